from __future__ import annotations

import math

import pytest
import torch

from diffmatch.config import IGNORE
from diffmatch.losses import (
    LossTerms,
    PseudoLabels,
    ceg_ce_mean,
    ceg_ce_sum_over_all,
    confidence_weight,
    contrastive_balanced,
    contrastive_weighted,
    flexmatch_thresholds,
    lambda_vl_at,
    poly_lr,
    pseudo_label_weight,
    rampup,
    supervised_ce,
    total_loss,
    unsupervised_ce,
    zero_like,
)

LN2, LN43, LN4 = math.log(2.0), math.log(4.0 / 3.0), math.log(4.0)


def row_logits(*pixels: tuple[float, float]) -> torch.Tensor:
    """(1, 2, 1, P) logits, one (class 0, class 1) pair per pixel, with gradient."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 2, 1, -1).requires_grad_()


def row(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).reshape(1, 1, -1)


# Cross-entropy of each pixel below, by hand: CE = log(sum exp) - logit of the target.
#   (0, 0)     target 0 or 1 -> ln 2
#   (0, ln 3)  target 1 -> ln 4 - ln 3 = ln(4/3);  target 0 -> ln 4
PIXELS = ((0.0, 0.0), (0.0, math.log(3.0)), (0.0, math.log(3.0)), (0.0, 0.0))


def assert_zero_with_graph(loss: torch.Tensor, logits: torch.Tensor) -> None:
    assert loss.item() == 0.0 and bool(torch.isfinite(loss))
    assert loss.requires_grad
    loss.backward()
    assert (
        logits.grad is not None and bool(torch.isfinite(logits.grad).all()) and logits.grad.abs().sum() == 0
    )


def test_supervised_ce_ignores_255() -> None:
    logits = row_logits(*PIXELS)
    target = row(0, 1, IGNORE, 1, dtype=torch.long)
    loss = supervised_ce(logits, target, ignore_index=IGNORE)
    assert loss.item() == pytest.approx((LN2 + LN43 + LN2) / 3)
    assert ceg_ce_mean(logits, target, ignore_index=IGNORE).item() == pytest.approx(loss.item())


def test_the_ignore_index_is_the_callers() -> None:
    # A copied losses.py serves a project whose ignore value is torch's -100: pixel 3 is left out there,
    # while 255 would be an out-of-range class.
    logits = row_logits(*PIXELS)
    assert supervised_ce(logits, row(0, 1, -100, 1, dtype=torch.long), ignore_index=-100).item() == pytest.approx(
        (LN2 + LN43 + LN2) / 3)
    assert ceg_ce_sum_over_all(logits, row(0, 1, -100, -100, dtype=torch.long), ignore_index=-100).item() == (
        pytest.approx((LN2 + LN43) / 4))


def test_supervised_ce_all_ignored_is_zero() -> None:
    logits = row_logits(*PIXELS)
    assert_zero_with_graph(
        supervised_ce(logits, row(IGNORE, IGNORE, IGNORE, IGNORE, dtype=torch.uint8), ignore_index=IGNORE), logits
    )


def test_unsupervised_ce_weights_and_divides_by_valid() -> None:
    logits = row_logits(*PIXELS)
    pseudo = row(0, 1, 0, 1, dtype=torch.long)
    conf = row(0.99, 0.95, 0.5, 0.99)
    valid = row(True, True, True, False, dtype=torch.bool)
    # Pixels 0 and 1 count (conf >= 0.95 and valid); 2 is below τ; 3 is padding; divide by 3 valid.
    loss = unsupervised_ce(logits, PseudoLabels(pseudo, conf, valid, 0.95), ignore_index=IGNORE)
    assert loss.item() == pytest.approx((LN2 + LN43) / 3)
    weight = confidence_weight(conf, valid, 0.95)
    assert weight.tolist() == [[[1.0, 1.0, 0.0, 0.0]]]


def test_unsupervised_ce_empty_cases_are_zero() -> None:
    pseudo = row(0, 1, 0, 1, dtype=torch.long)
    logits = row_logits(*PIXELS)
    below = row(0.1, 0.2, 0.3, 0.94)
    assert_zero_with_graph(
        unsupervised_ce(logits, PseudoLabels(pseudo, below, torch.ones(1, 1, 4, dtype=torch.bool), 0.95),
                        ignore_index=IGNORE), logits
    )
    logits = row_logits(*PIXELS)
    no_valid = torch.zeros(1, 1, 4, dtype=torch.bool)
    loss = unsupervised_ce(logits, PseudoLabels(pseudo, torch.ones(1, 1, 4), no_valid, 0.95), ignore_index=IGNORE)
    assert_zero_with_graph(loss, logits)


def test_contrastive_balanced_by_hand() -> None:
    d = row(0.5, 1.0, 3.0, 1.5, 0.2).requires_grad_()
    target = row(0, 0, 1, 1, IGNORE, dtype=torch.long)
    # unchanged: (0.5² + 1²) / 2 = 0.625; changed: (max(0, 2-3)² + (2-1.5)²) / 2 = 0.125
    loss = contrastive_balanced(d, target, margin=2.0)
    assert loss.item() == pytest.approx(0.75)
    loss.backward()
    assert d.grad is not None and d.grad[0, 0, 4].item() == 0.0  # ignored pixel
    assert d.grad[0, 0].tolist() == pytest.approx([0.5, 1.0, 0.0, -0.5, 0.0])


def test_contrastive_balanced_missing_class_contributes_zero() -> None:
    d = row(0.5, 1.0, 0.2)
    assert contrastive_balanced(d, row(0, 0, IGNORE, dtype=torch.long)).item() == pytest.approx(0.625)
    assert contrastive_balanced(d, row(1, 1, 1, dtype=torch.long)).item() == pytest.approx(
        (2.25 + 1 + 3.24) / 3
    )
    assert contrastive_balanced(d, row(1, 1, 1, dtype=torch.long), margin=1.0).item() == pytest.approx(
        (0.25 + 0 + 0.64) / 3
    )
    d = d.clone().requires_grad_()
    loss = contrastive_balanced(d, row(IGNORE, IGNORE, IGNORE, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad


def test_contrastive_weighted_by_hand() -> None:
    d = row(0.5, 1.0, 3.0, 1.5)
    pseudo = row(0, 0, 1, 1, dtype=torch.long)
    conf = row(0.99, 0.5, 0.99, 0.99)
    valid = row(True, True, True, False, dtype=torch.bool)
    # kept: pixel 0 (0.25) and pixel 2 (0); pixel 1 below τ, pixel 3 padding; divide by 3 valid pixels.
    assert contrastive_weighted(d, PseudoLabels(pseudo, conf, valid, 0.95)).item() == pytest.approx(0.25 / 3)
    valid_all = torch.ones(1, 1, 4, dtype=torch.bool)
    both = contrastive_weighted(d, PseudoLabels(pseudo, conf, valid_all, 0.95))
    assert both.item() == pytest.approx((0.25 + 0.25) / 4)
    d = d.clone().requires_grad_()
    loss = contrastive_weighted(d, PseudoLabels(pseudo, torch.zeros(1, 1, 4), valid, 0.95))
    assert loss.item() == 0.0 and loss.requires_grad
    loss = contrastive_weighted(d, PseudoLabels(pseudo, conf, torch.zeros(1, 1, 4, dtype=torch.bool), 0.95))
    assert loss.item() == 0.0 and not bool(torch.isnan(loss))


def test_ceg_sum_over_all_pixels() -> None:
    logits = row_logits(*PIXELS)
    target = row(1, 0, IGNORE, IGNORE, dtype=torch.long)
    # sum over the two labelled pixels (ln 2 + ln 4) divided by all four pixels
    assert ceg_ce_sum_over_all(logits, target, ignore_index=IGNORE).item() == pytest.approx((LN2 + LN4) / 4)
    assert ceg_ce_mean(logits, target, ignore_index=IGNORE).item() == pytest.approx((LN2 + LN4) / 2)
    logits = row_logits(*PIXELS)
    assert_zero_with_graph(ceg_ce_sum_over_all(logits, torch.full((1, 1, 4), IGNORE), ignore_index=IGNORE), logits)


def test_batch_reductions_pool_pixels_over_images() -> None:
    """Means are over pixels of the whole batch, not averaged per image."""
    logits = torch.cat([row_logits(*PIXELS[:2]), row_logits(*PIXELS[:2])]).detach()
    target = torch.tensor([[[0, IGNORE]], [[1, 1]]])
    assert supervised_ce(logits, target, ignore_index=IGNORE).item() == pytest.approx((LN2 + LN2 + LN43) / 3)


def test_schedules() -> None:
    assert lambda_vl_at(0, 100) == pytest.approx(0.1)
    assert lambda_vl_at(50, 100) == pytest.approx(0.05)
    assert lambda_vl_at(100, 100) == 0.0
    assert lambda_vl_at(99, 100, start=1.0) == pytest.approx(0.01)
    assert poly_lr(0.02, 0, 100) == pytest.approx(0.02)
    assert poly_lr(0.02, 50, 100) == pytest.approx(0.02 * 0.5**0.9)
    assert poly_lr(0.02, 100, 100) == 0.0


def test_rampup_is_mean_teachers_sigmoid_after_the_warmup() -> None:
    assert rampup(0, 0, 0) == rampup(5, 10, 0) == 1.0  # no ramp-up: full weight
    assert rampup(10, 10, 40) == pytest.approx(math.exp(-5))  # starts at the end of the warm-up
    assert rampup(3, 10, 40) == pytest.approx(math.exp(-5))
    assert rampup(30, 10, 40) == pytest.approx(math.exp(-5 * 0.5**2))  # halfway: exp(-1.25) = 0.2865
    assert rampup(50, 10, 40) == rampup(90, 10, 40) == 1.0


def test_total_loss_weights() -> None:
    terms = LossTerms(s=torch.tensor(1.0), u=torch.tensor(2.0), c=torch.tensor(3.0), vl=torch.tensor(4.0))
    # (1 + 2) / 2 + 0.1 * 3 + 0.05 * 4
    assert total_loss(terms, lambda_c=0.1, lambda_vl=0.05).item() == pytest.approx(2.0)
    off = LossTerms(s=torch.tensor(1.0), u=torch.tensor(2.0), c=zero_like(terms.s), vl=zero_like(terms.s))
    assert total_loss(off, lambda_c=0.1, lambda_vl=0.1).item() == pytest.approx(1.5)
    # a pseudo-label weight of 0.5 scales L_u (L_c's strong half is weighted where it is made):
    # (1 + 0.5 * 2) / 2 + 0.1 * 3 + 0.05 * 4
    assert total_loss(terms, lambda_c=0.1, lambda_vl=0.05, unsup_weight=0.5).item() == pytest.approx(1.5)
    assert zero_like(torch.ones(2, dtype=torch.float64)).dtype == torch.float64


def test_flexmatch_thresholds_give_a_rare_but_learnt_class_a_threshold_near_tau() -> None:
    # Over the set: 960 pixels predicted "no change", all above τ (r = 1); 40 predicted "change", 32 above
    # τ (r = 0.8); every sample seen. β = (1, 0.8); τ_c = 0.95 * 0.8 / 1.2.
    tau = flexmatch_thresholds(torch.tensor([960, 32]), torch.tensor([960, 40]), 0.0, 0.95)
    torch.testing.assert_close(tau, torch.tensor([0.95, 0.95 * 0.8 / 1.2]))
    assert 0.95 / 2 < float(tau[1]) < 0.95  # not its pixel share (32 / 960 would give 0.016)
    # Half the set unseen does not change β while the best class is at r = 1 ...
    torch.testing.assert_close(flexmatch_thresholds(torch.tensor([960, 32]), torch.tensor([960, 40]), 0.5, 0.95),
                               tau)
    # ... but FlexMatch's warm-up divides by the unseen share while it is the larger: r = (0.4, 0.2),
    # 90 % unseen -> β = (0.4 / 0.9, 0.2 / 0.9).
    warm = flexmatch_thresholds(torch.tensor([40, 2]), torch.tensor([100, 10]), 0.9, 0.95)
    beta = torch.tensor([0.4 / 0.9, 0.2 / 0.9])
    torch.testing.assert_close(warm, 0.95 * beta / (2 - beta))
    # A class never predicted has r = 0 and threshold 0; nothing at all seen gives 0 everywhere, not NaN.
    assert flexmatch_thresholds(torch.tensor([5, 0]), torch.tensor([10, 0]), 0.0, 0.95).tolist()[1] == 0.0
    assert flexmatch_thresholds(torch.zeros(2), torch.zeros(2), 1.0, 0.95).tolist() == [0.0, 0.0]


def test_pseudo_label_weight_is_zero_during_the_warmup_then_ramps_up() -> None:
    assert pseudo_label_weight(99, 100, 0) == 0.0
    assert pseudo_label_weight(100, 100, 0) == 1.0
    assert pseudo_label_weight(100, 100, 50) == pytest.approx(math.exp(-5))
    assert pseudo_label_weight(150, 100, 50) == 1.0
    assert pseudo_label_weight(0, 0, 0) == 1.0  # the paper: every term from the first iteration
