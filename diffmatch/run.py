"""A training run's frame: its settings checked, the data it trains on (§3.1), its start (new, or resumed
from ``last.pt`` with the same settings) and its end (the test scores of ``best.pt``, the last weights and
the EMA teacher). The loop itself is ``diffmatch.train``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from diffmatch.atomic import atomic_path, write_json
from diffmatch.board import Board, MapGrid
from diffmatch.checkpoint import RunState, load_checkpoint, load_state, restore
from diffmatch.checks import check_training_data
from diffmatch.cli import InputError
from diffmatch.config import Method, TrainArgs, from_dict, to_dict
from diffmatch.data import EpochSampler, EvalSet, LabeledSet, UnlabeledSet, ViewOptions, eval_set
from diffmatch.device import setup_distributed, use_bf16
from diffmatch.evaluate import Windows, evaluate_model
from diffmatch.metrics import format_scores
from diffmatch.model import build_model, build_optimizer
from diffmatch.pairs import write_id_list
from diffmatch.step import (
    LearningStatus,
    StepSetup,
    uses_every_parameter,
)
from diffmatch.subsets import SemiSplit, eval_ids, leak_warning, repeat_to, semi_split


@dataclass
class Run:
    """One training run: its settings, where it runs, its data, network, state and log."""

    args: TrainArgs
    device: torch.device
    amp: bool
    """bf16 autocast (``--amp`` on CUDA)."""
    world: int
    """Processes (1 without torchrun)."""
    main: bool
    """Rank 0, the process that prints, logs, evaluates and saves."""
    loaders: Loaders
    val_set: EvalSet
    """The split that selects ``best.pt``."""
    model: nn.Module
    """The network, wrapped in DistributedDataParallel when ``world`` > 1 (``state.model`` is the bare one)."""
    state: RunState
    setup: StepSetup
    board: Board
    total_iters: int
    started: float = 0.0
    """Wall time at which this process started (or resumed) the loop."""
    start_iter: int = 0
    """The iteration it started at."""

    @property
    def epochs(self) -> int:
        """The epochs ``--max-iters`` leaves of ``--epochs``."""
        return -(-self.total_iters // len(self.loaders.x))


def start(args: TrainArgs) -> Run:
    """Everything a run needs, started anew or resumed from ``last.pt``; prints what it trains."""
    device, rank, world = setup_distributed(args.device)
    main, out = rank == 0, args.out_dir
    if args.resume and not (out / "last.pt").exists():
        raise InputError(f"{out / 'last.pt'}: nothing to resume; drop --resume to start a new run")
    if not args.resume and (out / "last.pt").exists():
        raise InputError(f"{out}: holds a run already; pass --resume to continue it or choose another --out-dir")
    amp = use_bf16(args.amp, device)
    if args.amp and not amp and main:
        print("note: --amp applies to CUDA only; training in float32")
    split = training_split(args, main)
    loaders = make_loaders(args, split, rank, world, pin_memory=device.type == "cuda")
    val_set = eval_set(args.data, args.selection_split)
    model, state = build_state(args, device, world, len(split.unlabeled))
    if args.resume:
        saved = load_checkpoint(out / "last.pt", device)
        check_same_run(saved["config"], args, out / "last.pt")
        restore(saved, state, device, out / "last.pt")
        if main:
            truncate_metrics(out / "metrics.jsonl", state.iteration)
            print(f"resuming {out} at epoch {state.epoch}, iteration {state.iteration}")
    elif main:
        open_run_folder(args, split)
    board = Board.open(out / "tensorboard", MapGrid(val_set, args.select_on, Windows(args.data.crop_size, amp=amp)),
                       enabled=args.tensorboard, write=main, start=state.iteration)
    total = min(args.epochs * len(loaders.x), args.max_iters or args.epochs * len(loaders.x))
    if main:
        print(f"{args.method}: {len(split.labeled)} labelled, {len(split.unlabeled)} unlabelled pairs; "
              f"{len(loaders.x)} iterations/epoch, {total} in all, on {device} x{world}")
    setup = StepSetup(args.method, args.loss, state.teacher, state.status)
    return Run(args, device, amp, world, main, loaders, val_set, model, state, setup, board, total,
               started=time.time(), start_iter=state.iteration)


def training_split(args: TrainArgs, main: bool) -> SemiSplit:
    """The labelled and unlabelled training ids (§3.1); warns of labelled ids in an evaluation split and,
    with ``--check-data``, checks every file the run will read before anything is built."""
    split = semi_split(args.data, args.label_ratio, args.seed)
    if main:
        for name in dict.fromkeys((args.data.val_split, args.data.test_split)):
            if warning := leak_warning(split.labeled, eval_ids(args.data, name), name):
                print(warning, flush=True)
    if args.check_data:  # every rank checks; rank 0 prints
        unlabeled = [] if args.method == "supervised" else split.unlabeled
        check_training_data(args.data, SemiSplit(split.labeled, unlabeled), pseudo_dir=pseudo_dir_of(args),
                            eval_splits=(args.selection_split, args.data.test_split), show=main)
    return split


class Loaders(NamedTuple):
    """Labelled batches ``x``, unlabelled batches ``u`` and a second stream ``u2`` of CutMix content
    (the unlabelled loaders are None for the supervised baseline)."""

    x: DataLoader
    u: DataLoader | None
    u2: DataLoader | None


def make_loaders(args: TrainArgs, split: SemiSplit, rank: int, world: int, pin_memory: bool = False) -> Loaders:
    """One epoch is a pass over the unlabelled set, the labelled ids repeated to match (over the
    labelled set for ``supervised``); each process sees its own shard of every epoch."""
    labeled, unlabeled = split
    views = ViewOptions(args.data.crop_size, args.augment, pseudo_dir_of(args))
    threshold = args.data.label_threshold

    def loader(dataset: torch.utils.data.Dataset, stream: int) -> DataLoader:
        if len(dataset) < args.batch_size * world:
            raise InputError(f"only {len(dataset)} training pairs for --batch-size {args.batch_size} on {world} "
                             "process(es); lower --batch-size or add data")
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                               seed=args.seed + 1000 * stream, drop_last=True)
        return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                          drop_last=True, pin_memory=pin_memory, persistent_workers=args.num_workers > 0)

    if args.method == "supervised":
        return Loaders(loader(LabeledSet(args.data.root, labeled, views=views, seed=args.seed,
                                         label_threshold=threshold), 0), None, None)
    if not unlabeled:
        raise InputError(f"--label-ratio {args.label_ratio} leaves no unlabelled pairs for {args.method}; "
                         "lower it or use --method supervised")
    u_root = args.data.unlabeled_root or args.data.root
    x = LabeledSet(args.data.root, repeat_to(labeled, len(unlabeled)), views=views, seed=args.seed,
                   label_threshold=threshold)
    u = UnlabeledSet(u_root, unlabeled, views=views, seed=args.seed + 1)
    u2 = UnlabeledSet(u_root, unlabeled, views=views, seed=args.seed + 2)
    return Loaders(loader(x, 0), loader(u, 1), loader(u2, 2))


def iterations_per_epoch(method: Method, split: SemiSplit, batch_size: int, world: int = 1) -> int:
    """Full batches per process in one epoch of ``make_loaders``: a pass over the unlabelled set (over the
    labelled set for ``supervised``), each process's shard cut to whole batches."""
    pairs = len(split.labeled) if method == "supervised" else len(split.unlabeled)
    return pairs // world // batch_size


