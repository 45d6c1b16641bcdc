"""Speed measurements: CEG, the unlabelled data pipeline, one training iteration and inference.

Each ``bench_*`` returns what it measured as a dict (``python -m diffmatch.bench`` prints them as a table and
writes them to its JSON report). Times are medians (and minima) of ``iters`` runs after ``warmup``, read by
``tick``, CUDA synchronised; throughputs are items per second of one timed pass.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffmatch import ceg, pseudo, vlm
from diffmatch.config import AugmentConfig, CEGConfig, LossConfig, Method, ModelConfig, OptimConfig
from diffmatch.data import LabeledSet, UnlabeledSet, ViewOptions
from diffmatch.device import autocast
from diffmatch.evaluate import Windows, change_logits
from diffmatch.model import build_model, build_optimizer
from diffmatch.step import Batches, StepSetup, Weights, compute_losses, to_device
from diffmatch.subsets import repeat_to

PSEUDO = "pseudo_bench"
"""Folder under the data root that the CEG benchmark writes and the other benchmarks read."""


class Settings(NamedTuple):
    """What the data, training and inference benchmarks feed and how they time it: the command's ``Args``
    (``bench.py``) with the device picked and autocast decided."""

    crop: int
    """Side of the training crop and of the inference pairs."""
    batch_size: int
    """Pairs per batch: labelled and each unlabelled batch, data loader and inference."""
    device: torch.device
    """Where the model runs (CUDA synchronised before each clock reading)."""
    warmup: int = 2
    """Untimed iterations before the timed ones."""
    iters: int = 5
    """Timed iterations (training, inference)."""
    amp: bool = False
    """bf16 autocast (``use_bf16`` decides: CUDA only, as in training)."""


def tick(device: torch.device) -> float:
    """A timestamp after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def durations(call: Callable[[], object], *, warmup: int, iters: int, device: torch.device, amp: bool) -> list[float]:
    """Seconds of each of ``iters`` calls after ``warmup`` untimed ones, under bf16 autocast if ``amp``."""
    times = []
    for _ in range(warmup + iters):
        start = tick(device)
        with autocast(device, amp):
            call()
        times.append(tick(device) - start)
    return times[warmup:]


def ms(times: list[float]) -> dict[str, float]:
    """Median and minimum of durations in seconds, as milliseconds."""
    return {"median": 1000 * statistics.median(times), "min": 1000 * min(times)}


def say(message: str) -> None:
    """A progress line on stderr (stdout holds the table)."""
    print(message, file=sys.stderr, flush=True)


def read_inputs(root: Path, ids: list[str]) -> None:
    """Read the VLM files of ``ids`` that ``vlm.read_vlm`` reads, without decoding them further."""
    for image_id in ids:
        for date in ("A", "B"):
            files = vlm.find_files(root / "vlm" / date, image_id)
            if files.npy is not None:
                np.load(files.npy)
            elif files.png is not None:  # read by read_vlm only without a .npy
                np.asarray(Image.open(files.png))
            if files.json is not None:
                json.loads(files.json.read_text())


def run_ceg(root: Path, workers: int, overwrite: bool = True) -> float:
    """Seconds of ``python -m diffmatch.ceg --root ROOT --out-name pseudo_bench --workers N``, printout dropped."""
    start = time.perf_counter()
    with open(os.devnull, "w") as null, redirect_stdout(null):
        pseudo.main(pseudo.Args(root=root, out_name=PSEUDO, workers=workers, overwrite=overwrite))
    return time.perf_counter() - start


def bench_ceg(root: Path, *, workers: tuple[int, ...] = (1, 2)) -> dict:
    """``pairs``; pairs/s of reading the inputs, of CEG's compute (same ids, same order) and, per worker
    count, of the CEG run; ``run_vs_read``: per worker count, the run's time over the reading's."""
    cfg, ids = CEGConfig(), sorted(vlm.list_ids(root / "vlm" / "A"))
    read_inputs(root, ids)  # warm the page cache
    start = time.perf_counter()
    read_inputs(root, ids)
    read, start = time.perf_counter() - start, time.perf_counter()
    say(f"ceg: {len(ids)} pairs, reading {len(ids) / read:.1f} pairs/s; compute only, then runs")
    for image_id in ids:
        out_a = vlm.read_vlm(root / "vlm" / "A", image_id, cfg)
        ceg.generate(out_a, vlm.read_vlm(root / "vlm" / "B", image_id, cfg), vlm.concepts(cfg), cfg)
    compute = time.perf_counter() - start
    runs = {str(count): run_ceg(root, count) for count in workers}
    return {"pairs": len(ids), "read_pairs_per_s": len(ids) / read, "compute_pairs_per_s": len(ids) / compute,
            "run_pairs_per_s": {w: len(ids) / t for w, t in runs.items()},
            "run_vs_read": {w: t / read for w, t in runs.items()}}


