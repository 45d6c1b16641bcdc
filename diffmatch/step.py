"""One training step of DiffMatch and its baselines (§3.1, §3.3–3.6, Table 1; README §3).

Batches: labelled ``x``, unlabelled ``u`` and a second unlabelled batch ``u2`` that supplies the CutMix
content of ``u``'s strong view.
1. ``u2``'s weak view through the model in eval mode, without gradient.
2. ``x`` and ``u``-weak in one forward pass, then ``u``-strong; FixMatch pseudo labels from ``u``-weak,
   CutMix'd with ``u2``'s.
3. The loss terms L_s, L_u, L_c, L_vl and their total (Eq. 1, 15).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from diffmatch import losses
from diffmatch.config import IGNORE, LossConfig, Method
from diffmatch.losses import LossTerms

if TYPE_CHECKING:  # types only: the step runs on any model and batches with these fields
    from diffmatch.data import LabeledSample, UnlabeledSample
    from diffmatch.model import ModelOutput

Batch = TypeVar("Batch", "LabeledSample", "UnlabeledSample")


def confidence(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence and hard label of detached change logits (FixMatch pseudo labels, Eq. 3)."""
    probs = logits.detach().float().softmax(dim=1)
    conf, label = probs.max(dim=1)
    return conf, label


def cutmix(box: Tensor, x: Tensor, content: Tensor) -> Tensor:
    """``x`` with ``content`` pasted inside the CutMix box (N, H, W); works for images and masks."""
    inside = box.bool().view(box.shape[0], *([1] * (x.dim() - 3)), *box.shape[1:])
    return torch.where(inside, content, x)


@torch.no_grad()
def eval_predictions(model: nn.Module, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence and label of ``model``'s change prediction in eval mode, without gradient (step 1:
    the pseudo labels of ``u2``, the CutMix content; with a teacher, those of ``u`` too)."""
    was_training = model.training
    model.eval()
    logits = model(a, b, change_only=True).change
    model.train(was_training)
    return confidence(logits)


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """Within the block, BatchNorm layers still normalise with their batch's statistics but leave their
    running statistics (those of evaluation and of eval-mode pseudo labels) as they are."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, iteration: int) -> None:
    """Mean Teacher's update (Tarvainen and Valpola 2017): teacher = d * teacher + (1 - d) * student with
    d = min(decay, 1 - 1 / (iteration + 1)), so that the first steps follow the student closely;
    BatchNorm statistics are copied."""
    d = min(decay, 1 - 1 / (iteration + 1))
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1 - d)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def contrastive_term(out: ModelOutput, out_s: ModelOutput, x_label: Tensor, label: Tensor, conf: Tensor,
                     valid: Tensor, tau: float | Tensor, margin: float) -> Tensor:
    """L_c (§3.6, Eq. 14): labelled pairs against the ground truth, batch-balanced; the strong view
    against the mixed pseudo label, weighted like L_u; the two averaged."""
    n = x_label.shape[0]
    labelled = losses.contrastive_balanced(out.distance[:n], x_label, margin)
    strong = losses.contrastive_weighted(out_s.distance, label, conf, valid, tau, margin)
    return (labelled + strong) / 2


def guidance_term(out: ModelOutput, out_s: ModelOutput, x: LabeledSample, u: UnlabeledSample,
                  u2: UnlabeledSample, cfg: LossConfig) -> Tensor:
    """L_vl (§3.3–3.5): CEG change labels on the change head (``w_vl``) and CEG single-date masks on the
    segmentation head, for x, u-weak and u-strong (CEG labels CutMix'd like the images); the mean of the
    terms that are on (six with everything on)."""
    n, terms = x.label.shape[0], []
    if cfg.vl_guidance:
        strong = cutmix(u.box, u.pseudo, u2.pseudo)
        terms += [losses.ceg_ce_mean(out.change_vl[:n], x.pseudo, ignore_index=IGNORE),
                  losses.ceg_ce_sum_over_all(out.change_vl[n:], u.pseudo, ignore_index=IGNORE),
                  losses.ceg_ce_sum_over_all(out_s.change_vl, strong, ignore_index=IGNORE)]
    if cfg.seg_guidance:

        def seg_terms(seg: Tensor, seg_s: Tensor, xs: Tensor, us: Tensor, u2s: Tensor) -> list[Tensor]:
            return [losses.ceg_ce_mean(seg[:n], xs, ignore_index=IGNORE),
                    losses.ceg_ce_sum_over_all(seg[n:], us, ignore_index=IGNORE),
                    losses.ceg_ce_sum_over_all(seg_s, cutmix(u.box, us, u2s), ignore_index=IGNORE)]

        date_a = seg_terms(out.seg_a, out_s.seg_a, x.seg_a, u.seg_a, u2.seg_a)
        date_b = seg_terms(out.seg_b, out_s.seg_b, x.seg_b, u.seg_b, u2.seg_b)
        terms += [(ta + tb) / 2 for ta, tb in zip(date_a, date_b, strict=True)]
    return torch.stack(terms).sum() / len(terms) if terms else losses.zero_like(out.change)


