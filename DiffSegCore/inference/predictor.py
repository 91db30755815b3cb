"""Network evaluations of a run: conditioning channels, whole volume or sliding window, member sampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

import torch

from DiffSegCore.diffusion.masks import to_diffusion_space
from DiffSegCore.diffusion.samplers import initial_state, member_generators, sample
from DiffSegCore.diffusion.schedules import NoiseSchedule, respace, training_schedule
from DiffSegCore.errors import InputError
from DiffSegCore.inference.plan import WINDOWS_PER_BATCH, Plan
from DiffSegCore.io.preprocess import coordinate_channels
from DiffSegCore.models.bundle import ModelBundle
from DiffSegCore.networks.allocator import keep_freed_memory
from DiffSegCore.networks.precision import inference_autocast, memory_format
from DiffSegCore.networks.unet import UNet3D
from DiffSegCore.settings import RunSettings


def on_device(network: UNet3D, device: torch.device) -> UNet3D:
    """The network on `device`, in the memory layout that is fastest there; on the CPU, freed feature
    maps are kept for reuse (networks/allocator.py)."""
    if device.type == "cpu":
        keep_freed_memory()
    return network.to(device=device, memory_format=memory_format(device))


def evaluate_network(
    network: UNet3D,
    x: torch.Tensor,
    t: torch.Tensor | None,
    window: tuple[int, ...] | None,
    windows_per_batch: int = WINDOWS_PER_BATCH,
    precision: str = "auto",
) -> torch.Tensor:
    """One network evaluation on the whole volume, or by MONAI's sliding window (Gaussian blending).

    Args:
        network: on the device of `x`.
        x: input (B, C, *S): conditioning channels, then the noisy mask for a diffusion network.
        t: time steps (B,), or None for the plain pre-segmentation U-Net.
        window: sliding-window size (z, y, x), or None for the whole volume.
        windows_per_batch: sliding windows evaluated at once.
        precision: the run's --precision (networks/precision.py: inference_autocast).

    Returns:
        The raw output (B, K, *S) in float32.
    """
    layout = memory_format(x.device)
    with inference_autocast(x.device, precision):
        if window is None:
            return network(x.contiguous(memory_format=layout), t).float()

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            patch_t = None if t is None else t[:1].expand(patch.shape[0])
            return network(patch.contiguous(memory_format=layout), patch_t)

        # MONAI is imported only here: importing it costs more start-up than torch itself (about 2.4 s).
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, window, windows_per_batch, predictor, overlap=0.25, mode="gaussian").float()


def conditioning(network: UNet3D, image: torch.Tensor) -> torch.Tensor:
    """Image channels (C, *S), plus 3 global coordinate channels when the network was patch-trained with them."""
    if network.config.get("coords"):
        return torch.cat([image, coordinate_channels(tuple(image.shape[1:]))])
    return image


def presegment(bundle: ModelBundle, image: torch.Tensor, plan: Plan, precision: str = "auto") -> torch.Tensor:
    """Label map (*S) from the bundle's plain U-Net (PD-DDPM pre-segmentation) of a (C, *S) image."""
    if bundle.preseg_network is None:
        raise InputError(
            f"model {bundle.meta['id']} has no pre-segmentation network; use --preseg none or a label file"
        )
    network = on_device(bundle.preseg_network, plan.device)
    with torch.inference_mode():
        x = conditioning(network, image)[None].to(plan.device)
        return evaluate_network(network, x, None, plan.window, plan.windows_per_batch, precision)[0].argmax(0).cpu()


def sampling_schedule(diffusion: dict, steps: int, start_step: int | None = None) -> NoiseSchedule:
    """The `steps`-step schedule from the trained one, ending at `start_step` (T') when given, else at its end."""
    trained = training_schedule(diffusion)
    last = len(trained) - 1 if start_step is None else start_step
    return respace(trained, steps, last)


