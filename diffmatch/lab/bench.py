"""Benchmarks of CEG, the unlabelled data pipeline, one training iteration and inference.

    python -m diffmatch.bench --backbone resnet50 --batch-size 8 --crop 256 --loader-workers 0 2 4 --amp  # GPU
    OMP_NUM_THREADS=1 python -m diffmatch.bench --backbone resnet18 --crop 128 --device cpu  # a busy CPU

Prints a table and writes a JSON report (``--out``): machine, settings and what each ``bench_*`` returns (the
speed measurements are in ``speed.py``, ``bench_methods`` here), on 16 synthetic pairs in a temporary folder or
on ``--data`` (CEG then writes ``<data>/pseudo_bench/``). Times are medians (and minima) of ``--iters`` runs after
``--warmup``, CUDA synchronised. In the table, ``Nx read`` is a time over that of reading CEG's inputs, ``fwd+bwd
Nx this`` a training forward+backward over the bare one.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from diffmatch import vlm
from diffmatch.atomic import write_json
from diffmatch.cli import InputError
from diffmatch.config import Backbone, Method, ModelConfig, to_dict
from diffmatch.device import pick_device, use_bf16
from diffmatch.lab import comparison, synthetic
from diffmatch.lab.comparison import Regime
from diffmatch.lab.speed import PSEUDO, Settings, bench_ceg, bench_inference, bench_pipeline, bench_train, run_ceg, say

Part = Literal["ceg", "data", "train", "inference", "methods"]


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

