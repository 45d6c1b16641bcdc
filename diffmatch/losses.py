"""DiffMatch's loss terms and schedules as pure functions over tensors (§3.1, §3.3–3.6, Eq. 1–3, 14, 15).

Shapes: ``logits`` (N, C, H, W); ``target`` / ``pseudo`` (N, H, W) integer class maps in which
``ignore_index`` (255 in diffmatch, ``config.IGNORE``) marks pixels no loss sees;
``conf`` (N, H, W) pseudo-label confidences; ``valid`` (N, H, W) bool, False on padding; ``distance``
(N, H, W). Every reduction divides by a count clamped to at least 1, so an empty selection (all pixels
ignored, none above τ) gives an exact zero that still belongs to the graph, never NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _ce_sum(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Sum of the per-pixel cross-entropy over pixels whose target is not ``ignore_index``."""
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")


def _count(mask: Tensor) -> Tensor:
    return mask.sum().clamp(min=1)


def supervised_ce(logits: Tensor, target: Tensor, *, ignore_index: int) -> Tensor:
    """L_s (Eq. 2): cross-entropy averaged over the pixels whose target is not ``ignore_index``."""
    return _ce_sum(logits, target, ignore_index) / _count(target != ignore_index)


def confidence_weight(conf: Tensor, valid: Tensor, tau: float | Tensor) -> Tensor:
    """Per-pixel weight [conf >= τ] * valid of the strong-view losses (Eq. 3), as a float map; ``tau``
    is one threshold or a per-pixel map (``class_thresholds``)."""
    return ((conf >= tau) & valid).to(conf.dtype)


def flexmatch_thresholds(confident: Tensor, predicted: Tensor, unseen: float, tau: float) -> Tensor:
    """FlexMatch's class-wise thresholds (Zhang et al. 2021, Eq. 6-7 with the convex mapping and the
    threshold warm-up) for dense prediction: τ_c = τ · β_c / (2 - β_c) with β_c = r_c / max(max_k r_k,
    ``unseen``), where r_c = ``confident[c] / predicted[c]`` is the learning status of class c (the share of
    the pixels predicted as c that are above τ, over every unlabelled sample's latest prediction) and
    ``unseen`` the share of the unlabelled samples not yet predicted. FlexMatch counts confident samples per
    class; with balanced classes that count is proportional to r_c, and dividing by the class's own
    predictions keeps a rare class (change) from getting β ≈ its pixel share. A class never predicted
    has r = 0. Returns (C,) thresholds."""
    status = confident.double() / predicted.double().clamp(min=1)
    beta = status / max(float(status.max()), unseen, 1e-12)
    return (tau * beta / (2 - beta)).float()


class PseudoLabels(NamedTuple):
    """Pseudo labels of the strong view (Eq. 3) with what decides which pixels train: (N, H, W) each."""

    label: Tensor
    """Hard labels (argmax of the weak view's prediction)."""
    conf: Tensor
    """Their confidences."""
    valid: Tensor
    """False on padding."""
    tau: float | Tensor
    """τ: one threshold, or a per-pixel map (class-wise thresholds)."""


def unsupervised_ce(logits: Tensor, pseudo: PseudoLabels, *, ignore_index: int) -> Tensor:
    """L_u (Eq. 3) as FixMatch/UniMatch compute it: sum(CE * [conf >= τ] * valid) / sum(valid)."""
    ce = F.cross_entropy(logits, pseudo.label.long(), ignore_index=ignore_index, reduction="none")
    return (ce * confidence_weight(pseudo.conf, pseudo.valid, pseudo.tau)).sum() / _count(pseudo.valid)


