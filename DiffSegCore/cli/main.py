"""The `diffseg` command: segment volumes, train and evaluate models, manage the model cache."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from pathlib import Path

from DiffSegCore import __version__
from DiffSegCore.cli.models import add_models_parser
from DiffSegCore.cli.train import add_training_parsers
from DiffSegCore.errors import DiffSegError, InputError
from DiffSegCore.io.cases import collect_cases
from DiffSegCore.progress import Progress

DEFAULT_MODEL = "hippocampus-recycling-x0"


def load_model(ref: str, device: str, progress: Progress):
    """A bundle path, or a registry id resolved (and downloaded on first use, with progress)."""
    # torch-heavy modules load here so that `diffseg models ...` starts fast.
    from DiffSegCore.inference.ensemble import resolve_device
    from DiffSegCore.models.bundle import load_bundle
    from DiffSegCore.models.registry import resolve_model

    def on_bytes(done: int, total: int | None) -> None:
        progress.report("load", f"downloading {ref}: {done / 2**20:.1f} MiB", within=(done / total) if total else 0.0)

    return load_bundle(resolve_model(ref, progress=on_bytes), resolve_device(device))


def _add_segment_parser(subparsers) -> None:
    p = subparsers.add_parser("segment", help="segment volumes; writes segmentation, uncertainty and a run record")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="volume files (one per channel), folders of volumes, or DICOM folders",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"bundle folder/.zip or registry id[@version] (default {DEFAULT_MODEL})"
    )
    p.add_argument("--steps", type=int, help="sampling steps K (default: the model's)")
    p.add_argument("--ensemble", type=int, help="ensemble members N (default: the model's)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], help="sampler (default: the model's)")
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic updates)")
    p.add_argument("--preseg", help="none, model (the bundle's U-Net) or a label file to start from (PD-DDPM)")
    p.add_argument("--preseg-step", type=int, help="training step T' the pre-segmentation is diffused to")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--window", default="auto", choices=["auto", "full", "sliding"], help="full volume or sliding window"
    )
    p.add_argument(
        "--members-per-batch", type=int, help="ensemble members evaluated together (default: as memory allows)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--save-probabilities", action="store_true", help="also write mean class probabilities and entropy")
    p.add_argument("--save-members", action="store_true", help="also write each member's label map")
    p.add_argument("--per-class-variance", action="store_true", help="record the variance per class in the run record")
    p.add_argument("--preview", action="store_true", help="also write a PNG montage of the result")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same case")
    p.add_argument("--progress", default="text", choices=["text", "json", "none"])
    p.set_defaults(func=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    from DiffSegCore.inference.ensemble import SegmentSettings
    from DiffSegCore.inference.pipeline import OutputOptions, segment_case

    cases = collect_cases(args.inputs)
    progress = Progress(args.progress, len(cases))
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create output folder {args.output_dir} ({exc.strerror}); choose another --output-dir"
        ) from None
    if not _writable(args.output_dir):
        raise InputError(f"output folder {args.output_dir} is not writable; choose another --output-dir")
    bundle = load_model(args.model, args.device, progress)
    expected = len(bundle.meta["channels"])
    settings = SegmentSettings.from_args(args)
    options = OutputOptions(args.save_probabilities, args.save_members, args.preview, args.overwrite)
    written = {}
    for index, (name, paths) in enumerate(cases.items()):
        if len(paths) != expected:
            raise InputError(
                f"case {name} has {len(paths)} channel file(s) but model {bundle.meta['id']} needs {expected}; "
                "name channel files <case>_0000, <case>_0001, ..."
            )
        progress.start_case(index, name)
        outputs = segment_case(bundle, paths, name, args.output_dir, settings, options, progress)
        written[name] = {k: str(v) for k, v in outputs.items()}
        progress.result(f"{name}: {outputs['segmentation']}")
    progress.report("done", f"{len(cases)} case(s) segmented", outputs=written)
    return 0


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_segment_parser(subparsers)
    add_models_parser(subparsers)
    add_training_parsers(subparsers)
    return parser


def _report_error(args: argparse.Namespace | None, message: str) -> None:
    from tqdm import tqdm

    if args is not None and getattr(args, "progress", None) == "json":
        print(json.dumps({"stage": "error", "message": message}), flush=True)
    tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line even while a progress bar is drawn


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    # Slicer's Cancel sends SIGTERM: handle it like Ctrl-C so temporary files are removed.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return args.func(args)
    except DiffSegError as exc:
        if args.debug:
            traceback.print_exc()
        _report_error(args, str(exc))
        return 2
    except KeyboardInterrupt:
        _report_error(args, "interrupted; no outputs were written for the unfinished case")
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        _report_error(args, f"unexpected {type(exc).__name__}: {first_line}; rerun with --debug and report it")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
