"""Install what the core needs into Slicer's Python on first use, after asking the user.

PyTorch comes from the PyTorch extension (PyTorchUtils picks the build that matches the GPU
driver); the other packages come from PyPI through slicer.util.pip_install. SimpleITK and numpy
ship with Slicer. Keep REQUIREMENTS in step with `dependencies` in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import logging

# import name -> pip requirement
REQUIREMENTS = {
    "monai": "monai>=1.4",
    "scipy": "scipy>=1.10",  # MONAI's HD95 and morphology
    "safetensors": "safetensors>=0.4",
    "platformdirs": "platformdirs>=4",
    "jsonschema": "jsonschema>=4.18",
    "filelock": "filelock>=3.12",
    "requests": "requests>=2.31",
    "tqdm": "tqdm>=4.66",
    "matplotlib": "matplotlib>=3.7",
}
TORCH_REQUIREMENT = ">=2.2"


class DependencyError(RuntimeError):
    """Dependencies are missing and were not installed (declined, or the PyTorch extension is absent)."""


def missing_packages() -> list[str]:
    """Pip requirements of the packages that cannot be imported here (torch excluded)."""
    return [spec for name, spec in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def ensure_dependencies(ask: bool = True) -> None:
    """Make torch and the other packages importable in Slicer, or raise DependencyError.

    Nothing is installed unless the user agrees; declining leaves the Python environment untouched.
    """
    import slicer

    if not torch_installed():
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError(
                "DiffSeg needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
                "restart Slicer and try again."
            ) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT
        )
        if torch is None:
            raise DependencyError("PyTorch was not installed, so DiffSeg cannot run. Click Apply again to install it.")
    missing = missing_packages()
    if not missing:
        return
    if ask and not slicer.util.confirmOkCancelDisplay(
        "DiffSeg needs these Python packages, which will now be downloaded and installed into Slicer "
        f"(a few minutes):\n\n{', '.join(missing)}",
        windowTitle="DiffSeg: install Python packages",
    ):
        raise DependencyError(
            "The Python packages DiffSeg needs were not installed, so it cannot run. Click Apply again to install them."
        )
    logging.info("DiffSeg: installing %s", " ".join(missing))
    # One pip call, so pip resolves all of them before installing any.
    slicer.util.pip_install(missing)
    still_missing = missing_packages()
    if still_missing:
        raise DependencyError(f"Installing {', '.join(still_missing)} failed; see the Python console for pip's output.")
