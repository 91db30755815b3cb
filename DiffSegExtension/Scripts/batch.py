"""Segment every volume in a folder through the DiffSeg Slicer logic and save the results.

    Slicer --no-main-window --python-script DiffSegExtension/Scripts/batch.py \
        --input DIR --output DIR --model ID [--steps K --ensemble N --sampler ddim ...]

Writes <case>.seg.nrrd and <case>_uncertainty.nrrd per case and prints a summary. Channel files
follow the nnU-Net naming (<case>_0000, <case>_0001, ...). Also runs with plain Python on a
slicer-core scene (how the tests drive it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(MODULE_DIR))
if (MODULE_DIR.parent / "DiffSegCore").is_dir():
    sys.path.insert(0, str(MODULE_DIR.parent))

import numpy as np  # noqa: E402
import slicer  # noqa: E402
from DiffSegLib import scene as bridge  # noqa: E402
from DiffSegLib.logic import DEVICES, SAMPLERS, SegmentationLogic, sampler_defaults  # noqa: E402

from DiffSegCore.io.cases import VOLUME_SUFFIXES, group_by_case, volume_files  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batch.py", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="folder of volumes")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results")
    parser.add_argument("--model", required=True, help="registry id or bundle path")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--ensemble", type=int, help="ensemble members (default: the model's)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the model's")
    parser.add_argument("--preseg", choices=["none", "model"], default="none")
    parser.add_argument("--preseg-step", type=int)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-members", action="store_true", help="also save one .seg.nrrd per ensemble member")
    return parser.parse_args(argv)


def open_scene():
    """Slicer's scene and volumes logic, or a standalone slicer-core scene outside the application."""
    if hasattr(slicer, "app"):
        return slicer.mrmlScene, slicer.modules.volumes.logic(), None
    standalone = bridge.StandaloneScene()
    return standalone.scene, standalone.logics["Volumes"], standalone


def save_segmentation(node, path: Path) -> None:
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise OSError(f"could not write {path}")


def fill_model_defaults(args: argparse.Namespace) -> None:
    """Steps, ensemble size and sampler not given take the model's own defaults (fetching it if asked for by id)."""
    from DiffSegCore.errors import DiffSegError
    from DiffSegCore.models.registry import resolve_model

    try:
        defaults = sampler_defaults(str(resolve_model(args.model)))
    except DiffSegError as exc:
        raise SystemExit(f"error: {exc}") from None
    for option, value in defaults.items():
        if getattr(args, option) is None:
            setattr(args, option, value)


def run(args: argparse.Namespace) -> int:
    if not args.input.is_dir():
        print(f"error: input folder {args.input} does not exist", file=sys.stderr)
        return 2
    cases = group_by_case(volume_files(args.input))
    if not cases:
        print(f"error: no volumes ({', '.join(VOLUME_SUFFIXES)}) in {args.input}", file=sys.stderr)
        return 2
    fill_model_defaults(args)
    args.output.mkdir(parents=True, exist_ok=True)
    scene, volumes_logic, _keep_alive = open_scene()
    logic = SegmentationLogic(scene)
    rows, failures = [], 0
    for name, paths in cases.items():
        started = time.monotonic()
        nodes = []
        try:
            for path in paths:
                node = volumes_logic.AddArchetypeVolume(str(path), path.name.split(".")[0])
                if node is None:
                    raise OSError(f"could not load {path.name}")
                nodes.append(node)
            segmentation, uncertainty = logic.process(
                nodes,
                args.model,
                args.steps,
                args.ensemble,
                sampler=args.sampler,
                preseg=None if args.preseg == "none" else args.preseg,
                presegStep=args.preseg_step,
                device=args.device,
                saveMembers=args.save_members,
                seed=args.seed,
            )
            created = [segmentation, uncertainty, *logic.activeRun.memberSegmentationNodes]
            nodes += created
            save_segmentation(segmentation, args.output / f"{name}.seg.nrrd")
            bridge.write_volume(uncertainty, args.output / f"{name}_uncertainty.nrrd")
            for k, member in enumerate(logic.activeRun.memberSegmentationNodes, start=1):
                save_segmentation(member, args.output / f"{name}_member{k}.seg.nrrd")
            spread = bridge.array_from_volume(uncertainty)
            segments = segmentation.GetSegmentation().GetNumberOfSegments()
            rows.append((name, "ok", time.monotonic() - started, segments, float(np.mean(spread))))
        except Exception as exc:  # one bad case must not stop the batch
            failures += 1
            rows.append((name, f"failed: {exc}", time.monotonic() - started, 0, float("nan")))
        finally:
            for node in nodes:
                scene.RemoveNode(node)
    print(f"{'case':<28} {'seconds':>8} {'segments':>8} {'mean uncertainty':>17}  status")
    for name, status, seconds, segments, spread in rows:
        print(f"{name:<28} {seconds:8.1f} {segments:8d} {spread:17.5f}  {status}")
    print(f"{len(rows) - failures} of {len(rows)} case(s) segmented; results in {args.output}")
    return 1 if failures else 0


def main() -> None:
    code = run(parse_args(sys.argv[1:]))
    if hasattr(slicer, "app"):
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    main()
