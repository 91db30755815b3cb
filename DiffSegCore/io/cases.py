"""Case naming and grouping: which files belong to which case (nnU-Net `_0000` channel suffixes).

Stdlib only, so the Slicer GUI process (batch script) can group files without SimpleITK or torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from DiffSegCore.errors import InputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


def case_name(path: str | Path) -> str:
    """File name without volume extension and without an nnU-Net `_0000` channel suffix."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return CHANNEL_SUFFIX.sub("", name)


def is_volume_file(path: Path) -> bool:
    """A regular volume file; hidden files (macOS `._` copies of MSD archives look like volumes) are not."""
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(VOLUME_SUFFIXES)


def volume_files(folder: Path) -> list[Path]:
    """The volume files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_volume_file(p))


def group_by_case(files: list[Path]) -> dict[str, list[Path]]:
    """Files grouped by case name, each case's channels in file-name order, cases sorted by name."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(case_name(path), []).append(path)
    return {name: sorted(groups[name], key=lambda p: p.name) for name in sorted(groups)}


def collect_cases(inputs: list[str | Path]) -> dict[str, list[Path]]:
    """Command-line inputs as cases: files by case name, folders of volumes by their files, DICOM folders whole."""
    files: list[Path] = []
    dicom: dict[str, list[Path]] = {}
    for item in map(Path, inputs):
        if not item.exists():
            raise InputError(f"input not found: {item}; check the path")
        if item.is_dir():
            found = volume_files(item)
            if not found:
                dicom[item.name] = [item]  # a DICOM series folder
            files += found
        else:
            files.append(item)
    return {**dicom, **group_by_case(files)}


def channel_mismatch(name: str, paths: list[Path], meta: dict) -> str:
    """Why a case's files do not fit the model's input channels ('' when they do)."""
    expected = len(meta["channels"])
    if len(paths) == expected:
        return ""
    return (
        f"case {name} has {len(paths)} channel file(s) but model {meta['id']} needs {expected}; "
        "name channel files <case>_0000, <case>_0001, ..."
    )
