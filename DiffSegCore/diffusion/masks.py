"""Masks in diffusion space: label maps as one-hot * 2 - 1, and the network's output back to x0 and probabilities.

For x0 prediction the network outputs logits and x0 = softmax(logits) * 2 - 1 (fu2023, ImgX-DiffSeg).
"""

from __future__ import annotations

import torch

from DiffSegCore.diffusion.process import x0_from_eps

PREDICTIONS = ("x0", "eps")  # what a diffusion network is trained to output


def to_diffusion_space(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class numbers as a mask in diffusion space: one-hot * 2 - 1.

    Args:
        labels: class numbers 0..num_classes-1, (B, *S).
        num_classes: K, classes including the background.

    Returns:
        float32 mask with values -1 and 1, (B, K, *S).
    """
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1)
    return one_hot.float() * 2 - 1


def predict_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, prediction: str) -> torch.Tensor:
    """The network's estimate of x0 in [-1, 1] from its raw output.

    Args:
        output: network output, logits for "x0" or noise for "eps", (B, K, *S).
        x_t: the noisy mask the network saw, (B, K, *S).
        alpha_bar: alpha_bar of the step x_t is at, a float or (B,).
        prediction: "x0" or "eps".

    Returns:
        float32 x0 estimate in [-1, 1], (B, K, *S).
    """
    if prediction == "x0":
        return torch.softmax(output.float(), dim=1) * 2 - 1
    return x0_from_eps(x_t, output.float(), alpha_bar).clamp(-1, 1)


def x0_to_probabilities(x0: torch.Tensor) -> torch.Tensor:
    """Map x0 in [-1, 1] back to class probabilities summing to one per voxel.

    Args:
        x0: mask estimate in [-1, 1], (B, K, *S).

    Returns:
        probabilities, (B, K, *S), summing to one over dim 1.
    """
    p = ((x0 + 1) / 2).clamp_min(1e-6)
    return p / p.sum(dim=1, keepdim=True)
