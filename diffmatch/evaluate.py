"""Evaluation: change logits of pairs of any size by sliding windows, the metrics over a
whole split (Eq. 16–17), per-image CSV, result pictures, and the command.

    python -m diffmatch.evaluate --checkpoint runs/diffmatch/best.pt --data.root LEVIR-CD256

Pairs larger than the window are predicted with overlapping windows whose logits are averaged. The
images stay where the caller keeps them (on the CPU for a large scene); only batches of windows go to
the model's device, and the result is accumulated beside the images in float32. Images may be given as
uint8 (0..255), then each window is normalised on the device as ``augment.image_to_tensor`` does, so a
scene costs 3 bytes a pixel per date instead of 12.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from diffmatch import augment
from diffmatch.atomic import atomic_path, write_json
from diffmatch.augment import MEAN, STD
from diffmatch.checkpoint import model_from_checkpoint
from diffmatch.cli import InputError, Progress
from diffmatch.config import DataConfig
from diffmatch.data import EvalSet, eval_set
from diffmatch.device import autocast, pick_device
from diffmatch.metrics import Confusion, confusion, format_scores, scores
from diffmatch.pairs import read_id_list
from diffmatch.png import write_png
from diffmatch.subsets import leak_warning


# ----------------------------------------------------------------------------- sliding windows
class Windows(NamedTuple):
    """Sliding-window options of prediction and evaluation."""

    tile: int = 256
    """Side of the square windows; a pair that fits one is predicted whole."""
    overlap: int | None = None
    """Pixels that neighbouring windows share; None: a quarter of the tile."""
    batch_size: int = 8
    """Windows (or whole pairs) per forward pass: this, not the image size, bounds the memory in the model."""
    amp: bool = False
    """bf16 autocast on CUDA."""

    @property
    def shared(self) -> int:
        """The overlap in pixels."""
        return self.tile // 4 if self.overlap is None else self.overlap


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


class Head(NamedTuple):
    """What ``slide`` averages over the windows."""

    run: Callable[[Tensor, Tensor], Tensor]
    """Maps a batch of window pairs (B, 3, h, w), as cut from the images, to values (B, channels, h, w)."""
    channels: int
    """Channels of the values."""


def change_head(model: nn.Module, reduce: Callable[[Tensor], Tensor], channels: int) -> Head:
    """``reduce`` of the float32 change logits of ``w_cr`` on window pairs moved to the model's device
    (normalised float, or uint8 normalised there); ``reduce`` maps (B, 2, h, w) to (B, channels, h, w)."""
    device = model_device(model)

    def run(a: Tensor, b: Tensor) -> Tensor:
        logits = model(normalise(a.to(device)), normalise(b.to(device)), change_only=True).change
        return reduce(logits.float())

    return Head(run, channels)


@torch.no_grad()
def slide(head: Head, a: Tensor, b: Tensor, *, windows: Windows,
          on_batch: Callable[[int], None] | None = None) -> Tensor:
    """(N, head.channels, H, W) float32 on ``a``'s device: ``head``'s values of the windows of (N, 3, H, W)
    pairs (normalised float or uint8), averaged where windows overlap. Windows run ``windows.batch_size``
    at a time, so the memory in the model depends on the window batch, not the image. ``on_batch`` is told
    how many windows just ran."""
    n, _, height, width = a.shape
    if b.shape != a.shape:
        raise ValueError(f"pre-event shape {tuple(a.shape)} differs from post-event {tuple(b.shape)}")
    grid = window_grid(height, width, windows.tile, windows.shared)
    th, tw = min(windows.tile, height), min(windows.tile, width)
    out = torch.zeros((n, head.channels, height, width), dtype=torch.float32, device=a.device)
    # Windows form a grid, so the number covering (y, x) is rows(y) * cols(x): two vectors, no count map.
    rows = torch.zeros(height, dtype=torch.float32, device=a.device)
    cols = torch.zeros(width, dtype=torch.float32, device=a.device)
    for y in sorted({y for y, _ in grid}):
        rows[y : y + th] += 1
    for x in sorted({x for _, x in grid}):
        cols[x : x + tw] += 1
    items = [(i, y, x) for i in range(n) for y, x in grid]  # small pairs batch across images
    for start in range(0, len(items), windows.batch_size):
        chunk = items[start : start + windows.batch_size]
        crops_a = torch.stack([a[i, :, y : y + th, x : x + tw] for i, y, x in chunk])
        crops_b = torch.stack([b[i, :, y : y + th, x : x + tw] for i, y, x in chunk])
        for (i, y, x), window in zip(chunk, head.run(crops_a, crops_b).to(a.device), strict=True):
            out[i, :, y : y + th, x : x + tw] += window
        if on_batch is not None:
            on_batch(len(chunk))
    out /= rows.view(height, 1)
    out /= cols.view(1, width)
    return out


def change_logits(model: nn.Module, a: Tensor, b: Tensor, *, windows: Windows) -> Tensor:
    """(N, 2, H, W) change logits of ``w_cr`` on ``a``'s device for (N, 3, H, W) pairs (normalised
    float, or uint8), averaged over the sliding ``windows`` (one window when it fits)."""
    with autocast(model_device(model), windows.amp):
        return slide(change_head(model, lambda logits: logits, 2), a, b, windows=windows)


def change_margin(model: nn.Module, a: Tensor, b: Tensor, *, windows: Windows,
                  on_batch: Callable[[int], None] | None = None) -> Tensor:
    """(N, H, W) float32 on ``a``'s device: change logit minus no-change logit, averaged over the
    windows. Half the memory of ``change_logits``; ``sigmoid`` of it is the change probability (the
    softmax of two classes) and ``> 0`` is the argmax."""
    head = change_head(model, lambda logits: logits[:, 1:] - logits[:, :1], 1)
    with autocast(model_device(model), windows.amp):
        return slide(head, a, b, windows=windows, on_batch=on_batch)[:, 0]


# ----------------------------------------------------------------------------- a split
class Evaluation(NamedTuple):
    """Scores of the pooled confusion matrix, and the counts of each image."""

    scores: dict[str, float]
    per_image: dict[str, Confusion]


def visualise(a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """A | B | ground truth | prediction, side by side; in the prediction TP white, FP red, FN green."""
    mean, std = torch.tensor(augment.MEAN).view(3, 1, 1), torch.tensor(augment.STD).view(3, 1, 1)

    def rgb(x: torch.Tensor) -> np.ndarray:
        return (x.cpu().float() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()

    truth, guess = label.cpu().numpy() == 1, pred.cpu().numpy() == 1
    colours = np.zeros((*truth.shape, 3), np.uint8)
    colours[truth & guess] = (255, 255, 255)
    colours[~truth & guess] = (255, 0, 0)
    colours[truth & ~guess] = (0, 255, 0)
    gt = np.repeat((truth * 255).astype(np.uint8)[..., None], 3, axis=2)
    gap = np.full((truth.shape[0], 4, 3), 128, np.uint8)
    return np.concatenate([rgb(a), gap, rgb(b), gap, gt, gap, colours], axis=1)


class Report(NamedTuple):
    """What an evaluation writes besides its scores."""

    vis_dir: Path | None = None
    """Write A | B | ground truth | prediction pictures here, one per pair (``visualise``)."""
    progress: bool = False
    """Print a progress line over the pairs on stderr."""


NO_REPORT = Report()
"""No pictures, no progress line."""


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: EvalSet, *, windows: Windows, num_workers: int = 0,
                   report: Report = NO_REPORT) -> Evaluation:
    """Run the model over a split on the model's device and pool one confusion matrix (not a mean of
    per-image scores). Pairs load ``windows.batch_size`` at a time; those larger than the tile are
    predicted with sliding ``windows``."""
    model.eval()
    device = model_device(model)
    loader = DataLoader(dataset, batch_size=windows.batch_size, num_workers=num_workers)
    total, per_image = Confusion(), {}
    shown = Progress("evaluate", len(dataset), "pairs", file=sys.stderr, enabled=report.progress)
    try:
        for batch in loader:
            pred = change_logits(model, batch.a.to(device), batch.b.to(device), windows=windows).argmax(1)
            for i, sample_id in enumerate(batch.id):
                counts = confusion(pred[i].cpu(), batch.label[i])
                per_image[sample_id] = counts
                total = total + counts
                if report.vis_dir is not None:
                    picture = visualise(batch.a[i], batch.b[i], batch.label[i], pred[i])
                    write_png(report.vis_dir / f"{sample_id}.png", picture)
            shown.step(len(batch.id))
    except RuntimeError as err:
        if "stack expects each tensor to be equal size" in str(err):
            raise InputError(f"{dataset.root}: images of different sizes in one split; pass --batch-size 1") from None
        raise
    return Evaluation(scores(total), per_image)


def write_per_image_csv(path: Path, per_image: dict[str, Confusion]) -> None:
    """One row per image: counts, IoU^c and F1^c."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "tp", "fp", "fn", "tn", "iou", "f1"])
        for sample_id, counts in per_image.items():
            s = scores(counts)
            row = [sample_id, counts.tp, counts.fp, counts.fn, counts.tn, f"{s['iou']:.3f}", f"{s['f1']:.3f}"]
            writer.writerow(row)


