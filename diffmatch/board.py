"""TensorBoard view of a training run (``--tensorboard``): curves and change maps while it trains.

Scalars of every logged iteration (the loss terms and their total, both learning rates, λ_vl, the share
of confident pseudo-label pixels, pairs/s) and of every evaluation, and at each evaluation a grid of the
same validation pairs, A | B | ground truth | prediction in the colours of ``evaluate --save-vis``.
Event files go to ``<out-dir>/tensorboard/``; a resumed run drops the events after its checkpoint and
continues there. The ``tensorboard`` package is an optional extra, imported here only, and only when
the flag is on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from diffmatch.cli import InputError
from diffmatch.data import EvalSample, EvalSet
from diffmatch.evaluate import Windows, change_logits, model_device, visualise

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

INSTALL = 'pip install -e ".[tensorboard]"'
"""How to get the extra, as the error message says it."""
GAP = 4
"""Grey pixels between the rows of the change-map grid (the gap ``visualise`` leaves between columns)."""


def change_grid(model: nn.Module, samples: Sequence[EvalSample], *, windows: Windows) -> np.ndarray:
    """(H, W, 3) uint8: one row per pair, A | B | ground truth | prediction with TP white, FP red, FN
    green, predicted as ``evaluate`` does (sliding ``windows``). Rows narrower than the widest are padded
    grey. The model is left in the mode it came in."""
    was_training, device = model.training, model_device(model)
    model.eval()
    rows = []
    with torch.no_grad():
        for sample in samples:
            a, b = sample.a[None].to(device), sample.b[None].to(device)
            pred = change_logits(model, a, b, windows=windows).argmax(1)[0]
            rows.append(visualise(sample.a, sample.b, sample.label, pred))
    model.train(was_training)
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, GAP), (0, width - row.shape[1]), (0, 0)), constant_values=128) for row in rows]
    return np.concatenate(padded)[:-GAP]


def step_scalars(record: Mapping[str, Any], optimizer: torch.optim.Optimizer, pairs_per_s: float) -> dict[str, float]:
    """Tags and values of one ``metrics.jsonl`` step record: ``loss/total`` and ``loss/<term>``, every
    other number as ``train/<name>`` (λ_vl, the confident share, ...), ``lr/<group>`` for each parameter
    group of the optimiser, and ``train/pairs_per_s``."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if key in ("iteration", "epoch", "lr") or not isinstance(value, int | float):
            continue
        tag = "loss/total" if key == "loss" else f"loss/{key[5:]}" if key.startswith("loss_") else f"train/{key}"
        values[tag] = float(value)
    for index, group in enumerate(optimizer.param_groups):
        values[f"lr/{group.get('name', index)}"] = float(group["lr"])
    values["train/pairs_per_s"] = float(pairs_per_s)
    return values


class MapGrid(NamedTuple):
    """The change-map grid logged at every evaluation."""

    vis_set: EvalSet
    """Its rows are the first ``pairs`` pairs of this set."""
    split: str
    """Name of the set's split: the prefix of the grid's and the scores' tags."""
    windows: Windows
    """Sliding windows of the prediction (``evaluate``'s)."""
    pairs: int = 4
    """Rows of the grid."""


class Board:
    """The run's event files; a Board without a writer (flag off, or a process other than rank 0) does
    nothing. Events are flushed at every call, so an interrupted run loses none."""

    def __init__(self, writer: SummaryWriter | None = None, samples: Sequence[EvalSample] = (), split: str = "val",
                 windows: Windows | None = None) -> None:
        self.writer, self.samples, self.split, self.windows = writer, list(samples), split, windows or Windows()

    @classmethod
    def open(cls, log_dir: Path, grid: MapGrid, *, enabled: bool, write: bool, start: int) -> Board:
        """The Board of a run that starts after ``start`` iterations (0: a new run, whose stale event files
        are removed; else a resumed one, whose events after ``start`` are dropped by the reader), logging
        the change maps of ``grid``. ``enabled`` without the package is an ``InputError`` on every process;
        only ``write`` opens files."""
        if not enabled:
            return cls()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None
        if not write:
            return cls()
        if start == 0:
            for stale in log_dir.glob("events.out.tfevents.*"):
                stale.unlink()
        # The restart marker written at purge_step makes TensorBoard drop earlier files' events at steps >= it:
        # start + 1 keeps the checkpoint's own step and drops what an interrupted run logged after it.
        writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start else None)
        samples = [grid.vis_set[i] for i in range(min(grid.pairs, len(grid.vis_set)))]
        if samples:
            ids = ", ".join(sample.id for sample in samples)
            writer.add_text(f"{grid.split}/change_map_ids", f"rows, top to bottom: {ids} (A | B | ground truth | "
                            "prediction; TP white, FP red, FN green)", start)
        return cls(writer, samples, grid.split, grid.windows)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One point per tag at ``step``."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_images(self, step: int, tag: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 picture at ``step``."""
        if self.writer is None:
            return
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def log_step(self, step: int, record: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                 pairs_per_s: float) -> None:
        """The scalars of a logged iteration (``step_scalars``)."""
        if self.writer is not None:
            self.log_scalars(step, step_scalars(record, optimizer, pairs_per_s))

    def log_evaluation(self, step: int, scores: Mapping[str, float], model: nn.Module) -> None:
        """Every validation score as ``<split>/<name>`` and the change-map grid of the fixed pairs."""
        if self.writer is None:
            return
        self.log_scalars(step, {f"{self.split}/{name}": value for name, value in scores.items()})
        if self.samples:
            self.log_images(step, f"{self.split}/change_maps",
                            change_grid(model, self.samples, windows=self.windows))

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
