"""The whole training step by value: a stub network with fixed per-pixel outputs, and the total written out
from Eq. 1, 3, 14 and 15 with the reductions of the authors' code (unlabelled CEG terms summed over their
valid pixels and divided by all pixels; labelled ones plain means), for FixMatch and DiffMatch with every
Table 7 switch on and off. A head fed the wrong target, or L_vl divided by a fixed count, changes the total."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from diffmatch.config import IGNORE, LossConfig
from diffmatch.data import LabeledSample, UnlabeledSample
from diffmatch.model import ModelOutput
from diffmatch.step import Batches, StepSetup, Weights, compute_losses

H = W = 3


class Stub(nn.Module):
    """Per-pixel outputs of the images alone: change logits (0, d), w_vl logits (0, -d) (or the change
    logits without the dual head), segmentation logits (0, mean of a date), distance |d| + 0.5, with d
    the mean over channels of b - a."""

    def __init__(self, dual_head: bool) -> None:
        super().__init__()
        self.dual_head = dual_head

    def forward(self, a: Tensor, b: Tensor, *, change_only: bool = False, metric: str = "pixel") -> ModelOutput:
        d = (b - a).mean(1)
        zero = torch.zeros_like(d)
        change = torch.stack([zero, d], 1)
        if change_only:
            return ModelOutput(change)
        change_vl = torch.stack([zero, -d], 1) if self.dual_head else change
        seg_a, seg_b = (torch.stack([zero, x.mean(1)], 1) for x in (a, b))
        return ModelOutput(change, change_vl, seg_a, seg_b, d.abs() + 0.5)


def image(seed: int) -> Tensor:
    return torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(seed))


def mask(*values: int) -> Tensor:
    return torch.tensor(values, dtype=torch.long).view(1, H, W)


X = LabeledSample(image(1), image(2), label=mask(0, 1, 0, 0, 255, 1, 0, 0, 1), pseudo=mask(1, 0, 255, 0, 1, 0, 0, 1, 0),
                  seg_a=mask(0, 0, 1, 255, 1, 0, 0, 1, 1), seg_b=mask(1, 1, 0, 0, 255, 0, 1, 0, 0))
BOX = mask(0, 0, 0, 0, 1, 1, 0, 1, 1)  # CutMix box: u2's content on these pixels


def unlabelled(seed: int, ignore: Tensor, pseudo: Tensor, seg_a: Tensor, seg_b: Tensor) -> UnlabeledSample:
    return UnlabeledSample(image(seed), image(seed + 1), image(seed + 2), image(seed + 3), ignore, pseudo, seg_a,
                           seg_b, BOX, torch.tensor([0]))


U = unlabelled(10, mask(0, 0, 0, 0, 0, 0, 0, 0, 255), mask(0, 1, 1, 255, 0, 0, 1, 0, 0),
               mask(1, 0, 0, 1, 255, 1, 0, 0, 1), mask(0, 0, 1, 1, 1, 255, 0, 1, 0))
U2 = unlabelled(20, mask(0, 0, 0, 0, 255, 0, 0, 0, 0), mask(1, 0, 0, 0, 1, 1, 255, 1, 0),
                mask(0, 1, 1, 0, 0, 0, 1, 255, 0), mask(1, 1, 0, 0, 0, 1, 1, 0, 255))


def ce(logits: Tensor, target: Tensor) -> list[float]:
    """Per-pixel cross-entropy of (1, 2, H, W) logits, written out: log(e^l0 + e^l1) - l_t; NaN where
    the target is the ignore value."""
    out = []
    for (l0, l1), t in zip(logits[0].flatten(1).T.tolist(), target.flatten().tolist(), strict=True):
        out.append(math.nan if t == IGNORE else math.log(math.exp(l0) + math.exp(l1)) - (l0, l1)[t])
    return out


def mean_valid(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else 0.0


def sum_over_all(values: list[float]) -> float:
    return sum(v for v in values if not math.isnan(v)) / len(values)


def mixed(weak: Tensor, content: Tensor) -> Tensor:
    return torch.where(BOX.bool(), content, weak)


def by_hand(method: str, cfg: LossConfig, dual_head: bool, lambda_vl: float) -> float:
    """The total of Eq. 1 and 15 for X, U, U2 through the stub, pixel by pixel."""
    stub = Stub(dual_head)
    out_x, out_u, out_u2 = stub(X.a, X.b), stub(U.a, U.b), stub(U2.a, U2.b)
    strong = stub(mixed(U.a_strong, U2.a_strong), mixed(U.b_strong, U2.b_strong))
    l_s = mean_valid(ce(out_x.change, X.label))
    # Eq. 3: pseudo labels from the weak views (u's own, u2's in the box), kept where conf >= τ and not padding
    probs = mixed(out_u.change.softmax(1), out_u2.change.softmax(1))
    conf, label = probs.max(1)
    valid = mixed(U.ignore, U2.ignore) != IGNORE
    keep = ((conf >= cfg.tau) & valid).flatten().tolist()
    n_valid = int(valid.sum())
    l_u = sum(c for c, k in zip(ce(strong.change, label), keep, strict=True) if k) / n_valid
    total = (l_s + l_u) / 2
    if method == "fixmatch":
        return total
    if cfg.contrastive:  # Eq. 14, squared as in the batch-balanced contrastive loss
        d_x, eps = out_x.distance.flatten().tolist(), cfg.margin
        pull = [d * d for d, t in zip(d_x, X.label.flatten().tolist(), strict=True) if t == 0]
        push = [max(0.0, eps - d) ** 2 for d, t in zip(d_x, X.label.flatten().tolist(), strict=True) if t == 1]
        labelled = sum(pull) / len(pull) + sum(push) / len(push)
        per_pixel = [d * d if t == 0 else max(0.0, eps - d) ** 2
                     for d, t in zip(strong.distance.flatten().tolist(), label.flatten().tolist(), strict=True)]
        strong_half = sum(p for p, k in zip(per_pixel, keep, strict=True) if k) / n_valid
        total += cfg.lambda_c * (labelled + strong_half) / 2
    terms = []
    if cfg.vl_guidance:  # §3.3: CEG change labels on w_vl (the change head without the dual head)
        terms += [mean_valid(ce(out_x.change_vl, X.pseudo)), sum_over_all(ce(out_u.change_vl, U.pseudo)),
                  sum_over_all(ce(strong.change_vl, mixed(U.pseudo, U2.pseudo)))]
    if cfg.seg_guidance:  # §3.5: CEG single-date masks on the segmentation head, (A + B) / 2
        pairs = []
        for date in ("seg_a", "seg_b"):
            x_t, u_t, u2_t = getattr(X, date), getattr(U, date), getattr(U2, date)
            pairs.append([mean_valid(ce(getattr(out_x, date), x_t)), sum_over_all(ce(getattr(out_u, date), u_t)),
                          sum_over_all(ce(getattr(strong, date), mixed(u_t, u2_t)))])
        terms += [(a + b) / 2 for a, b in zip(*pairs, strict=True)]
    if terms:
        total += lambda_vl * sum(terms) / len(terms)  # the mean of the terms that are on
    return total


SWITCHES = [dict(zip(("vl_guidance", "seg_guidance", "contrastive", "dual_head"), flags, strict=True))
            for flags in itertools.product((True, False), repeat=4)]


@pytest.mark.parametrize("switches", SWITCHES, ids=[",".join(k for k, v in s.items() if v) or "none" for s in SWITCHES])
def test_diffmatch_step_total_by_hand(switches: dict[str, bool]) -> None:
    dual_head = switches.pop("dual_head")
    cfg = LossConfig(tau=0.6, **switches)
    step = compute_losses(Stub(dual_head), Batches(X, U, U2), StepSetup("diffmatch", cfg), Weights(0.07))
    assert float(step.total) == pytest.approx(by_hand("diffmatch", cfg, dual_head, 0.07), rel=1e-5)


def test_fixmatch_step_total_by_hand() -> None:
    cfg = LossConfig(tau=0.6)
    step = compute_losses(Stub(True), Batches(X, U, U2), StepSetup("fixmatch", cfg), Weights(0.07))
    assert float(step.total) == pytest.approx(by_hand("fixmatch", cfg, True, 0.07), rel=1e-5)


def test_the_inputs_make_every_choice_matter() -> None:
    """Some pixels above τ and some below, CutMix changing the CEG targets, ignore values in every mask: so
    a wrong target, a missing mixing or a wrong divisor changes the total (each was checked by breaking
    ``step.py`` on purpose)."""
    stub = Stub(True)
    probs = mixed(stub(U.a, U.b).change.softmax(1), stub(U2.a, U2.b).change.softmax(1))
    above = probs.max(1).values >= 0.6
    assert bool(above.any()) and not bool(above.all())
    for date in ("pseudo", "seg_a", "seg_b"):
        assert not torch.equal(mixed(getattr(U, date), getattr(U2, date)), getattr(U, date))
        assert bool((getattr(X, date) == IGNORE).any())
