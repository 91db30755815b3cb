"""One case end to end: read, preprocess, sample, reduce, resample back, write outputs."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DiffSegCore.errors import InputError, RuntimeFault
from DiffSegCore.inference.ensemble import SegmentSettings, predict_volume, resolve_device
from DiffSegCore.io.preprocess import intensity_warnings, prepare_image, resample_like, resample_to_spacing
from DiffSegCore.io.preview import write_preview
from DiffSegCore.io.volumes import from_array, read_channels, read_volume, same_geometry, to_array, write_image_atomic
from DiffSegCore.models.bundle import ModelBundle
from DiffSegCore.progress import Progress


@dataclass
class OutputOptions:
    """Which extra outputs to write beside the segmentation, uncertainty and run record."""

    save_probabilities: bool = False
    save_members: bool = False
    preview: bool = False
    overwrite: bool = False


def output_names(case: str, options: OutputOptions, members: int) -> dict[str, str]:
    names = {"segmentation": f"{case}_seg.nii.gz", "uncertainty": f"{case}_uncertainty.nii.gz"}
    if options.save_probabilities:
        names["probabilities"] = f"{case}_probabilities.nii.gz"
        names["entropy"] = f"{case}_entropy.nii.gz"
    if options.save_members:
        names.update({f"member{k}": f"{case}_member{k}_seg.nii.gz" for k in range(1, members + 1)})
    if options.preview:
        names["preview"] = f"{case}_preview.png"
    names["run"] = f"{case}_run.json"
    return names


def read_preseg_labels(path: Path, reference: sitk.Image, num_classes: int, spacing) -> torch.Tensor:
    """A user's label map as the starting mask: same grid as the input, known labels only."""
    labels = read_volume(path)
    if not same_geometry(labels, reference):
        raise InputError(
            f"pre-segmentation {path} does not share the input's geometry; resample it onto the input first"
        )
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    unknown = [v for v in values.tolist() if v != int(v) or not 0 <= v < num_classes]
    if unknown:
        raise InputError(
            f"pre-segmentation {path} holds labels {unknown[:5]} that the model does not know (it knows 0..{num_classes - 1})"
        )
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    return torch.from_numpy(sitk.GetArrayFromImage(resample_to_spacing(labels, spacing, is_label=True))).long()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _results_on_input_grid(result, grid: sitk.Image, reference: sitk.Image, options: OutputOptions) -> dict:
    """The images to write, each resampled back onto the input's exact grid."""

    def back(array: np.ndarray, is_label: bool, is_vector: bool = False) -> sitk.Image:
        return resample_like(from_array(array, grid, is_vector), reference, is_label)

    images = {
        "segmentation": back(result.labels.numpy().astype(np.uint8), True),
        "uncertainty": back(result.variance.numpy().astype(np.float32), False),
    }
    if options.save_probabilities:
        images["probabilities"] = back(np.moveaxis(result.mean_probs.numpy(), 0, -1).astype(np.float32), False, True)
        images["entropy"] = back(result.entropy.numpy().astype(np.float32), False)
    if options.save_members:
        for k, member in enumerate(result.member_labels.numpy(), start=1):
            images[f"member{k}"] = back(member.astype(np.uint8), True)
    return images


def segment_case(
    bundle: ModelBundle,
    inputs: list[Path],
    case: str,
    output_dir: Path,
    settings: SegmentSettings,
    options: OutputOptions,
    progress: Progress,
) -> dict[str, Path]:
    """Segment one case; every output appears at once at the end, or none does."""
    settings = settings.with_defaults(bundle.meta)
    if options.save_members:
        settings.keep_members = True
    names = output_names(case, options, settings.ensemble)
    targets = {key: output_dir / name for key, name in names.items()}
    existing = [p for p in targets.values() if p.exists()]
    if existing and not options.overwrite:
        raise InputError(f"{existing[0]} already exists; choose another --output-dir or pass --overwrite")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(timings.get(stage, 0.0) + now - clock, 4)
        clock = now

    progress.report("load", f"reading {', '.join(p.name for p in inputs)}")
    images = read_channels(inputs)
    warnings = intensity_warnings(images, bundle.meta)
    for warning in warnings:
        progress.note(f"warning: {warning}")
    reference = images[0]
    preseg = None
    if settings.preseg not in ("none", "model"):
        preseg = read_preseg_labels(Path(settings.preseg), reference, bundle.num_classes, bundle.meta.get("spacing"))
    lap("load")
    progress.report("preprocess", "resampling and normalising")
    image, grid = prepare_image(images, bundle.meta)
    lap("preprocess")
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = predict_volume(bundle, image, settings, preseg, progress)
    lap("sample")
    progress.report("write", "writing outputs")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{case}.", dir=output_dir))
    except OSError as exc:
        raise RuntimeFault(f"cannot write in {output_dir} ({exc.strerror}); check write permission") from None
    try:
        results = _results_on_input_grid(result, grid, reference, options)
        for key, img in results.items():
            write_image_atomic(img, staging / names[key])
        if options.preview:
            colors = [c.get("color", [1, 0, 0]) for c in bundle.meta["classes"]]
            write_preview(
                to_array(reference),
                sitk.GetArrayViewFromImage(results["segmentation"]),
                sitk.GetArrayViewFromImage(results["uncertainty"]),
                colors,
                staging / names["preview"],
            )
        lap("write")
        record = {**run_record(bundle, inputs, settings, options, timings, device, result), "warnings": warnings}
        (staging / names["run"]).write_text(json.dumps(record, indent=2) + "\n")
        _publish(staging, names, targets, options.overwrite)
    except OSError as exc:
        raise RuntimeFault(
            f"cannot write the outputs of {case} in {output_dir} ({exc.strerror or exc}); "
            "check free disk space and write permission"
        ) from None
    except RuntimeFault as exc:  # name the output the user asked for, not its staged copy
        raise RuntimeFault(str(exc).replace(str(staging), str(output_dir))) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def _publish(staging: Path, names: dict[str, str], targets: dict[str, Path], overwrite: bool) -> None:
    """Move the staged outputs into place; if that is cut short, take back the ones already moved."""
    existing = [p for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} appeared during the run; choose another --output-dir or pass --overwrite")
    moved: list[Path] = []
    try:
        for key, name in names.items():
            os.replace(staging / name, targets[key])
            moved.append(targets[key])
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise


def run_record(bundle, inputs, settings, options, timings, device, result) -> dict:
    """What was run, how, how long it took and how much memory it used."""
    return {
        "model": {"id": bundle.meta["id"], "version": bundle.meta["version"], "path": str(bundle.path)},
        "inputs": [str(p) for p in inputs],
        "settings": asdict(settings),
        "outputs": asdict(options),
        "timings_s": timings,
        "device": str(device),
        "torch": torch.__version__,
        "host": platform.node(),
        "peak_memory_bytes": peak_memory_bytes(device),
        "summary": {
            "voxels_per_class": {int(k): int(v) for k, v in zip(*np.unique(result.labels.numpy(), return_counts=True))},
            "mean_uncertainty": float(result.variance.mean()),
            "mean_entropy": float(result.entropy.mean()),
        },
    }
