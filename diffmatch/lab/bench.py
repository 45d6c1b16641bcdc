"""Benchmarks of CEG, the unlabelled data pipeline, one training iteration and inference.

    python -m diffmatch.bench --backbone resnet50 --batch-size 8 --crop 256 --loader-workers 0 2 4 --amp  # GPU
    OMP_NUM_THREADS=1 python -m diffmatch.bench --backbone resnet18 --crop 128 --device cpu  # a busy CPU

Prints a table and writes a JSON report (``--out``): machine, settings and what each ``bench_*`` returns, on
16 synthetic pairs in a temporary folder or on ``--data`` (CEG then writes ``<data>/pseudo_bench/``). Times are
medians (and minima) of ``--iters`` runs after ``--warmup``, CUDA synchronised. In the table, ``Nx read`` is a
time over that of reading CEG's inputs, ``fwd+bwd Nx this`` a training forward+backward over the bare one.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffmatch import ceg, pseudo, vlm
from diffmatch.atomic import write_json
from diffmatch.cli import InputError
from diffmatch.config import AugmentConfig, Backbone, CEGConfig, LossConfig, Method, ModelConfig, OptimConfig, to_dict
from diffmatch.data import LabeledSet, UnlabeledSet, ViewOptions, repeat_to
from diffmatch.device import autocast, pick_device, use_bf16
from diffmatch.evaluate import Windows, change_logits
from diffmatch.lab import comparison, synthetic
from diffmatch.lab.comparison import Regime
from diffmatch.model import build_model, build_optimizer
from diffmatch.step import Batches, StepSetup, Weights, compute_losses, to_device

Part = Literal["ceg", "data", "train", "inference", "methods"]
PSEUDO = "pseudo_bench"
"""Folder under the data root that the CEG benchmark writes and the other benchmarks read."""


@dataclass
class Args:
    """Time CEG, the data pipeline, a training iteration and inference; print a table, write JSON."""

    parts: tuple[Part, ...] = ("ceg", "data", "train", "inference")
    """Benchmarks to run; ``methods`` trains the methods to the end and compares their test scores
    (docs/benchmark.md)."""
    methods: tuple[Method, ...] | None = None
    """Methods whose training iteration is timed (None: diffmatch) and that ``methods`` compares (None:
    supervised, fixmatch, diffmatch)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds of the ``methods`` comparison (labelled draw, augmentations, initialisation)."""
    regime: Regime = field(default_factory=Regime)
    """Budget of the ``methods`` comparison: data, model, iterations, loss terms and remedies."""
    jobs: int = 1
    """Training runs of the ``methods`` comparison at a time, each with its share of the CPU threads."""
    runs_dir: Path | None = None
    """Folder for the comparison's data set, encoder and runs (kept, and a rerun resumes them); None: a
    temporary folder."""
    backbone: Backbone = "resnet50"
    """Encoder of the model (random weights)."""
    batch_size: int = 8
    """Pairs per batch: labelled and each unlabelled batch, data loader and inference."""
    crop: int = 256
    """Side of the training crop and of the inference pairs."""
    warmup: int = 2
    """Untimed iterations before the timed ones."""
    iters: int = 5
    """Timed iterations (training, inference)."""
    amp: bool = False
    """bf16 autocast (CUDA only, as in training)."""
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; None: cuda when available."""
    data: Path | None = None
    """Root with ``A/``, ``B/``, ``label/``, ``vlm/{A,B}``; None: 16 synthetic pairs of max(256, crop) px."""
    ceg_workers: tuple[int, ...] = (1, 2)
    """Worker counts of the CEG run."""
    loader_workers: tuple[int, ...] = (0, 1, 2)
    """DataLoader worker counts of the data benchmark (training loads in the main process)."""
    out: Path = Path("bench.json")
    """JSON report to write."""


class Settings(NamedTuple):
    """What the data, training and inference benchmarks feed and how they time it: ``Args`` with the device
    picked and autocast decided."""

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


