"""See DiffMatch work in minutes, on the CPU, with nothing to download.

    python -m diffmatch.demo            # about 10 minutes on 2 CPU cores
    python -m diffmatch.demo --quick    # under a minute: a smoke test of the whole pipeline

Generates a synthetic data set with simulated VLM outputs, runs CEG on it, trains ``supervised``,
``fixmatch`` and ``diffmatch`` with the same number of iterations, evaluates each on the test split
and prints one table.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from diffmatch import ceg_cli, synthetic
from diffmatch.config import DataConfig, ModelConfig, TrainArgs
from diffmatch.files import InputError, read_id_list, write_json
from diffmatch.train import train

METHODS = ("supervised", "fixmatch", "diffmatch")


@dataclass
class Args:
    """Synthetic data, CEG, and the three methods trained with one budget; prints a table."""

    out: Path | None = None
    """Folder for the data set and the runs; None: a temporary folder, removed at the end."""
    quick: bool = False
    """A tiny run (under a minute) that exercises every step."""
    pairs: int = 240
    """Synthetic pairs (70 % train, 10 % val, 20 % test)."""
    size: int = 96
    """Side of the synthetic images."""
    label_ratio: float = 0.1
    """Share of the training pairs with labels."""
    iters: int = 120
    """Training iterations for each method (the same budget for all)."""
    batch_size: int = 4
    """Pairs per batch."""
    backbone: str = "resnet18"
    """Encoder (resnet18, resnet34, resnet50, resnet101); no pretrained weights are downloaded."""
    device: str | None = None
    """``cpu``, ``cuda``; None: cuda when available."""
    workers: int = 2
    """Processes for data generation, CEG and data loading."""
    seed: int = 0
    """Seed of the data, the labelled draw and the training runs."""

    def sized(self) -> Args:
        """The settings of ``--quick``, or these."""
        if not self.quick:
            return self
        return Args(out=self.out, quick=True, pairs=40, size=64, label_ratio=0.2, iters=4, batch_size=2,
                    backbone=self.backbone, device=self.device, workers=self.workers, seed=self.seed)


def epochs_for(budget: int, pairs: int, batch_size: int) -> tuple[int, int]:
    """Epochs that cover ``budget`` iterations over ``pairs`` pairs, and an evaluation interval that
    gives about four evaluations."""
    per_epoch = max(pairs // batch_size, 1)
    epochs = math.ceil(budget / per_epoch)
    return epochs, max(1, epochs // 4)


def run(args: Args, root: Path) -> dict:
    """Every step of the demo under ``root``; returns the table as a dict."""
    data, start = root / "data", time.time()
    print(f"[1/3] synthetic data set: {args.pairs} pairs of {args.size}x{args.size} in {data}", flush=True)
    synthetic.generate(data, num_pairs=args.pairs, size=args.size, seed=args.seed, workers=args.workers)
    print("[2/3] change event generation (CEG) from the simulated VLM outputs", flush=True)
    table = ceg_cli.main(ceg_cli.Args(root=data, split="test", out_name="pseudo_test", workers=args.workers))
    ceg_cli.main(ceg_cli.Args(root=data, split="train", workers=args.workers))
    train_ids = read_id_list(data / "list" / "train.txt")
    labelled = max(1, round(args.label_ratio * len(train_ids)))
    results = {}
    for i, method in enumerate(METHODS, 1):
        pairs = labelled if method == "supervised" else len(train_ids) - labelled
        epochs, _ = epochs_for(args.iters, pairs, args.batch_size)
        print(f"[3/3] training {method} ({i}/3): {args.iters} iterations, {args.backbone}", flush=True)
        run_args = TrainArgs(
            data=DataConfig(root=data, crop_size=args.size), label_ratio=args.label_ratio, method=method,
            epochs=epochs, batch_size=args.batch_size, model=ModelConfig(backbone=args.backbone),  # type: ignore[arg-type]
            out_dir=root / "runs" / method, seed=args.seed, num_workers=args.workers, device=args.device,
            log_every=max(1, args.iters // 5), eval_interval=max(1, args.iters // 4),
            max_iters=args.iters)
        results[method] = train(run_args)
    summary = {"ceg_test": table["rows"] if table else None, "methods": results,
               "settings": {k: str(v) for k, v in vars(args).items()}, "seconds": round(time.time() - start, 1)}
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
        print(f"{method:<35}{s['iou']:10.1f}   {s['f1']:9.1f}")
    print(f"({summary['seconds']:.0f} s)")


def main(args: Args) -> dict:
    args = args.sized()
    if args.pairs < 10 or args.iters < 1:
        raise InputError(f"--pairs {args.pairs} --iters {args.iters}: need at least 10 pairs and 1 iteration")
    if args.out is not None:
        summary = run(args, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="diffmatch-demo-") as tmp:
            summary = run(args, Path(tmp))
    print_table(summary)
    return summary


if __name__ == "__main__":
    import tyro

    from diffmatch.files import run_cli

    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.demo")))