class StepResult(NamedTuple):
    """Loss terms of one step and the share of confident pseudo-label pixels (a tensor, so that reading
    it, and waiting for the device, happens only when it is logged)."""

    terms: LossTerms
    total: Tensor
    confident: Tensor


def uses_every_parameter(method: Method, cfg: LossConfig, dual_head: bool) -> bool:
    """Whether the losses of a step reach every parameter of the network (DistributedDataParallel needs
    ``find_unused_parameters`` otherwise): the seg classifier needs seg guidance, ``w_vl`` CEG guidance."""
    return method == "diffmatch" and cfg.seg_guidance and (cfg.vl_guidance or not dual_head)


def compute_losses(model: nn.Module, method: Method, x: LabeledSample, u: UnlabeledSample | None,
                   u2: UnlabeledSample | None, cfg: LossConfig, lambda_vl: float,
                   teacher: nn.Module | None = None, unsup_weight: float = 1.0) -> StepResult:
    """Steps 1–3 of the training step (§3.1, Table 1): pseudo labels, forward passes with gradient, loss
    terms and total. With a ``teacher``, it gives the pseudo labels of ``u`` and ``u2`` instead of
    ``model``; ``unsup_weight`` scales L_u and L_c (a ramp-up, ``losses.rampup``)."""
    if method == "supervised" or u is None or u2 is None:
        l_s = losses.supervised_ce(model(x.a, x.b, change_only=True).change, x.label, ignore_index=IGNORE)
        zero = losses.zero_like(l_s)
        return StepResult(LossTerms(l_s, zero, zero, zero), l_s, zero.detach())
    conf_mix, label_mix = eval_predictions(teacher or model, u2.a, u2.b)
    a_s, b_s = cutmix(u.box, u.a_strong, u2.a_strong), cutmix(u.box, u.b_strong, u2.b_strong)
    change_only, metric = method != "diffmatch", cfg.distance
    n = x.a.shape[0]
    out = model(torch.cat([x.a, u.a]), torch.cat([x.b, u.b]), change_only=change_only, metric=metric)
    with frozen_bn_statistics(model, cfg.weak_bn_stats):
        out_s = model(a_s, b_s, change_only=change_only, metric=metric)
    conf_u, label_u = confidence(out.change[n:]) if teacher is None else eval_predictions(teacher, u.a, u.b)
    conf, label = cutmix(u.box, conf_u, conf_mix), cutmix(u.box, label_u, label_mix)
    valid = cutmix(u.box, u.ignore, u2.ignore) != IGNORE
    tau = losses.class_thresholds(conf, label, valid, cfg.tau) if cfg.class_thresholds else cfg.tau
    l_s = losses.supervised_ce(out.change[:n], x.label, ignore_index=IGNORE)
    l_u = losses.unsupervised_ce(out_s.change, label, conf, valid, tau, ignore_index=IGNORE)
    l_c = l_vl = losses.zero_like(l_s)
    if method == "diffmatch":
        if cfg.contrastive:
            l_c = contrastive_term(out, out_s, x.label, label, conf, valid, tau, cfg.margin)
        l_vl = guidance_term(out, out_s, x, u, u2, cfg)
    terms = LossTerms(l_s, l_u, l_c, l_vl)
    total = losses.total_loss(terms, lambda_c=cfg.lambda_c, lambda_vl=lambda_vl, unsup_weight=unsup_weight)
    confident = ((conf >= tau) & valid).sum() / valid.sum().clamp(min=1)
    return StepResult(terms, total, confident)


def to_device(batch: Batch | None, device: torch.device) -> Batch | None:
    """A batch's tensors on ``device``."""
    return None if batch is None else type(batch)(*(t.to(device, non_blocking=True) for t in batch))
