"""What the uncertainty volume means and how it is shown: one definition for the core and the extension.

The uncertainty volume holds, per voxel, the variance of each class probability across the
ensemble members (population variance, divided by N), summed over the K classes
(inference/ensemble.py). It is 0 where every member gives the same probabilities; it is 0.5 where
the members split half and half between two classes; its largest possible value is 1 - 1/K (the
members split evenly over all K classes). Stdlib only, so the Slicer GUI process can import it.
"""

from __future__ import annotations

DEFINITION = (
    "variance of each class probability across the ensemble members, summed over the classes "
    "(0: the members agree; 0.5: they split half and half between two classes)"
)
# One display scale for every case and model, so that two results can be compared: its top is a coin
# toss between two classes; the rarer splits over three or more classes (up to 1 - 1/K) show at the top.
DISPLAY_RANGE = (0.0, 0.5)
# Below this the members are taken to agree: the overlay is transparent there, and uncertain regions
# (review figures) are made of the voxels at or above it. The user can move the overlay's threshold.
DEFAULT_THRESHOLD = 0.05


def largest_possible(num_classes: int) -> float:
    """The largest value the uncertainty can take with `num_classes` classes (background included)."""
    return 1.0 - 1.0 / num_classes if num_classes > 0 else 0.0


def single_member_warning(ensemble: int) -> str:
    """A warning when the ensemble cannot show any uncertainty, else an empty string."""
    if ensemble > 1:
        return ""
    return (
        "an ensemble of 1 member gives no uncertainty (the uncertainty volume is all zero); "
        "use 2 or more members (--ensemble) to see where the model is unsure"
    )


def describe(ensemble: int) -> dict:
    """The meaning and display scale, as written into every run record (run.json), with the warning
    (or '') that an ensemble of `ensemble` members shows no uncertainty."""
    return {
        "definition": DEFINITION,
        "display_range": list(DISPLAY_RANGE),
        "threshold": DEFAULT_THRESHOLD,
        "warning": single_member_warning(ensemble),
    }
