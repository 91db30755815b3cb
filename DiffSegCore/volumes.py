"""Reading and writing volumes with SimpleITK, with the checks clinical data needs."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError, RuntimeFault

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
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder} is a folder without volumes or a DICOM series; pass image files or a DICOM folder")
    if len(series) > 1:
        raise InputError(f"{folder} holds {len(series)} DICOM series; put each series in its own folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def read_image(path: str | Path) -> sitk.Image:
    """Read a file SimpleITK understands, or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}; check the path")
    try:
        return _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise InputError(
            f"cannot read {path} as an image ({reason[:160]}); check that the file is complete and a volume format"
        ) from None


def read_volume(path: str | Path) -> sitk.Image:
    """Read a 3D scalar volume, refusing 2D, 4D, vector and empty images with a clear message."""
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; the model needs scalar volumes, "
            "pass each channel as its own file"
        )
    if image.GetDimension() == 4:
        raise InputError(f"{path} is a 4D (time series) image; extract one 3D volume first")
    if image.GetDimension() != 3:
        raise InputError(f"{path} is a {image.GetDimension()}D image; the model needs a 3D volume")
    if min(image.GetSize()) < 1 or 0 in image.GetSize():
        raise InputError(f"{path} is empty (size {image.GetSize()}); pass a non-empty volume")
    return image


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def read_channels(paths: list[Path]) -> list[sitk.Image]:
    """Read one volume per channel and check they share one geometry."""
    images = [read_volume(p) for p in paths]
    for path, image in zip(paths[1:], images[1:]):
        if not same_geometry(images[0], image):
            raise InputError(
                f"channel {path} has a different geometry from {paths[0]}; resample the channels onto one grid first"
            )
    return images


def to_array(image: sitk.Image) -> np.ndarray:
    """Voxels as float32 in (z, y, x) order, refusing NaN or Inf."""
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise InputError("the volume contains NaN or infinite voxels; fix or mask them before segmenting")
    return array


def from_array(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """An image from (z, y, x[, c]) voxels with the reference's geometry."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(reference)
    return image


def write_image_atomic(image: sitk.Image, path: str | Path) -> Path:
    """Write to a temporary name in the target folder, then rename: never a half-written file."""
    path = Path(path)
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        os.replace(tmp, path)
    except RuntimeError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeFault(
            f"cannot write {path} ({str(exc).strip().splitlines()[-1][:120]}); check free disk space"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
