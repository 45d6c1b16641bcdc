from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffmatch.config import IGNORE, ModelConfig
from diffmatch.losses import ceg_ce_mean, contrastive_balanced, supervised_ce
from diffmatch.model import (
    DiffMatchNet,
    ModelOutput,
    authors_distance,
    build_model,
    distance,
    param_groups,
    upsample,
)


def count_parameters(model: DiffMatchNet) -> dict[str, int]:
    """Number of parameters of each part (BatchNorm buffers excluded) and in total."""

    def count(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    diff = model.diff_decoder
    return {
        "encoder": count(model.encoder),
        "difference_decoder": count(diff.mlp),
        "w_cr": count(diff.w_cr),
        "w_vl": count(diff.w_vl),
        "segmentation_decoder": count(model.seg_decoder),
        "total": count(model),
    }


@pytest.fixture(scope="module")
def net18() -> DiffMatchNet:
    torch.manual_seed(0)
    return DiffMatchNet(backbone="resnet18")


def pair(n: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g), torch.randn(n, 3, h, w, generator=g)


def check_shapes(out: ModelOutput, n: int, h: int, w: int) -> None:
    for logits in (out.change, out.change_vl, out.seg_a, out.seg_b):
        assert logits is not None and logits.shape == (n, 2, h, w) and logits.dtype == torch.float32
    assert (
        out.distance is not None and out.distance.shape == (n, h, w) and out.distance.dtype == torch.float32
    )
    assert bool((out.distance >= 0).all())
    assert all(bool(torch.isfinite(t).all()) for t in out if t is not None)


@pytest.mark.parametrize(
    ("n", "h", "w", "train"),
    [(2, 64, 64, True), (1, 96, 160, False), (3, 97, 131, True), (2, 97, 131, False), (1, 256, 256, True)],
)
def test_output_shapes_resnet18(net18: DiffMatchNet, n: int, h: int, w: int, train: bool) -> None:
    net18.train(train)
    with torch.no_grad():
        check_shapes(net18(*pair(n, h, w)), n, h, w)


def test_output_shapes_resnet50() -> None:
    torch.manual_seed(0)
    net = DiffMatchNet(backbone="resnet50")
    for train, (n, h, w) in ((True, (2, 64, 64)), (False, (1, 49, 75))):
        net.train(train)
        with torch.no_grad():
            check_shapes(net(*pair(n, h, w)), n, h, w)


@pytest.mark.parametrize("train", [True, False])
def test_swapping_dates_swaps_seg_and_keeps_change(net18: DiffMatchNet, train: bool) -> None:
    net18.train(train)
    a, b = pair(2, 64, 96)
    with torch.no_grad():
        ab, ba = net18(a, b), net18(b, a)
    exact = {"rtol": 0.0, "atol": 0.0}
    torch.testing.assert_close(ab.change, ba.change, **exact)
    torch.testing.assert_close(ab.change_vl, ba.change_vl, **exact)
    torch.testing.assert_close(ab.seg_a, ba.seg_b, **exact)
    torch.testing.assert_close(ab.seg_b, ba.seg_a, **exact)
    torch.testing.assert_close(ab.distance, ba.distance, **exact)


def test_dual_heads_are_two_classifiers_on_one_feature(net18: DiffMatchNet) -> None:
    dec = net18.diff_decoder
    assert isinstance(dec.w_cr, nn.Conv2d) and isinstance(dec.w_vl, nn.Conv2d)
    assert dec.w_cr.kernel_size == dec.w_vl.kernel_size == (1, 1)
    assert dec.w_cr.weight.data_ptr() != dec.w_vl.weight.data_ptr()
    assert not torch.equal(dec.w_cr.weight, dec.w_vl.weight)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        dec.w_cr.register_forward_hook(lambda m, i, o: seen.update(cr=i[0])),
        dec.w_vl.register_forward_hook(lambda m, i, o: seen.update(vl=i[0])),
        dec.mlp.register_forward_hook(lambda m, i, o: seen.update(q=o)),
    ]
    net18.eval()
    with torch.no_grad():
        out = net18(*pair(1, 64, 64))
    for h in hooks:
        h.remove()
    assert seen["cr"] is seen["q"] and seen["vl"] is seen["q"]
    torch.testing.assert_close(out.change_vl, upsample(dec.w_vl(seen["q"]), (64, 64)))
    assert not torch.allclose(out.change, out.change_vl)


