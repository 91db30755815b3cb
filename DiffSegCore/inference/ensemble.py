"""An ensemble of diffusion samples: members sampled in batches, reduced to mean probabilities and uncertainty."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from DiffSegCore.errors import RuntimeFault
from DiffSegCore.inference.case_score import review_score
from DiffSegCore.inference.plan import Plan, is_out_of_memory, make_plan
from DiffSegCore.inference.predictor import bundle_members, conditioning, presegment
from DiffSegCore.models.bundle import ModelBundle
from DiffSegCore.progress import RunProgress
from DiffSegCore.settings import RunSettings


@dataclass
class EnsembleResult:
    """Mean class probabilities (K, *S), argmax labels, and uncertainty over N members."""

    mean_probs: torch.Tensor
    labels: torch.Tensor
    variance: torch.Tensor
    entropy: torch.Tensor
    variance_per_class: torch.Tensor | None = None
    member_labels: torch.Tensor | None = None
    plan: str = ""  # the plan the members ran with (after any out-of-memory fallback)
    device: str = "cpu"
    plan_record: dict = field(default_factory=dict)  # that plan and its memory estimate (Plan.to_json)
    review_score: float | None = None  # case_score.review_score of the members; None for one member


def first_max_index(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`values.argmax(dim)` (the first of equal maxima) for a short `dim` such as the classes, in one element-wise
    pass per entry: torch's argmax over a dimension that is not the innermost runs 10x slower on the CPU."""
    best = values.select(dim, 0)
    index = torch.zeros(best.shape, dtype=torch.long, device=values.device)
    for k in range(1, values.shape[dim]):
        candidate = values.select(dim, k)
        index.masked_fill_(candidate > best, k)
        best = torch.maximum(best, candidate)
    return index


def label_map(probs: torch.Tensor, threshold: float = 0.0, dim: int = 0) -> torch.Tensor:
    """Class probabilities -> labels along `dim` (the class axis, background first): with threshold 0 the
    most likely class; else background unless the foreground probability (1 - background) exceeds the
    threshold, then the most likely foreground class. It corrects a model that draws structures too large."""
    if not threshold:
        return first_max_index(probs, dim)
    foreground = probs.narrow(dim, 1, probs.shape[dim] - 1)
    return torch.where(foreground.sum(dim) > threshold, first_max_index(foreground, dim) + 1, 0)


class EnsembleAccumulator:
    """Running mean and squared deviations over member batches, so N members never need to be held at once.

    Variance is the population variance across members (0 for one member), summed over
    classes; entropy is that of the mean probabilities, in nats. Labels follow `label_map` with `threshold`.
    Float32 throughout: each batch's deviations are taken from its own mean and batches are combined by Chan's
    formula, so no sum of squares cancels; equal to float64 sums within 1e-6 (Testing/core/test_ensemble_reduction.py).
    """

    def __init__(self, per_class: bool = False, keep_members: bool = False, threshold: float = 0.0):
        self.per_class = per_class
        self.keep_members = keep_members
        self.threshold = threshold
        self.count = 0
        self.mean: torch.Tensor | None = None  # (K, *S)
        self.squares: torch.Tensor | None = None  # (K, *S): summed squared deviations from the mean
        self.members: list[torch.Tensor] = []

    def add(self, probs: torch.Tensor) -> None:
        """Add a batch of members' probabilities (B, K, *S), reduced on the CPU."""
        # Contiguous: in the network's channels-last layout every per-class pass below is several times slower.
        probs = probs.detach().to("cpu", torch.float32).contiguous()
        count = probs.shape[0]
        mean = probs.mean(dim=0)
        squares = (probs - mean).square_().sum(dim=0)
        if self.mean is None:
            self.mean, self.squares = mean, squares
        else:
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.squares = self.squares + squares + delta.square_() * (self.count * count / total)
        self.count += count
        if self.keep_members:
            self.members.append(label_map(probs, self.threshold, dim=1).to(torch.uint8))

    def result(self) -> EnsembleResult:
        mean = self.mean
        variance_k = self.squares / self.count
        entropy = -(mean * mean.clamp_min(1e-12).log()).sum(dim=0)
        return EnsembleResult(
            mean_probs=mean,
            labels=label_map(mean, self.threshold),
            variance=variance_k.sum(dim=0),
            entropy=entropy,
            variance_per_class=variance_k if self.per_class else None,
            member_labels=torch.cat(self.members) if self.keep_members else None,
        )


