"""Study 10 (bieder2023 on abdominal MR): patches with and without coordinates vs. whole volumes at a coarser spacing.

CHAOS MR T2-SPIR (liver, right kidney, left kidney, spleen), 256x256x31-46 voxels at 1.25x1.25x7.7 mm.
Every arm trains with `diffseg train` for the same iterations and batch on the same split (11 train /
4 validation cases: the abdomen-mr-t2 model's split), and is scored on the 4 validation cases on their
own grid. The patch model is sampled on the whole volume (PatchDDM) and by sliding window (its training
patch). Each scoring runs in its own process, so its peak resident memory is its own.

    python benchmarks/study_abdomen_patches.py [--iterations N] [--members N] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIFFSEG_CHAOS_DATA") or REPO.parent / "shared" / "data" / "chaos")
RUNS = REPO / "runs" / "studies" / "abdomen"
RESULTS = REPO / "benchmarks" / "results"
CARD = REPO / "docs" / "model_cards" / "abdomen.json"
DIFFSEG = [sys.executable, "-m", "DiffSegCore"]
# (z, y, x) voxels at 2.5x2.5x7.7 mm: an eighth of a 32x128x128 volume, as PatchDDM's 128^3 of 256^3
PATCH = ["16", "64", "64"]
COMMON = ["--validation-fraction", "0.27", "--widths", "8", "16", "32", "64", "--ema", "0.995", "--affine-prob", "0.25"]
FINE = ["--spacing", "2.5", "2.5", "7.7"]
ARMS = {
    "patch_coords": (
        "patches 16x64x64 at 2.5x2.5x7.7 mm + coordinate channels",
        [*FINE, "--patch-size", *PATCH, "--coords"],
    ),
    "patch_no_coords": ("patches 16x64x64 at 2.5x2.5x7.7 mm, no coordinates", [*FINE, "--patch-size", *PATCH]),
    "whole_5mm": ("whole volumes at 5x5x7.7 mm (about 40x64x64)", ["--spacing", "5.0", "5.0", "7.7"]),
}
# (arm, window setting) pairs scored; the patch arms also by sliding window over their training patch.
SCORINGS = [
    ("patch_coords", "full"),
    ("patch_coords", "sliding"),
    ("patch_no_coords", "full"),
    ("whole_5mm", "full"),
]
RIGHT_KIDNEY, LEFT_KIDNEY = 2, 3


def train_arm(name: str, iterations: int) -> dict:
    """Train one arm with `diffseg train` (skipped when its bundle exists); its command and training peak memory."""
    run = RUNS / name
    command = [*DIFFSEG, "train", "--data", str(DATA), "--output", str(run), "--card", str(CARD)]
    command += COMMON + ARMS[name][1] + ["--iterations", str(iterations), "--val-every", str(iterations)]
    command += ["--val-steps", "1", "--checkpoint-every", "25", "--threads", "1"]
    record = run / "study_train.json"
    if record.exists() and (run / "bundle" / "model.json").exists():
        return json.loads(record.read_text())
    resume = ["--resume"] if (run / "config.json").exists() else []
    start = time.time()
    subprocess.run(command + resume, check=True, cwd=REPO)
    # ru_maxrss of children is the largest child's peak: this arm's training process (one per arm).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    shown = " ".join(["diffseg", *command[len(DIFFSEG) :]])
    shown = shown.replace(str(REPO) + "/", "").replace(str(DATA), "../shared/data/chaos")
    result = {
        "command": shown,
        "peak_rss_bytes": peak,
        "wall_seconds": round(time.time() - start, 1),
        "resumed": bool(resume),
    }
    record.write_text(json.dumps(result, indent=1))
    return result


def kidney_swap(labels, truth) -> float:
    """Share of true kidney voxels labelled as the other kidney (left/right confusion)."""
    swapped = ((truth == RIGHT_KIDNEY) & (labels == LEFT_KIDNEY)).sum() + (
        (truth == LEFT_KIDNEY) & (labels == RIGHT_KIDNEY)
    ).sum()
    return float(swapped / max(((truth == RIGHT_KIDNEY) | (truth == LEFT_KIDNEY)).sum(), 1))


def score(name: str, window: str, members: int) -> dict:
    """Segment the arm's validation cases (1 DDIM step, `members` members) in this process and score them."""
    import numpy as np
    import torch

    from DiffSegCore.evaluation.metrics import case_metrics
    from DiffSegCore.inference.pipeline import OutputOptions, on_input_grid, run_case
    from DiffSegCore.io.volumes import read_volume, to_array
    from DiffSegCore.models.bundle import load_bundle
    from DiffSegCore.progress import RunProgress
    from DiffSegCore.settings import resolve

    torch.set_num_threads(1)
    run = RUNS / name
    bundle = load_bundle(run / "bundle")
    settings = resolve(bundle.meta, {"steps": 1, "ensemble": members, "window": window, "device": "cpu"})
    rows = []
    for case in json.loads((run / "split.json").read_text())["validation"]:
        result = run_case(bundle, [DATA / "imagesTr" / f"{case}.nii.gz"], settings, RunProgress("none"))
        outputs = on_input_grid(result, OutputOptions())
        labels = to_array(outputs["segmentation"]).astype(np.int64)
        truth = np.rint(to_array(read_volume(DATA / "labelsTr" / f"{case}.nii.gz"))).astype(np.int64)
        spacing_zyx = tuple(reversed(result.reference.GetSpacing()))
        metrics = case_metrics(labels, truth, to_array(outputs["uncertainty"]), bundle.num_classes, spacing_zyx)
        rows.append(
            {
                "case": case,
                **metrics,
                "kidney_swap": kidney_swap(labels, truth),
                "seconds": sum(result.timings.values()),
            }
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "arm": name,
        "window": window,
        "window_size": bundle.meta.get("window"),
        "cases": rows,
        "peak_rss_bytes": peak,
    }


