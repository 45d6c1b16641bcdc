"""Train DiffMatch, or the FixMatch and supervised baselines, on a change-detection data set.

    python -m diffmatch.train --data.root LEVIR-CD256 --label-ratio 0.05
    torchrun --nproc_per_node 4 -m diffmatch.train --data.root LEVIR-CD256 --label-ratio 0.05

Read top to bottom next to the paper: the data (§3.1), then the loop: poly learning rate and λ_vl
schedule, one step of ``diffmatch.step`` (§3, Table 1), the update, logging, evaluation on a fixed
iteration interval, and checkpoints.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from diffmatch import losses
from diffmatch.atomic import atomic_path, write_json
from diffmatch.board import Board
from diffmatch.checks import check_training_data
from diffmatch.cli import InputError
from diffmatch.config import TrainArgs, from_dict, to_dict
from diffmatch.data import (
    EpochSampler,
    LabeledSet,
    UnlabeledSet,
    eval_ids,
    eval_set,
    leak_warning,
    repeat_to,
    semi_split,
)
from diffmatch.evaluate import evaluate_model
from diffmatch.metrics import format_scores
from diffmatch.model import (
    autocast,
    build_model,
    build_optimizer,
    load_checkpoint,
    load_state,
    pick_device,
    save_checkpoint,
    use_bf16,
)
from diffmatch.pairs import write_id_list
from diffmatch.step import LearningStatus, compute_losses, ema_update, to_device, uses_every_parameter


# ----------------------------------------------------------------------------- data (§3.1)
class Loaders(NamedTuple):
    """Labelled batches ``x``, unlabelled batches ``u`` and a second stream ``u2`` of CutMix content
    (the unlabelled loaders are None for the supervised baseline)."""

    x: DataLoader
    u: DataLoader | None
    u2: DataLoader | None


def make_loaders(args: TrainArgs, labeled: list[str], unlabeled: list[str], rank: int, world: int,
                 pin_memory: bool = False) -> Loaders:
    """One epoch is a pass over the unlabelled set, the labelled ids repeated to match (over the
    labelled set for ``supervised``); each process sees its own shard of every epoch."""
    common = {"crop_size": args.data.crop_size, "augment_cfg": args.augment, "pseudo_dir": pseudo_dir_of(args)}
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
        return Loaders(loader(LabeledSet(args.data.root, labeled, seed=args.seed, label_threshold=threshold,
                                         **common), 0), None, None)
    if not unlabeled:
        raise InputError(f"--label-ratio {args.label_ratio} leaves no unlabelled pairs for {args.method}; "
                         "lower it or use --method supervised")
    u_root = args.data.unlabeled_root or args.data.root
    x = LabeledSet(args.data.root, repeat_to(labeled, len(unlabeled)), seed=args.seed, label_threshold=threshold,
                   **common)
    u = UnlabeledSet(u_root, unlabeled, seed=args.seed + 1, **common)
    u2 = UnlabeledSet(u_root, unlabeled, seed=args.seed + 2, **common)
    return Loaders(loader(x, 0), loader(u, 1), loader(u2, 2))


def pseudo_dir_of(args: TrainArgs) -> str | None:
    """The CEG pseudo-label folder the method reads, or None when no loss term uses it."""
    wants_pseudo = args.method == "diffmatch" and (args.loss.vl_guidance or args.loss.seg_guidance)
    return args.data.pseudo_dir if wants_pseudo else None


# ----------------------------------------------------------------------------- the run
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


def check_args(args: TrainArgs) -> None:
    """Reject values that cannot train, naming the flag."""
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--data.crop-size", args.data.crop_size), ("--log-every", args.log_every),
                        ("--eval-interval", args.eval_interval)):
        if value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    if not 0 <= args.loss.tau <= 1:
        raise InputError(f"--loss.tau {args.loss.tau}: must be in [0, 1]")
    if not 0 <= args.loss.ema_teacher < 1:
        raise InputError(f"--loss.ema-teacher {args.loss.ema_teacher}: must be in [0, 1)")
    for flag, value in (("--num-workers", args.num_workers), ("--loss.warmup-iters", args.loss.warmup_iters),
                        ("--loss.rampup-iters", args.loss.rampup_iters)):
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


def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop records written after the checkpoint a resumed run starts from."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(args: TrainArgs) -> dict[str, float]:
    """Run training to the end and return the test scores of ``best.pt``."""
    check_args(args)
    device, rank, world = setup_distributed(args.device)
    main_process = rank == 0
    out = args.out_dir
    if args.resume and not (out / "last.pt").exists():
        raise InputError(f"{out / 'last.pt'}: nothing to resume; drop --resume to start a new run")
    if not args.resume and (out / "last.pt").exists():
        raise InputError(f"{out}: holds a run already; pass --resume to continue it or choose another --out-dir")
    amp = use_bf16(args.amp, device)
    if args.amp and not amp and main_process:
        print("note: --amp applies to CUDA only; training in float32")

    split = semi_split(args.data, args.label_ratio, args.seed)
    if main_process:
        for name in dict.fromkeys((args.data.val_split, args.data.test_split)):
            if warning := leak_warning(split.labeled, eval_ids(args.data, name), name):
                print(warning, flush=True)
    if args.check_data:  # every file the run will read, before anything is built (every rank; rank 0 prints)
        selection = args.data.val_split if args.select_on == "val" else args.data.test_split
        check_training_data(args.data, split.labeled, [] if args.method == "supervised" else split.unlabeled,
                            pseudo_dir=pseudo_dir_of(args), eval_splits=(selection, args.data.test_split),
                            show=main_process)
    loaders = make_loaders(args, split.labeled, split.unlabeled, rank, world, pin_memory=device.type == "cuda")
    val_set = eval_set(args.data, args.data.val_split if args.select_on == "val" else args.data.test_split)
    torch.manual_seed(args.seed)
    net = build_model(args.model).to(device)
    model: nn.Module = net
    if world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not uses_every_parameter(args.method, args.loss, args.model.dual_head))
    optimizer = build_optimizer(net, args.optim)
    iters_per_epoch = len(loaders.x)
    total_iters = min(args.epochs * iters_per_epoch, args.max_iters or args.epochs * iters_per_epoch)
    epochs = -(-total_iters // iters_per_epoch)  # those --max-iters leaves
    semi = args.method != "supervised"
    teacher = None
    if args.loss.ema_teacher > 0 and semi:
        teacher = copy.deepcopy(net).eval().requires_grad_(False)  # Mean Teacher: pseudo labels of L_u, L_c
    status = LearningStatus(len(split.unlabeled)) if args.loss.class_thresholds and semi else None

    epoch, iteration, best = 0, 0, -1.0
    if args.resume:
        state = load_checkpoint(out / "last.pt", device)
        check_same_run(state["config"], args, out / "last.pt")
        load_state(net, state["model"], out / "last.pt")
        optimizer.load_state_dict(state["optimizer"])
        if teacher is not None:
            load_state(teacher, state["teacher"], out / "last.pt")
        if status is not None and "learning_status" in state:  # else it is rebuilt as the samples come again
            status.load_state_dict(state["learning_status"])
        epoch, iteration, best = state["epoch"], state["iteration"], state["best_score"]
        torch.set_rng_state(state["rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])
        if main_process:
            truncate_metrics(out / "metrics.jsonl", iteration)
            print(f"resuming {out} at epoch {epoch}, iteration {iteration}")
    elif main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", to_dict(args))
        for name, ids in (("labeled", split.labeled), ("unlabeled", split.unlabeled)):
            write_id_list(out / f"{name}.txt", ids)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    board = Board.open(out / "tensorboard", enabled=args.tensorboard, write=main_process, start=iteration,
                       vis_set=val_set, split=args.select_on, tile=args.data.crop_size, amp=amp)
    if main_process:
        print(f"{args.method}: {len(split.labeled)} labelled, {len(split.unlabeled)} unlabelled pairs; "
              f"{iters_per_epoch} iterations/epoch, {total_iters} in all, on {device} x{world}")

    start_time, start_iter = time.time(), iteration
    saved_at = start_time
    while iteration < total_iters:
        for loader in loaders:
            if loader is not None:
                loader.sampler.set_epoch(epoch)  # workers live across epochs: the keys carry the epoch
        streams = [loader if loader is not None else iter(lambda: None, 0) for loader in loaders]
        model.train()
        for x, u, u2 in zip(*streams, strict=False):
            for group in optimizer.param_groups:
                group["lr"] = losses.poly_lr(group["base_lr"], iteration, total_iters, args.optim.poly_power)
            lambda_vl = losses.lambda_vl_at(iteration, total_iters, args.loss.lambda_vl)  # over the whole run
            weight = losses.pseudo_label_weight(iteration, args.loss.warmup_iters, args.loss.rampup_iters)
            if teacher is not None and iteration == args.loss.warmup_iters:
                teacher.load_state_dict(net.state_dict())  # the teacher starts from the student
            x, u, u2 = to_device(x, device), to_device(u, device), to_device(u2, device)
            with autocast(device, amp):
                step = compute_losses(model, args.method, x, u, u2, args.loss, lambda_vl, teacher=teacher,
                                      unsup_weight=weight, status=status)
            optimizer.zero_grad(set_to_none=True)
            step.total.backward()
            optimizer.step()
            if teacher is not None and weight > 0:
                ema_update(teacher, net, args.loss.ema_teacher, iteration - args.loss.warmup_iters)
            iteration += 1
            if main_process and (iteration % args.log_every == 0 or iteration == total_iters):
                terms = {k: round(float(v.detach()), 5) for k, v in step.terms._asdict().items()}
                record = {"iteration": iteration, "epoch": epoch, "loss": round(float(step.total.detach()), 5),
                          **{f"loss_{k}": v for k, v in terms.items()}, "lr": optimizer.param_groups[0]["lr"],
                          "lambda_vl": lambda_vl, "confident": round(float(step.confident), 4),
                          "tau_no_change": round(float(step.tau[0]), 4), "tau_change": round(float(step.tau[1]), 4)}
                append_metrics(out / "metrics.jsonl", record)
                rate = (iteration - start_iter) / max(time.time() - start_time, 1e-9)
                print(f"epoch {epoch + 1}/{epochs} it {iteration}/{total_iters} loss {record['loss']:.4f} "
                      f"(s {terms['s']:.3f} u {terms['u']:.3f} c {terms['c']:.3f} vl {terms['vl']:.3f}) "
                      f"conf {record['confident']:.0%} lr {record['lr']:.2e} | {rate * args.batch_size * world:.1f} "
                      f"pairs/s, ETA {hms((total_iters - iteration) / max(rate, 1e-9))}", flush=True)
                board.log_step(iteration, record, optimizer, pairs_per_s=rate * args.batch_size * world)
            if iteration % args.eval_interval == 0 or iteration == total_iters:  # one schedule for all methods
                if main_process:
                    selectable = not semi or iteration > args.loss.warmup_iters or iteration == total_iters
                    best = validate(args, net, val_set, device, amp, epoch, iteration, best, board, selectable)
                if world > 1:
                    dist.barrier()
                model.train()
            if iteration >= total_iters:
                break
        epoch += 1
        if main_process and (iteration >= total_iters or time.time() - saved_at >= args.save_every):
            saved_at = time.time()
            save_checkpoint(out / "last.pt", model=net, args=args, epoch=epoch, iteration=iteration,
                            best_score=best, optimizer=optimizer, teacher=teacher,
                            learning_status=status.state_dict() if status is not None else None)
        if world > 1:
            dist.barrier()
    board.close()
    timing = {"train_seconds": round(time.time() - start_time, 1), "from_iteration": start_iter}
    return finish(args, net, device, amp, main_process, world, teacher, timing)


def validate(args: TrainArgs, net: nn.Module, val_set: torch.utils.data.Dataset, device: torch.device, amp: bool,
             epoch: int, iteration: int, best: float, board: Board, selectable: bool = True) -> float:
    """Score the network on the selection split and record it; when ``selectable`` (not during a warm-up),
    keep it as ``best.pt`` if it is the best so far; returns the best IoU^c."""
    result = evaluate_model(net, val_set, device=device, tile=args.data.crop_size, amp=amp,
                            num_workers=min(args.num_workers, 2))
    score = result.scores["iou"]
    append_metrics(args.out_dir / "metrics.jsonl", {"iteration": iteration, "epoch": epoch,
                                                    f"{args.select_on}": result.scores})
    print(format_scores(f"it {iteration} {args.select_on}", result.scores), flush=True)
    board.log_evaluation(iteration, result.scores, net)
    if not selectable or score <= best:
        return best
    save_checkpoint(args.out_dir / "best.pt", model=net, args=args, epoch=epoch, iteration=iteration,
                    best_score=score)
    return score


def finish(args: TrainArgs, net: nn.Module, device: torch.device, amp: bool, main_process: bool,
           world: int, teacher: nn.Module | None = None, timing: dict | None = None) -> dict[str, float]:
    """Evaluate the last weights, the EMA teacher if any and ``best.pt`` on the test split, print and record
    them; returns the scores of ``best.pt`` (``test.json`` holds them, the last weights' under ``last`` and
    the teacher's under ``teacher``, and ``timing``: the wall seconds of the training loop in this process,
    from the iteration it started at)."""
    scores: dict[str, float] = {}
    if main_process:
        test_set = eval_set(args.data, args.data.test_split)
        last = evaluate_model(net, test_set, device=device, tile=args.data.crop_size, amp=amp).scores
        others = {"last": last}
        if teacher is not None:
            others["teacher"] = evaluate_model(teacher, test_set, device=device, tile=args.data.crop_size,
                                               amp=amp).scores
            print(format_scores(f"test of the EMA teacher ({len(test_set)} pairs)", others["teacher"]), flush=True)
        best_path = args.out_dir / "best.pt"
        load_state(net, load_checkpoint(best_path, device)["model"], best_path)
        scores = evaluate_model(net, test_set, device=device, tile=args.data.crop_size, amp=amp).scores
        write_json(args.out_dir / "test.json", {"checkpoint": str(best_path), "pairs": len(test_set), **scores,
                                                **others, **(timing or {})})
        print(format_scores(f"test of the last weights ({len(test_set)} pairs)", last), flush=True)
        print(format_scores(f"test of best.pt ({len(test_set)} pairs)", scores), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return scores


if __name__ == "__main__":
    import tyro

    from diffmatch.cli import run_cli

    run_cli(lambda: train(tyro.cli(TrainArgs, prog="python -m diffmatch.train")))