def bench_pipeline(root: Path, ids: list[str], settings: Settings, *, workers: tuple[int, ...] = (0, 1, 2),
                   samples: int = 64) -> dict:
    """Per worker count, samples/s of ``UnlabeledSet`` with CEG labels through a DataLoader (crops and batches of
    ``settings``), in all and per worker process (the main process for 0): one pass to start the workers and
    warm the cache, one timed."""
    dataset = UnlabeledSet(root, repeat_to(ids, samples), views=ViewOptions(settings.crop, AugmentConfig(), PSEUDO))
    rates = {}
    for count in workers:
        say(f"data: {samples} samples, {count} worker(s)")
        loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=count, persistent_workers=count > 0)
        sum(1 for _ in loader)  # start the workers, warm the cache
        start = time.perf_counter()
        rates[str(count)] = sum(len(batch.a) for batch in loader) / (time.perf_counter() - start)
    return {"samples": samples, "samples_per_s": rates, "per_worker": {w: r / max(int(w), 1) for w, r in rates.items()}}


def bench_train(root: Path, ids: list[str], method: Method, model_cfg: ModelConfig, settings: Settings) -> dict:
    """One training iteration (§3, Table 1): ``ms`` (median, min) of data, forward, backward, step and the
    iteration; ``bare_ms`` of the bare model's forward+backward on the same images and ``vs_bare``, the
    iteration's forward+backward over it; peak memory in MiB and what it measures."""
    crop, batch_size, device, warmup, iters, amp = settings
    count, pseudo = batch_size * (warmup + iters), PSEUDO if method == "diffmatch" else None
    views = ViewOptions(crop, AugmentConfig(), pseudo)

    def stream(dataset: Dataset) -> Iterator:
        return iter(DataLoader(dataset, batch_size=batch_size, drop_last=True, pin_memory=device.type == "cuda"))

    x_it = stream(LabeledSet(root, repeat_to(ids, count), views=views))
    u_its = [iter(lambda: None, 0)] * 2 if method == "supervised" else [
        stream(UnlabeledSet(root, repeat_to(ids, count), views=views, seed=k)) for k in (1, 2)]
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device).train()
    opt, loss_cfg = OptimConfig(), LossConfig()
    optimizer = build_optimizer(model, opt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[tuple[float, ...]] = []  # seconds of data, forward, backward, step per iteration
    for i in range(warmup + iters):
        t0 = tick(device)
        x, u, u2 = (to_device(next(it), device) for it in (x_it, *u_its))
        t1 = tick(device)
        with autocast(device, amp):
            result = compute_losses(model, Batches(x, u, u2), StepSetup(method, loss_cfg), Weights(loss_cfg.lambda_vl))
        t2 = tick(device)
        optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        t3 = tick(device)
        optimizer.step()
        t4 = tick(device)
        times.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        say(f"train {method}: iteration {i + 1}/{warmup + iters} {t4 - t0:.2f} s")
    if device.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    else:  # ru_maxrss: KiB on Linux
        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "peak RSS of the process so far"
    a, b = (x.a, x.b) if u is None else (torch.cat([x.a, u.a]), torch.cat([x.b, u.b]))  # bare: sum of all outputs
    bare = durations(lambda: sum(o.float().sum() for o in model(a, b, change_only=False) if o is not None).backward(),
                     warmup=warmup, iters=iters, device=device, amp=amp)
    timed = times[warmup:]
    table = {k: ms([t[j] for t in timed]) for j, k in enumerate(("data", "forward", "backward", "step"))}
    table["iteration"] = ms([sum(t) for t in timed])
    compute = statistics.median(t[1] + t[2] for t in timed)  # forward + backward
    return {"method": method, "ms": table, "bare_ms": ms(bare), "vs_bare": compute / statistics.median(bare),
            "peak_memory_mib": memory, "peak_memory_kind": kind}


def bench_inference(model_cfg: ModelConfig, settings: Settings) -> dict:
    """``ms`` (median, min) per call of ``change_logits`` (eval mode, no gradient) on ``batch_size`` random
    crop-sized pairs, and pairs/s."""
    crop, batch_size, device, warmup, iters, amp = settings
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device).eval()
    a, b = (torch.randn(batch_size, 3, crop, crop).to(device) for _ in range(2))
    times = durations(lambda: change_logits(model, a, b, windows=Windows(crop, 0, batch_size, amp)),
                      warmup=warmup, iters=iters, device=device, amp=amp)
    rate = batch_size / statistics.median(times)
    return {"batch_size": batch_size, "crop": crop, "ms": ms(times), "pairs_per_s": rate}
