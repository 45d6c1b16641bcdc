"""The DiffMatch network (§3.4–3.7): siamese encoder, difference decoder with the dual projection head,
and the weight-shared segmentation decoder whose features give the distance map of §3.6; and its SGD
optimiser's parameter groups (§4.1.2).

    a, b ──encoder──> f_A, f_B ──|f_A - f_B|──> difference decoder ──> w_cr: change, w_vl: change_vl
                        │    └──────────────> segmentation decoder ──> q_B, seg_b
                        └───────────────────> segmentation decoder ──> q_A, seg_a
                                              distance = ||q_A - q_B||_2 over channels, per pixel
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmatch.config import Backbone, Distance, ModelConfig, OptimConfig
from diffmatch.decoders import DifferenceDecoder, SegmentationDecoder
from diffmatch.encoder import SiameseEncoder


class ModelOutput(NamedTuple):
    """Outputs at the input size. Only ``change`` is set when the model runs with ``change_only``."""

    change: Tensor
    """(N, 2, H, W) change logits of ``w_cr`` (test time, supervised and FixMatch losses)."""
    change_vl: Tensor | None = None
    """(N, 2, H, W) change logits of ``w_vl`` (CEG loss); the same tensor as ``change`` without the dual
    head."""
    seg_a: Tensor | None = None
    """(N, 2, H, W) background/building logits of date A."""
    seg_b: Tensor | None = None
    """(N, 2, H, W) background/building logits of date B."""
    distance: Tensor | None = None
    """(N, H, W) per-pixel L2 distance between the segmentation features of A and B (§3.6)."""


class DiffMatchNet(nn.Module):
    """Siamese change detector with the dual projection head and the auxiliary segmentation decoder."""

    def __init__(
        self,
        *,
        backbone: Backbone = "resnet50",
        weights: str = "none",
        decoder_channels: int = 256,
        dual_head: bool = True,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.encoder = SiameseEncoder(backbone=backbone, weights=weights)
        channels = self.encoder.channels
        self.diff_decoder = DifferenceDecoder(
            in_channels=channels, channels=decoder_channels, num_classes=num_classes, dual_head=dual_head
        )
        self.seg_decoder = SegmentationDecoder(
            in_channels=channels, channels=decoder_channels, num_classes=num_classes
        )

    def forward(self, a: Tensor, b: Tensor, *, change_only: bool = False, metric: Distance = "pixel") -> ModelOutput:
        """Run the pre-event images ``a`` and post-event images ``b`` (N, 3, H, W), any H and W;
        ``metric`` picks the distance map of §3.6 (``pixel`` or the released code's ``authors``)."""
        size = a.shape[-2:]
        f_a, f_b = self.encoder(a, b)
        diff = [(x - y).abs() for x, y in zip(f_a, f_b, strict=True)]  # §3.7: l1 difference per stage
        y_cr, y_vl = self.diff_decoder(diff, need_vl=not change_only)
        change = upsample(y_cr, size)
        if change_only:
            return ModelOutput(change)
        change_vl = change if y_vl is y_cr else upsample(y_vl, size)
        q_a, seg_a = self.seg_decoder(f_a)
        q_b, seg_b = self.seg_decoder(f_b)
        return ModelOutput(
            change, change_vl, upsample(seg_a, size), upsample(seg_b, size),
            (distance if metric == "pixel" else authors_distance)(q_a, q_b, size),
        )


def upsample(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of (N, C, h, w) maps to ``size`` (align_corners=False)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


REFERENCE_WIDTH = 64
"""Elements the released code's distance sums over at the paper's setting: the width of the stride-4
feature map of a 256 px crop."""


def distance(q_a: Tensor, q_b: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(N, H, W) per-pixel L2 distance over channels of ``q_a - q_b``, upsampled to ``size`` (§3.6,
    Eq. 14), times sqrt(64 / C).

    The factor gives the sum of 64 squared differences the magnitude the released code's distance has
    at 256 px crops (docs/differences.md), whatever the decoder width C, so that the paper's margin ε = 2 and
    λ_c = 0.1 keep their meaning. Its gradient at ``q_a == q_b`` is 0, not NaN.
    """
    scale = (REFERENCE_WIDTH / q_a.shape[1]) ** 0.5
    d = torch.linalg.vector_norm(q_a - q_b, ord=2, dim=1, keepdim=True) * scale
    return upsample(d, size).squeeze(1)


def authors_distance(q_a: Tensor, q_b: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """The released code's distance map: ``pairwise_distance`` on (N, C, h, w) features, which reduces
    over the width w and leaves a (C, h) map per image, stretched to ``size`` as if it were a picture.
    Kept to reproduce the authors' numbers term for term; ``distance`` is what §3.6 describes."""
    d = F.pairwise_distance(q_a, q_b, p=2.0, keepdim=True).permute(0, 3, 1, 2)  # (N, 1, C, h)
    return upsample(d, size).squeeze(1)


def build_model(cfg: ModelConfig) -> DiffMatchNet:
    """The network described by a ``ModelConfig``."""
    return DiffMatchNet(
        backbone=cfg.backbone,
        weights=cfg.weights,
        decoder_channels=cfg.decoder_channels,
        dual_head=cfg.dual_head,
    )


def param_groups(
    model: DiffMatchNet, *, lr: float, decoder_lr_mult: float, weight_decay: float
) -> list[dict]:
    """SGD parameter groups: the encoder at ``lr``, the decoders and heads at ``lr * decoder_lr_mult``
    (§4.1.2). Each group keeps its starting rate under ``base_lr`` for the poly schedule."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    decoders = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    return [
        {"name": "encoder", "params": encoder, "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
        {
            "name": "decoders",
            "params": decoders,
            "lr": lr * decoder_lr_mult,
            "base_lr": lr * decoder_lr_mult,
            "weight_decay": weight_decay,
        },
    ]


def build_optimizer(model: DiffMatchNet, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum over ``param_groups`` (§4.1.2); the poly schedule sets each group's ``lr``."""
    groups = param_groups(model, lr=cfg.lr, decoder_lr_mult=cfg.decoder_lr_mult, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
