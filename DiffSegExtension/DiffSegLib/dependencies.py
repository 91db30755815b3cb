"""The Python packages DiffSeg needs in Slicer: which are missing or too old, and how to install them.

PyTorch comes from the PyTorch extension (PyTorchUtils picks the build that matches the GPU
driver); the other packages come from PyPI through pip in a child process, so the panel shows
pip's output while it runs. SimpleITK and numpy ship with Slicer, and so does `packaging`
(Slicer 5.10's python-pythonqt-requirements), which compares the versions here. Keep
REQUIREMENTS in step with `dependencies` in pyproject.toml (Testing/scene/test_dependencies.py
checks it).
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

# distribution name -> minimum version
REQUIREMENTS = {
    "monai": "1.4",
    "scipy": "1.10",  # MONAI's HD95 and morphology
    "safetensors": "0.4",
    "platformdirs": "4",
    "jsonschema": "4.18",
    "filelock": "3.12",
    "requests": "2.31",
    "tqdm": "4.66",
    "matplotlib": "3.7",
}
TORCH = "torch"
TORCH_MINIMUM = "2.2"


class DependencyError(RuntimeError):
    """Dependencies are missing and were not installed (declined, failed, or the PyTorch extension is absent)."""


@dataclass(frozen=True)
class Problem:
    """A package that is missing (found None) or older than DiffSeg needs."""

    name: str
    minimum: str
    found: str | None

    @property
    def requirement(self) -> str:
        """pip's requirement specifier."""
        return f"{self.name}>={self.minimum}"

    def describe(self) -> str:
        state = "not installed" if self.found is None else f"{self.found} installed"
        return f"{self.name} >= {self.minimum} ({state})"


def _problem(name: str, minimum: str) -> Problem | None:
    try:
        found = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Problem(name, minimum, None)
    try:
        too_old = Version(found) < Version(minimum)
    except InvalidVersion:
        too_old = False  # a local build with an odd version string: trust it rather than reinstall over it
    return Problem(name, minimum, found) if too_old else None


def check_packages(requirements: dict[str, str] | None = None) -> list[Problem]:
    """The pip-installable packages that are missing or too old here (torch not included)."""
    found = [_problem(name, minimum) for name, minimum in (requirements or REQUIREMENTS).items()]
    return [problem for problem in found if problem is not None]


def check_torch() -> Problem | None:
    return _problem(TORCH, TORCH_MINIMUM)


def check_all() -> list[Problem]:
    """Everything missing or too old, torch first (it is installed through its own extension)."""
    torch = check_torch()
    return ([torch] if torch else []) + check_packages()


def summary(problems: list[Problem]) -> str:
    """The line the panel shows above its Install button."""
    return "DiffSeg needs Python packages that are missing or too old: " + "; ".join(p.describe() for p in problems)


def pip_arguments(problems: list[Problem]) -> list[str]:
    """Arguments after `python -m` that install the given packages in one pip call (so pip resolves them together)."""
    return ["pip", "install", "--progress-bar", "off", *(p.requirement for p in problems if p.name != TORCH)]


def install_torch(ask: bool = True) -> None:
    """Install PyTorch through the PyTorch extension's PyTorchUtils (it asks and shows its own progress)."""
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "DiffSeg needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, restart Slicer "
            "and open DiffSeg again."
        ) from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=ask, torchVersionRequirement=f">={TORCH_MINIMUM}"
    )
    if torch is None:
        raise DependencyError("PyTorch was not installed, so DiffSeg cannot run. Click Install to try again.")


def ensure_dependencies() -> None:
    """Install whatever is missing without asking, blocking (self-test and batch scripts), or raise DependencyError."""
    import slicer

    if check_torch():
        install_torch(ask=False)
    problems = check_packages()
    if not problems:
        return
    logging.info("DiffSeg: installing %s", " ".join(p.requirement for p in problems))
    slicer.util.pip_install(pip_arguments(problems)[2:])
    still = check_packages()
    if still:
        raise DependencyError(f"Installing failed for {summary(still)}; see the Python console for pip's output.")