@dataclass
class Args:
    """Evaluate a trained checkpoint on a split of a data set."""

    checkpoint: Path
    """``best.pt`` or ``last.pt`` of a training run."""
    data: DataConfig
    """The data set (its ``list/<split>.txt``, or the split folder's ``<split>.txt``)."""
    split: str = "test"
    """Split to evaluate."""
    per_image_csv: Path | None = None
    """Also write per-image counts and scores to this CSV file."""
    save_vis: Path | None = None
    """Write A | B | ground truth | prediction pictures here (TP white, FP red, FN green)."""
    out_json: Path | None = None
    """Where to write the metrics; default ``<checkpoint folder>/eval_<split>.json``."""
    tile: int | None = None
    """Sliding-window size for larger images; default the training crop size."""
    overlap: int | None = None
    """Overlap of neighbouring windows in pixels; default a quarter of the window."""
    batch_size: int = 8
    """Pairs (or windows) per forward pass."""
    num_workers: int = 2
    """DataLoader worker processes."""
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; None: cuda when available."""
    amp: bool = False
    """bf16 autocast on CUDA."""
    check_data: bool = True
    """Check every pair of the split and its label before loading the model; ``--no-check-data`` skips it."""


def main(args: Args) -> dict[str, float]:
    from diffmatch.checks import check_eval_data

    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    device = pick_device(args.device)
    if args.check_data:
        check_eval_data(args.data, args.split)
    model, train_args = model_from_checkpoint(args.checkpoint, device)
    dataset = eval_set(args.data, args.split)
    labelled = args.checkpoint.parent / "labeled.txt"  # written by train beside its checkpoints
    if labelled.is_file() and (warning := leak_warning(read_id_list(labelled), dataset.ids, args.split)):
        print(warning, file=sys.stderr, flush=True)
    windows = Windows(args.tile or train_args.data.crop_size, args.overlap, args.batch_size, args.amp)
    result = evaluate_model(model, dataset, windows=windows, num_workers=args.num_workers,
                            report=Report(vis_dir=args.save_vis, progress=True))
    print(format_scores(f"{args.split} ({len(dataset)} pairs)", result.scores))
    out = args.out_json or args.checkpoint.parent / f"eval_{args.split}.json"
    write_json(out, {"checkpoint": str(args.checkpoint), "split": args.split, "pairs": len(dataset),
                     **result.scores})
    if args.per_image_csv is not None:
        write_per_image_csv(args.per_image_csv, result.per_image)
    return result.scores


if __name__ == "__main__":
    import tyro

    from diffmatch.cli import run_cli

    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.evaluate")))