def reduce_members(
    member_probs: torch.Tensor, per_class: bool = False, keep_members: bool = False, threshold: float = 0.0
) -> EnsembleResult:
    """member_probs (N, K, *S) -> mean, label map (`label_map` with `threshold`), variance and entropy."""
    accumulator = EnsembleAccumulator(per_class, keep_members, threshold)
    accumulator.add(member_probs)
    return accumulator.result()


def member_probabilities(
    bundle: ModelBundle, image: torch.Tensor, settings: RunSettings, preseg_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Class probabilities (N, K, *S) of every member of a (C, *S) image, sampled as one batch.

    Members draw the same noise as in `predict_volume` with the same seed, so any prefix of them is
    the ensemble a smaller run would give; for studies that score many ensemble sizes at once.
    """
    plan = replace(make_plan(bundle, tuple(image.shape[1:]), settings), batch=settings.ensemble)
    cond = conditioning(bundle.network, image)
    return bundle_members(bundle, cond, settings, plan, 0, settings.ensemble, preseg_mask)


def predict_volume(
    bundle: ModelBundle,
    image: torch.Tensor,
    settings: RunSettings,
    preseg_mask: torch.Tensor | None = None,
    progress: RunProgress | None = None,
    keep_members: bool = False,
) -> EnsembleResult:
    """Run the ensemble on a normalised (C, z, y, x) image; falls back to smaller plans on running out of memory.

    Args:
        bundle: the model.
        image: preprocessed image channels (C, *S).
        settings: the run's resolved settings (settings.resolve).
        preseg_mask: a label map (*S) to start from (PD-DDPM), or None (noise, or the model's network
            when settings.preseg is "model").
        progress: where to report sampling progress.
        keep_members: also return each member's label map.
    """
    progress = progress or RunProgress("none")
    plan = make_plan(bundle, tuple(image.shape[1:]), settings)
    if plan.window is not None and settings.window == "auto":
        progress.note(f"the whole volume does not fit in the memory at hand; running {plan.describe()}")
    if plan.estimate is not None and plan.budget_bytes is not None and plan.estimate.peak_bytes > plan.budget_bytes:
        progress.note(
            f"warning: {plan.describe()} needs about {plan.estimate.peak_bytes / 2**30:.1f} GiB, more than the "
            f"{plan.budget_bytes / 2**30:.1f} GiB the run should use; leave --window and --members-per-batch to the planner"
        )
    while True:
        try:
            return _run_plan(bundle, image, settings, preseg_mask, plan, progress, keep_members)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            smaller = plan.fallback()
            if smaller is None:
                raise RuntimeFault(
                    "out of memory even with one member in a sliding window on the CPU; "
                    "close other programs or use a machine with more memory"
                ) from None
            progress.note(f"out of memory with {plan.describe()}; retrying with {smaller.describe()}")
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            plan = smaller


def _run_plan(
    bundle: ModelBundle,
    image: torch.Tensor,
    settings: RunSettings,
    preseg_mask: torch.Tensor | None,
    plan: Plan,
    progress: RunProgress,
    keep_members: bool,
) -> EnsembleResult:
    cond = conditioning(bundle.network, image)
    if settings.preseg == "model" and preseg_mask is None:
        progress.report("preseg", "pre-segmentation network")
        preseg_mask = presegment(bundle, image, plan, settings.precision)
    # Member label maps (uint8) are kept for the review score even when they are not written.
    accumulator = EnsembleAccumulator(settings.per_class_variance, True, settings.foreground_threshold)
    ensemble = settings.ensemble
    for first in range(0, ensemble, plan.batch):
        count = min(plan.batch, ensemble - first)

        def on_step(step: int, total: int, first: int = first, count: int = count) -> None:
            progress.report(
                "sample",
                f"members {first + 1}-{first + count} of {ensemble}, step {step}/{total}",
                step=step,
                steps=total,
                member=first + count,
                members=ensemble,
                within=(first + count * step / total) / ensemble,
            )

        accumulator.add(bundle_members(bundle, cond, settings, plan, first, count, preseg_mask, on_step))
    progress.report("reduce", "mean and uncertainty", within=1.0)
    result = accumulator.result()
    score = review_score(result.member_labels, result.labels, bundle.num_classes) if ensemble > 1 else None
    members = result.member_labels if keep_members else None
    return replace(
        result,
        member_labels=members,
        plan=plan.describe(),
        device=plan.device.type,
        plan_record=plan.to_json(),
        review_score=score,
    )
