"""Segment every volume in a folder through the DiffSeg Slicer logic and save the results.

    Slicer --no-main-window --python-script DiffSegExtension/Scripts/batch.py \
        --input DIR --output DIR --model ID [--steps K --ensemble N --sampler ddim ...]

Writes <case>.seg.nrrd and <case>_uncertainty.nrrd per case and prints a table: per segment its
volume (mL) and mean uncertainty inside it and on its boundary, with the case's review score (higher =
review first). Channel files follow the nnU-Net
naming (<case>_0000, <case>_0001, ...). Also runs with plain Python on a slicer-core scene (how the
tests drive it).
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

import slicer  # noqa: E402
from DiffSegLib import scene as bridge  # noqa: E402
from DiffSegLib.logic import SegmentationLogic, model_meta  # noqa: E402
from DiffSegLib.review import Review  # noqa: E402

from DiffSegCore import settings  # noqa: E402
from DiffSegCore.errors import DiffSegError  # noqa: E402
from DiffSegCore.io.cases import VOLUME_SUFFIXES, group_by_case, volume_files  # noqa: E402
from DiffSegCore.models.registry import resolve_model  # noqa: E402

# The run settings a batch takes (settings.py); a pre-segmentation here can only come from the model.
BATCH_SETTINGS = ("steps", "ensemble", "sampler", "preseg", "preseg_step", "device", "seed", "max_memory")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batch.py", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="folder of volumes")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results")
    parser.add_argument("--model", required=True, help="registry id or bundle path")
    settings.add_arguments(parser, BATCH_SETTINGS)
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


def run(args: argparse.Namespace) -> int:
    if not args.input.is_dir():
        print(f"error: input folder {args.input} does not exist", file=sys.stderr)
        return 2
    cases = group_by_case(volume_files(args.input))
    if not cases:
        print(f"error: no volumes ({', '.join(VOLUME_SUFFIXES)}) in {args.input}", file=sys.stderr)
        return 2
    if args.preseg not in (None, *settings.PRESEG_SOURCES):
        print("error: --preseg takes none or model in a batch (one label file cannot fit every case)", file=sys.stderr)
        return 2
    chosen = settings.chosen_from_args(args)
    chosen.setdefault("seed", settings.BY_NAME["seed"].default)  # a batch is reproducible unless a seed is given
    try:  # one clear error before any case: a model that cannot be had, or settings it cannot take
        resolve_model(args.model)  # fetched once here if it is a registry id that is not here yet
        settings.resolve(model_meta(args.model), chosen)
    except DiffSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
            segmentation, uncertainty = logic.process(nodes, args.model, saveMembers=args.save_members, **chosen)
            created = [segmentation, uncertainty, *logic.activeRun.memberSegmentationNodes]
            nodes += created
            save_segmentation(segmentation, args.output / f"{name}.seg.nrrd")
            bridge.write_volume(uncertainty, args.output / f"{name}_uncertainty.nrrd")
            for k, member in enumerate(logic.activeRun.memberSegmentationNodes, start=1):
                save_segmentation(member, args.output / f"{name}_member{k}.seg.nrrd")
            review = Review.of(segmentation)
            score = "-" if review.score is None else f"{review.score:.3f}"
            rows.append((name, "ok", time.monotonic() - started, score, review.rows()))
        except Exception as exc:  # one bad case must not stop the batch
            failures += 1
            rows.append((name, f"failed: {exc}", time.monotonic() - started, "-", [("-",) * 5]))
        finally:
            for node in nodes:
                scene.RemoveNode(node)
    # One line per segment: the core's review figures (volume, mean uncertainty inside and on the boundary) and the
    # case's review score (DiffSegCore/inference/case_score.py).
    print(f"{'case':<24} {'seconds':>7} {'score':>6}  {'segment':<24} {'mL':>8} {'inside':>7} {'boundary':>8}  status")
    for name, status, seconds, score, segments in rows:
        for segment, volume, inside, boundary, _ in segments:
            print(f"{name:<24} {seconds:7.1f} {score:>6}  {segment:<24} {volume:>8} {inside:>7} {boundary:>8}  {status}")
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