def format_table(results: dict) -> str:
    """The results of a report as one plain-text table."""
    rows: list[tuple] = [("benchmark", "measure", "value", "unit", "note")]
    if c := results.get("ceg"):
        rows += [("ceg", "read inputs (np.load, json.load)", c["read_pairs_per_s"], "pairs/s", f"{c['pairs']} pairs"),
                 ("ceg", "compute (read_vlm + generate)", c["compute_pairs_per_s"], "pairs/s",
                  f"{c['read_pairs_per_s'] / c['compute_pairs_per_s']:.1f}x read")]
        rows += [("ceg", f"run, {w} worker(s)", r, "pairs/s", f"{c['run_vs_read'][w]:.1f}x read")
                 for w, r in c["run_pairs_per_s"].items()]
    if d := results.get("data"):
        rows += [("data", f"UnlabeledSet, {w} worker(s)", r, "samples/s", f"{d['per_worker'][w]:.1f} per worker")
                 for w, r in d["samples_per_s"].items()]
    for t in results.get("train", []):
        m = t["method"]
        rows += [("train", f"{m}: {k}", v["median"], "ms", f"min {v['min']:.1f}") for k, v in t["ms"].items()]
        rows += [("train", f"{m}: bare model fwd+bwd", t["bare_ms"]["median"], "ms",
                  f"fwd+bwd {t['vs_bare']:.2f}x this"),
                 ("train", f"{m}: peak memory", t["peak_memory_mib"], "MiB", t["peak_memory_kind"])]
    if i := results.get("inference"):
        rows.append(("inference", "change_logits", i["pairs_per_s"], "pairs/s",
                     f"{i['ms']['median']:.1f} ms per batch of {i['batch_size']}"))
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(5)]
    align = "<<><<"  # the value column to the right
    return "\n".join("  ".join(f"{v:{a}{w}}" for v, a, w in zip(row, align, widths, strict=True)).rstrip()
                     for row in cells)


def bench_methods(args: Args, runs: Path) -> dict:
    """Train the methods for every seed under ``args.regime`` on ``args.data`` (CEG labels made where
    missing) or on a synthetic set written under ``runs``; the runs' test scores and their summary."""
    root = comparison.data_root(args.data, runs, args.regime, workers=max(args.ceg_workers))
    start = time.perf_counter()
    launch = comparison.Launch(root, runs, device=args.device, jobs=args.jobs)
    result = comparison.compare(launch, methods=args.methods or comparison.METHODS, seeds=args.seeds,
                                regime=args.regime)
    return {**result, "seconds": time.perf_counter() - start}


def check_args(args: Args) -> None:
    """Reject values that cannot run, naming the flag."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--crop", args.crop, 32),
                               ("--iters", args.iters, 1), ("--warmup", args.warmup, 0), ("--jobs", args.jobs, 1),
                               *(("--ceg-workers", w, 1) for w in args.ceg_workers),
                               *(("--loader-workers", w, 0) for w in args.loader_workers)):
        if value < least:
            raise InputError(f"{flag} {value}: must be at least {least}")
    if args.data is not None and not (args.data / "vlm").is_dir():
        raise InputError(f"{args.data / 'vlm'}: not found; --data needs VLM outputs in vlm/A and vlm/B")


def main(args: Args) -> dict:
    """Run the chosen benchmarks, print the table, write the JSON report and return it."""
    check_args(args)
    device = pick_device(args.device)
    amp = use_bf16(args.amp, device)
    model_cfg = ModelConfig(backbone=args.backbone)
    settings = Settings(args.crop, args.batch_size, device, warmup=args.warmup, iters=args.iters, amp=amp)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    machine = {"device": str(device), "name": name, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
    results: dict = {}
    report = {"machine": machine, "settings": {**to_dict(args), "amp_used": amp}, "results": results}
    with tempfile.TemporaryDirectory(prefix="diffmatch-bench-") as tmp:
        if "methods" in args.parts:
            results["methods"] = bench_methods(args, args.runs_dir or Path(tmp) / "methods")
        root = args.data or Path(tmp) / "synthetic"
        if args.data is None and set(args.parts) - {"methods", "inference"}:
            say(f"writing a synthetic set to {root}")
            synthetic.generate(synthetic.Args(out=root, num_pairs=16, size=max(256, args.crop)), verbose=False)
        ids = sorted(vlm.list_ids(root / "vlm" / "A"))
        if "ceg" in args.parts:
            results["ceg"] = bench_ceg(root, workers=args.ceg_workers)
        elif {"data", "train"} & set(args.parts) and not all((root / PSEUDO / "change" / f"{i}.png").is_file()
                                                             for i in ids):  # the CEG labels they read
            run_ceg(root, workers=max(args.ceg_workers), overwrite=False)
        if "data" in args.parts:
            results["data"] = bench_pipeline(root, ids, settings, workers=args.loader_workers,
                                             samples=8 * args.batch_size)
        if "train" in args.parts:
            results["train"] = [bench_train(root, ids, m, model_cfg, settings) for m in args.methods or ("diffmatch",)]
    if "inference" in args.parts:
        results["inference"] = bench_inference(model_cfg, settings)
    if set(args.parts) != {"methods"}:
        print(format_table(results))
    if "methods" in results:
        print(comparison.format_summary(results["methods"]["summary"], results["methods"]["pairs"]))
    write_json(args.out, report)
    say(f"wrote {args.out}")
    return report

