"""The light all-MLP decoder and the two decoders DiffMatch builds from it (§3.4, §3.5, §3.7).

Both decoders are the SegFormer/Changer "light" head: per stage a 1x1 conv + BN + ReLU, resize to the
stride-4 grid, concatenate, a 1x1 fuse conv + BN + ReLU giving the feature ``q``; a 1x1 classifier on
``q`` gives the logits. Dropout is 0, so there is none. Initialisation as in mmseg's decode heads:
Kaiming-normal (fan-out) convs, classifiers N(0, 0.01), zero biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Sequential):
    """1x1 conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """A 1x1 linear classifier on a feature map."""
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class MLPDecoder(nn.Module):
    """Four stage features -> one feature ``q`` (N, channels, H/4, W/4) on the first stage's grid."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        self.stages = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels)
        self.fuse = ConvBNReLU(channels * len(in_channels), channels)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        outs = [
            F.interpolate(stage(f), size=size, mode="bilinear", align_corners=False)
            for stage, f in zip(self.stages, feats, strict=True)
        ]
        return self.fuse(torch.cat(outs, dim=1))


class DifferenceDecoder(nn.Module):
    """Change decoder on the difference features, with the dual projection head (Eq. 13).

    ``w_cr`` gives the change prediction used at test time and by consistency regularisation; ``w_vl``
    is a second classifier on the same ``q``, trained only by the CEG change labels. Without the dual
    head, ``w_vl`` is None and the CEG labels train ``w_cr``.
    """

    def __init__(
        self, *, in_channels: Sequence[int], channels: int = 256, num_classes: int = 2, dual_head: bool = True
    ) -> None:
        super().__init__()
        self.mlp = MLPDecoder(in_channels, channels)
        self.w_cr = classifier(channels, num_classes)
        self.w_vl = classifier(channels, num_classes) if dual_head else None

    def forward(self, feats: Sequence[Tensor], *, need_vl: bool = True) -> tuple[Tensor, Tensor | None]:
        """Stride-4 logits ``(y_cr, y_vl)``; ``y_vl`` is ``y_cr`` itself without the dual head and None
        when not needed."""
        q = self.mlp(feats)
        y_cr = self.w_cr(q)
        if not need_vl:
            return y_cr, None
        return y_cr, (self.w_vl(q) if self.w_vl is not None else y_cr)


class SegmentationDecoder(nn.Module):
    """Single-date decoder (§3.5): one set of weights for both dates, applied by the caller to each."""

    def __init__(self, *, in_channels: Sequence[int], channels: int = 256, num_classes: int = 2) -> None:
        super().__init__()
        self.mlp = MLPDecoder(in_channels, channels)
        self.classifier = classifier(channels, num_classes)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The feature ``q`` and the stride-4 logits of one date."""
        q = self.mlp(feats)
        return q, self.classifier(q)