def _contrastive_terms(distance: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Per-pixel pull term d² (unchanged pairs) and push term max(0, ε - d)² (changed pairs).

    Squared as in the batch-balanced contrastive loss of Chen and Shi (2020) and the authors' code;
    Eq. 14 as printed leaves the squares out."""
    return distance.pow(2), (margin - distance).clamp(min=0).pow(2)


def contrastive_balanced(distance: Tensor, target: Tensor, margin: float = 2.0) -> Tensor:
    """Batch-balanced contrastive loss (Eq. 14) on labelled pairs.

    Unchanged pixels (target 0) give d², changed ones (target 1) max(0, ε - d)²; each class is averaged
    over its own pixels in the batch and the two means are summed. Any other value (the ignore index) is
    left out; a class with no pixel contributes 0.
    """
    pull, push = _contrastive_terms(distance, margin)
    unchanged, changed = target == 0, target == 1
    return (pull * unchanged).sum() / _count(unchanged) + (push * changed).sum() / _count(changed)


def contrastive_weighted(distance: Tensor, pseudo: PseudoLabels, margin: float = 2.0) -> Tensor:
    """Contrastive loss (Eq. 14) on the strong view: the per-pixel term for the pseudo label, weighted
    like ``unsupervised_ce``: sum(l * [conf >= τ] * valid) / sum(valid). Pixels labelled other than 0
    or 1 (the ignore index) give 0."""
    pull, push = _contrastive_terms(distance, margin)
    per_pixel = pull * (pseudo.label == 0) + push * (pseudo.label == 1)
    return (per_pixel * confidence_weight(pseudo.conf, pseudo.valid, pseudo.tau)).sum() / _count(pseudo.valid)


def ceg_ce_mean(logits: Tensor, target: Tensor, *, ignore_index: int) -> Tensor:
    """CEG guidance term on labelled pairs (§3.3, §3.5): plain mean over pixels whose label is not
    ``ignore_index``."""
    return supervised_ce(logits, target, ignore_index=ignore_index)


def ceg_ce_sum_over_all(logits: Tensor, target: Tensor, *, ignore_index: int) -> Tensor:
    """CEG guidance term on unlabelled pairs: cross-entropy summed over pixels whose label is not
    ``ignore_index``, divided by ALL pixels (the reduction behind the authors' numbers)."""
    return _ce_sum(logits, target, ignore_index) / max(target.numel(), 1)


def lambda_vl_at(iteration: int, total_iters: int, start: float = 0.1) -> float:
    """λ_vl(t) (§4.1.2): ``start`` at iteration 0, falling linearly to 0 at ``iteration == total_iters``
    (the end of training), as the authors' schedule does."""
    return start * max(0.0, 1.0 - iteration / max(total_iters, 1))


def rampup(iteration: int, start: int, length: int) -> float:
    """Mean Teacher's sigmoid ramp-up (Tarvainen and Valpola 2017; CCT uses it too): exp(-5 (1 - t)^2)
    with t = (iteration - start) / length clipped to [0, 1]; 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    t = min(max((iteration - start) / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def pseudo_label_weight(iteration: int, warmup_iters: int, rampup_iters: int) -> float:
    """Weight of the terms trained on the model's own pseudo labels (L_u, the strong-view half of L_c) at
    ``iteration``: 0 during the warm-up, then ``rampup`` from its end (1 without one, as in the paper)."""
    return 0.0 if iteration < warmup_iters else rampup(iteration, warmup_iters, rampup_iters)


def poly_lr(base_lr: float, iteration: int, total_iters: int, power: float = 0.9) -> float:
    """Poly decay per iteration: base_lr * (1 - t / T) ** power."""
    return base_lr * max(0.0, 1.0 - iteration / max(total_iters, 1)) ** power


class LossTerms(NamedTuple):
    """The four loss terms of one step; a term that is off is a zero tensor."""

    s: Tensor
    """L_s, supervised cross-entropy (Eq. 2)."""
    u: Tensor
    """L_u, FixMatch consistency (Eq. 3)."""
    c: Tensor
    """L_c, contrastive consistency (Eq. 14): (labelled + w · strong view) / 2, w the pseudo-label weight
    (1 in the paper)."""
    vl: Tensor
    """L_vl, VLM guidance (§3.3, §3.5): the mean of the CEG terms that are on (six by default)."""


def total_loss(terms: LossTerms, *, lambda_c: float, lambda_vl: float, unsup_weight: float = 1.0) -> Tensor:
    """L = (L_s + w L_u) / 2 + λ_c L_c + λ_vl L_vl (Eq. 1 and 15). The weight w of the terms trained on the
    model's own pseudo labels is 1 in the paper (0 during a warm-up, below 1 during a ramp-up,
    ``rampup``); L_c arrives with its strong-view half already weighted by it (``step.compute_losses``)."""
    return (terms.s + unsup_weight * terms.u) / 2 + lambda_c * terms.c + lambda_vl * terms.vl


def zero_like(x: Tensor) -> Tensor:
    """A scalar zero on ``x``'s device and dtype, for a loss term that is switched off."""
    return torch.zeros((), device=x.device, dtype=x.dtype)
