"""Training data: find image/label cases, check them, and split them deterministically.

Accepted sources: an MSD or nnU-Net folder (imagesTr/, labelsTr/, optional dataset.json; several
channels per case as `_0000`, `_0001` files or as the modalities of one 4D MSD file) or a JSON/CSV
list of image/label pairs.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from DiffSegCore.errors import InputError
from DiffSegCore.io.cases import case_name, group_by_case, volume_files


@dataclass(frozen=True)
class Case:
    """One training case: its channel files (one 4D file for MSD modalities) and its label file."""

    name: str
    images: tuple[Path, ...]
    label: Path | None
    channels: int = 1

    def to_json(self) -> dict:
        return {"name": self.name, "images": [str(p) for p in self.images], "label": str(self.label or "")}


@dataclass
class CaseProblem:
    case: str
    reason: str


@dataclass
class Dataset:
    """The cases of a source, with the channel names and class labels it declares (if any)."""

    cases: list[Case]
    channel_names: list[str] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)


def _dataset_json(folder: Path) -> dict:
    path = folder / "dataset.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); fix or remove it") from None


def _declared(meta: dict) -> tuple[list[str], dict[int, str]]:
    """Channel names and labels from an MSD ('modality') or nnU-Net v2 ('channel_names') dataset.json."""
    channels = meta.get("channel_names") or meta.get("modality") or {}
    names = [str(channels[k]) for k in sorted(channels, key=int)]
    labels = meta.get("labels") or {}
    if labels and all(str(k).isdigit() for k in labels):  # MSD: {"1": "Anterior"}
        parsed = {int(k): str(v) for k, v in labels.items()}
    else:  # nnU-Net v2: {"Anterior": 1}
        parsed = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
    parsed.pop(0, None)
    return names, parsed


def _from_folder(folder: Path) -> Dataset:
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not images_dir.is_dir():
        raise InputError(f"{folder} has no imagesTr/ folder; pass an MSD/nnU-Net dataset folder or a JSON/CSV list")
    channel_names, labels = _declared(_dataset_json(folder))
    groups = group_by_case(volume_files(images_dir))
    label_files = {name: files[0] for name, files in group_by_case(volume_files(labels_dir)).items()} if labels_dir.is_dir() else {}
    cases = []
    for name, files in groups.items():
        # MSD keeps all modalities in one 4D file; nnU-Net gives one file per channel (_0000, _0001, ...).
        channels = len(channel_names) if len(files) == 1 and len(channel_names) > 1 else len(files)
        cases.append(Case(name, tuple(sorted(files)), label_files.get(name), channels))
    return Dataset(cases, channel_names, labels)


def _pair(entry: dict, base: Path, where: str) -> Case:
    images = entry.get("image") or entry.get("images")
    if not images:
        raise InputError(f"{where} has no 'image'; each entry needs 'image' (one path or a list) and 'label'")
    if isinstance(images, str):
        images = [p for p in images.split(";") if p]
    paths = tuple((base / p).resolve() for p in images)
    label = entry.get("label")
    return Case(case_name(paths[0]), paths, (base / label).resolve() if label else None, len(paths))


def _from_list(path: Path) -> Dataset:
    base = path.parent
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and "image" not in rows[0]:
            raise InputError(f"{path} needs a header with 'image' and 'label' columns (channels separated by ';')")
        return Dataset([_pair(row, base, f"{path} row {i + 2}") for i, row in enumerate(rows)])
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    entries = data.get("training", data.get("cases")) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(f"{path} must hold a list of {{'image', 'label'}} entries (or a 'training' list)")
    return Dataset([_pair(e, base, f"{path} entry {i + 1}") for i, e in enumerate(entries)])


def find_cases(source: str | Path) -> Dataset:
    """All cases of a dataset folder or JSON/CSV list, sorted by name; duplicates refused."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"training data not found: {source}")
    dataset = _from_folder(source) if source.is_dir() else _from_list(source)
    if not dataset.cases:
        raise InputError(f"no cases found in {source}")
    names = [c.name for c in dataset.cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"case names must be unique; {source} repeats {', '.join(duplicates[:5])}")
    return dataset


def _header(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _geometry(reader) -> tuple:
    size = reader.GetSize()[:3]
    return size, reader.GetSpacing()[:3], reader.GetOrigin()[:3], reader.GetDirection()


def _close(a: tuple, b: tuple, tol: float = 1e-4) -> bool:
    return a[0] == b[0] and all(abs(x - y) <= tol for p, q in zip(a[1:], b[1:]) for x, y in zip(p, q))


def check_case(case: Case) -> str | None:
    """Why a case cannot be used for training (missing files, geometry mismatch), or None."""
    if case.label is None:
        return "no label file"
    for path in (*case.images, case.label):
        if not path.exists():
            return f"missing file {path}"
    try:
        headers = [_header(p) for p in case.images]
        label = _header(case.label)
    except RuntimeError as exc:
        return f"unreadable file ({str(exc).strip().splitlines()[-1][:100]})"
    reference = _geometry(headers[0])
    for path, header in zip(case.images[1:], headers[1:]):
        if not _close(_geometry(header), reference):
            return f"channel {path.name} has a different geometry from {case.images[0].name}"
    if not _close(_geometry(label), reference):
        return f"label geometry {_geometry(label)[0]} does not match the image {reference[0]}"
    return None


def usable_cases(cases: list[Case], on_problem: str = "skip", log=print) -> list[Case]:
    """Check every case; report problems case by case, then skip them or refuse the whole set."""
    problems = [CaseProblem(c.name, reason) for c in cases if (reason := check_case(c))]
    for problem in problems:
        log(f"case {problem.case}: {problem.reason}")
    if problems and on_problem == "refuse":
        raise InputError(
            f"{len(problems)} of {len(cases)} cases cannot be used (listed above); fix them, or leave out --refuse-bad-cases to skip them"
        )
    bad = {p.case for p in problems}
    kept = [c for c in cases if c.name not in bad]
    if not kept:
        raise InputError("no usable cases remain after the checks listed above")
    if problems:
        log(f"skipping {len(problems)} case(s); training on {len(kept)}")
    return kept


def split_cases(names: list[str], validation_fraction: float, seed: int) -> dict:
    """A deterministic train/validation split: sorted names shuffled by `seed`."""
    if not 0 <= validation_fraction < 1:
        raise InputError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    count = round(len(order) * validation_fraction)
    if validation_fraction > 0 and len(order) > 1:
        count = min(max(count, 1), len(order) - 1)
    return {
        "seed": seed,
        "validation_fraction": validation_fraction,
        "train": sorted(order[count:]),
        "validation": sorted(order[:count]),
    }
