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
import torch.distributed as dist
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
    d = min(decay, 1 - 1 / (iteration + 1)), ``iteration`` counted from the teacher's start (a copy of the
    student), so that the first steps follow the student closely; BatchNorm statistics are copied."""
    d = min(decay, 1 - 1 / (iteration + 1))
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1 - d)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


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


class LearningStatus:
    """FlexMatch's learning status over the unlabelled set, kept per sample: the pixel counts, per class,
    of each sample's latest weak-view prediction (predicted as the class, and predicted above τ).

    Per sample rather than per pixel: the random rescale, crop and flip move a source pixel between two
    visits of its image, so a per-pixel status would need every augmentation inverted, while a sample's
    counts are exactly what its latest prediction says (FlexMatch keeps each sample's latest prediction);
    the memory is two counts per class and sample. Under DDP every process gathers the others' updates.
    """

    def __init__(self, num_samples: int, num_classes: int = 2) -> None:
        self.counts = torch.zeros(num_samples, 2, num_classes, dtype=torch.long)  # [predicted, confident]
        self.seen = torch.zeros(num_samples, dtype=torch.bool)

    @torch.no_grad()
    def update(self, index: Tensor, conf: Tensor, label: Tensor, valid: Tensor, tau: float) -> None:
        """Record the latest prediction (``conf``, ``label``; (N, H, W)) of the samples ``index`` (N,)."""
        classes = torch.arange(self.counts.shape[-1], device=label.device).view(1, -1, 1)
        is_class = (label.flatten(1).unsqueeze(1) == classes) & valid.flatten(1).unsqueeze(1)  # (N, C, HW)
        above = (conf >= tau).flatten(1).unsqueeze(1)
        counts = torch.stack([is_class.sum(-1), (is_class & above).sum(-1)], 1)  # (N, 2, C)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            index, counts = all_gather(index), all_gather(counts)
        self.counts[index.cpu()] = counts.cpu()
        self.seen[index.cpu()] = True

    def thresholds(self, tau: float) -> Tensor:
        """Class-wise thresholds (C,) from the status (``losses.flexmatch_thresholds``)."""
        predicted, confident = self.counts[self.seen].sum(0)
        unseen = 1.0 - float(self.seen.float().mean())
        return losses.flexmatch_thresholds(confident, predicted, unseen, tau)

    def state_dict(self) -> dict[str, Tensor]:
        return {"counts": self.counts, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.counts.copy_(state["counts"])
        self.seen.copy_(state["seen"])


def all_gather(t: Tensor) -> Tensor:
    """``t`` of every process, concatenated along the first dimension (same shape on every process)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class StepResult(NamedTuple):
    """Loss terms of one step, the share of confident pseudo-label pixels and the thresholds τ per class
    (tensors, so that reading them, and waiting for the device, happens only when they are logged)."""

    terms: LossTerms
    total: Tensor
    confident: Tensor
    tau: Tensor


def uses_every_parameter(method: Method, cfg: LossConfig, dual_head: bool) -> bool:
    """Whether the losses of a step reach every parameter of the network (DistributedDataParallel needs
    ``find_unused_parameters`` otherwise): the seg classifier needs seg guidance, ``w_vl`` CEG guidance."""
    return method == "diffmatch" and cfg.seg_guidance and (cfg.vl_guidance or not dual_head)


def compute_losses(model: nn.Module, method: Method, x: LabeledSample, u: UnlabeledSample | None,
                   u2: UnlabeledSample | None, cfg: LossConfig, lambda_vl: float, *,
                   teacher: nn.Module | None = None, unsup_weight: float = 1.0,
                   status: LearningStatus | None = None) -> StepResult:
    """Steps 1–3 of the training step (§3.1, Table 1): pseudo labels, forward passes with gradient, loss
    terms and total. ``unsup_weight`` weighs what is trained on the model's own pseudo labels, L_u and the
    strong-view half of L_c: 1 in the paper, 0 during a warm-up (those pseudo labels are then not made; L_s,
    the labelled half of L_c and the CEG guidance train as usual), below 1 during a ramp-up
    (``losses.pseudo_label_weight``). With a ``teacher``, it gives the pseudo labels of ``u`` and ``u2``
    instead of ``model``; with a ``status``, τ is class-wise (FlexMatch)."""
    tau = torch.full((2,), cfg.tau)
    if method == "supervised" or u is None or u2 is None:
        l_s = losses.supervised_ce(model(x.a, x.b, change_only=True).change, x.label, ignore_index=IGNORE)
        zero = losses.zero_like(l_s)
        total = l_s / 2 if cfg.halve_supervised else l_s
        return StepResult(LossTerms(l_s, zero, zero, zero), total, zero.detach(), tau)
    pseudo, diffmatch = unsup_weight > 0, method == "diffmatch"
    guided = diffmatch and (cfg.vl_guidance or cfg.seg_guidance)
    if pseudo:
        conf_mix, label_mix = eval_predictions(teacher or model, u2.a, u2.b)
    n, metric = x.a.shape[0], cfg.distance
    out = model(torch.cat([x.a, u.a]), torch.cat([x.b, u.b]), change_only=not diffmatch, metric=metric)
    if pseudo or guided:
        a_s, b_s = cutmix(u.box, u.a_strong, u2.a_strong), cutmix(u.box, u.b_strong, u2.b_strong)
        with frozen_bn_statistics(model, cfg.weak_bn_stats):
            out_s = model(a_s, b_s, change_only=not diffmatch, metric=metric)
    l_s = losses.supervised_ce(out.change[:n], x.label, ignore_index=IGNORE)
    l_u = l_c = l_vl = c_strong = losses.zero_like(l_s)
    confident = l_u.detach()
    if pseudo:
        conf_u, label_u = confidence(out.change[n:]) if teacher is None else eval_predictions(teacher, u.a, u.b)
        if status is not None:
            status.update(u.index, conf_u, label_u, u.ignore != IGNORE, cfg.tau)
            tau = status.thresholds(cfg.tau)
        conf, label = cutmix(u.box, conf_u, conf_mix), cutmix(u.box, label_u, label_mix)
        valid = cutmix(u.box, u.ignore, u2.ignore) != IGNORE
        tau_map = tau.to(conf.device)[label] if status is not None else cfg.tau
        l_u = losses.unsupervised_ce(out_s.change, label, conf, valid, tau_map, ignore_index=IGNORE)
        if diffmatch and cfg.contrastive:
            c_strong = losses.contrastive_weighted(out_s.distance, label, conf, valid, tau_map, cfg.margin)
        confident = ((conf >= tau_map) & valid).sum() / valid.sum().clamp(min=1)
    if diffmatch and cfg.contrastive:  # L_c (§3.6, Eq. 14): labelled half + strong-view half, averaged
        l_c = (losses.contrastive_balanced(out.distance[:n], x.label, cfg.margin) + unsup_weight * c_strong) / 2
    if guided:
        l_vl = guidance_term(out, out_s, x, u, u2, cfg)
    terms = LossTerms(l_s, l_u, l_c, l_vl)
    total = losses.total_loss(terms, lambda_c=cfg.lambda_c, lambda_vl=lambda_vl, unsup_weight=unsup_weight)
    return StepResult(terms, total, confident, tau)


def to_device(batch: Batch | None, device: torch.device) -> Batch | None:
    """A batch's tensors on ``device``."""
    return None if batch is None else type(batch)(*(t.to(device, non_blocking=True) for t in batch))