def pseudo_dir_of(args: TrainArgs) -> str | None:
    """The CEG pseudo-label folder the method reads, or None when no loss term uses it."""
    wants_pseudo = args.method == "diffmatch" and (args.loss.vl_guidance or args.loss.seg_guidance)
    return args.data.pseudo_dir if wants_pseudo else None


def build_state(args: TrainArgs, device: torch.device, world: int, unlabeled: int) -> tuple[nn.Module, RunState]:
    """The network (wrapped for DistributedDataParallel when ``world`` > 1) and the run's state at its start:
    SGD (§4.1.2) and, when asked for, the stabilisers' EMA teacher and learning status."""
    torch.manual_seed(args.seed)
    net = build_model(args.model).to(device)
    model: nn.Module = net
    if world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not uses_every_parameter(args.method, args.loss, args.model.dual_head))
    semi, stabilise = args.method != "supervised", args.loss.stabilise
    teacher = copy.deepcopy(net).eval().requires_grad_(False) if stabilise.ema_teacher > 0 and semi else None
    status = LearningStatus(unlabeled) if stabilise.class_thresholds and semi else None
    return model, RunState(net, build_optimizer(net, args.optim), teacher, status)


def open_run_folder(args: TrainArgs, split: SemiSplit) -> None:
    """A new run's folder: its settings, its labelled and unlabelled ids, no metrics yet."""
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(args))
    for name, ids in (("labeled", split.labeled), ("unlabeled", split.unlabeled)):
        write_id_list(out / f"{name}.txt", ids)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def finish(run: Run) -> dict[str, float]:
    """Evaluate the last weights, the EMA teacher if any and ``best.pt`` on the test split, print and record
    them; returns the scores of ``best.pt`` (``test.json`` holds them, the last weights' under ``last``, the
    teacher's under ``teacher``, and the wall seconds of this process's loop from the iteration it
    started at)."""
    scores: dict[str, float] = {}
    if run.main:
        args, net = run.args, run.state.model
        timing = {"train_seconds": round(time.time() - run.started, 1), "from_iteration": run.start_iter}
        test_set = eval_set(args.data, args.data.test_split)
        tested = {"last": test_scores(run, net, test_set)}
        if run.state.teacher is not None:
            tested["teacher"] = test_scores(run, run.state.teacher, test_set)
            print(format_scores(f"test of the EMA teacher ({len(test_set)} pairs)", tested["teacher"]), flush=True)
        best_path = args.out_dir / "best.pt"
        load_state(net, load_checkpoint(best_path, run.device)["model"], best_path)
        scores = test_scores(run, net, test_set)
        write_json(args.out_dir / "test.json", {"checkpoint": str(best_path), "pairs": len(test_set), **scores,
                                                **tested, **timing})
        print(format_scores(f"test of the last weights ({len(test_set)} pairs)", tested["last"]), flush=True)
        print(format_scores(f"test of best.pt ({len(test_set)} pairs)", scores), flush=True)
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return scores


