"""Study 2 (fu2023 Table 2): the diffusion model vs. a plain U-Net trained at the same budget.

python benchmarks/study_diffusion_vs_unet.py [--iterations N] [--cases N] [--smoke]
"""

from __future__ import annotations

from studies_common import arm_study_main

STUDY = "study_diffusion_vs_unet"
# The diffusion arm is study 1's default arm (shared cache). fu2023 Table 2, prostate MR (Dice, HD mm).
ARMS = [
    ("default", "diffusion (recycling, x0, Dice+CE, 5 steps), one DDIM sample", {}, True, (0.830, 5.424)),
    ("unet", "plain U-Net, same network body, Dice+CE", {"kind": "unet"}, True, (0.838, 5.197)),
]


def main() -> None:
    arm_study_main(
        STUDY, __doc__, ARMS, paper="fu2023 prostate MR (Dice, HD mm)", title="Diffusion vs. U-Net (fu2023 Table 2)"
    )


if __name__ == "__main__":
    main()
