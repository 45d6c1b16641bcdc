"""Training checkpoints: what a run saves (``last.pt`` to resume, ``best.pt`` to use), resuming from one,
and the trained network of one for evaluation and prediction. Files are read with ``weights_only=True``
(no code runs from them) and written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffmatch.atomic import atomic_path
from diffmatch.cli import InputError
from diffmatch.config import TrainArgs, from_dict
from diffmatch.encoder import read_torch_file
from diffmatch.model import DiffMatchNet, build_model

if TYPE_CHECKING:
    from diffmatch.step import LearningStatus


@dataclass
class RunState:
    """What changes as a run trains, and what ``last.pt`` keeps of it."""

    model: nn.Module
    """The network (not its DistributedDataParallel wrapper)."""
    optimizer: torch.optim.Optimizer | None = None
    """Its optimiser; None in ``best.pt``."""
    teacher: nn.Module | None = None
    """The EMA teacher, if the run has one."""
    status: LearningStatus | None = None
    """FlexMatch's learning status, if the run keeps one."""
    epoch: int = 0
    """Epochs done."""
    iteration: int = 0
    """Training steps done."""
    best: float = -1.0
    """Best validation IoU^c so far (-1: none yet)."""


def save_checkpoint(path: Path, state: RunState, config: dict) -> None:
    """Write ``state`` (the parts it has), the RNG states and the run's resolved ``config``, atomically."""
    saved: dict[str, Any] = {"model": state.model.state_dict(), "epoch": state.epoch, "iteration": state.iteration,
                             "best_score": state.best, "config": config, "rng": torch.get_rng_state()}
    parts = {"optimizer": state.optimizer, "teacher": state.teacher, "learning_status": state.status}
    saved.update({name: part.state_dict() for name, part in parts.items() if part is not None})
    if torch.cuda.is_available():
        saved["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)


def restore(saved: dict[str, Any], state: RunState, device: torch.device, path: Path) -> None:
    """Load a ``last.pt`` (``saved``, read from ``path`` by ``load_checkpoint``) into ``state`` and restore the
    RNG states. A learning status missing from an older file is rebuilt as the samples come again."""
    load_state(state.model, saved["model"], path)
    if state.optimizer is not None:
        state.optimizer.load_state_dict(saved["optimizer"])
    if state.teacher is not None:
        load_state(state.teacher, saved["teacher"], path)
    if state.status is not None and "learning_status" in saved:
        state.status.load_state_dict(saved["learning_status"])
    state.epoch, state.iteration, state.best = saved["epoch"], saved["iteration"], saved["best_score"]
    torch.set_rng_state(saved["rng"].cpu())
    if device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state_all([t.cpu() for t in saved["cuda_rng"]])


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True`` (no code runs from the file)."""
    fix = "pass the last.pt or best.pt of a training run (a truncated one: use the run's other checkpoint or retrain)"
    state = read_torch_file(path, what="checkpoint", device=device, fix=fix)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path}: not a diffmatch checkpoint (no model or config); "
                         "train with python -m diffmatch.train")
    return state


def model_from_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[DiffMatchNet, TrainArgs]:
    """The trained network (eval mode, on ``device``) and the config it was trained with."""
    state = load_checkpoint(path, device)
    args = from_dict(TrainArgs, state["config"])
    model = build_model(args.model_for_inference)
    load_state(model, state["model"], path)
    return model.to(device).eval(), args


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state dict strictly; a mismatch (another backbone, a foreign file) names the file."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise InputError(f"{path}: weights do not fit this model ({first[:200]}); "
                         "check --model.backbone or the checkpoint") from None
