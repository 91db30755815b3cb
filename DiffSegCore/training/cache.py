"""On-disk cache of cases preprocessed to a model spec (spacing, normalisation).

One .npz per case, named by a hash of the spec and of the source files (path, size, mtime), so a
changed spec or file is preprocessed again and an unchanged one never is. Files are written under
a temporary name and renamed, so an interrupted run never leaves a corrupt entry.
Loading needs numpy only; building reads images, so its I/O modules are imported there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from DiffSegCore.errors import InputError
from DiffSegCore.io.atomic import atomic_path, write_text

CACHE_VERSION = 1


@dataclass(frozen=True)
class CachedCase:
    """A case preprocessed to a model spec, stored as one .npz at `path`."""

    name: str
    path: Path

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, z, y, x) float32, label (z, y, x) uint8)."""
        with np.load(self.path) as data:
            return data["image"], data["label"]


def spec_of(meta: dict) -> dict:
    """The part of a model's metadata that determines preprocessing."""
    return {"channels": [c.get("normalisation", {}) for c in meta["channels"]], "spacing": meta.get("spacing")}


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def case_key(case, spec: dict) -> str:
    payload = {
        "version": CACHE_VERSION,
        "spec": spec,
        "files": [_file_stamp(p) for p in (*case.images, case.label)],
        "channels": case.channels,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _read_channels(case) -> list:
    import SimpleITK as sitk

    from DiffSegCore.io.volumes import read_channels, read_image

    if case.channels > 1 and len(case.images) == 1:
        # MSD stores the modalities of a case as the 4th axis of one file.
        image = read_image(case.images[0])
        if image.GetDimension() != 4 or image.GetSize()[3] != case.channels:
            raise InputError(f"{case.images[0]} should hold {case.channels} modalities along a 4th axis")
        size = list(image.GetSize())
        return [sitk.Extract(image, [*size[:3], 0], [0, 0, 0, c]) for c in range(case.channels)]
    return read_channels(list(case.images))


def _label_array(label_image, reference, case_name: str) -> np.ndarray:
    import SimpleITK as sitk

    from DiffSegCore.io.preprocess import resample_to_spacing

    label = resample_to_spacing(label_image, list(reference.GetSpacing()), is_label=True)
    values = sitk.GetArrayFromImage(label)
    rounded = np.rint(values)
    # Some published label files are float32; accept them when they hold whole numbers only.
    if not np.allclose(values, rounded, atol=1e-3) or rounded.min() < 0 or rounded.max() > 255:
        raise InputError(f"case {case_name}: the label file holds values that are not class numbers 0..255")
    if rounded.shape != tuple(reversed(reference.GetSize())):
        raise InputError(f"case {case_name}: label and image grids differ after resampling")
    return rounded.astype(np.uint8)


def preprocess_case(case, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Read a case and bring it to the model spec: (image (C, z, y, x) float32, label uint8)."""
    from DiffSegCore.io.preprocess import prepare_image
    from DiffSegCore.io.volumes import read_volume

    image, grid = prepare_image(_read_channels(case), meta)
    return image.numpy(), _label_array(read_volume(case.label), grid, case.name)


def build_cache(cases: list, meta: dict, cache_dir: str | Path, log: Callable[[str], None] = print) -> list[CachedCase]:
    """Preprocess the cases not yet cached for this spec; return all of them as cached entries."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    spec = spec_of(meta)
    cached, made = [], 0
    for case in cases:
        path = cache_dir / f"{case.name}-{case_key(case, spec)}.npz"
        if not path.exists():
            image, label = preprocess_case(case, meta)
            with atomic_path(path) as tmp:  # path ends in .npz, so numpy writes to tmp itself
                np.savez(tmp, image=image, label=label)
            made += 1
        cached.append(CachedCase(case.name, path))
    log(f"preprocessing cache {cache_dir}: {made} case(s) prepared, {len(cases) - made} reused")
    return cached


def write_index(path: Path, cached: list[CachedCase]) -> None:
    """The list of cached cases of a run, so training can be restarted from the cache alone."""
    write_text(path, json.dumps({c.name: str(c.path.resolve()) for c in cached}, indent=1))


def read_index(path: Path) -> list[CachedCase]:
    return [CachedCase(name, Path(p)) for name, p in json.loads(path.read_text()).items()]