def score_cached(arm: str, window: str, members: int, smoke: bool) -> Path:
    """The arm's scores in a process of its own (so its peak memory is its own), kept in the run folder."""
    path = RUNS / arm / f"study_score_{window}_{members}.json"
    if not path.exists():
        command = [sys.executable, __file__, "--score", arm, window, "--members", str(members)]
        out = subprocess.run([*command, *(["--smoke"] if smoke else [])], check=True, capture_output=True, text=True)
        path.write_text(out.stdout.strip().splitlines()[-1])
    return path


def summary(scored: dict) -> dict:
    """Means over the validation cases."""
    import numpy as np

    rows = scored["cases"]
    dice = np.array([r["dice"] for r in rows], dtype=float)
    hd = np.array([[np.nan if v is None else v for v in r["hd95_mm"]] for r in rows], dtype=float)
    auroc = [r["uncertainty_auroc"] for r in rows if r["uncertainty_auroc"] is not None]
    return {
        "dice": float(dice.mean()),
        "dice_per_class": dice.mean(0).round(4).tolist(),
        "hd95_mm": float(np.nanmean(hd)),
        "auroc": float(np.mean(auroc)) if auroc else None,
        "kidney_swap": float(np.mean([r["kidney_swap"] for r in rows])),
        "seconds_per_case": float(np.mean([r["seconds"] for r in rows])),
        "peak_rss_mib": scored["peak_rss_bytes"] / 2**20,
    }


def _iterations(arm: str) -> int:
    return json.loads((RUNS / arm / "config.json").read_text())["iterations"]


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def table(trained: dict, scores: list[dict]) -> str:
    header = "| arm | iterations | inference | Dice | Dice liver / R kidney / L kidney / spleen | HD95 mm | kidney L/R swap | AUROC | s per case | peak RSS MiB | training peak RSS MiB |"
    lines = [header, "|" + "---|" * 11]
    for s in scores:
        m = s["summary"]
        mode = "whole volume" if s["window"] == "full" else f"sliding window {'x'.join(map(str, s['window_size']))}"
        auroc = "-" if m["auroc"] is None else f"{m['auroc']:.3f}"
        lines.append(
            f"| `{s['arm']}` | {_iterations(s['arm'])} | {mode} | {m['dice']:.3f} | {' / '.join(f'{v:.3f}' for v in m['dice_per_class'])} | "
            f"{m['hd95_mm']:.1f} | {100 * m['kidney_swap']:.1f} % | {auroc} | {m['seconds_per_case']:.1f} | "
            f"{m['peak_rss_mib']:.0f} | {_mib(trained[s['arm']].get('peak_rss_bytes'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="train only these")
    parser.add_argument("--score", nargs=2, metavar=("ARM", "WINDOW"), help=argparse.SUPPRESS)
    parser.add_argument("--score-only", nargs=2, metavar=("ARM", "WINDOW"), help="score one trained arm (full|sliding)")
    parser.add_argument("--smoke", action="store_true", help="4 iterations, 1 member: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        global RUNS
        RUNS, args.iterations, args.members = RUNS.parent / "abdomen_smoke", 4, 1
    if args.score:
        print(json.dumps(score(*args.score, args.members)))
        return
    if args.score_only:
        score_cached(*args.score_only, args.members, args.smoke)
        return
    trained = {name: train_arm(name, args.iterations) for name in args.arms}
    if set(args.arms) != set(ARMS):
        return
    scores = []
    for arm, window in SCORINGS:
        scored = json.loads(score_cached(arm, window, args.members, args.smoke).read_text())
        scores.append({**scored, "summary": summary(scored)})
        print(arm, window, scores[-1]["summary"], flush=True)
    text = table(trained, scores)
    print(text)
    if not args.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
        record = {
            "when": stamp,
            "commit": commit,
            "iterations": args.iterations,
            "members": args.members,
            "trained": trained,
            "scores": scores,
        }
        (RESULTS / "study_abdomen_patches.json").write_text(json.dumps(record, indent=1))
        (RESULTS / "study_abdomen_patches.md").write_text(f"{stamp}, commit {commit}\n\n{text}\n")


if __name__ == "__main__":
    main()
