"""Locate the project's Resources folder (registry, bundled model, sample data)."""

import os
from pathlib import Path


def resources_dir() -> Path:
    """DIFFSEG_RESOURCES if set, else the Resources folder beside the DiffSegCore package.

    The same relative layout holds in the source tree and in the installed Slicer extension.
    """
    override = os.environ.get("DIFFSEG_RESOURCES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "Resources"


def resource_path(*parts: str) -> Path:
    """Path of a file under the Resources folder."""
    return resources_dir().joinpath(*parts)
