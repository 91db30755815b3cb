"""`diffseg train`: argument parsing and the run-folder bookkeeping."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from DiffSegCore import settings
from DiffSegCore.cli.records import command_line, write_json
from DiffSegCore.errors import InputError

SPLIT_FILE = "split.json"
CASES_FILE = "cases.json"


def add_train_parser(subparsers) -> None:
    from DiffSegCore.training.config import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("train", help="train a diffusion model (or the pre-segmentation U-Net) and bundle it")
    p.add_argument("--data", help="MSD/nnU-Net dataset folder, or a JSON/CSV list of image/label pairs")
    p.add_argument("--output", required=True, help="run folder (checkpoints, split, curve, bundle)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--kind", choices=["diffusion", "unet"], default=d.kind, help="unet: the pre-segmentation network")
    p.add_argument("--card", help="model card JSON (id, version, title, description, license, modality, classes)")
    g = p.add_argument_group("data")
    g.add_argument("--validation-fraction", type=float, default=0.2)
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--split", help="reuse a split.json (e.g. of the diffusion run when training its unet)")
    g.add_argument("--normalisation", default="percentile_zscore", help="percentile_zscore | zscore | window_zscore")
    g.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), help="CT window for window_zscore")
    g.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="resample to this spacing (mm)")
    g.add_argument("--cache", default="runs/cache", help="preprocessing cache folder")
    g.add_argument("--refuse-bad-cases", action="store_true", help="stop if any case is unusable (default: skip it)")
    g = p.add_argument_group("model")
    g.add_argument("--prediction", choices=["x0", "eps"], default=d.prediction)
    g.add_argument("--no-recycling", dest="recycling", action="store_false")
    g.add_argument("--train-steps", type=int, default=d.train_steps, help="diffusion steps T in training (5, 1000)")
    g.add_argument("--base-steps", type=int, default=d.base_steps, help="steps of the base schedule (noise levels)")
    g.add_argument("--schedule", choices=["linear", "cosine"], default=d.schedule)
    g.add_argument("--widths", type=int, nargs="+", default=d.widths)
    g.add_argument("--res-blocks", type=int, default=d.res_blocks)
    g.add_argument("--skip", choices=["add", "average", "concat"], default=d.skip)
    g.add_argument("--coords", action="store_true", help="add global coordinate channels (patch training)")
    g.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"), help="default: whole volumes")
    g.add_argument("--centre-bias", type=float, default=d.centre_bias, help="patch centre spread (fraction of room)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iterations", type=int, help=f"default {d.iterations}; with --resume, extends the run")
    g.add_argument("--batch", type=int, default=d.batch)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--clip", type=float, default=d.clip)
    g.add_argument("--ema", type=float, default=d.ema, help="EMA decay (0: off)")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--affine-prob", type=float, default=d.affine_prob)
    g.add_argument(
        "--mirror-axes",
        type=int,
        nargs="+",
        default=[],
        metavar="AXIS",
        help="mirror samples along these spatial axes (0 z, 1 y, 2 x), each with probability 0.5",
    )
    g.add_argument("--val-every", type=int, default=d.val_every)
    g.add_argument("--val-steps", type=int, default=d.val_steps)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    g.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a shared CPU)")
    g.add_argument("--device", choices=settings.DEVICES, default=d.device)
    g.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on GPU")
    g = p.add_argument_group("bundle")
    g.add_argument("--bundle", help="bundle folder to write (default: OUTPUT/bundle)")
    g.add_argument("--preseg-run", help="a finished --kind unet run to pack as pre-segmentation network")
    g.add_argument(
        "--member-runs",
        nargs="+",
        default=[],
        metavar="RUN",
        help="finished diffusion runs of the same network (other seeds) to pack as further ensemble members",
    )
    g.add_argument("--weights-dtype", choices=["float32", "float16"], default="float32")
    g.add_argument(
        "--validated-by",
        metavar="BUNDLE",
        help="for a run on every case (--validation-fraction 0): the bundle of the same recipe trained on a split, "
        "whose recorded validation figures this bundle carries",
    )
    p.set_defaults(func=run_train, parser=p)


def _config(args):
    from DiffSegCore.training.config import TrainConfig

    return TrainConfig(
        kind=args.kind,
        prediction=args.prediction,
        recycling=args.recycling,
        train_steps=args.train_steps,
        base_steps=args.base_steps,
        schedule=args.schedule,
        widths=args.widths,
        res_blocks=args.res_blocks,
        skip=args.skip,
        coords=args.coords,
        size=args.patch_size,
        centre_bias=args.centre_bias,
        batch=args.batch,
        iterations=args.iterations or TrainConfig.iterations,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip=args.clip,
        ema=args.ema,
        augment=args.augment,
        affine_prob=args.affine_prob,
        mirror_axes=args.mirror_axes,
        val_every=args.val_every,
        val_steps=args.val_steps,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
    )


def _spec(args, channel_count: int) -> dict:
    normalisation = {"kind": args.normalisation}
    if args.normalisation == "window_zscore":
        if not args.window:
            raise InputError("--normalisation window_zscore needs --window LOW HIGH")
        normalisation["window"] = list(args.window)
    return {"channels": [normalisation] * channel_count, "spacing": list(args.spacing) if args.spacing else None}


def prepare_run(args, run_dir: Path, card: dict | None, check: Callable[[dict], object] | None = None) -> dict:
    """Find, check, split and cache the data; write split.json, cases.json and data.json, after `check` (which
    raises to refuse the run) has passed the data record, so a refused run leaves no run folder behind."""
    from DiffSegCore.io.sanity import training_envelope
    from DiffSegCore.io.volumes import read_channels
    from DiffSegCore.training.cache import build_cache, write_index
    from DiffSegCore.training.datasets import find_cases, split_cases, usable_cases

    if not args.data:
        raise InputError("--data is needed for a new run (only --resume reads the data from the run folder)")
    dataset = find_cases(args.data)
    cases = usable_cases(dataset.cases, "refuse" if args.refuse_bad_cases else "skip")
    channels = cases[0].channels
    if any(c.channels != channels for c in cases):
        raise InputError("cases have different numbers of channels; every case needs the same channels")
    spec = _spec(args, channels)
    if args.split:
        split = json.loads(Path(args.split).read_text())
    else:
        split = split_cases([c.name for c in cases], args.validation_fraction, args.split_seed)
    known = {c.name for c in cases}
    split = {**split, "train": [n for n in split["train"] if n in known]}
    split["validation"] = [n for n in split["validation"] if n in known]
    model_spec = {"channels": [{"normalisation": n} for n in spec["channels"]], "spacing": spec["spacing"]}
    cached = build_cache(cases, model_spec, args.cache)
    labels = {str(c["value"]): c["name"] for c in card["classes"]} if card else dataset.labels
    num_classes = max(int(v) for v in labels) + 1 if labels else 1 + max(int(c.load()[1].max()) for c in cached)
    names = [c.get("name") for c in card["channels"]] if card and card.get("channels") else dataset.channel_names
    data = {
        "source": str(Path(args.data).resolve()),
        "channel_names": (names or [f"channel {i}" for i in range(channels)])[:channels],
        "spec": spec,
        "image_channels": channels,
        "num_classes": num_classes,
        "labels": {str(k): v for k, v in labels.items()},
        "split": {
            "seed": split.get("seed"),
            "validation_fraction": split.get("validation_fraction"),
            "train_cases": len(split["train"]),
            "validation": split["validation"],
        },
    }
    data["command"] = command_line(args)
    # What the training images were like, so that runs on inputs far from them say so (io/sanity.py).
    train = set(split["train"])
    data["envelope"] = training_envelope(read_channels(list(c.images)) for c in cases if c.name in train)
    if check is not None:
        check(data)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / SPLIT_FILE, split)
    write_index(run_dir / CASES_FILE, cached)
    write_json(run_dir / "data.json", data)
    return data


def run_train(args: argparse.Namespace) -> int:
    import torch

    from DiffSegCore.training.cache import read_index
    from DiffSegCore.training.export import check_member_runs, check_validated_by, export_bundle
    from DiffSegCore.training.loop import CONFIG, TrainConfig, train

    torch.set_num_threads(args.threads)
    run_dir = Path(args.output)
    card = json.loads(Path(args.card).read_text()) if args.card else None
    if args.resume:
        if not (run_dir / CONFIG).exists():
            raise InputError(f"{run_dir} holds no run to resume; start it without --resume")
        config = TrainConfig.from_json(json.loads((run_dir / CONFIG).read_text()))
        data = json.loads((run_dir / "data.json").read_text())
        extended = bool(args.iterations) and args.iterations > config.iterations
        config.iterations = args.iterations or config.iterations
    else:
        if (run_dir / CONFIG).exists():
            raise InputError(f"{run_dir} already holds a run; pass --resume to continue it or choose a new --output")
        config, data, extended = _config(args), None, False
    check_member_runs(args.member_runs, config)
    bundle = Path(args.bundle) if args.bundle else run_dir / "bundle"
    if config.kind == "diffusion" and bundle.exists():  # refused before preparing or training, not after it
        raise InputError(f"{bundle} already exists; pass --bundle with a new folder, or remove it first")
    validated = args.validated_by and config.kind == "diffusion"
    check = partial(check_validated_by, args.validated_by, config) if validated else None
    if data is None:
        data = prepare_run(args, run_dir, card, check)
    elif check is not None:
        check(data)

    def record_extension() -> None:  # part of how the model came to be (export.run_commands)
        data["resumed"] = [*data.get("resumed", []), command_line(args)]
        write_json(run_dir / "data.json", data)

    split = json.loads((run_dir / SPLIT_FILE).read_text())
    cached = {c.name: c for c in read_index(run_dir / CASES_FILE)}
    train_cases = [cached[n] for n in split["train"]]
    val_cases = [cached[n] for n in split["validation"]]
    if not train_cases:
        raise InputError("the split leaves no training cases; lower --validation-fraction")
    state, _ = train(
        run_dir, train_cases, val_cases, config, data["num_classes"],
        resume=args.resume, on_start=record_extension if extended else None,
    )  # fmt: skip
    checked = f"best validation Dice {state.best:.4f} at step {state.best_step}" if val_cases else "no validation cases"
    print(f"finished {state.step} iterations; {checked}")
    if config.kind == "diffusion" and int(os.environ.get("RANK", "0")) == 0:
        export_bundle(
            run_dir, bundle, card, args.preseg_run, args.weights_dtype, args.member_runs, args.validated_by
        )
        print(f"bundle written to {bundle}")
    return 0
