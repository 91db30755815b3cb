"""The Slicer GUI process never loads torch or MONAI, and lists the bundled models before DiffSeg's packages exist."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

# Not in a fresh Slicer: what DiffSeg installs. Blocked here as if missing (numpy, SimpleITK and
# packaging ship with Slicer 5.10).
NOT_IN_SLICER = ("torch", "monai", "jsonschema", "platformdirs", "filelock", "tqdm", "requests", "safetensors", "scipy")

# What the panel does before a run: import its modules, list the models, show a model's settings and estimate.
GUI_SESSION = f"""
import sys
sys.modules.update(dict.fromkeys({NOT_IN_SLICER!r}))  # None: import fails, find_spec says absent
sys.path[:0] = [{str(ROOT / "DiffSegExtension")!r}, {str(ROOT)!r}]
from DiffSegLib import dependencies, logic, parameters, scene, widgets, worker
from DiffSegCore import events, resources, settings
from DiffSegCore.models.registry import list_models
models = list_models()
bundled = [m for m in models if m.current.installed][0]
shown = logic.model_settings(str(bundled.current.path))
flags = shown.to_flags()
estimate = logic.describe_estimate(logic.model_meta(str(bundled.current.path)), (240, 240, 155), (1.0, 1.0, 1.0), {{}})
assert "GB of memory" in estimate, estimate  # the panel's memory estimate is torch-free too
print(bundled.id, shown.steps, len(flags) > 0, sorted(m for m in {NOT_IN_SLICER!r} if sys.modules[m] is not None))
"""


def test_the_gui_process_lists_models_and_settings_without_the_packages_diffseg_installs(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}  # no DIFFSEG_HOME: platformdirs would be needed to find the cache
    result = subprocess.run([sys.executable, "-c", GUI_SESSION], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-4:] == ["hippocampus-recycling-x0", "1", "True", "[]"], result.stdout
