"""One case end to end: read, preprocess, sample, reduce, resample back, write outputs."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DiffSegCore.errors import InputError, RuntimeFault
from DiffSegCore.inference.ensemble import EnsembleResult, predict_volume
from DiffSegCore.inference.memory import model_grid_shape
from DiffSegCore.inference.plan import Plan, make_plan, resolve_device
from DiffSegCore.inference.review import segment_review
from DiffSegCore.io.atomic import owned_prefix
from DiffSegCore.io.preprocess import prepare_image, resample_like, resample_to_spacing
from DiffSegCore.io.sanity import input_warnings
from DiffSegCore.io.volumes import from_array, read_channels, read_volume, same_geometry, write_image_atomic
from DiffSegCore.models.bundle import ModelBundle, load_bundle
from DiffSegCore.models.metadata import read_meta
from DiffSegCore.models.registry import resolve_model
from DiffSegCore.progress import RunProgress
from DiffSegCore.settings import PRESEG_SOURCES, RunSettings, resolve, setting_warnings
from DiffSegCore.uncertainty import describe as describe_uncertainty


@dataclass
class OutputOptions:
    """Which extra outputs to write beside the segmentation, uncertainty and run record."""

    save_probabilities: bool = False
    save_members: bool = False
    preview: bool = False
    overwrite: bool = False


def open_model(ref: str, chosen: dict, progress: RunProgress) -> tuple[ModelBundle, RunSettings]:
    """A bundle path or registry id (downloaded on first use, with progress), its defaults merged into
    the user's `chosen` settings (the one place this happens for a run), loaded on the chosen device."""

    def on_bytes(done: int, total: int | None) -> None:
        progress.report("load", f"downloading {ref}: {done / 2**20:.1f} MiB", within=(done / total) if total else 0.0)

    path = resolve_model(ref, progress=on_bytes)
    settings = resolve(read_meta(path), chosen)
    return load_bundle(path, resolve_device(settings.device)), settings


def output_names(case: str, options: OutputOptions, members: int) -> dict[str, str]:
    """Output key -> file name of one case (the keys the final progress event reports paths under)."""
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


def plan_case(bundle: ModelBundle, inputs: list[Path], settings: RunSettings) -> tuple[tuple[int, ...], Plan]:
    """The model-grid shape (z, y, x) of one case and the plan a run would take for it, without sampling."""
    reference = read_channels(inputs)[0]
    shape = model_grid_shape(reference.GetSize(), reference.GetSpacing(), bundle.meta.get("spacing"))
    return shape, make_plan(bundle, shape, settings)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: allocated on the GPU, or resident on the host."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class CaseResult:
    """One case sampled: the ensemble's result on the model's grid, and what is needed to map it back."""

    result: EnsembleResult
    grid: sitk.Image  # the model-spacing grid the result lies on
    reference: sitk.Image  # the input's first channel: the grid outputs are written on
    settings: RunSettings  # as the case ran: the device actually used
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ReadCase:
    """One case read and brought to the model's spec, ready to sample (what can be read ahead of the network)."""

    image: torch.Tensor  # (C, z, y, x) channels on the model's grid, normalised
    grid: sitk.Image  # the model-spacing grid of `image`
    reference: sitk.Image  # the input's first channel
    preseg: torch.Tensor | None  # a user's starting labels (z, y, x) on the model grid, or None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_case(bundle: ModelBundle, inputs: list[Path], settings: RunSettings, progress: RunProgress) -> ReadCase:
    """Read one case's channel files and preprocess them to the model's spec (no network evaluation)."""
    clock = time.perf_counter()
    progress.report("load", f"reading {', '.join(p.name for p in inputs)}")
    warnings: list[str] = []  # ITK's messages while reading, then what sanity and settings find
    images = read_channels(inputs, warnings)
    warnings += input_warnings(images, inputs, bundle.meta) + setting_warnings(settings)
    for warning in warnings:
        progress.note(f"warning: {warning}")
    reference = images[0]
    preseg = None
    if settings.preseg not in PRESEG_SOURCES:
        preseg = read_preseg_labels(Path(settings.preseg), reference, bundle.num_classes, bundle.meta.get("spacing"))
    loaded = time.perf_counter()
    progress.report("preprocess", "resampling and normalising")
    image, grid = prepare_image(images, bundle.meta)
    timings = {"load": round(loaded - clock, 4), "preprocess": round(time.perf_counter() - loaded, 4)}
    return ReadCase(image, grid, reference, preseg, timings, warnings)


