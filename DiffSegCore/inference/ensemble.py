"""From a normalised image tensor to ensemble probabilities, on the best device that fits."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields, replace

import torch
from monai.inferers import sliding_window_inference

from DiffSegCore.diffusion.masks import to_diffusion_space
from DiffSegCore.diffusion.samplers import initial_state, member_generators, sample
from DiffSegCore.diffusion.schedules import respace, training_schedule
from DiffSegCore.errors import InputError, RuntimeFault
from DiffSegCore.inference.reduce import EnsembleAccumulator, EnsembleResult
from DiffSegCore.io.preprocess import coordinate_channels
from DiffSegCore.models.bundle import ModelBundle
from DiffSegCore.networks.unet import UNet3D
from DiffSegCore.progress import Progress

MEMORY_FRACTION = 0.6  # share of free memory a run may plan to use
DEFAULT_WINDOW = (96, 96, 96)
WINDOWS_PER_BATCH = 4  # windows sliding_window_inference evaluates at once; the planner counts them all


@dataclass
class SegmentSettings:
    """What the user chose for one run; None means the model's default."""

    steps: int | None = None
    ensemble: int | None = None
    sampler: str | None = None
    eta: float | None = None
    preseg: str | None = None
    preseg_step: int | None = None
    seed: int = 0
    device: str = "auto"
    window: str = "auto"
    members_per_batch: int | None = None
    per_class_variance: bool = False
    keep_members: bool = False

    @classmethod
    def from_args(cls, args) -> SegmentSettings:
        """The settings among parsed command-line options (same names); options not given keep the defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})

    def with_defaults(self, meta: dict) -> SegmentSettings:
        """Fill unset choices from the model's default sampler settings."""
        defaults = {
            "steps": 5,
            "ensemble": 5,
            "sampler": "ddim",
            "eta": 0.0,
            "preseg": "none",
            **meta.get("defaults", {}),
        }
        filled = {
            k: defaults.get(k) if getattr(self, k) is None else getattr(self, k)
            for k in ("steps", "ensemble", "sampler", "eta", "preseg", "preseg_step")
        }
        return replace(self, **filled)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeFault("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{name}'; use auto, cpu or cuda")
    return torch.device(name)


def memory_limit_bytes() -> int | None:
    """The cap set by DIFFSEG_MEMORY_LIMIT_MB (for shared machines and tests), or None."""
    value = os.environ.get("DIFFSEG_MEMORY_LIMIT_MB")
    if not value:
        return None
    try:
        return int(float(value) * 2**20)
    except ValueError:
        raise InputError(f"DIFFSEG_MEMORY_LIMIT_MB={value!r} is not a number of megabytes; fix or unset it") from None


def free_memory_bytes(device: torch.device) -> int:
    """Memory the run may take: free GPU memory, or MemAvailable on the host; capped by DIFFSEG_MEMORY_LIMIT_MB."""
    limit = memory_limit_bytes()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    return free if limit is None else min(free, limit)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a plain RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def member_bytes(network: UNet3D, shape: tuple[int, ...], bytes_per_value: int = 4) -> int:
    """Rough peak activation memory of one network evaluation without gradients.

    Input, a few live feature maps at full resolution, and the skips kept at each lower level.
    """
    voxels = 1
    for size in shape:
        voxels *= size + (-size) % network.multiple
    widths = network.config["widths"]
    per_voxel = network.in_channels + 5 * widths[0] + sum(3 * w / 8**level for level, w in enumerate(widths) if level)
    return int(voxels * per_voxel * bytes_per_value)