def test_without_dual_head_change_vl_is_change() -> None:
    net = build_model(ModelConfig(backbone="resnet18", dual_head=False)).eval()
    assert net.diff_decoder.w_vl is None
    with torch.no_grad():
        out = net(*pair(1, 64, 64))
    assert out.change_vl is out.change
    assert count_parameters(net)["w_vl"] == 0


def test_distance_is_per_pixel_channel_norm_scaled_to_64_channels() -> None:
    q_a = torch.zeros(1, 2, 2, 3)
    q_b = torch.zeros(1, 2, 2, 3)
    q_b[0, :, 0, 1] = torch.tensor([3.0, 4.0])  # pixel (0, 1): norm 5
    q_b[0, :, 1, 2] = torch.tensor([-1.0, 0.0])  # pixel (1, 2): norm 1
    d = distance(q_a, q_b, (2, 3))
    scale = 32**0.5  # sqrt(64 / 2 channels)
    expected = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 1.0]]]) * scale
    torch.testing.assert_close(d, expected)
    # Upsampling happens after the norm: a 1x1 map spreads to a constant map.
    d_up = distance(torch.zeros(1, 2, 1, 1), torch.tensor([3.0, 4.0]).view(1, 2, 1, 1), (4, 5))
    torch.testing.assert_close(d_up, torch.full((1, 4, 5), 5.0 * scale))
    # At 64 channels the scale is 1: the plain L2 norm.
    ones = distance(torch.zeros(1, 64, 1, 1), torch.ones(1, 64, 1, 1), (1, 1))
    torch.testing.assert_close(ones, torch.full((1, 1, 1), 8.0))


def test_authors_distance_reduces_over_width_and_stretches_the_channel_rows() -> None:
    q_a = torch.zeros(1, 2, 3, 2)  # C = 2, h = 3, w = 2
    q_b = torch.zeros(1, 2, 3, 2)
    q_b[0, 0, 1] = torch.tensor([3.0, 4.0])  # channel 0, row 1: norm over the width 5
    q_b[0, 1, 2] = torch.tensor([0.0, 2.0])  # channel 1, row 2: 2
    d = authors_distance(q_a, q_b, (2, 3))  # the (C, h) = (2, 3) map at the "image" size 2x3
    expected = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 2.0]]])
    torch.testing.assert_close(d, expected, atol=1e-5, rtol=0)  # atol: pairwise_distance's eps of 1e-6
    # Where along the width a difference lies does not matter (the width is summed over), unlike §3.6's
    # per-pixel distance; which channel it lies in does (channels become rows).
    moved = torch.zeros(1, 2, 3, 2)
    moved[0, 0, 1] = torch.tensor([4.0, 3.0])
    moved[0, 1, 2] = torch.tensor([2.0, 0.0])
    torch.testing.assert_close(authors_distance(q_a, moved, (2, 3)), d)
    assert not torch.allclose(distance(q_a, moved, (3, 2)), distance(q_a, q_b, (3, 2)))
    swapped = q_b.flip(1)
    torch.testing.assert_close(authors_distance(q_a, swapped, (2, 3)), d.flip(1), atol=1e-5, rtol=0)


def test_change_only_skips_segmentation(net18: DiffMatchNet) -> None:
    calls: list[int] = []
    hooks = [
        net18.seg_decoder.register_forward_hook(lambda m, i, o: calls.append(1)),
        net18.diff_decoder.w_vl.register_forward_hook(lambda m, i, o: calls.append(2)),
    ]
    net18.eval()
    a, b = pair(2, 64, 64)
    with torch.no_grad():
        fast = net18(a, b, change_only=True)
        assert calls == []
        full = net18(a, b)
    for h in hooks:
        h.remove()
    assert fast.change_vl is None and fast.seg_a is None and fast.seg_b is None and fast.distance is None
    torch.testing.assert_close(fast.change, full.change, rtol=0, atol=0)