def sample_members(
    network: UNet3D,
    cond: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: str,
    sampler: str,
    eta: float,
    seed: int,
    members: Sequence[int],
    window: tuple[int, ...] | None = None,
    windows_per_batch: int = WINDOWS_PER_BATCH,
    precision: str = "auto",
    start: torch.Tensor | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample the ensemble members numbered `members` as one batch.

    Args:
        network: the diffusion network, already on the run's device.
        cond: conditioning channels (C, *S) of one case, or one per member (len(members), C, *S).
        schedule: the sampling schedule.
        prediction, sampler, eta: the model's prediction type and the sampler's settings.
        seed, members: member k's noise depends on (seed, k) only, not on batching or device.
        window: sliding-window size, or None for the whole volume.
        windows_per_batch: sliding windows evaluated at once.
        precision: float32, bf16 or auto (see evaluate_network).
        start: a pre-segmentation (*S), or one per member (len(members), *S), to start from (PD-DDPM);
            None for pure noise.
        on_step: called with (step, steps) after each step.

    Returns:
        Class probabilities (len(members), K, *S).
    """
    device = next(network.parameters()).device
    count = len(members)
    cond_b = (cond if cond.dim() == 5 else cond[None].expand(count, *cond.shape)).to(device)  # a 3D network
    shape = (count, network.num_classes, *cond_b.shape[2:])
    generators = member_generators(seed, members)
    if start is not None:
        start = start if start.dim() == 4 else start[None].expand(count, *start.shape)
    mask = None if start is None else to_diffusion_space(start, network.num_classes)
    x = initial_state(schedule, shape, generators, cond_b, mask)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return evaluate_network(
            network, torch.cat([cond_b, x_t.to(cond_b.dtype)], dim=1), t, window, windows_per_batch, precision
        )

    with torch.inference_mode():
        return sample(
            denoise, schedule, x, prediction=prediction, sampler=sampler, eta=eta, generators=generators, on_step=on_step
        )


def member_views(meta: dict, members: Sequence[int]) -> dict[tuple[int, tuple[int, ...]], list[int]]:
    """Which network and which mirroring each member uses, grouped: {(network, mirrored axes): [members]}.

    A bundle's "members" entry names its networks (trainings of one config) and the spatial axes
    (0 z, 1 y, 2 x) it was trained to be mirrored along; member k takes network k mod N and, every N
    members, the next mirroring (none first, then each non-empty subset of the axes), so the first N
    members are the plain networks and any ensemble mixes trainings before mirrorings.
    """
    spec = meta.get("members") or {}
    networks = int(spec.get("networks", 1))
    axes = sorted(spec.get("mirror_axes", []))
    mirrors = [subset for size in range(len(axes) + 1) for subset in combinations(axes, size)]
    views: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for k in members:
        views.setdefault((k % networks, mirrors[(k // networks) % len(mirrors)]), []).append(k)
    return views


def _mirrored(volume: torch.Tensor, axes: tuple[int, ...], leading: int, channels: int | None = None) -> torch.Tensor:
    """`volume` mirrored along spatial `axes` (0 z, 1 y, 2 x) after `leading` non-spatial dims; with
    `channels`, only the first `channels` of dim leading - 1 (image channels, not coordinate channels)."""
    if not axes:
        return volume
    dims = [leading + axis for axis in axes]
    if channels is None:
        return volume.flip(dims)
    return torch.cat([volume[:channels].flip(dims), volume[channels:]])


def bundle_members(
    bundle: ModelBundle,
    cond: torch.Tensor,
    settings: RunSettings,
    plan: Plan,
    first: int,
    count: int,
    preseg: torch.Tensor | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """`sample_members` for a model bundle and a run's settings: probabilities (count, K, *S) of members
    first..first+count-1, each from its network and mirroring (`member_views`), mirrored back.

    The members of one network form one batch whatever their mirroring: on one CPU thread, 5 members of the
    hippocampus model took 312 ms as batches of 3 and 2 against 355 ms as batches of 2, 1, 1 and 1.
    """
    diffusion = bundle.meta["diffusion"]
    schedule = sampling_schedule(diffusion, settings.steps, settings.preseg_step if preseg is not None else None)
    image_channels = len(bundle.meta["channels"])
    by_network: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for (index, axes), members in member_views(bundle.meta, range(first, first + count)).items():
        by_network.setdefault(index, []).extend((k, axes) for k in members)
    out: torch.Tensor | None = None
    done = 0
    for index, views in by_network.items():

        def view_step(step: int, total: int, done: int = done, size: int = len(views)) -> None:
            if on_step is not None:  # progress over all networks, as one batch of `count` members would give
                on_step(round(((done + size * step / total) / count) * total), total)

        mirrorings = {axes for _, axes in views}
        if len(mirrorings) == 1:  # one view: the shared input, not a copy per member
            (axes,) = mirrorings
            conds = _mirrored(cond, axes, 1, image_channels)
            starts = None if preseg is None else _mirrored(preseg, axes, 0)
        else:
            conds = torch.stack([_mirrored(cond, axes, 1, image_channels) for _, axes in views])
            starts = None if preseg is None else torch.stack([_mirrored(preseg, axes, 0) for _, axes in views])
        probs = sample_members(
            on_device(bundle.networks[index], plan.device),
            conds,
            schedule,
            prediction=diffusion.get("prediction", "x0"),
            sampler=settings.sampler,
            eta=settings.eta,
            seed=settings.seed,
            members=[k for k, _ in views],
            window=plan.window,
            windows_per_batch=plan.windows_per_batch,
            precision=settings.precision,
            start=starts,
            on_step=view_step,
        )
        if out is None:
            out = probs.new_empty((count, *probs.shape[1:]))
        for row, (k, axes) in enumerate(views):
            out[k - first] = _mirrored(probs[row], axes, 1)
        done += len(views)
    return out
