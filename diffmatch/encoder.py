"""Siamese ResNet encoder: one torchvision ResNet shared by both dates, last stage dilated (§3.7).

``weights="imagenet"`` downloads torchvision's ``DEFAULT`` ImageNet weights of the backbone (V2 for
ResNet-50/101, V1 for ResNet-18/34); nothing is downloaded otherwise. The encoder's parameter names
are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a torchvision ResNet state dict
loads into it as it is (its ``fc.*`` keys are dropped).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from diffmatch.cli import InputError
from diffmatch.config import Backbone

STAGE_CHANNELS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
"""Channels of the four stage features (strides 4, 8, 16, 16) of each backbone."""

_PREFIXES = ("module.", "backbone.", "encoder.")


class SiameseEncoder(nn.Module):
    """A ResNet with output stride 16 applied to each date with the same weights.

    ``forward(a, b)`` returns the four stage features of ``a`` and of ``b`` (strides 4, 8, 16, 16).
    """

    def __init__(self, *, backbone: Backbone = "resnet50", weights: str = "none") -> None:
        super().__init__()
        if backbone not in STAGE_CHANNELS:
            raise InputError(f"unknown backbone {backbone!r}; use one of {', '.join(STAGE_CHANNELS)}")
        self.backbone = backbone
        self.channels = STAGE_CHANNELS[backbone]
        net = dilated_resnet(backbone)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if weights == "imagenet":
            self.load_state_dict(_drop_fc(imagenet_state(backbone)))
        elif weights != "none":
            load_resnet_weights(self, Path(weights))

    def features(self, x: Tensor) -> list[Tensor]:
        """The four stage features of one batch of images (N, 3, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def forward(self, a: Tensor, b: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        # Two passes, as the authors' code does: in train mode each date gets its own BN statistics.
        return self.features(a), self.features(b)


def imagenet_state(backbone: Backbone) -> dict[str, Tensor]:
    """torchvision's ``DEFAULT`` ImageNet weights of ``backbone``, downloaded once into torch's cache
    (``~/.cache/torch/hub/checkpoints``); offline, an ``InputError`` that says what to pass instead."""
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except OSError as err:  # URLError, timeouts and unreachable hosts are all OSErrors
        file = weights.url.rsplit("/", 1)[-1]
        raise InputError(f"cannot download the ImageNet weights of {backbone} ({err}); offline, copy {file} "
                         "from a machine that has it (torch's cache: ~/.cache/torch/hub/checkpoints) and pass "
                         "--model.weights PATH, or train from scratch with --model.weights none") from None


def dilated_resnet(backbone: Backbone) -> ResNet:
    """A randomly initialised torchvision ResNet whose last stage is dilated (output stride 16)."""
    if backbone in ("resnet50", "resnet101"):
        return getattr(torchvision.models, backbone)(replace_stride_with_dilation=[False, False, True])
    net = getattr(torchvision.models, backbone)()
    _dilate_basic_stage(net.layer4)
    return net


def _dilate_basic_stage(stage: nn.Sequential) -> None:
    """Replace a BasicBlock stage's stride 2 by dilation 2, by the rule torchvision applies to Bottleneck
    stages: the first block keeps dilation 1 and loses its stride; the later blocks' 3x3 convs get
    dilation (and padding) 2. Shapes of the weights do not change."""
    first = stage[0]
    assert isinstance(first, BasicBlock) and first.downsample is not None
    first.conv1.stride = (1, 1)
    first.downsample[0].stride = (1, 1)
    for block in stage[1:]:
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (2, 2), (2, 2)


def read_torch_file(path: Path, *, what: str, fix: str, device: torch.device | str = "cpu") -> Any:
    """The contents of a file written by ``torch.save`` (``what``: "checkpoint", ...), loaded with
    ``weights_only=True`` (no code runs from the file); a missing, empty, truncated or foreign file is one
    ``InputError`` naming it and ``fix``."""
    if not path.is_file():
        raise InputError(f"{path}: {what} not found; {fix}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes; an interrupted copy?), not a readable {what}; {fix}")
    if not zipfile.is_zipfile(path):  # what torch.save writes
        raise InputError(f"{path}: not a readable {what} (not an archive torch.save wrote, or a truncated one); {fix}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # pickle, zip and unpickler errors come in many types, some without a message
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise InputError(f"{path}: not a readable {what} ({reason[:100]}); {fix}") from None


def load_resnet_weights(encoder: nn.Module, path: Path) -> None:
    """Load a local ResNet state dict (torchvision keys) into ``encoder``.

    Accepts a ``state_dict`` / ``model`` wrapper and ``module.`` / ``backbone.`` / ``encoder.`` key
    prefixes; ``fc.*`` keys are ignored. Missing and unexpected keys are reported on one warning line;
    a missing file, an unreadable file, no matching key or a shape mismatch raises ``InputError``.
    """
    state = read_torch_file(path, what="weights file",
                            fix="pass 'none', 'imagenet' or a ResNet state dict saved with torch.save")
    state = _drop_fc(_strip_prefixes(_unwrap(state, path)))
    if any(key.startswith("stem.") for key in state):
        raise InputError(f"{path}: a deep-stem ResNet (ResNet-V1c, as mmseg's and the authors' checkpoints) does "
                         "not fit torchvision's ResNet; use --model.weights imagenet (torchvision's weights)")
    own = encoder.state_dict()
    if not own.keys() & state.keys():
        raise InputError(f"{path}: no key matches a torchvision ResNet; is it a ResNet state dict?")
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise InputError(
                f"{path}: {key} has shape {tuple(value.shape)}, the encoder expects {tuple(own[key].shape)}; "
                "pick the matching --model.backbone"
            )
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        print(
            f"warning: {path}: {len(result.missing_keys)} missing keys {result.missing_keys[:3]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:3]}"
        )


def _unwrap(state: object, path: Path) -> dict[str, Tensor]:
    while isinstance(state, Mapping):
        inner = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _drop_fc(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
