"""The training loop for the diffusion network and the plain pre-segmentation U-Net.

Runs in one process or under torchrun (DistributedDataParallel: NCCL on GPUs, gloo on CPU). All
randomness is derived from (seed, step, rank), and the learning rate from the step, so a run
resumed from a checkpoint ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from DiffSegCore.diffusion.objectives import diffusion_loss, segmentation_loss
from DiffSegCore.diffusion.schedules import training_schedule
from DiffSegCore.errors import InputError
from DiffSegCore.evaluation.metrics import dice_per_class
from DiffSegCore.inference.predictor import conditioning, evaluate_network, sample_members, sampling_schedule
from DiffSegCore.inference.ranks import setup_distributed
from DiffSegCore.io.atomic import atomic_path, write_text
from DiffSegCore.io.weights import write_weights
from DiffSegCore.networks.precision import autocast
from DiffSegCore.networks.unet import build_network
from DiffSegCore.training.cache import CachedCase
from DiffSegCore.training.checkpoints import load_checkpoint, save_checkpoint
from DiffSegCore.training.config import TrainConfig, optimiser_step
from DiffSegCore.training.samples import TrainingSamples

CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"
CONFIG = "config.json"


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by (seed, step, rank) alone, for the step's noise and diffusion steps."""
    state = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def training_size(cases: list[CachedCase], multiple: int) -> list[int]:
    """Whole-volume training: the largest case shape rounded up to the network's multiple."""
    shapes = np.array([case.load()[1].shape for case in cases])
    return [int(math.ceil(n / multiple) * multiple) for n in shapes.max(axis=0)]


@torch.no_grad()
def predict_labels(network, image: torch.Tensor, config: TrainConfig, seed: int = 0) -> torch.Tensor:
    """A fast, one-member prediction for validation, through the same sampler as a run.

    Args:
        network: the network being trained (not a DistributedDataParallel wrapper), in eval mode.
        image: preprocessed image channels (C, z, y, x).
        config: the run's config (kind, diffusion schedule, prediction, val_steps).
        seed: seed of the member's noise.

    Returns:
        Labels (z, y, x) on the CPU.
    """
    device = next(network.parameters()).device
    cond = conditioning(network, image)
    with torch.no_grad():
        if config.kind == "unet":
            return evaluate_network(network, cond[None].to(device), None, None)[0].argmax(0).cpu()
        schedule = sampling_schedule(config.diffusion_config(), min(config.val_steps, config.train_steps))
        probs = sample_members(
            network, cond, schedule, prediction=config.prediction, sampler="ddim", eta=0.0, seed=seed, members=[0]
        )
    return probs[0].argmax(0).cpu()


def validate(network, cases: list[CachedCase], config: TrainConfig, num_classes: int) -> dict:
    """Mean foreground Dice over the cases ("mean_dice") and per class ("dice_per_class"), via predict_labels."""
    network.eval()
    per_case = {}
    for case in cases:
        image, label = case.load()
        labels = predict_labels(network, torch.from_numpy(image), config)
        per_case[case.name] = dice_per_class(labels, torch.from_numpy(label.astype(np.int64)), num_classes)
    network.train()
    scores = np.array(list(per_case.values()))
    return {"mean_dice": float(np.nanmean(scores)), "dice_per_class": np.nanmean(scores, axis=0).tolist()}


def save_curve(path: Path, history: dict) -> None:
    """Training loss (and its running mean) and validation Dice over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = np.array(history["step"]), np.array(history["loss"])
    if len(steps) == 0:
        return
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(steps, losses, color="0.75", linewidth=0.6, label="loss")
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    loss_axis.plot(steps[window - 1 :], smooth, color="C0", label=f"loss (mean of {window})")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    if history["val_step"]:
        dice_axis = loss_axis.twinx()
        dice_axis.plot(history["val_step"], history["val_dice"], "o-", color="C1", label="validation Dice")
        dice_axis.set_ylabel("validation mean foreground Dice")
        dice_axis.set_ylim(0, 1)
    fig.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _save_best(path: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
    with atomic_path(path) as tmp:
        write_weights(tmp, weights, metadata={"info": json.dumps(info)})


def read_best(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The best weights of a finished run (state dict, tensors on the CPU) and the run's config (config.json)."""
    best = run_dir / BEST
    if not best.exists():
        raise InputError(f"{run_dir} holds no {BEST}; train it first (it is written at the first validation)")
    return load_file(best), json.loads((run_dir / CONFIG).read_text())


@dataclass
class RunState:
    """Progress of a run, saved in its checkpoints: steps done, best validation Dice and the curves."""

    step: int = 0
    best: float = -1.0
    best_step: int = -1
    history: dict = field(default_factory=lambda: {"step": [], "loss": [], "val_step": [], "val_dice": []})


