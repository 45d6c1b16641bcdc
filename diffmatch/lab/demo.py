"""See DiffMatch work in minutes, on the CPU, with nothing to download.

    python -m diffmatch.demo            # about 8 minutes on 2 CPU cores
    python -m diffmatch.demo --quick    # under a minute: a smoke test of the whole pipeline

Generates a synthetic data set with simulated VLM outputs, runs CEG on it, pretrains a small encoder
on other synthetic scenes (the stand-in for ImageNet weights), trains ``supervised``, ``fixmatch`` and
``diffmatch`` with the same budget, evaluates each on the test split and prints one table: one seed, a
look at the pipeline, not evidence. docs/benchmark.md makes the same comparison, larger and over paired
seeds.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from diffmatch import pseudo
from diffmatch.atomic import write_json
from diffmatch.cli import InputError
from diffmatch.lab import comparison
from diffmatch.lab.comparison import Regime

BENCHMARK = ("the benchmark (docs/benchmark.md: 1,500 pairs, 1,600 iterations), 8 paired seeds: "
             "test IoU^c FixMatch - supervised +1.5, DiffMatch - FixMatch +2.2, DiffMatch - supervised +3.7")
"""The benchmark's paired result as it stands in docs/benchmark.md, printed under the demo's table (the
demo's one seed is no evidence of the methods' order)."""


def demo_regime() -> Regime:
    """The demo's budget: the benchmark's regime (docs/benchmark.md) on fewer, smaller pairs and iterations."""
    return Regime(pairs=400, val_fraction=0.1, test_fraction=0.2, size=96, iters=240, eval_interval=40,
                  pretrain_iters=200, pretrain_scenes=200)


def quick_regime() -> Regime:
    """A budget that only checks every step runs."""
    loss = comparison.regime_loss()
    return Regime(pairs=40, val_fraction=0.1, size=64, crop=32, label_ratio=0.2, decoder_channels=16, batch_size=2,
                  iters=4, eval_interval=2, pretrain_iters=2, pretrain_scenes=4,
                  loss=replace(loss, stabilise=replace(loss.stabilise, warmup_iters=2)))


@dataclass
class Args:
    """Synthetic data, CEG, and the three methods trained with one budget; prints a table."""

    out: Path | None = None
    """Folder for the data set, the encoder and the runs (a rerun resumes); None: a temporary folder."""
    quick: bool = False
    """A tiny run (under a minute) that exercises every step."""
    regime: Regime = field(default_factory=demo_regime)
    """Data, model, budget and loss settings (``--quick`` replaces them)."""
    device: str | None = None
    """``cpu``, ``cuda``; None: cuda when available."""
    workers: int = 2
    """Processes for data generation and CEG."""
    jobs: int = 2
    """Training runs at a time, each in its own process with its share of the CPU threads (on 2 cores, two
    one-thread runs at a time finish sooner than one two-thread run after another)."""
    seed: int = 0
    """Seed of the labelled draw and the training runs (the data set's is 0)."""


def run(args: Args, regime: Regime, root: Path) -> dict:
    """Every step of the demo under ``root``; returns the table as a dict."""
    data, start = root / "data", time.time()
    print(f"[1/3] synthetic data set: {regime.pairs} pairs of {regime.size}x{regime.size} in {data}", flush=True)
    comparison.prepare_data(data, regime, workers=args.workers)
    print("[2/3] change event generation (CEG) from the simulated VLM outputs", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        table = pseudo.main(pseudo.Args(root=data, split="test", out_name="pseudo_test", workers=args.workers))
    print(f"[3/3] pretraining an encoder ({regime.pretrain_iters} iterations), then supervised, fixmatch and "
          f"diffmatch for {regime.iters} iterations each ({regime.backbone}); progress on stderr", flush=True)
    launch = comparison.Launch(data, root / "runs", device=args.device, jobs=args.jobs)
    result = comparison.compare(launch, seeds=(args.seed,), regime=regime)
    methods = {m: runs[str(args.seed)] for m, runs in result["runs"].items()}
    summary = {"ceg_test": table["rows"] if table else None, "methods": methods,
               "regime": asdict(regime), "seconds": round(time.time() - start, 1)}
    write_json(root / "demo.json", summary)
    return summary


def print_table(summary: dict) -> None:
    """The demo's one table: CEG as an unsupervised detector, then the three trained methods."""
    print("\n                                   test IoU^c   test F1^c")
    if summary["ceg_test"]:
        rows = summary["ceg_test"]
        for level in ("pixel", "instance"):
            total = rows[level]["total"]
            print(f"{'CEG ' + level + '-level (no training)':<35}{total['iou']:10.1f}   {total['f1']:9.1f}")
        mixed = rows["mixed"]
        name = f"CEG mixed, reliable {mixed['ratio']:.0f} % of pixels"
        print(f"{name:<35}{mixed['valid']['iou']:10.1f}   {mixed['valid']['f1']:9.1f}")
    for method, s in summary["methods"].items():
        print(f"{method:<35}{s['best']['iou']:10.1f}   {s['best']['f1']:9.1f}")
    quick = summary["regime"]["iters"] < 10
    what = "a smoke run of a few iterations, not a result" if quick else "one seed, best.pt picked on val"
    print(f"({summary['seconds']:.0f} s; trained rows: {what})")
    print(BENCHMARK)


def main(args: Args) -> dict:
    regime = quick_regime() if args.quick else args.regime
    if args.jobs < 1 or args.workers < 1:
        raise InputError(f"--jobs {args.jobs} --workers {args.workers}: need at least 1 of each")
    if regime.pairs < 10 or regime.iters < 1:
        raise InputError(f"--regime.pairs {regime.pairs} --regime.iters {regime.iters}: need at least 10 pairs "
                         "and 1 iteration")
    if args.out is not None:
        summary = run(args, regime, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="diffmatch-demo-") as tmp:
            summary = run(args, regime, Path(tmp))
    print_table(summary)
    sys.stdout.flush()
    return summary

