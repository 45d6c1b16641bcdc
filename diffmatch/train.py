"""Train DiffMatch, or the FixMatch and supervised baselines, on a change-detection data set.

    python -m diffmatch.train --data.root LEVIR-CD256 --label-ratio 0.05
    torchrun --nproc_per_node 4 -m diffmatch.train --data.root LEVIR-CD256 --label-ratio 0.05

Read top to bottom next to the paper. ``train`` starts the run (``diffmatch.run``: the data of §3.1, the
network, a new or resumed state) and loops: each step takes the schedules at its iteration (poly learning
rate, λ_vl), computes the losses of ``diffmatch.step`` (§3, Table 1) and updates; the loop logs, evaluates
on a fixed iteration interval and saves ``last.pt`` at epoch ends; at the end the test split scores
``best.pt`` and the last weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from diffmatch import losses
from diffmatch.checkpoint import RunState, save_checkpoint
from diffmatch.config import TrainArgs, to_dict
from diffmatch.device import autocast
from diffmatch.evaluate import Windows, evaluate_model
from diffmatch.metrics import format_scores
from diffmatch.run import Run, check_args, finish, start
from diffmatch.step import (
    Batches,
    StepResult,
    Weights,
    compute_losses,
    ema_update,
    to_device,
)


def train(args: TrainArgs) -> dict[str, float]:
    """Run training to the end and return the test scores of ``best.pt``."""
    check_args(args)
    run = start(args)
    saved_at = run.started
    while run.state.iteration < run.total_iters:
        train_epoch(run)
        run.state.epoch += 1
        if run.main and (run.state.iteration >= run.total_iters or time.time() - saved_at >= args.save_every):
            saved_at = time.time()
            save_checkpoint(args.out_dir / "last.pt", run.state, to_dict(args))
        barrier(run)
    run.board.close()
    return finish(run)


def train_epoch(run: Run) -> None:
    """One pass over the loaders (or what is left of the run): step, log, evaluate."""
    for loader in run.loaders:
        if loader is not None:
            loader.sampler.set_epoch(run.state.epoch)  # workers live across epochs: the keys carry the epoch
    streams = [loader if loader is not None else iter(lambda: None, 0) for loader in run.loaders]
    run.model.train()
    for batch in zip(*streams, strict=False):
        step, weights = train_step(run, Batches(*batch))
        run.state.iteration += 1
        log_step(run, step, weights)
        evaluate_if_due(run)
        if run.state.iteration >= run.total_iters:
            break


def train_step(run: Run, batch: Batches) -> tuple[StepResult, Weights]:
    """One update at ``run.state.iteration``: the schedules' values, the losses, the SGD step and the EMA
    teacher's update."""
    state, stabilise = run.state, run.args.loss.stabilise
    weights = schedules_at(run, state.iteration)
    if state.teacher is not None and state.iteration == stabilise.warmup_iters:
        state.teacher.load_state_dict(state.model.state_dict())  # stabiliser: the teacher starts as the student
    batch = Batches(*(to_device(b, run.device) for b in batch))
    with autocast(run.device, run.amp):
        step = compute_losses(run.model, batch, run.setup, weights)
    state.optimizer.zero_grad(set_to_none=True)
    step.total.backward()
    state.optimizer.step()
    if state.teacher is not None and weights.pseudo > 0:
        ema_update(state.teacher, state.model, stabilise.ema_teacher, state.iteration - stabilise.warmup_iters)
    return step, weights


def schedules_at(run: Run, iteration: int) -> Weights:
    """Set each parameter group's poly learning rate for ``iteration`` and return the loss weights: λ_vl's
    schedule over the whole run (§4.1.2) and the pseudo-label weight (1 but for a warm-up or ramp-up)."""
    args, total = run.args, run.total_iters
    for group in run.state.optimizer.param_groups:
        group["lr"] = losses.poly_lr(group["base_lr"], iteration, total, args.optim.poly_power)
    stabilise = args.loss.stabilise
    return Weights(losses.lambda_vl_at(iteration, total, args.loss.lambda_vl),
                   losses.pseudo_label_weight(iteration, stabilise.warmup_iters, stabilise.rampup_iters))


def log_step(run: Run, step: StepResult, weights: Weights) -> None:
    """Every ``--log-every`` iterations (and the last): a record in ``metrics.jsonl``, the progress line and
    the TensorBoard scalars."""
    args, iteration, total = run.args, run.state.iteration, run.total_iters
    if not run.main or (iteration % args.log_every and iteration != total):
        return
    terms = {k: round(float(v.detach()), 5) for k, v in step.terms._asdict().items()}
    lr = run.state.optimizer.param_groups[0]["lr"]
    record = {"iteration": iteration, "epoch": run.state.epoch, "loss": round(float(step.total.detach()), 5),
              **{f"loss_{k}": v for k, v in terms.items()}, "lr": lr, "lambda_vl": weights.lambda_vl,
              "confident": round(float(step.confident), 4), "tau_no_change": round(float(step.tau[0]), 4),
              "tau_change": round(float(step.tau[1]), 4)}
    append_metrics(args.out_dir / "metrics.jsonl", record)
    rate = (iteration - run.start_iter) / max(time.time() - run.started, 1e-9)
    pairs_per_s = rate * args.batch_size * run.world
    print(f"epoch {run.state.epoch + 1}/{run.epochs} it {iteration}/{total} loss {record['loss']:.4f} "
          f"(s {terms['s']:.3f} u {terms['u']:.3f} c {terms['c']:.3f} vl {terms['vl']:.3f}) "
          f"conf {record['confident']:.0%} lr {lr:.2e} | {pairs_per_s:.1f} pairs/s, "
          f"ETA {hms((total - iteration) / max(rate, 1e-9))}", flush=True)
    run.board.log_step(iteration, record, run.state.optimizer, pairs_per_s=pairs_per_s)


def evaluate_if_due(run: Run) -> None:
    """Every ``--eval-interval`` iterations (and the last), one schedule for all methods: ``validate``."""
    iteration, args = run.state.iteration, run.args
    if iteration % args.eval_interval and iteration != run.total_iters:
        return
    if run.main:
        semi = args.method != "supervised"
        validate(run, selectable=not semi or iteration > args.loss.stabilise.warmup_iters
                 or iteration == run.total_iters)
    barrier(run)
    run.model.train()


def validate(run: Run, selectable: bool = True) -> None:
    """Score the network on the selection split and record it; when ``selectable`` (not during a warm-up),
    keep it as ``best.pt`` if it is the best so far."""
    args, state = run.args, run.state
    result = evaluate_model(state.model, run.val_set, windows=Windows(args.data.crop_size, amp=run.amp),
                            num_workers=min(args.num_workers, 2))
    score = result.scores["iou"]
    append_metrics(args.out_dir / "metrics.jsonl", {"iteration": state.iteration, "epoch": state.epoch,
                                                    f"{args.select_on}": result.scores})
    print(format_scores(f"it {state.iteration} {args.select_on}", result.scores), flush=True)
    run.board.log_evaluation(state.iteration, result.scores, state.model)
    if selectable and score > state.best:
        state.best = score
        best = RunState(state.model, epoch=state.epoch, iteration=state.iteration, best=score)
        save_checkpoint(args.out_dir / "best.pt", best, to_dict(args))


def barrier(run: Run) -> None:
    """Wait for every process (nothing to wait for in a single one)."""
    if run.world > 1:
        dist.barrier()


def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    import tyro

    from diffmatch.cli import run_cli

    run_cli(lambda: train(tyro.cli(TrainArgs, prog="python -m diffmatch.train")))
