from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from diffmatch.cli import InputError
from diffmatch.config import DataConfig, ModelConfig, TrainArgs
from diffmatch.encoder import STAGE_CHANNELS, SiameseEncoder, dilated_resnet


def conv3x3_layout(stage: torch.nn.Sequential) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(stride, dilation) of each 3x3 conv of a stage, in order."""
    return [
        (m.stride, m.dilation)
        for m in stage.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [(64, 64), (33, 47)])
def test_stage_shapes_output_stride_16(backbone: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    enc = SiameseEncoder(backbone=backbone).eval()  # type: ignore[arg-type]
    a, b = torch.randn(1, 3, *size), torch.randn(1, 3, *size)
    with torch.no_grad():
        f_a, f_b = enc(a, b)
    h, w = size
    grid = [(h, w)]
    for _ in range(4):  # conv1, maxpool, layer2, layer3: kernel 3 or 7 with "same" padding and stride 2
        grid.append(((grid[-1][0] - 1) // 2 + 1, (grid[-1][1] - 1) // 2 + 1))
    expected = [grid[2], grid[3], grid[4], grid[4]]  # layer4 is dilated: no further downsampling
    for feats in (f_a, f_b):
        assert [tuple(f.shape[-2:]) for f in feats] == expected
        assert [f.shape[1] for f in feats] == list(STAGE_CHANNELS[backbone])
        assert all(f.dtype == torch.float32 for f in feats)


@pytest.mark.parametrize("backbone", ["resnet34", "resnet101"])
def test_other_depths(backbone: str) -> None:
    enc = SiameseEncoder(backbone=backbone).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        f_a, _ = enc(torch.randn(1, 3, 32, 48), torch.randn(1, 3, 32, 48))
    assert [tuple(f.shape[1:]) for f in f_a] == [
        (c, h, w)
        for c, (h, w) in zip(STAGE_CHANNELS[backbone], [(8, 12), (4, 6), (2, 3), (2, 3)], strict=True)
    ]


def test_siamese_weights_shared() -> None:
    torch.manual_seed(0)
    enc = SiameseEncoder(backbone="resnet18").eval()
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f_a, f_b = enc(a, b)
        g_b, g_a = enc(b, a)
    for x, y in zip(f_a + f_b, g_a + g_b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_basic_block_dilation_follows_torchvision_rule() -> None:
    """ResNet-18/34 get layer4 dilated by the rule torchvision applies to Bottleneck nets."""
    r50 = dilated_resnet("resnet50")
    r50_layout = conv3x3_layout(r50.layer4)  # one 3x3 conv per Bottleneck
    assert r50_layout[0] == ((1, 1), (1, 1)) and all(x == ((1, 1), (2, 2)) for x in r50_layout[1:])
    for name in ("resnet18", "resnet34"):
        net = dilated_resnet(name)  # type: ignore[arg-type]
        layout = conv3x3_layout(net.layer4)  # two 3x3 convs per BasicBlock
        assert layout[:2] == [((1, 1), (1, 1))] * 2
        assert all(x == ((1, 1), (2, 2)) for x in layout[2:])
        assert net.layer4[0].downsample[0].stride == (1, 1)
        assert all(
            m.padding == m.dilation
            for m in net.layer4.modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
        )
        # The earlier stages are untouched.
        assert net.layer3[0].conv1.stride == (2, 2)


def test_parameter_names_are_torchvision_keys() -> None:
    enc = SiameseEncoder(backbone="resnet18")
    ref = torchvision.models.resnet18().state_dict()
    assert set(enc.state_dict()) == {k for k in ref if not k.startswith("fc.")}


def _resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


def test_local_weights_with_wrapper_and_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _resnet18_state()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, path)
    enc = SiameseEncoder(backbone="resnet18", weights=str(path))
    for key, value in enc.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert "warning" not in capsys.readouterr().out  # fc.* is ignored silently


def test_local_weights_report_missing_and_unexpected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _resnet18_state()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save({"model": {f"module.encoder.{k}": v for k, v in state.items()}}, path)
    enc = SiameseEncoder(backbone="resnet18", weights=str(path))
    out = capsys.readouterr().out
    assert "warning" in out and str(path) in out
    assert "1 missing keys ['layer1.0.conv1.weight']" in out and "1 unexpected keys ['extra.weight']" in out
    torch.testing.assert_close(enc.conv1.weight, state["conv1.weight"], rtol=0, atol=0)


def test_local_weights_shape_mismatch_names_file(tmp_path: Path) -> None:
    state = _resnet18_state()
    state["layer4.1.conv2.weight"] = torch.zeros(2, 2, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"wrong\.pth.*layer4\.1\.conv2\.weight"):
        SiameseEncoder(backbone="resnet18", weights=str(path))


def test_local_weights_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere\.pth: weights file not found"):
        SiameseEncoder(backbone="resnet18", weights=str(tmp_path / "nowhere.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pth"):
        SiameseEncoder(backbone="resnet18", weights=str(junk))
    foreign = tmp_path / "foreign.pth"
    torch.save({"head.weight": torch.zeros(2)}, foreign)
    with pytest.raises(InputError, match=r"foreign\.pth: no key matches"):
        SiameseEncoder(backbone="resnet18", weights=str(foreign))


def test_imagenet_weights_come_from_torchvision_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    """The download itself is replaced here: tests never download."""
    state = _resnet18_state()
    calls: list[str] = []

    def fake_get_state_dict(self: object, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append(str(self))
        return state

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", fake_get_state_dict)
    enc = SiameseEncoder(backbone="resnet18", weights="imagenet")
    assert calls == ["ResNet18_Weights.IMAGENET1K_V1"]
    torch.testing.assert_close(enc.layer4[1].conv2.weight, state["layer4.1.conv2.weight"], rtol=0, atol=0)


def test_imagenet_offline_says_what_to_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self: object, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(InputError, match=r"cannot download the ImageNet weights of resnet18 .*resnet18-f37072fd\.pth"
                                         r".*--model\.weights PATH.*--model\.weights none"):
        SiameseEncoder(backbone="resnet18", weights="imagenet")


def test_deep_stem_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "resnet50_v1c.pth"
    state = {"stem.0.weight": torch.zeros(32, 3, 3, 3), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(InputError, match=r"resnet50_v1c\.pth: a deep-stem ResNet .* --model\.weights imagenet"):
        SiameseEncoder(backbone="resnet50", weights=str(path))


def test_train_defaults_to_imagenet_weights_and_other_configs_do_not() -> None:
    args = TrainArgs(data=DataConfig(root=Path("data")))
    assert args.model.weights == "imagenet"
    assert ModelConfig().weights == "none" and args.model_for_inference.weights == "none"