PARTS = ("encoder", "diff_mlp", "w_cr", "w_vl", "seg_mlp", "seg_classifier")


def reached(net: DiffMatchNet, loss: torch.Tensor) -> set[str]:
    """The parts with a nonzero gradient after ``loss.backward()``."""
    net.zero_grad(set_to_none=True)
    loss.backward()
    modules = {
        "encoder": net.encoder,
        "diff_mlp": net.diff_decoder.mlp,
        "w_cr": net.diff_decoder.w_cr,
        "w_vl": net.diff_decoder.w_vl,
        "seg_mlp": net.seg_decoder.mlp,
        "seg_classifier": net.seg_decoder.classifier,
    }
    return {
        name
        for name, m in modules.items()
        if m is not None and any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())
    }


def test_gradients_reach_the_right_parts(net18: DiffMatchNet) -> None:
    net18.train()
    a, b = pair(2, 32, 32)
    target = torch.randint(0, 2, (2, 32, 32), generator=torch.Generator().manual_seed(3))

    def fwd() -> ModelOutput:
        return net18(a, b)

    assert reached(net18, supervised_ce(fwd().change, target, ignore_index=IGNORE)) == {"encoder", "diff_mlp", "w_cr"}
    assert reached(net18, ceg_ce_mean(fwd().change_vl, target, ignore_index=IGNORE)) == {"encoder", "diff_mlp", "w_vl"}
    out = fwd()
    seg = (ceg_ce_mean(out.seg_a, target, ignore_index=IGNORE) + ceg_ce_mean(out.seg_b, target, ignore_index=IGNORE))
    seg = seg / 2
    assert reached(net18, seg) == {"encoder", "seg_mlp", "seg_classifier"}
    assert reached(net18, contrastive_balanced(fwd().distance, target)) == {"encoder", "seg_mlp"}


def test_ceg_change_loss_reaches_w_cr_without_dual_head() -> None:
    torch.manual_seed(0)
    net = DiffMatchNet(backbone="resnet18", dual_head=False).train()
    target = torch.randint(0, 2, (2, 32, 32))
    assert reached(net, ceg_ce_mean(net(*pair(2, 32, 32)).change_vl, target, ignore_index=IGNORE)) == {
        "encoder",
        "diff_mlp",
        "w_cr",
    }


def test_sync_batchnorm_conversion(net18: DiffMatchNet) -> None:
    net18.eval()
    a, b = pair(1, 64, 64)
    with torch.no_grad():
        before = net18(a, b)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net18))
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) > 0
    assert synced.state_dict().keys() == net18.state_dict().keys()
    with torch.no_grad():
        after = synced.eval()(a, b)
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(x, y)


def test_param_groups_split_encoder_and_decoders(net18: DiffMatchNet) -> None:
    groups = param_groups(net18, lr=0.02, decoder_lr_mult=10.0, weight_decay=1e-4)
    enc, dec = groups
    assert (enc["lr"], enc["base_lr"]) == (0.02, 0.02)
    assert dec["lr"] == pytest.approx(0.2) and dec["base_lr"] == dec["lr"]
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    enc_ids = {id(p) for p in enc["params"]}
    dec_ids = {id(p) for p in dec["params"]}
    assert enc_ids == {id(p) for p in net18.encoder.parameters()}
    assert not enc_ids & dec_ids and enc_ids | dec_ids == {id(p) for p in net18.parameters()}
    assert id(net18.diff_decoder.w_vl.weight) in dec_ids and id(net18.seg_decoder.classifier.bias) in dec_ids
    opt = torch.optim.SGD(groups, lr=0.02, momentum=0.9)
    assert [g["base_lr"] for g in opt.param_groups] == [0.02, pytest.approx(0.2)]


def test_count_parameters(net18: DiffMatchNet) -> None:
    counts = count_parameters(net18)
    assert counts["w_cr"] == counts["w_vl"] == 256 * 2 + 2
    parts = sum(v for k, v in counts.items() if k != "total")
    assert parts == counts["total"] == sum(p.numel() for p in net18.parameters())
    assert counts["encoder"] == 11_176_512  # torchvision ResNet-18 without fc (11,689,512 - 513,000)
