"""Evaluate a checkpoint: the metrics of README §4 over a whole split, per-image CSV, result pictures.

    python -m diffmatch.evaluate --checkpoint runs/diffmatch/best.pt --data.root LEVIR-CD256
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from diffmatch import augment
from diffmatch.config import DataConfig
from diffmatch.data import EvalSet, eval_set
from diffmatch.files import InputError, atomic_path, write_json, write_png
from diffmatch.inference import change_logits
from diffmatch.metrics import Confusion, confusion, scores
from diffmatch.progress import Progress


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


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: EvalSet, *, device: torch.device, tile: int = 256,
                   overlap: int | None = None, batch_size: int = 8, num_workers: int = 0, amp: bool = False,
                   vis_dir: Path | None = None, progress: bool = False) -> Evaluation:
    """Run the model over a split and pool one confusion matrix (not a mean of per-image scores).
    Pairs larger than ``tile`` are predicted with windows overlapping by ``overlap`` (default tile / 4)."""
    model.eval()
    overlap = tile // 4 if overlap is None else overlap
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    total, per_image = Confusion(), {}
    shown = Progress("evaluate", len(dataset), "pairs", file=sys.stderr, enabled=progress)
    try:
        for batch in loader:
            a, b = batch.a.to(device), batch.b.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                pred = change_logits(model, a, b, tile=tile, overlap=overlap, batch_size=batch_size).argmax(1)
            for i, sample_id in enumerate(batch.id):
                counts = confusion(pred[i].cpu(), batch.label[i])
                per_image[sample_id] = counts
                total = total + counts
                if vis_dir is not None:
                    write_png(vis_dir / f"{sample_id}.png", visualise(batch.a[i], batch.b[i], batch.label[i], pred[i]))
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


def format_scores(name: str, s: dict[str, float]) -> str:
    """One console line of the main metrics."""
    return (f"{name}: IoU^c {s['iou']:.2f}  F1^c {s['f1']:.2f}  precision {s['precision']:.2f}  "
            f"recall {s['recall']:.2f}  OA {s['accuracy']:.2f}")


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


def pick_device(name: str | None) -> torch.device:
    """The requested device, or cuda when available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def main(args: Args) -> dict[str, float]:
    from diffmatch.checkpoint import model_from_checkpoint
    from diffmatch.checks import check_eval_data

    device = pick_device(args.device)
    if args.check_data:
        check_eval_data(args.data, args.split)
    model, train_args = model_from_checkpoint(args.checkpoint, device)
    dataset = eval_set(args.data, args.split)
    result = evaluate_model(model, dataset, device=device, tile=args.tile or train_args.data.crop_size,
                            overlap=args.overlap, batch_size=args.batch_size, num_workers=args.num_workers,
                            amp=args.amp, vis_dir=args.save_vis, progress=True)
    print(format_scores(f"{args.split} ({len(dataset)} pairs)", result.scores))
    out = args.out_json or args.checkpoint.parent / f"eval_{args.split}.json"
    write_json(out, {"checkpoint": str(args.checkpoint), "split": args.split, "pairs": len(dataset),
                     **result.scores})
    if args.per_image_csv is not None:
        write_per_image_csv(args.per_image_csv, result.per_image)
    return result.scores


if __name__ == "__main__":
    import tyro

    from diffmatch.files import run_cli

    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.evaluate")))
