"""Fixtures for the core suites: small real volumes, tiny real bundles and the CLI run in-process or as a process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from Testing.conftest import make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def events(self) -> list[dict]:
        """The --progress json lines."""
        return [json.loads(line) for line in self.out.splitlines() if line.startswith("{")]


def assert_one_line_error(result: CliResult, *words: str, code: int = 2) -> str:
    """Exit code, exactly one `error:` line (the last one), no traceback; returns the message."""
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.err
    message = errors[0].lower()
    for word in words:
        assert word.lower() in message, (word, errors[0])
    return errors[0]


def folder_entries(folder: Path) -> list[str]:
    """Everything in a folder, hidden temporary files included."""
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run `diffseg` in this process (the real entry point), with a private model home."""
    from DiffSegCore.cli.main import main

    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path / "home"))

    def run(*args) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def cli_process(*args, env: dict | None = None, **popen) -> subprocess.Popen:
    """`python -m DiffSegCore ...` as a real child process with piped text output."""
    return subprocess.Popen(
        [sys.executable, "-m", "DiffSegCore", *map(str, args)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    """Write a (z, y, x) array as a real image file with the given geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in direction))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="session")
def small_case(hippocampus_case, tmp_path_factory) -> Path:
    """A 20 x 24 x 16 crop of a real hippocampus MR volume: real intensities, fast to segment."""
    image = sitk.ReadImage(str(hippocampus_case[0]))
    crop = image[8:28, 14:38, 10:26]
    path = tmp_path_factory.mktemp("cases") / "small_001.nii.gz"
    sitk.WriteImage(crop, str(path))
    return path


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """Tiny real bundles with metadata overrides, built once per session per variant."""
    built: dict[str, Path] = {}

    def make(name: str, **overrides) -> Path:
        if name not in built:
            built[name] = make_tiny_bundle(tmp_path_factory.mktemp("bundles") / name, **overrides)
        return built[name]

    return make


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, read_only: bool = False):
    """A real, small tmpfs mounted on `folder` (needs root and mount rights); yields False where unavailable."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
