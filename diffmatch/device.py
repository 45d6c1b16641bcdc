"""Where a command runs: the device of ``--device`` (CUDA when there is one), bf16 autocast under
``--amp``, and the process group of a ``torchrun`` launch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from diffmatch.cli import InputError


def pick_device(name: str | None) -> torch.device:
    """The device of ``--device``, or cuda when available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def use_bf16(amp: bool, device: torch.device) -> bool:
    """Whether ``--amp`` turns bf16 autocast on: on CUDA only, float32 elsewhere."""
    return amp and device.type == "cuda"


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``use_bf16``; a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(amp, device))


def setup_distributed(device_name: str | None) -> tuple[torch.device, int, int]:
    """Device, rank and world size; under torchrun, joins the process group (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return device, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world
