"""Study 2 (fu2023 Table 2): the diffusion model vs. a plain U-Net trained at the same budget.

python benchmarks/study_diffusion_vs_unet.py [--iterations N] [--cases N] [--smoke]
"""

from __future__ import annotations

from studies_common import STUDY_META, bar_plot, budget_from, load_data, parser, run_arms, write_arms

STUDY = "study_diffusion_vs_unet"
# The diffusion arm is study 1's default arm (shared cache). fu2023 Table 2, prostate MR (Dice, HD mm).
ARMS = [
    ("default", "diffusion (recycling, x0, Dice+CE, 5 steps), one DDIM sample", {}, True, (0.830, 5.424)),
    ("unet", "plain U-Net, same network body, Dice+CE", {"kind": "unet"}, True, (0.838, 5.197)),
]


def main() -> None:
    args = parser(__doc__).parse_args()
    budget = budget_from(args)
    data = load_data(STUDY_META, budget, args.smoke)
    rows = run_arms(ARMS, data, budget)
    write_arms(STUDY, rows, data, budget, args.smoke, paper="fu2023 prostate MR (Dice, HD mm)")
    bar_plot(STUDY, rows, f"Diffusion vs. U-Net (fu2023 Table 2), {budget.iterations} iterations per arm", args.smoke)


if __name__ == "__main__":
    main()
