"""Change-detection metrics from one confusion matrix over a whole split (Eq. 16–17)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from diffmatch.config import IGNORE

if TYPE_CHECKING:  # numpy only at run time, so CEG's worker processes start without torch
    import torch


@dataclass(frozen=True)
class Confusion:
    """Pixel counts of the change class; add two to pool them."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def confusion(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
              valid: np.ndarray | torch.Tensor | None = None) -> Confusion:
    """Counts of binary ``pred`` against binary ``target``; pixels outside ``valid`` (or where
    ``target`` is ``IGNORE``) are left out."""
    pred_a, target_a = _numpy(pred).astype(bool), _numpy(target)
    keep = target_a != IGNORE
    if valid is not None:
        keep &= _numpy(valid).astype(bool)
    truth = (target_a == 1) & keep
    pred_a &= keep
    tp = int(np.count_nonzero(pred_a & truth))  # Python ints: scores end up in checkpoints and JSON
    fp = int(np.count_nonzero(pred_a)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    tn = int(np.count_nonzero(keep)) - tp - fp - fn
    return Confusion(tp, fp, fn, tn)


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def scores(c: Confusion) -> dict[str, float]:
    """IoU^c (Eq. 16), F1^c (Eq. 17), precision, recall and overall accuracy, in percent, plus the
    raw counts."""
    return {
        "iou": 100 * _ratio(c.tp, c.tp + c.fp + c.fn),
        "f1": 100 * _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "precision": 100 * _ratio(c.tp, c.tp + c.fp),
        "recall": 100 * _ratio(c.tp, c.tp + c.fn),
        "accuracy": 100 * _ratio(c.tp + c.tn, c.tp + c.fp + c.fn + c.tn),
        **{k: float(v) for k, v in asdict(c).items()},
    }


def format_scores(name: str, s: dict[str, float]) -> str:
    """One console line of the main metrics."""
    return (f"{name}: IoU^c {s['iou']:.2f}  F1^c {s['f1']:.2f}  precision {s['precision']:.2f}  "
            f"recall {s['recall']:.2f}  OA {s['accuracy']:.2f}")
