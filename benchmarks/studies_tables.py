"""Print the markdown tables of docs/results.md from benchmarks/results/study_*.json.

python benchmarks/studies_tables.py [STUDY ...]
"""

from __future__ import annotations

import json
import sys

from studies_common import output_dir


def _f(value, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def arms(data: dict) -> str:
    header = [
        "arm",
        "what",
        "train cases",
        "Dice (± sd)",
        "Dice per class",
        "HD95 mm (± sd)",
        "CPU s",
        "paper Dice / HD",
    ]
    rows = [
        [
            f"`{a['arm']}`",
            a["description"],
            str(a["train_cases"]),
            f"{_f(a['dice'])} ± {_f(a['dice_std'])}",
            " / ".join(_f(v) for v in a["dice_per_class"]),
            f"{_f(a['hd95'], 2)} ± {_f(a['hd95_std'], 2)}",
            f"{a['cpu_seconds']:.0f}",
            "-" if not a.get("paper") else f"{a['paper'][0]:.3f} / {a['paper'][1]:.2f}",
        ]
        for a in data["arms"]
    ]
    return table(header, rows)


def steps_ensemble(data: dict) -> str:
    out = []
    for sampler in dict.fromkeys(c["sampler"] for c in data["grid"]):
        cells = [c for c in data["grid"] if c["sampler"] == sampler]
        sizes = sorted({c["ensemble"] for c in cells})
        rows = []
        for steps in sorted({c["steps"] for c in cells}):
            got = {c["ensemble"]: c for c in cells if c["steps"] == steps}
            rows.append([str(steps), *(f"{_f(got[n]['dice'])} / {_f(got[n]['hd95'], 2)}" for n in sizes)])
        out.append(f"**{sampler.upper()}** (Dice / HD95 mm)\n\n" + table(["steps \\ ensemble", *map(str, sizes)], rows))
    return "\n\n".join(out)


def pd_ddpm(data: dict) -> str:
    starts = sorted({r["start_step"] for r in data["rows"]})
    rows = []
    for source in dict.fromkeys(r["preseg"] for r in data["rows"]):
        mine = {r["start_step"]: r for r in data["rows"] if r["preseg"] == source}
        first = mine[starts[0]]
        rows.append(
            [f"`{source}`", f"{_f(first['preseg_dice'])} / {_f(first['preseg_hd95'], 2)}"]
            + [f"{_f(mine[s]['dice'])} / {_f(mine[s]['hd95'], 2)}" for s in starts]
        )
    base = data["no_preseg"]
    note = f"\n\nNo pre-segmentation ({base['steps']} steps from noise): Dice {_f(base['dice'])}, HD95 {_f(base['hd95'], 2)} mm."
    return table(["pre-segmentation", "its own Dice / HD95", *(f"T'={s} ({s + 1} steps)" for s in starts)], rows) + note


def uncertainty(data: dict) -> str:
    header = [
        "sampler",
        "steps",
        "ensemble",
        "voxel AUROC variance (all voxels)",
        "AUROC entropy (all voxels)",
        "AUROC variance near structures (mean per case)",
        "Spearman(Dice, mean fg variance)",
        "Spearman(Dice, mean fg entropy)",
        "worst case: Dice, uncertainty rank",
    ]
    rows = [
        [
            r["sampler"],
            str(r["steps"]),
            str(r["ensemble"]),
            _f(r["auroc_variance_pooled"]),
            _f(r["auroc_entropy_pooled"]),
            _f(r["auroc_variance_near_mean_per_case"]),
            _f(r["spearman_dice_vs_mean_variance_fg"]),
            _f(r["spearman_dice_vs_mean_entropy_fg"]),
            f"{_f(r['worst_case']['dice'])}, {r['worst_case']['uncertainty_rank']} of {len(r['cases'])}",
        ]
        for r in data["results"]
    ]
    return table(header, rows)


def members(data: dict) -> str:
    """Study 7c: member sets at 5 and 8 members, without and with the default threshold 0.7."""
    header = ["members", "n", "threshold", "Dice", "anterior / posterior", "HD95 mm", "AUROC", "review score", "mean variance"]

    def rank(value: dict | None) -> str:
        return "-" if not value else f"{value['spearman']:.2f}, {value['worst_rank']} of 40"

    rows = [
        [
            r["set"],
            str(r["members"]),
            str(r["threshold"]),
            _f(r["dice"], 4),
            " / ".join(_f(v) for v in r["dice_per_class"]),
            _f(r["hd95_mm"], 2),
            _f(r["auroc_near"]),
            rank(r["review_score"]),
            rank(r["mean_fg_variance"]),
        ]
        for r in data["rows"]
        if r["members"] in (5, 8) and r["threshold"] in (0.0, 0.7)
    ]
    return table(header, rows)


RENDER = {
    "study_steps_ensemble": steps_ensemble,
    "study_pd_ddpm": pd_ddpm,
    "study_uncertainty": uncertainty,
    "study_members": members,
}


def main() -> None:
    args = sys.argv[1:]
    folder = output_dir(smoke="--smoke" in args)
    names = [a for a in args if a != "--smoke"] or sorted(p.stem for p in folder.glob("study_*.json"))
    for name in names:
        data = json.loads((folder / f"{name}.json").read_text())
        machine = data["machine"]
        print(
            f"### {name}\n\n`{data['command']}`  \n{data['finished']}, {machine.get('cpu')}, commit {machine.get('commit')}"
        )
        print(f"Budget: {data['budget']}\n")
        print(RENDER.get(name, arms)(data) + "\n")


if __name__ == "__main__":
    main()