def train(
    run_dir: str | Path,
    train_cases: list[CachedCase],
    val_cases: list[CachedCase],
    config: TrainConfig,
    num_classes: int,
    resume: bool = False,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
    on_start: Callable[[], None] | None = None,
) -> tuple[RunState, torch.nn.Module]:
    """Train until config.iterations (or, for time-sliced runs, stop after `stop_after` more steps).

    Checkpoints, best weights, config.json and the curve go to run_dir.

    Args:
        run_dir: the run folder.
        train_cases: cached cases, image (C, *S) and label (*S) each; batches are (B, C (+ 3), *P) crops.
        val_cases: cached cases scored at every config.val_every steps; none: the last weights are the best.
        config: the run's config; config.size is filled in when None.
        num_classes: K, classes including the background.
        resume: continue from run_dir's checkpoint.
        log: where progress lines go (rank 0 only).
        stop_after: steps to run in this call at most.
        on_start: called (rank 0) once the run's checkpoint is loaded and its config.json written.

    Returns:
        the run state and the trained network (not the EMA copy).
    """
    config.check()
    run_dir = Path(run_dir)
    ddp = setup_distributed(config.device)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    image_channels = train_cases[0].load()[0].shape[0]
    network = build_network(config.network_config(image_channels, num_classes)).to(ddp.device)
    if config.size is None:
        config.size = training_size(train_cases, network.multiple)
    optimizer = config.optimiser(network.parameters())
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(config.ema)) if config.ema > 0 else None
    state = RunState()
    if resume:
        model_state, optim_state, info, ema_state = load_checkpoint(run_dir / CHECKPOINT)
        network.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        state = RunState(**info["state"])
        if ddp.main:
            log(f"resumed {run_dir} at step {state.step} of {config.iterations}")
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / CONFIG, json.dumps(asdict(config), indent=2) + "\n")
        if on_start is not None:
            on_start()
    model = network
    if ddp.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[ddp.device.index] if ddp.device.index is not None else None
        )
    schedule = training_schedule(config.diffusion_config())
    samples = TrainingSamples(
        train_cases,
        tuple(config.size),
        config.seed,
        config.augment,
        config.coords,
        config.centre_bias,
        config.affine_prob,
        tuple(config.mirror_axes),
    )
    end = config.iterations if stop_after is None else min(config.iterations, state.step + stop_after)
    order = [
        (step * ddp.world + ddp.rank) * config.batch + i for step in range(state.step, end) for i in range(config.batch)
    ]
    loader = DataLoader(samples, batch_size=config.batch, sampler=order, num_workers=config.workers)
    bar = tqdm(
        total=config.iterations,
        initial=state.step,
        disable=not ddp.main,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        desc=f"train {config.kind}",
    )
    network.train()
    started = time.monotonic()
    for step, (image, label) in zip(range(state.step, end), loader):
        image, label = image.to(ddp.device, non_blocking=True), label.to(ddp.device, non_blocking=True)
        generator = step_generator(config.seed, step, ddp.rank, ddp.device)
        with autocast(ddp.device, enabled=config.amp, allow_fp16=False):
            if config.kind == "unet":
                loss = segmentation_loss(model(image), label)
            else:
                loss = diffusion_loss(
                    model, image, label, schedule, config.prediction, config.recycling, generator, config.eps_weight
                )
        optimiser_step(optimizer, network, loss, step, config)
        if ema is not None:
            ema.update_parameters(network)
        state.step = step + 1
        value = float(loss.detach())
        state.history["step"].append(state.step)
        state.history["loss"].append(value)
        bar.set_postfix(loss=f"{value:.4f}", **({"best": f"{state.best:.3f}"} if val_cases else {}))
        bar.update(1)
        last = state.step == config.iterations
        if ddp.main and (state.step % config.val_every == 0 or last):
            evaluated = ema.module if ema is not None else network
            scores = validate(evaluated, val_cases, config, num_classes) if val_cases else {"mean_dice": float("nan")}
            state.history["val_step"].append(state.step)
            state.history["val_dice"].append(scores["mean_dice"])
            if not val_cases or scores["mean_dice"] > state.best:
                state.best, state.best_step = scores["mean_dice"], state.step
                _save_best(run_dir / BEST, evaluated.state_dict(), {"step": state.step, **scores})
            elapsed = time.monotonic() - started
            checked = (
                f"validation Dice {scores['mean_dice']:.4f} (per class {[round(v, 4) for v in scores['dice_per_class']]}"
                f"), best {state.best:.4f} at {state.best_step}"
                if val_cases
                else "no validation cases, these weights kept"
            )
            log(f"step {state.step}: loss {value:.4f}, {checked}, {elapsed:.0f} s")
            save_curve(run_dir / "training_curve.png", state.history)
        stopping = state.step == end
        if ddp.main and (state.step % config.checkpoint_every == 0 or state.step % config.val_every == 0 or stopping):
            save_checkpoint(
                run_dir / CHECKPOINT,
                network.state_dict(),
                optimizer.state_dict(),
                {"state": asdict(state)},
                ema.state_dict() if ema is not None else None,
            )
    bar.close()
    if ddp.world > 1:
        dist.barrier()
    return state, network
