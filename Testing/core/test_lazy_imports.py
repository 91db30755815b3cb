"""Commands that do not need torch do not import it: `diffseg --help` answers without loading torch or MONAI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from DiffSegCore.settings import DEFAULT_MODEL
from Testing.core.conftest import REPO

HEAVY = ("torch", "monai", "SimpleITK")

# Runs the real entry point in a fresh interpreter, then prints the modules it loaded.
PROBE = """
import json, sys
from DiffSegCore.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def loaded_modules(tmp_path, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=REPO,
        env={**os.environ, "DIFFSEG_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    return {"code": probe["code"], "loaded": [m for m in HEAVY if m in probe["modules"]]}


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["models", "list"],
        ["models", "info", DEFAULT_MODEL],
        ["segment", "--help"],
        ["train", "--help"],
        ["evaluate", "--help"],
    ],
    ids=" ".join,
)
def test_commands_that_need_no_network_do_not_import_torch(tmp_path, args):
    probe = loaded_modules(tmp_path, *args)
    assert probe["code"] in (0, None), probe
    assert probe["loaded"] == [], f"diffseg {' '.join(args)} imported {probe['loaded']}"


def test_the_probe_sees_torch_when_a_command_loads_it(tmp_path, tiny_bundle, small_case):
    """The same probe on a real segmentation does report torch (so the check above can fail)."""
    out = tmp_path / "out"
    probe = loaded_modules(
        tmp_path, "segment", str(small_case), "--model", str(tiny_bundle), "--output-dir", str(out),
        "--steps", "1", "--ensemble", "1", "--progress", "none",
    )  # fmt: skip
    assert probe["code"] == 0 and "torch" in probe["loaded"], probe
