"""Study 1 (fu2023 Tables 1 and 3): recycling vs. standard training, x0 vs. eps prediction,
Dice loss on/off, 5 vs. 1000 training steps, each at the same training budget.

    python benchmarks/study_training_strategy.py [--iterations N] [--cases N] [--smoke]
"""

from __future__ import annotations

from studies_common import arm_study_main

STUDY = "study_training_strategy"
# (arm, what it changes from the default recipe, TrainConfig overrides, Dice term in the loss,
#  fu2023's prostate-MR Dice/HD at 12,500 steps: Table 1 recycling N/Y, Table 3 (a) noise vs.
#  logits, (b) Dice loss N/Y, (c) 1000 vs. 5 steps).
ARMS = [
    ("default", "recycling, x0 prediction, Dice+CE, 5 training steps", {}, True, (0.830, 5.424)),
    ("no_recycling", "standard training (ground truth noised)", {"recycling": False}, True, (0.815, 5.485)),
    ("eps", "eps prediction (L2 weight 0.1 + Dice+CE on implied x0)", {"prediction": "eps"}, True, (0.713, 23.855)),
    ("ce_only", "no Dice loss (cross-entropy only)", {}, False, (0.812, 5.463)),
    ("steps_1000", "1000 training steps (sampled with 5)", {"train_steps": 1000}, True, (0.821, 5.223)),
]


def main() -> None:
    arm_study_main(STUDY, __doc__, ARMS, paper="fu2023 prostate MR (Dice, HD mm)", title="Training strategy (fu2023)")


if __name__ == "__main__":
    main()