@dataclass
class Plan:
    """How to run: device, members per batch, and whether to use a sliding window."""

    device: torch.device
    batch: int
    window: tuple[int, ...] | None
    # The model's window clipped to the volume; None where a window would hold the whole volume (no saving).
    smaller_window: tuple[int, ...] | None = None

    def fallback(self) -> Plan | None:
        """The next, smaller plan after running out of memory (fewer members, window, CPU)."""
        if self.batch > 1:
            return replace(self, batch=self.batch // 2)
        if self.window is None and self.smaller_window is not None:
            return replace(self, window=self.smaller_window)
        if self.device.type == "cuda":
            return replace(self, device=torch.device("cpu"))
        return None

    def describe(self) -> str:
        mode = f"sliding window {'x'.join(map(str, self.window))}" if self.window else "full volume"
        return f"{self.device.type}, {self.batch} member(s) per batch, {mode}"


def make_plan(bundle: ModelBundle, shape: tuple[int, ...], settings: SegmentSettings, members: int) -> Plan:
    """Pick members per batch and full volume vs. sliding window from the memory at hand."""
    device = resolve_device(settings.device)
    value_bytes = 2 if device.type == "cuda" else 4
    budget = free_memory_bytes(device) * MEMORY_FRACTION
    per_member = member_bytes(bundle.network, shape, value_bytes)
    window_shape = tuple(min(w, s) for w, s in zip(bundle.meta.get("window") or DEFAULT_WINDOW, shape))
    use_window = settings.window == "sliding" or (settings.window == "auto" and per_member > budget)
    if use_window:
        # Measured at 240x240x155 on CPU: 2.8 GiB peak above baseline vs. 4 x 0.64 GiB (benchmarks/results).
        per_member = member_bytes(bundle.network, window_shape, value_bytes) * WINDOWS_PER_BATCH
        if per_member > budget:
            capped = " (capped by DIFFSEG_MEMORY_LIMIT_MB)" if memory_limit_bytes() is not None else ""
            raise RuntimeFault(
                f"not enough memory: one sliding window needs about {per_member / 2**20:.0f} MiB but the run may use "
                f"{budget / 2**20:.0f} MiB{capped}; close other programs or use a machine with more memory"
            )
    batch = settings.members_per_batch or max(1, min(members, int(budget // per_member)))
    return Plan(device, batch, window_shape if use_window else None, window_shape if window_shape != shape else None)


def _autocast(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on the CPU, where oneDNN's 3D convolutions ran 1.2-1.6x faster so (docs/results.md, section 8);
    GPUs keep the default layout until it is measured there."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def _on_device(network: UNet3D, device: torch.device) -> UNet3D:
    return network.to(device=device, memory_format=_memory_format(device))


def _evaluate(network: UNet3D, x: torch.Tensor, t: torch.Tensor | None, window) -> torch.Tensor:
    """One network evaluation on the whole volume or by MONAI sliding window (Gaussian blending)."""
    layout = _memory_format(x.device)
    with _autocast(x.device):
        if window is None:
            return network(x.contiguous(memory_format=layout), t).float()

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            patch_t = None if t is None else t[:1].expand(patch.shape[0])
            return network(patch.contiguous(memory_format=layout), patch_t)

        return sliding_window_inference(x, window, WINDOWS_PER_BATCH, predictor, overlap=0.25, mode="gaussian").float()


def conditioning(network: UNet3D, image: torch.Tensor) -> torch.Tensor:
    """Image channels plus global coordinate channels when the network was patch-trained with them."""
    if network.config.get("coords"):
        return torch.cat([image, coordinate_channels(tuple(image.shape[1:]))])
    return image


def presegment(bundle: ModelBundle, image: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Label map from the bundle's plain U-Net (PD-DDPM pre-segmentation)."""
    if bundle.preseg_network is None:
        raise InputError(
            f"model {bundle.meta['id']} has no pre-segmentation network; use --preseg none or a label file"
        )
    network = _on_device(bundle.preseg_network, plan.device)
    with torch.inference_mode():
        x = conditioning(network, image)[None].to(plan.device)
        return _evaluate(network, x, None, plan.window)[0].argmax(0).cpu()


def _sample_batch(bundle, cond, schedule, settings, plan, first, count, preseg, on_step) -> torch.Tensor:
    network = _on_device(bundle.network, plan.device)
    cond_b = cond[None].to(plan.device).expand(count, *cond.shape)
    shape = (count, bundle.num_classes, *cond.shape[1:])
    generators = member_generators(settings.seed, first, count)
    start = (
        None if preseg is None else to_diffusion_space(preseg[None].expand(count, *preseg.shape), bundle.num_classes)
    )
    x = initial_state(schedule, shape, generators, cond_b, start)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _evaluate(network, torch.cat([cond_b, x_t.to(cond_b.dtype)], dim=1), t, plan.window)

    with torch.inference_mode():
        return sample(
            denoise,
            schedule,
            x,
            prediction=bundle.meta["diffusion"].get("prediction", "x0"),
            sampler=settings.sampler,
            eta=settings.eta,
            generators=generators,
            on_step=on_step,
        )


def member_probabilities(
    bundle: ModelBundle, image: torch.Tensor, settings: SegmentSettings, preseg_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Class probabilities (N, K, *S) of every member, sampled as one batch on the whole volume.

    Members draw the same noise as in `predict_volume` with the same seed, so any prefix of them is
    the ensemble a smaller run would give; for studies that score many ensemble sizes at once.
    """
    settings = settings.with_defaults(bundle.meta)
    plan = make_plan(bundle, tuple(image.shape[1:]), settings, settings.ensemble)
    cond = conditioning(bundle.network, image)
    schedule = sampling_schedule(bundle, settings, preseg_mask is not None)
    return _sample_batch(bundle, cond, schedule, settings, plan, 0, settings.ensemble, preseg_mask, None)


def sampling_schedule(bundle: ModelBundle, settings: SegmentSettings, from_preseg: bool):
    """The K-step schedule, ending at T' when starting from a pre-segmentation."""
    train = training_schedule(bundle.meta["diffusion"])
    last = len(train) - 1
    if from_preseg:
        last = settings.preseg_step if settings.preseg_step is not None else last // 2
    return respace(train, min(settings.steps, last + 1), last)


def predict_volume(
    bundle: ModelBundle,
    image: torch.Tensor,
    settings: SegmentSettings,
    preseg_mask: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> EnsembleResult:
    """Run the ensemble on a normalised (C, z, y, x) image; falls back to smaller plans on OOM."""
    settings = settings.with_defaults(bundle.meta)
    if settings.ensemble < 1 or settings.steps < 1:
        raise InputError("--steps and --ensemble must be at least 1")
    progress = progress or Progress("none")
    plan = make_plan(bundle, tuple(image.shape[1:]), settings, settings.ensemble)
    if plan.window is not None and settings.window == "auto":
        progress.note(f"the whole volume does not fit in the memory at hand; running {plan.describe()}")
    while True:
        try:
            return _run_plan(bundle, image, settings, preseg_mask, plan, progress)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            smaller = plan.fallback()
            if smaller is None:
                raise RuntimeFault(
                    "out of memory even with one member in a sliding window on the CPU; "
                    "close other programs or use a machine with more memory"
                ) from None
            progress.note(f"out of memory with {plan.describe()}; retrying with {smaller.describe()}")
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            plan = smaller


def _run_plan(bundle, image, settings, preseg_mask, plan: Plan, progress: Progress) -> EnsembleResult:
    cond = conditioning(bundle.network, image)
    if settings.preseg == "model" and preseg_mask is None:
        progress.report("preseg", "pre-segmentation network")
        preseg_mask = presegment(bundle, image, plan)
    schedule = sampling_schedule(bundle, settings, preseg_mask is not None)
    accumulator = EnsembleAccumulator(settings.per_class_variance, settings.keep_members)
    members = settings.ensemble
    for first in range(0, members, plan.batch):
        count = min(plan.batch, members - first)

        def on_step(step: int, total: int, first: int = first, count: int = count) -> None:
            progress.report(
                "sample",
                f"members {first + 1}-{first + count} of {members}, step {step}/{total}",
                step=step,
                steps=total,
                member=first + count,
                members=members,
                within=(first + count * step / total) / members,
            )

        accumulator.add(_sample_batch(bundle, cond, schedule, settings, plan, first, count, preseg_mask, on_step))
    progress.report("reduce", "mean and uncertainty", within=1.0)
    return accumulator.result()
