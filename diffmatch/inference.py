"""Change logits for image pairs of any size: whole when small, sliding window with overlap when large.

The images stay where the caller keeps them (on the CPU for a large scene); only batches of windows go
to the model's device, and the result is accumulated beside the images in float32. Images may be given
as uint8 (0..255), then each window is normalised on the device as ``augment.image_to_tensor`` does,
so a scene costs 3 bytes a pixel per date instead of 12.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffmatch.augment import MEAN, STD

Reduce = Callable[[Tensor], Tensor]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` that cover ``length`` with step ``stride``; the last
    tile ends at the border. One tile at 0 when ``length <= tile``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def window_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the windows covering a ``height`` x ``width`` image, row-major."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    th, tw, stride = min(tile, height), min(tile, width), tile - overlap
    return [(y, x) for y in tile_starts(height, th, stride) for x in tile_starts(width, tw, stride)]


def normalise(x: Tensor) -> Tensor:
    """Float input unchanged; uint8 (N, 3, H, W) scaled to [0, 1] and normalised with the ImageNet
    mean and std (the same operations as ``augment.image_to_tensor``)."""
    if x.is_floating_point():
        return x
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.float().div(255).sub(mean).div(std)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def slide(model: nn.Module, a: Tensor, b: Tensor, *, reduce: Reduce, channels: int, tile: int, overlap: int,
          batch_size: int, on_batch: Callable[[int], None] | None = None) -> Tensor:
    """(N, channels, H, W) float32 on ``a``'s device: ``reduce`` of the change logits of ``w_cr``,
    averaged over the overlapping windows (``reduce`` maps (B, 2, h, w) logits to (B, channels, h, w)).

    ``a`` and ``b`` are (N, 3, H, W), normalised float or uint8; windows of ``tile`` x ``tile`` with
    ``overlap`` pixels in common run ``batch_size`` at a time on the model's device, so memory in the
    model depends on the window batch, not the image. ``on_batch`` is told how many windows just ran.
    """
    n, _, height, width = a.shape
    if b.shape != a.shape:
        raise ValueError(f"pre-event shape {tuple(a.shape)} differs from post-event {tuple(b.shape)}")
    device, windows = model_device(model), window_grid(height, width, tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    out = torch.zeros((n, channels, height, width), dtype=torch.float32, device=a.device)
    # Windows form a grid, so the number covering (y, x) is rows(y) * cols(x): two vectors, no count map.
    rows = torch.zeros(height, dtype=torch.float32, device=a.device)
    cols = torch.zeros(width, dtype=torch.float32, device=a.device)
    for y in sorted({y for y, _ in windows}):
        rows[y : y + th] += 1
    for x in sorted({x for _, x in windows}):
        cols[x : x + tw] += 1
    items = [(i, y, x) for i in range(n) for y, x in windows]  # small pairs batch across images
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        crops_a = torch.stack([a[i, :, y : y + th, x : x + tw] for i, y, x in chunk]).to(device)
        crops_b = torch.stack([b[i, :, y : y + th, x : x + tw] for i, y, x in chunk]).to(device)
        logits = model(normalise(crops_a), normalise(crops_b), change_only=True).change
        values = reduce(logits.float()).to(a.device)
        for (i, y, x), window in zip(chunk, values, strict=True):
            out[i, :, y : y + th, x : x + tw] += window
        if on_batch is not None:
            on_batch(len(chunk))
    out /= rows.view(height, 1)
    out /= cols.view(1, width)
    return out


def change_logits(model: nn.Module, a: Tensor, b: Tensor, *, tile: int = 256, overlap: int = 64,
                  batch_size: int = 8) -> Tensor:
    """(N, 2, H, W) change logits of ``w_cr`` on ``a``'s device for (N, 3, H, W) pairs (normalised
    float, or uint8), averaged over windows of ``tile`` with ``overlap`` (one window when it fits)."""
    return slide(model, a, b, reduce=lambda logits: logits, channels=2, tile=tile, overlap=overlap,
                 batch_size=batch_size)


def change_margin(model: nn.Module, a: Tensor, b: Tensor, *, tile: int = 256, overlap: int = 64,
                  batch_size: int = 8, on_batch: Callable[[int], None] | None = None) -> Tensor:
    """(N, H, W) float32 on ``a``'s device: change logit minus no-change logit, averaged over the
    windows. Half the memory of ``change_logits``; ``sigmoid`` of it is the change probability (the
    softmax of two classes) and ``> 0`` is the argmax."""
    return slide(model, a, b, reduce=lambda logits: logits[:, 1:] - logits[:, :1], channels=1, tile=tile,
                 overlap=overlap, batch_size=batch_size, on_batch=on_batch)[:, 0]
