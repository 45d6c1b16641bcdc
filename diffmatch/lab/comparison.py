"""Supervised, FixMatch and DiffMatch trained with one budget over several seeds: the paper's claim
(Tables 2–3) measured on a synthetic set a CPU can train on (docs/benchmark.md). Run by
``python -m diffmatch.bench --parts methods`` and, smaller, by ``python -m diffmatch.demo``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import math
import multiprocessing
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from scipy import stats

from diffmatch import pseudo
from diffmatch.config import Backbone, DataConfig, LossConfig, Method, ModelConfig, Stabilisers, TrainArgs
from diffmatch.lab import pretrain, synthetic
from diffmatch.run import iterations_per_epoch
from diffmatch.subsets import semi_split
from diffmatch.train import train

METHODS: tuple[Method, ...] = ("supervised", "fixmatch", "diffmatch")
PAIRS: tuple[tuple[Method, Method], ...] = (("fixmatch", "supervised"), ("diffmatch", "fixmatch"),
                                            ("diffmatch", "supervised"))
"""The paired differences the comparison reports (the paper's order: DiffMatch > FixMatch > supervised)."""


def regime_loss() -> LossConfig:
    """The paper's loss settings with the remedies a short CPU budget needs (docs/benchmark.md): a warm-up
    of the pseudo-label terms, an EMA teacher, BatchNorm statistics from the weak views and FlexMatch's
    class-wise thresholds."""
    return LossConfig(stabilise=Stabilisers(warmup_iters=100, ema_teacher=0.99, weak_bn_stats=True,
                                            class_thresholds=True))


@dataclass
class Regime:
    """One training budget for every method and seed (docs/benchmark.md)."""

    pairs: int = 1500
    """Synthetic pairs when no data set is given (``val_fraction`` val, ``test_fraction`` test, the rest
    train)."""
    val_fraction: float = 0.2
    """Share of the synthetic pairs in the val split (300 of 1,500: enough to select checkpoints)."""
    test_fraction: float = 0.2
    """Share of the synthetic pairs in the test split."""
    size: int = 128
    """Side of the synthetic images."""
    data_seed: int = 0
    """Seed of the synthetic set (scenes, changes, simulated VLM outputs, splits)."""
    label_ratio: float = 0.05
    """Share of the training pairs with labels."""
    crop: int = 64
    """Side of the training crops (and of the evaluation windows)."""
    backbone: Backbone = "resnet18"
    """Encoder."""
    decoder_channels: int = 64
    """Width of the decoders."""
    dual_head: bool = True
    """Dual projection head (§3.4; a Table 7 switch): the CEG change labels train their own head."""
    batch_size: int = 8
    """Pairs per batch (labelled and each unlabelled batch)."""
    iters: int = 1600
    """Training iterations of every method (supervised-only's plateau on val, docs/benchmark.md)."""
    eval_interval: int = 100
    """Validation every this many iterations, for every method."""
    pretrain_iters: int = 600
    """Iterations of ``python -m diffmatch.pretrain`` for the initial encoder, shared by every method
    and seed (a stand-in for ImageNet weights); 0: random initialisation."""
    pretrain_scenes: int = 300
    """Synthetic scenes of the pretraining (disjoint from the data set's)."""
    pretrain_buildings: bool = False
    """Pretrain with house and building labels (the first stand-in, which knows the changed concept);
    default: those pixels are ignored, as ImageNet weights carry no building masks."""
    loss: LossConfig = field(default_factory=regime_loss)
    """Loss terms, switches and remedies of ``fixmatch`` and ``diffmatch``."""


class Launch(NamedTuple):
    """Where the runs of a comparison read and write, and how they run."""

    root: Path
    """Data set root, with CEG labels for the training split."""
    runs: Path
    """Folder of the runs (``<method>-seed<seed>/``) and of the encoder they share."""
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; None: cuda when available."""
    workers: int = 1
    """DataLoader worker processes of each run."""
    jobs: int = 1
    """Runs at a time, each in its own process with its share of the CPU threads."""


def prepare_data(root: Path, regime: Regime, *, workers: int = 1) -> None:
    """The regime's synthetic set at ``root`` (kept if complete) and its CEG labels for the training
    split."""
    synthetic.generate(synthetic.Args(out=root, num_pairs=regime.pairs, size=regime.size,
                                      val_fraction=regime.val_fraction, test_fraction=regime.test_fraction,
                                      seed=regime.data_seed, workers=workers), verbose=False)
    prepare_labels(root, workers=workers)


def prepare_labels(root: Path, *, workers: int = 1) -> None:
    """CEG labels (``pseudo/``) of the training split, where they are missing."""
    with contextlib.redirect_stdout(io.StringIO()):
        pseudo.main(pseudo.Args(root=root, split="train" if (root / "list" / "train.txt").is_file() else None,
                                  workers=workers))


def data_root(data: Path | None, runs: Path, regime: Regime, *, workers: int = 1) -> Path:
    """``data`` with CEG labels made where missing, or (None) the regime's synthetic set under ``runs``."""
    if data is not None:
        prepare_labels(data, workers=workers)
        return data
    print(f"synthetic set: {regime.pairs} pairs of {regime.size} px at {runs / 'data'} (pairs already complete are"
          " kept)", file=sys.stderr)
    prepare_data(runs / "data", regime, workers=workers)
    return runs / "data"


def encoder_weights(path: Path, regime: Regime) -> str:
    """The ``--model.weights`` of the regime: a pretrained encoder at ``path`` (made once), or ``none``."""
    if regime.pretrain_iters == 0:
        return "none"
    if not path.is_file():
        with contextlib.redirect_stdout(sys.stderr):
            pretrain.pretrain(pretrain.Args(out=path, backbone=regime.backbone, iters=regime.pretrain_iters,
                                            scenes=regime.pretrain_scenes, crop=min(64, regime.size),
                                            with_buildings=regime.pretrain_buildings))
    return str(path)


def run_args(launch: Launch, method: Method, seed: int, regime: Regime, weights: str) -> TrainArgs:
    """The ``train`` settings of one method and seed under ``regime`` on the data set at ``launch.root``,
    writing to ``<runs>/<method>-seed<seed>``, from the encoder ``weights``: the epochs that hold
    ``regime.iters`` iterations, where ``max_iters`` ends the run."""
    data = DataConfig(root=launch.root, crop_size=regime.crop)
    split = semi_split(data, regime.label_ratio, seed)
    per_epoch = max(iterations_per_epoch(method, split, regime.batch_size), 1)
    return TrainArgs(
        data=data, label_ratio=regime.label_ratio, method=method, epochs=-(-regime.iters // per_epoch),
        batch_size=regime.batch_size,
        model=ModelConfig(backbone=regime.backbone, weights=weights, decoder_channels=regime.decoder_channels,
                          dual_head=regime.dual_head),
        loss=regime.loss, out_dir=launch.runs / f"{method}-seed{seed}", seed=seed, num_workers=launch.workers,
        device=launch.device, log_every=max(1, regime.iters // 8), eval_interval=regime.eval_interval,
        max_iters=regime.iters)


def run_method(args: TrainArgs) -> dict:
    """Train one run (or read its finished ``test.json``); the test scores of ``best.pt``, the last weights
    and the EMA teacher if there is one."""
    done = args.out_dir / "test.json"
    if not done.is_file():
        if (args.out_dir / "last.pt").is_file():
            args = replace(args, resume=True)
        with contextlib.redirect_stdout(sys.stderr):
            train(args)
    test, keys = json.loads(done.read_text()), ("iou", "f1", "precision", "recall")
    return {"best": {k: test[k] for k in keys},
            **{which: {k: test[which][k] for k in keys} for which in ("last", "teacher") if which in test},
            **({"train_seconds": test["train_seconds"]} if "train_seconds" in test else {})}


def _run_in_process(args: TrainArgs, threads: int) -> dict:
    """``run_method`` in a worker process with its share of the CPU threads."""
    torch.set_num_threads(threads)
    # A spawned process inherits "spawn" as its start method; give its DataLoader workers the platform's
    # default, as in a run started from the command line (spawned workers import torch again each time).
    multiprocessing.set_start_method(None, force=True)
    return run_method(args)


def compare(launch: Launch, *, methods: tuple[Method, ...] = METHODS, seeds: tuple[int, ...] = (0,),
            regime: Regime | None = None) -> dict:
    """Every method for every seed on the data set at ``launch.root`` (with CEG labels), runs under
    ``launch.runs``, ``launch.jobs`` runs at a time (each in its own process with its share of the CPU
    threads); returns the runs' scores and their mean and standard deviation per method."""
    regime = regime or Regime()
    cover = "with-buildings" if regime.pretrain_buildings else "no-buildings"
    name = f"encoder-{regime.backbone}-{regime.pretrain_scenes}x{regime.pretrain_iters}-{cover}.pt"
    weights = encoder_weights(launch.runs / name, regime)
    todo = [(m, s, run_args(launch, m, s, regime, weights)) for s in seeds for m in methods]
    results: dict[str, dict[str, dict]] = {m: {} for m in methods}
    print(f"{len(todo)} runs of {regime.iters} iterations, {launch.jobs} at a time", file=sys.stderr, flush=True)
    if launch.jobs == 1:
        for method, seed, args in todo:
            results[method][str(seed)] = run_method(args)
    else:
        threads = max(1, torch.get_num_threads() // launch.jobs)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(launch.jobs, mp_context=context) as pool:
            futures = {(m, s): pool.submit(_run_in_process, args, threads) for m, s, args in todo}
            for (method, seed), future in futures.items():
                results[method][str(seed)] = future.result()
    return {"runs": results, "summary": {m: summarise(r) for m, r in results.items()},
            "pairs": paired_differences(results)}


def summarise(runs: dict[str, dict]) -> dict:
    """Mean and sample standard deviation (0 for one run) of each score over the seeds, for ``best.pt``, the
    last weights and, where every run has one, the EMA teacher."""
    out: dict = {}
    for which in ("best", "last", "teacher"):
        if not runs or not all(which in r for r in runs.values()):
            continue
        for key in ("iou", "f1"):
            values = [r[which][key] for r in runs.values()]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out.setdefault(which, {})[key] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return out


def paired_difference(a: dict[str, dict], b: dict[str, dict], *, which: str = "best", key: str = "iou") -> dict:
    """Per-seed differences a - b of a score over the seeds both have, their mean and its 95 % t-interval
    (``low`` and ``high`` are None for fewer than two seeds)."""
    seeds = sorted(set(a) & set(b), key=int)
    diffs = [a[seed][which][key] - b[seed][which][key] for seed in seeds]
    mean = statistics.fmean(diffs) if diffs else float("nan")
    low = high = None
    if len(diffs) > 1:
        half = float(stats.t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "n": len(diffs), "per_seed": dict(zip(seeds, diffs, strict=True))}


def paired_differences(runs: dict[str, dict[str, dict]]) -> dict:
    """``fixmatch-supervised``, ``diffmatch-fixmatch`` and ``diffmatch-supervised`` (where both methods ran):
    the paired IoU^c differences of ``best.pt`` and of the last weights."""
    return {f"{a}-{b}": {which: paired_difference(runs[a], runs[b], which=which) for which in ("best", "last")}
            for a, b in PAIRS if runs.get(a) and runs.get(b)}


def format_summary(summary: dict, pairs: dict | None = None) -> str:
    """One line per method: its name, then test IoU^c and F1^c of ``best.pt`` as mean ± std, then the last
    weights' IoU^c; below them one line per paired difference: mean and 95 % t-interval of the IoU^c
    difference of ``best.pt``, then of the last weights."""
    lines = []
    for method, s in summary.items():
        best, last = s["best"], s["last"]
        lines.append(f"{method:<11} IoU^c {best['iou']['mean']:5.1f} ± {best['iou']['std']:4.1f}   "
                     f"F1^c {best['f1']['mean']:5.1f} ± {best['f1']['std']:4.1f}   "
                     f"(last weights: IoU^c {last['iou']['mean']:5.1f} ± {last['iou']['std']:4.1f}, "
                     f"{best['iou']['n']} seed{'s' if best['iou']['n'] > 1 else ''})")

    def interval(d: dict) -> str:
        span = "n/a" if d["low"] is None else f"[{d['low']:+.1f}, {d['high']:+.1f}]"
        return f"{d['mean']:+5.1f}, 95 % CI {span}"

    for name, d in (pairs or {}).items():
        lines.append(f"{name:<20} IoU^c {interval(d['best'])}   (last weights: {interval(d['last'])}; "
                     f"{d['best']['n']} paired seeds)")
    return "\n".join(lines)
