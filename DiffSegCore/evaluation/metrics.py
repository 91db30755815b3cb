"""Scores of one case: Dice and HD95 per class, and how well the uncertainty finds the errors (AUROC)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_roc_auc

NEAR_STRUCTURE_MM = 3.0  # AUROC region: union of truth and prediction, dilated by this much


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label map (*S) -> one-hot batch of one (1, num_classes, *S), as MONAI's metrics take it."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 0)[None].float()


def dice_per_class(labels: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list[float]:
    """Foreground Dice per class of two (*S) label maps (NaN where a class is absent from both), MONAI's metric."""
    scores = compute_dice(one_hot(labels, num_classes), one_hot(truth, num_classes), include_background=False, ignore_empty=False)
    return [float(v) for v in scores[0]]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _near_structures(truth: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, ...]) -> torch.Tensor:
    """Foreground of truth or prediction, dilated by NEAR_STRUCTURE_MM (max-pooling is a binary dilation
    with a box; MONAI has no plain binary dilation)."""
    union = torch.from_numpy((truth > 0) | (labels > 0)).float()[None, None]
    radius = [max(1, round(NEAR_STRUCTURE_MM / s)) for s in spacing_zyx]
    padded = F.pad(union, [r for r in reversed(radius) for _ in (0, 1)])
    dilated = F.max_pool3d(padded, [2 * r + 1 for r in radius], stride=1)
    return dilated[0, 0] > 0


def case_metrics(labels: np.ndarray, truth: np.ndarray, uncertainty: np.ndarray, num_classes: int, spacing_zyx) -> dict:
    """Per-class Dice and HD95 (mm), and the AUROC of uncertainty for errors near the structures."""
    pred_t, truth_t = torch.from_numpy(labels), torch.from_numpy(truth)
    pred_1h, truth_1h = one_hot(pred_t, num_classes), one_hot(truth_t, num_classes)
    with warnings.catch_warnings():  # MONAI's HD95 calls its own get_mask_edges with a deprecated argument
        warnings.filterwarnings("ignore", ".*always_return_as_numpy.*", FutureWarning)
        hd95 = compute_hausdorff_distance(
            pred_1h, truth_1h, include_background=False, percentile=95, spacing=list(spacing_zyx)
        )[0]
    region = _near_structures(truth, labels, spacing_zyx)
    errors = (pred_t != truth_t)[region].float()
    auroc = None
    if 0 < float(errors.sum()) < errors.numel():
        auroc = float(compute_roc_auc(torch.from_numpy(uncertainty)[region].float(), errors))
    return {
        "dice": dice_per_class(pred_t, truth_t, num_classes),
        "hd95_mm": [_finite(float(v)) for v in hd95],
        "uncertainty_auroc": auroc,
        "error_voxels_near_structures": int(errors.sum()),
    }
