"""Reading and writing volumes with SimpleITK, with the checks clinical data needs."""

from __future__ import annotations

import gzip
import itertools
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffSegCore.errors import InputError, RuntimeFault
from DiffSegCore.io.atomic import atomic_path
from DiffSegCore.io.cases import VOLUME_SUFFIXES
from DiffSegCore.io.sanity import check_spacing

NIFTI2_HEADER = 540


class _ItkMessages(sitk.LoggerBase):
    """Collects ITK's (and through it GDCM's) messages instead of letting them print blocks on stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def DisplayText(self, text: str) -> None:
        if text.strip():
            self.lines.append(_one_line(text))

    DisplayWarningText = DisplayErrorText = DisplayGenericOutputText = DisplayDebugText = DisplayText


def _one_line(text: str) -> str:
    """The message of an ITK block ('WARNING: In <file>, line n' / '<Class> (0x...): message')."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("WARNING: In", "ERROR: In"))]
    message = re.sub(r"^\w+ \(0x[0-9a-f]+\):\s*", "", " ".join(lines))
    return re.sub(r"\s+", " ", message)[:200]


@contextmanager
def _itk_messages(path: Path, notes: list[str] | None) -> Iterator[None]:
    """ITK's messages while reading `path`, one line each: into `notes`, or else as Python warnings."""
    logger = _ItkMessages()
    previous = logger.SetAsGlobalITKLogger()
    try:
        yield
    finally:
        previous.SetAsGlobalITKLogger()
        for line in logger.lines:
            message = f"reading {path}: {line}"
            if notes is None:
                warnings.warn(message, stacklevel=4)
            else:
                notes.append(message)


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder} is a folder without volumes or a DICOM series; pass image files or a DICOM folder")
    if len(series) > 1:
        raise InputError(f"{folder} holds {len(series)} DICOM series; put each series in its own folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def _itk_reason(exc: RuntimeError) -> str:
    """The informative line of a SimpleITK exception (not the source location or a stale errno)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Exception thrown", "Reason:"))] or lines
    reason = re.sub(r"^(ITK ERROR|sitk::ERROR):\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", lines[-1] if lines else "")
    return reason[:160] or "unknown reason"


def _nifti_header(head: bytes) -> tuple[str, list[int], int, int, int] | None:
    """(byte order, axis sizes, datatype, bitpix, vox_offset) from raw NIfTI-1/2 header bytes, else None."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(f"{order}i", head[:4])[0] == 348:
            dims = struct.unpack(f"{order}8h", head[40:56])
            datatype, bitpix = struct.unpack(f"{order}2h", head[70:74])
            offset = struct.unpack(f"{order}f", head[108:112])[0]
        elif len(head) >= NIFTI2_HEADER and struct.unpack(f"{order}i", head[:4])[0] == NIFTI2_HEADER:
            datatype, bitpix = struct.unpack(f"{order}2h", head[12:16])
            dims = struct.unpack(f"{order}8q", head[16:80])
            offset = struct.unpack(f"{order}q", head[168:176])[0]
        else:
            continue
        return order, list(dims[1 : 1 + min(max(dims[0], 0), 7)]), datatype, bitpix, int(offset)
    return None


def check_nifti(path: Path) -> None:
    """Refuse a NIfTI file that is cut short, has a zero-sized axis, or holds NaN/Inf voxels.

    Hand-written because ITK's NIfTI reader does not fail on any of these: it fills missing voxels
    with zeros, reads a zero size as 1 and turns NaN/Inf into 0 (other formats fail on their own).
    """
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            head = stream.read(NIFTI2_HEADER)
            header = _nifti_header(head)
            if header is None:
                return
            order, dims, datatype, bitpix, offset = header
            if 0 in dims:
                raise InputError(f"{path} is empty (size {' x '.join(map(str, dims))}); pass a non-empty volume")
            floats = np.dtype(f"{order}f{bitpix // 8}") if datatype in (16, 64) else None  # float32, float64
            stored, pending, finite = len(head), head[offset:], True
            stored += len(stream.read(max(offset - len(head), 0)))  # header extensions beyond the first bytes
            for chunk in itertools.chain(iter(lambda: stream.read(1 << 20), b""), [b""]):
                stored += len(chunk)
                if floats is not None:
                    pending += chunk
                    usable = len(pending) // floats.itemsize * floats.itemsize
                    finite = finite and bool(np.isfinite(np.frombuffer(pending[:usable], floats)).all())
                    pending = pending[usable:]
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{path} is truncated or corrupt ({exc}); copy or export the file again") from None
    expected = offset + math.prod(dims) * bitpix // 8
    if stored < expected:
        raise InputError(f"{path} is truncated ({stored} of {expected} bytes); copy or export the file again")
    if not finite:
        raise InputError(f"{path} contains NaN or infinite voxels; fix or mask them before segmenting")


def read_image(path: str | Path, notes: list[str] | None = None) -> sitk.Image:
    """Read a file SimpleITK understands, or a DICOM series folder.

    ITK's warnings (non-uniform slices, odd headers) become one line each, added to `notes` when
    given, else issued as Python warnings.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}; check the path")
    try:
        with _itk_messages(path, notes):
            return _read(path)
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        if "Unable to determine ImageIO reader" in reason:
            raise InputError(
                f"{path} is not an image SimpleITK can read; pass a NIfTI, NRRD, MetaImage file or a DICOM folder"
            ) from None
        raise InputError(
            f"cannot read {path} as an image ({reason}); check that the file is complete and a volume format"
        ) from None


def _read(path: Path) -> sitk.Image:
    if path.is_dir():
        return _read_dicom_series(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    check_nifti(path)
    return reader.Execute()


def read_volume(path: str | Path, notes: list[str] | None = None) -> sitk.Image:
    """Read a 3D scalar volume, refusing 2D, 4D, vector and empty images and impossible spacings with a
    clear message; `notes` as in read_image."""
    image = read_image(path, notes)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; the model needs scalar volumes, "
            "pass each channel as its own file"
        )
    if image.GetDimension() == 4:
        raise InputError(f"{path} is a 4D (time series) image; extract one 3D volume first")
    if image.GetDimension() != 3:
        raise InputError(f"{path} is a {image.GetDimension()}D image; the model needs a 3D volume")
    if 0 in image.GetSize():
        raise InputError(f"{path} is empty (size {image.GetSize()}); pass a non-empty volume")
    if 1 in image.GetSize():
        size = " x ".join(map(str, image.GetSize()))
        raise InputError(f"{path} is a single slice ({size} voxels); the model needs a 3D volume")
    check_spacing(image, path)
    return image


def check_voxels(image: sitk.Image, path: str | Path) -> None:
    """Refuse NaN/Inf voxels and constant volumes: both would give a meaningless segmentation."""
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise InputError(f"{path} contains NaN or infinite voxels; fix or mask them before segmenting")
    low, high = voxels.min(), voxels.max()
    if low == high:
        raise InputError(f"{path} is constant (every voxel is {low}); it holds no image to segment, check the file")


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def read_channels(paths: list[Path], notes: list[str] | None = None) -> list[sitk.Image]:
    """Read one volume per channel and check they share one geometry; `notes` as in read_image."""
    images = [read_volume(p, notes) for p in paths]
    for path, image in zip(paths, images):
        check_voxels(image, path)
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


def _check_written(path: Path) -> None:
    """Read back the header and byte count: ITK's NIfTI writer reports a short write (disk full) only on stderr."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    check_nifti(path)
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def write_image_atomic(image: sitk.Image, path: str | Path) -> Path:
    """Write to a temporary name in the target folder, check it, then rename: never a half-written file."""
    path = Path(path)
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    try:
        with atomic_path(path, suffix=suffix) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
            _check_written(tmp)
    except (RuntimeError, OSError, InputError) as exc:
        if isinstance(exc, RuntimeError):
            reason = _itk_reason(exc)
        elif isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
        else:
            reason = "the written file came out incomplete"
        raise RuntimeFault(f"cannot write {path} ({reason}); check free disk space and write permission") from None
    return path