def test_scores(run: Run, net: nn.Module, test_set: EvalSet) -> dict[str, float]:
    """The scores of ``net`` on the test split."""
    return evaluate_model(net, test_set, windows=Windows(run.args.data.crop_size, amp=run.amp)).scores


def check_args(args: TrainArgs) -> None:
    """Reject values that cannot train, naming the flag."""
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--data.crop-size", args.data.crop_size), ("--log-every", args.log_every),
                        ("--eval-interval", args.eval_interval)):
        if value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    if not 0 <= args.loss.tau <= 1:
        raise InputError(f"--loss.tau {args.loss.tau}: must be in [0, 1]")
    stabilise = args.loss.stabilise
    if not 0 <= stabilise.ema_teacher < 1:
        raise InputError(f"--loss.stabilise.ema-teacher {stabilise.ema_teacher}: must be in [0, 1)")
    for flag, value in (("--num-workers", args.num_workers), ("--loss.stabilise.warmup-iters", stabilise.warmup_iters),
                        ("--loss.stabilise.rampup-iters", stabilise.rampup_iters)):
        if value < 0:
            raise InputError(f"{flag} {value}: must be 0 or more")


RUN_FIELDS = ("data", "label_ratio", "method", "epochs", "batch_size", "augment", "model", "loss", "optim",
              "seed", "max_iters")
"""Settings a resumed run must share with its checkpoint (the rest, e.g. workers or device, may change)."""


def check_same_run(saved: dict, args: TrainArgs, path: Path) -> None:
    """Refuse to resume a checkpoint with settings that would change the data, schedule or losses."""
    now, saved = to_dict(args), to_dict(from_dict(TrainArgs, saved))  # settings added later take their defaults
    differ = [name for name in RUN_FIELDS if saved.get(name) != now.get(name)]
    if differ:
        flags = ", ".join("--" + name.replace("_", "-") for name in differ)
        raise InputError(f"{path}: trained with other {flags}; resume with the run's own settings "
                         f"(see {path.parent / 'config.json'})")


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop records written after the checkpoint a resumed run starts from."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))
