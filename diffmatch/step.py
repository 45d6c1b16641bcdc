"""One training step of DiffMatch and its baselines (§3.1, §3.3–3.6, Table 1).

Batches: labelled ``x``, unlabelled ``u`` and a second unlabelled batch ``u2`` that supplies the CutMix
content of ``u``'s strong view.
1. ``u2``'s weak view through the model in eval mode, without gradient.
2. ``x`` and ``u``-weak in one forward pass, then ``u``-strong; FixMatch pseudo labels from ``u``-weak,
   CutMix'd with ``u2``'s.
3. The loss terms L_s, L_u, L_c, L_vl and their total (Eq. 1, 15).

The stabilisers (``config.Stabilisers``: warm-up and ramp-up weight, EMA teacher, class-wise thresholds,
weak-view BatchNorm statistics, halved L_s) are off in the paper; each is marked ``# stabiliser``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffmatch import losses
from diffmatch.config import IGNORE, LossConfig, Method
from diffmatch.losses import LossTerms, PseudoLabels

if TYPE_CHECKING:  # types only: the step runs on any model and batches with these fields
    from diffmatch.data import LabeledSample, UnlabeledSample
    from diffmatch.model import ModelOutput

Batch = TypeVar("Batch", "LabeledSample", "UnlabeledSample")


class Batches(NamedTuple):
    """One step's batches: labelled ``x``; unlabelled ``u`` and ``u2``, whose strong views and pseudo
    labels CutMix ``u``'s (None for the supervised baseline)."""

    x: LabeledSample
    u: UnlabeledSample | None = None
    u2: UnlabeledSample | None = None


class Weights(NamedTuple):
    """The schedules' weights at one iteration."""

    lambda_vl: float
    """λ_vl(t) of L_vl (§4.1.2, ``losses.lambda_vl_at``)."""
    pseudo: float = 1.0
    """Weight of what is trained on the model's own pseudo labels (L_u, the strong-view half of L_c): 1 in
    the paper; 0 during a warm-up, below 1 during a ramp-up (``losses.pseudo_label_weight``)."""


@dataclass
class StepSetup:
    """What stays the same over a run's steps: the method, its loss settings and the stabilisers' state."""

    method: Method
    loss: LossConfig
    teacher: nn.Module | None = None
    """Stabiliser: an EMA teacher that gives the pseudo labels of ``u`` and ``u2`` instead of the model."""
    status: LearningStatus | None = None
    """Stabiliser: FlexMatch's learning status, for class-wise thresholds τ."""


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


def guidance_term(out: ModelOutput, out_s: ModelOutput, batch: Batches, cfg: LossConfig) -> Tensor:
    """L_vl (§3.3–3.5): CEG change labels on the change head (``w_vl``) and CEG single-date masks on the
    segmentation head, for x, u-weak and u-strong (CEG labels CutMix'd like the images); the mean of the
    terms that are on (six with everything on)."""
    x, u, u2 = batch
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