def sample_case(
    bundle: ModelBundle, case: ReadCase, settings: RunSettings, progress: RunProgress, keep_members: bool = False
) -> CaseResult:
    """Sample a case that `read_case` prepared: the ensemble on the model's grid (no outputs written)."""
    clock = time.perf_counter()
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = predict_volume(bundle, case.image, settings, case.preseg, progress, keep_members)
    timings = {**case.timings, "sample": round(time.perf_counter() - clock, 4)}
    return CaseResult(
        result, case.grid, case.reference, replace(settings, device=result.device), timings, case.warnings
    )


def run_case(
    bundle: ModelBundle, inputs: list[Path], settings: RunSettings, progress: RunProgress, keep_members: bool = False
) -> CaseResult:
    """Read, preprocess and sample one case (no outputs written); `settings` come from settings.resolve."""
    return sample_case(bundle, read_case(bundle, inputs, settings, progress), settings, progress, keep_members)


def on_input_grid(case: CaseResult, options: OutputOptions) -> dict[str, sitk.Image]:
    """The images to write (by output key), each resampled back onto the input's exact grid."""
    result = case.result

    def back(array: np.ndarray, is_label: bool, is_vector: bool = False) -> sitk.Image:
        return resample_like(from_array(array, case.grid, is_vector), case.reference, is_label)

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


def output_targets(case: str, output_dir: Path, settings: RunSettings, options: OutputOptions) -> dict[str, Path]:
    """Output key -> path of one case's outputs in `output_dir`."""
    return {key: output_dir / name for key, name in output_names(case, options, settings.ensemble).items()}


def write_case(
    bundle: ModelBundle,
    inputs: list[Path],
    case: str,
    output_dir: Path,
    sampled: CaseResult,
    options: OutputOptions,
    progress: RunProgress,
) -> dict[str, Path]:
    """Write a sampled case's outputs on the input's grid, all at once at the end or none; their paths by key."""
    names = output_names(case, options, sampled.settings.ensemble)
    targets = {key: output_dir / name for key, name in names.items()}
    clock = time.perf_counter()
    progress.report("write", "writing outputs")
    try:
        staging = Path(tempfile.mkdtemp(prefix=owned_prefix(f".{case}."), dir=output_dir))
    except OSError as exc:
        raise RuntimeFault(f"cannot write in {output_dir} ({exc.strerror}); check write permission") from None
    try:
        results = on_input_grid(sampled, options)
        for key, img in results.items():
            write_image_atomic(img, staging / names[key])
        if options.preview:
            from DiffSegCore.io.preview import write_preview  # matplotlib: about 1 s of start-up, only for --preview

            write_preview(
                sampled.reference,
                results["segmentation"],
                results["uncertainty"],
                bundle.meta["classes"],
                staging / names["preview"],
            )
        sampled.timings["write"] = round(time.perf_counter() - clock, 4)
        record = run_record(bundle, inputs, options, sampled)
        record["uncertainty"] = describe_uncertainty(sampled.settings.ensemble)
        record["review"] = segment_review(results["segmentation"], results["uncertainty"], bundle.meta["classes"])
        record["summary"]["volume_ml"] = {entry["name"]: entry["volume_ml"] for entry in record["review"]}
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


def run_record(bundle: ModelBundle, inputs: list[Path], options: OutputOptions, case: CaseResult) -> dict:
    """What was run, how, how long it took and how much memory it used."""
    result = case.result
    device = torch.device(result.device)
    return {
        "model": {"id": bundle.meta["id"], "version": bundle.meta["version"], "path": str(bundle.path)},
        "inputs": [str(p) for p in inputs],
        "settings": case.settings.to_json(),
        "outputs": asdict(options),
        "plan": result.plan,
        "timings_s": case.timings,
        "device": str(device),
        "torch": torch.__version__,
        "host": platform.node(),
        "peak_memory_bytes": peak_memory_bytes(device),
        "memory": {**result.plan_record, "measured_peak_bytes": peak_memory_bytes(device)},
        "summary": {
            "voxels_per_class": {int(k): int(v) for k, v in zip(*np.unique(result.labels.numpy(), return_counts=True))},
            "mean_uncertainty": float(result.variance.mean()),
            "mean_entropy": float(result.entropy.mean()),
            "review_score": result.review_score,
        },
        "warnings": case.warnings,
    }
