"""Study 5 (bieder2023): training on patches with and without coordinate channels vs. whole volumes.

Patch arms see an eighth of the default crop per sample (as PatchDDM: 128^3 patches of 256^3) and
are sampled on the whole volume, as PatchDDM does; every arm gets the same number of iterations,
and the "x8" arms take 8x the patches per batch, so they see as many voxels as the default arm.

    python benchmarks/study_patch_training.py [--iterations N] [--cases N] [--smoke]
"""

from __future__ import annotations

from studies_common import arm_study_main

STUDY = "study_patch_training"
PATCH = [16, 24, 16]  # (z, y, x) voxels: an eighth of the default 32x48x32 crop
# bieder2023 Table 2 (BraTS, single sample; Dice, HD95 mm): FullRes vs. PatchDDM; patches without
# coordinates "did not converge" (no numbers).
ARMS = [
    ("default", "32x48x32 crops, about the whole volume (study 1 default arm)", {}, True, (0.82, 16.80)),
    ("patch_coords", f"patches {PATCH} + coordinate channels", {"size": PATCH, "coords": True}, True, (0.88, 9.04)),
    ("patch_no_coords", f"patches {PATCH}, no coordinates", {"size": PATCH}, True, None),
    (
        "patch_coords_x8",
        "patches + coordinates, batch 16: the default arm's voxels",
        {"size": PATCH, "coords": True, "batch": 16},
        True,
        None,
    ),
    ("patch_no_coords_x8", "patches, no coordinates, batch 16", {"size": PATCH, "batch": 16}, True, None),
]


def main() -> None:
    arm_study_main(
        STUDY,
        __doc__,
        ARMS,
        paper="bieder2023 BraTS single sample (Dice, HD95 mm)",
        title="Patch training (bieder2023)",
    )


if __name__ == "__main__":
    main()
