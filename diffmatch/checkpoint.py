"""Training checkpoints: what ``last.pt`` and ``best.pt`` hold, written atomically, read safely."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffmatch.config import TrainArgs, from_dict, to_dict
from diffmatch.files import InputError, atomic_path
from diffmatch.model import DiffMatchNet, build_model


def save_checkpoint(path: Path, *, model: nn.Module, args: TrainArgs, epoch: int, iteration: int,
                    best_score: float, optimizer: torch.optim.Optimizer | None = None,
                    teacher: nn.Module | None = None) -> None:
    """Write a checkpoint atomically: model and optimiser state, progress (``epoch`` epochs done,
    ``iteration`` steps done), best validation score, RNG states, the resolved config and the EMA teacher
    if there is one."""
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "best_score": best_score,
        "config": to_dict(args),
        "rng": torch.get_rng_state(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if teacher is not None:
        state["teacher"] = teacher.state_dict()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True`` (no code runs from the file)."""
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found; pass a last.pt or best.pt of a training run")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0]}); "
                         "it may be truncated: use the run's other checkpoint or retrain") from None
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
