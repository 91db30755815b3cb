"""Training losses: the diffusion objective (x0 or eps prediction, with recycling) and the plain U-Net's.

Masks live in diffusion space as one-hot * 2 - 1; for x0 prediction the network outputs logits and
x0 = softmax(logits) * 2 - 1 (fu2023, ImgX-DiffSeg).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from DiffSegCore.diffusion.masks import predict_x0, to_diffusion_space, x0_to_probabilities
from DiffSegCore.diffusion.process import q_sample
from DiffSegCore.diffusion.schedules import NoiseSchedule

# Foreground Dice (background left out of the Dice term) plus cross-entropy over all classes.
_dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
_dice_ce_probs = DiceCELoss(include_background=False, to_onehot_y=True, softmax=False)


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Foreground Dice + cross-entropy on logits.

    Args:
        logits: network output, (B, K, *S).
        label: class numbers, (B, 1, *S).

    Returns:
        scalar loss.
    """
    return _dice_ce(logits.float(), label)


def probability_loss(x0: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Foreground Dice + cross-entropy on an x0 estimate (for eps prediction, whose output is no logits).

    MONAI's CE takes logits, so the negative log-likelihood of the probabilities is taken directly.

    Args:
        x0: mask estimate in [-1, 1], (B, K, *S).
        label: class numbers, (B, 1, *S).

    Returns:
        scalar loss.
    """
    probs = x0_to_probabilities(x0.float().clamp(-1, 1))
    dice = _dice_ce_probs.dice(probs, label)
    ce = F.nll_loss(probs.log(), label[:, 0].long())
    return dice + ce


def _predict_x0(network, inputs: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str, alpha_bar):
    """The network's x0 estimate and its raw output at step t."""
    out = network(torch.cat([inputs, x_t], dim=1), t)
    return predict_x0(out, x_t, alpha_bar, prediction), out


def diffusion_loss(
    network,
    inputs: torch.Tensor,
    label: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    recycling: bool,
    generator: torch.Generator,
    eps_weight: float = 0.1,
) -> torch.Tensor:
    """One batch of the diffusion objective.

    With recycling (fu2023 section 3.2), the noisy mask at t is made from the network's own
    (gradient-stopped) x0 prediction at t+1 instead of the ground truth; at the last step, where no
    t+1 exists, the prediction at that step itself is recycled.

    Args:
        network: denoiser taking (B, C + K, *S) and steps (B,), returning (B, K, *S); may be wrapped in DDP.
        inputs: image (+ coordinate) channels, (B, C, *S).
        label: class numbers, (B, 1, *S).
        schedule: the training schedule; steps t are drawn from its indices.
        prediction: "x0" or "eps".
        recycling: whether to recycle the prediction at t+1.
        generator: source of the steps and noise, on the device of `inputs`.
        eps_weight: weight of the noise MSE for eps prediction.

    Returns:
        scalar loss.
    """
    device = inputs.device
    steps = len(schedule)
    alpha_bar = schedule.alpha_bar.to(device=device, dtype=torch.float32)
    x0 = to_diffusion_space(label[:, 0], network_classes(network))
    batch = inputs.shape[0]
    t = torch.randint(0, steps, (batch,), generator=generator, device=device)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    start = x0
    if recycling:
        t_next = (t + 1).clamp(max=steps - 1)
        noise_next = torch.randn(x0.shape, generator=generator, device=device)
        x_next = q_sample(x0, alpha_bar[t_next], noise_next)
        with torch.no_grad():
            start, _ = _predict_x0(unwrap(network), inputs, x_next, t_next, prediction, alpha_bar[t_next])
    x_t = q_sample(start, alpha_bar[t], noise)
    estimate, out = _predict_x0(network, inputs, x_t, t, prediction, alpha_bar[t])
    if prediction == "x0":
        return segmentation_loss(out, label)
    # fu2023 eq. 6 and appendix: L2 to the noise that was added, plus the segmentation loss on the
    # x0 it implies (which, with recycling, is what pulls the estimate to the ground truth).
    return eps_weight * F.mse_loss(out.float(), noise) + probability_loss(estimate, label)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DistributedDataParallel wrapper."""
    return getattr(network, "module", network)


def network_classes(network: torch.nn.Module) -> int:
    """K, the classes (output channels) of a network, wrapped or not."""
    return unwrap(network).num_classes