def compute_losses(model: nn.Module, batch: Batches, setup: StepSetup, weights: Weights) -> StepResult:
    """Steps 1–3 of the training step (§3.1, Table 1): pseudo labels, forward passes with gradient, loss
    terms and their total, L = (L_s + L_u) / 2 + λ_c L_c + λ_vl L_vl (Eq. 1, 15). While ``weights.pseudo``
    is 0 (a warm-up) the pseudo labels are not made; L_s, the labelled half of L_c and L_vl train as usual."""
    method, cfg, (x, u, u2) = setup.method, setup.loss, batch
    if method == "supervised" or u is None or u2 is None:
        return supervised_step(model, x, cfg)
    diffmatch, pseudo = method == "diffmatch", weights.pseudo > 0
    guided = diffmatch and (cfg.vl_guidance or cfg.seg_guidance)
    n, metric = x.a.shape[0], cfg.distance
    mix = eval_predictions(setup.teacher or model, u2.a, u2.b) if pseudo else None  # step 1: u2's pseudo labels
    out = model(torch.cat([x.a, u.a]), torch.cat([x.b, u.b]), change_only=not diffmatch, metric=metric)
    out_s = strong_forward(model, batch, not diffmatch, cfg) if pseudo or guided else None
    l_s = losses.supervised_ce(out.change[:n], x.label, ignore_index=IGNORE)  # Eq. 2
    l_u = l_c = l_vl = c_strong = losses.zero_like(l_s)
    tau, confident = torch.full((2,), cfg.tau), l_u.detach()
    if pseudo:  # Eq. 3
        pl, tau = pseudo_labels(out.change[n:], mix, batch, setup)
        l_u = losses.unsupervised_ce(out_s.change, pl, ignore_index=IGNORE)
        if diffmatch and cfg.contrastive:
            c_strong = losses.contrastive_weighted(out_s.distance, pl, cfg.margin)
        confident = ((pl.conf >= pl.tau) & pl.valid).sum() / pl.valid.sum().clamp(min=1)
    if diffmatch and cfg.contrastive:  # L_c (§3.6, Eq. 14): labelled half + strong-view half, averaged
        l_c = (losses.contrastive_balanced(out.distance[:n], x.label, cfg.margin) + weights.pseudo * c_strong) / 2
    if guided:
        l_vl = guidance_term(out, out_s, batch, cfg)  # §3.3, §3.5
    terms = LossTerms(l_s, l_u, l_c, l_vl)
    total = losses.total_loss(terms, lambda_c=cfg.lambda_c, lambda_vl=weights.lambda_vl, unsup_weight=weights.pseudo)
    return StepResult(terms, total, confident, tau)


def supervised_step(model: nn.Module, x: LabeledSample, cfg: LossConfig) -> StepResult:
    """The supervised baseline: L_s alone (Eq. 2)."""
    l_s = losses.supervised_ce(model(x.a, x.b, change_only=True).change, x.label, ignore_index=IGNORE)
    zero = losses.zero_like(l_s)
    total = l_s / 2 if cfg.stabilise.halve_supervised else l_s  # stabiliser: the weight Eq. 1 gives L_s
    return StepResult(LossTerms(l_s, zero, zero, zero), total, zero.detach(), torch.full((2,), cfg.tau))


def strong_forward(model: nn.Module, batch: Batches, change_only: bool, cfg: LossConfig) -> ModelOutput:
    """The model on ``u``'s strong views with ``u2``'s CutMix'd in (step 2)."""
    _, u, u2 = batch
    a_s, b_s = cutmix(u.box, u.a_strong, u2.a_strong), cutmix(u.box, u.b_strong, u2.b_strong)
    with frozen_bn_statistics(model, cfg.stabilise.weak_bn_stats):  # stabiliser
        return model(a_s, b_s, change_only=change_only, metric=cfg.distance)


def pseudo_labels(weak: Tensor, mix: tuple[Tensor, Tensor], batch: Batches,
                  setup: StepSetup) -> tuple[PseudoLabels, Tensor]:
    """FixMatch pseudo labels of ``u`` from its weak-view logits ``weak`` (or the EMA teacher), CutMix'd
    with ``u2``'s (``mix``: confidence, label), and the thresholds τ per class (Eq. 3)."""
    _, u, u2 = batch
    cfg, tau = setup.loss, torch.full((2,), setup.loss.tau)
    conf_u, label_u = confidence(weak) if setup.teacher is None else eval_predictions(setup.teacher, u.a, u.b)
    label = cutmix(u.box, label_u, mix[1])
    tau_map: Tensor | float = cfg.tau
    if setup.status is not None:  # stabiliser: FlexMatch's class-wise thresholds
        setup.status.update(u.index, conf_u, label_u, u.ignore != IGNORE, cfg.tau)
        tau = setup.status.thresholds(cfg.tau)
        tau_map = tau.to(label.device)[label]
    valid = cutmix(u.box, u.ignore, u2.ignore) != IGNORE
    return PseudoLabels(label, cutmix(u.box, conf_u, mix[0]), valid, tau_map), tau


def to_device(batch: Batch | None, device: torch.device) -> Batch | None:
    """A batch's tensors on ``device``."""
    return None if batch is None else type(batch)(*(t.to(device, non_blocking=True) for t in batch))
