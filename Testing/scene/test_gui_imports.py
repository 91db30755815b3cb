"""The Slicer GUI process never loads torch or MONAI: it reads models and settings through torch-free modules."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

# What the panel does before a run: import its modules, list the models, show a model's settings.
GUI_SESSION = f"""
import sys
sys.path[:0] = [{str(ROOT / "DiffSegExtension")!r}, {str(ROOT)!r}]
from DiffSegLib import dependencies, logic, scene, widgets, worker
from DiffSegCore import events, resources, settings
from DiffSegCore.models.registry import list_models
models = list_models()
bundled = [m for m in models if m.current.installed][0]
shown = logic.model_settings(str(bundled.current.path))
flags = shown.to_flags()
print(shown.steps, len(flags) > 0, sorted(m for m in ("torch", "monai") if m in sys.modules))
"""


def test_the_gui_process_reads_models_and_settings_without_torch(tmp_path):
    env = {"DIFFSEG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", GUI_SESSION], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["1", "True", "[]"], result.stdout
