from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import write_pair, write_training_set
from torch import nn

from diffmatch import losses
from diffmatch import train as train_module
from diffmatch.checkpoint import RunState, load_checkpoint
from diffmatch.cli import InputError
from diffmatch.config import DataConfig, LossConfig, ModelConfig, Stabilisers, TrainArgs, to_dict
from diffmatch.data import LabeledSample, UnlabeledSample
from diffmatch.model import build_model
from diffmatch.run import check_same_run, iterations_per_epoch, make_loaders
from diffmatch.step import (
    Batches,
    LearningStatus,
    StepSetup,
    Weights,
    compute_losses,
    ema_update,
    uses_every_parameter,
)
from diffmatch.subsets import semi_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 pairs of 40x40 with CEG pseudo labels: train 10 (2 labelled at 20 %), val 2, test 2."""
    return write_training_set(tmp_path_factory.mktemp("train") / "data", {"train": 10, "val": 2, "test": 2})


def tiny_args(root: Path, out: Path, **overrides: object) -> TrainArgs:
    args = TrainArgs(data=DataConfig(root=root, crop_size=32), label_ratio=0.2, epochs=2, batch_size=2,
                     model=ModelConfig(backbone="resnet18", decoder_channels=16), out_dir=out, num_workers=0,
                     log_every=1, device="cpu", max_iters=None, save_every=0)
    return replace(args, **overrides)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "diffmatch"])
def test_each_method_trains_and_writes_its_files(data_root: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    scores = train_module.train(tiny_args(data_root, out, method=method, epochs=4, max_iters=3))
    assert {p.name for p in out.iterdir()} >= {"config.json", "labeled.txt", "unlabeled.txt", "metrics.jsonl",
                                               "last.pt", "best.pt", "test.json"}
    assert len((out / "labeled.txt").read_text().split()) == 2
    steps = [r for r in records(out) if "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert any("val" in r for r in records(out))
    assert 0 <= scores["iou"] <= 100
    if method == "diffmatch":
        assert all(r["loss_c"] > 0 and r["loss_vl"] > 0 for r in steps)
        assert steps[0]["lambda_vl"] == pytest.approx(0.1) and steps[-1]["lambda_vl"] < 0.1
    else:
        assert all(r["loss_c"] == 0 and r["loss_vl"] == 0 for r in steps)
    if method == "supervised":
        assert all(r["loss_u"] == 0 for r in steps)


@pytest.mark.parametrize(
    ("loss", "zero"),
    [(LossConfig(tau=0.0, contrastive=False), {"loss_c"}),
     (LossConfig(tau=0.0, vl_guidance=False, seg_guidance=False), {"loss_vl"})],
)
def test_ablation_switches_remove_their_terms(data_root: Path, tmp_path: Path, loss: LossConfig,
                                              zero: set[str]) -> None:
    out = tmp_path / "run"
    train_module.train(tiny_args(data_root, out, loss=loss, max_iters=2))
    for record in (r for r in records(out) if "loss" in r):
        for key in ("loss_s", "loss_u", "loss_c", "loss_vl"):
            assert (record[key] == 0) == (key in zero), (key, record)


def test_every_method_evaluates_on_the_same_iteration_schedule(data_root: Path, tmp_path: Path) -> None:
    for method in ("supervised", "diffmatch"):  # epochs of 2 and 4 iterations
        out = tmp_path / method
        train_module.train(tiny_args(data_root, out, method=method, epochs=10, max_iters=5, eval_interval=2))
        assert [r["iteration"] for r in records(out) if "val" in r] == [2, 4, 5], method
        test = json.loads((out / "test.json").read_text())
        assert test["last"].keys() >= {"iou", "f1", "precision", "recall", "accuracy"}
        assert test.keys() >= {"iou", "f1", "checkpoint", "pairs"}


@pytest.mark.parametrize(("method", "world", "batch_size"),
                         [("supervised", 1, 2), ("fixmatch", 1, 3), ("diffmatch", 2, 2), ("diffmatch", 3, 1)])
def test_iterations_per_epoch_is_the_length_of_the_labelled_loader(data_root: Path, tmp_path: Path, method: str,
                                                                   world: int, batch_size: int) -> None:
    args = tiny_args(data_root, tmp_path, method=method, batch_size=batch_size, label_ratio=0.3)
    split = semi_split(args.data, args.label_ratio, args.seed)  # 3 labelled, 7 unlabelled pairs
    for rank in range(world):
        loaders = make_loaders(args, split, rank, world)
        assert len(loaders.x) == len(list(loaders.x.sampler)) // batch_size
        assert len(loaders.x) == iterations_per_epoch(method, split, batch_size, world), rank


def test_warmup_holds_back_only_the_pseudo_label_terms(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    loss = LossConfig(tau=0.0, stabilise=Stabilisers(warmup_iters=2))
    train_module.train(tiny_args(data_root, out, max_iters=4, eval_interval=1, loss=loss))
    steps = [r for r in records(out) if "loss" in r]
    for r in steps[:2]:  # L_s, the labelled half of L_c and the CEG guidance train; L_u waits
        assert r["loss_s"] > 0 and r["loss_c"] > 0 and r["loss_vl"] > 0 and r["loss_u"] == 0, r
        expected = r["loss_s"] / 2 + loss.lambda_c * r["loss_c"] + r["lambda_vl"] * r["loss_vl"]  # Eq. 1, 15
        assert r["loss"] == pytest.approx(expected, abs=1e-4), r
    for r in steps[2:]:
        assert r["loss_u"] > 0 and r["loss_c"] > 0 and r["loss_vl"] > 0, r
    assert [r["lambda_vl"] for r in steps] == pytest.approx([0.1 * (1 - i / 4) for i in range(4)])  # the whole run
    assert load_checkpoint(out / "best.pt")["iteration"] > 2  # best.pt is picked after the warm-up only


def test_warmup_step_has_the_labelled_half_of_the_contrastive_term_alone() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", decoder_channels=8))
    x, u, u2 = random_batches()
    cfg = LossConfig(tau=0.0)
    held = compute_losses(model, Batches(x, u, u2), StepSetup("diffmatch", cfg), Weights(0.1, pseudo=0.0))
    out = model(torch.cat([x.a, u.a]), torch.cat([x.b, u.b]), change_only=False)
    labelled = losses.contrastive_balanced(out.distance[:2], x.label, cfg.margin)
    held_terms = held.terms._replace(**{k: v.detach() for k, v in held.terms._asdict().items()})
    labelled = labelled.detach()
    assert float(held_terms.u) == 0.0 and float(held.confident) == 0.0
    assert float(held_terms.c) == pytest.approx(float(labelled) / 2, rel=1e-5)
    assert float(held_terms.vl) > 0
    full = compute_losses(model, Batches(x, u, u2), StepSetup("diffmatch", cfg), Weights(0.1, pseudo=1.0)).terms
    assert float(full.u.detach()) > 0 and float(full.c.detach()) > float(held_terms.c)


def test_rampup_weighs_the_pseudo_label_terms_from_the_end_of_the_warmup(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    loss = LossConfig(tau=0.0, lambda_vl=0.0, contrastive=False,
                      stabilise=Stabilisers(warmup_iters=1, rampup_iters=2))
    train_module.train(tiny_args(data_root, out, max_iters=4, log_every=1, loss=loss))
    steps = [r for r in records(out) if "loss" in r]
    for r, weight in zip(steps[1:], (math.exp(-5), math.exp(-5 / 4), 1.0), strict=True):
        expected = (r["loss_s"] + weight * r["loss_u"]) / 2
        assert r["loss"] == pytest.approx(expected, abs=1e-4), r


def test_ema_teacher_starts_as_the_student_when_pseudo_labels_start(data_root: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    calls = []
    real = train_module.compute_losses

    def spy(model: nn.Module, batch: Batches, setup: StepSetup, weights: Weights) -> object:
        same = all(torch.equal(t, s) for t, s in zip(setup.teacher.state_dict().values(),
                                                      model.state_dict().values(), strict=True))
        calls.append((weights.pseudo, same))
        return real(model, batch, setup, weights)

    monkeypatch.setattr(train_module, "compute_losses", spy)
    loss = LossConfig(stabilise=Stabilisers(ema_teacher=0.9, warmup_iters=2))
    train_module.train(tiny_args(data_root, tmp_path / "run", method="fixmatch", max_iters=5, loss=loss))
    assert [w for w, _ in calls] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert calls[2][1] is True  # a copy of the student at its start, not an average of the warm-up's iterates
    assert calls[3][1] is True  # d = min(0.9, 1 - 1 / 1) = 0 at its first update
    assert calls[4][1] is False  # then it trails the student (d = 0.5)


def test_learning_status_is_kept_per_sample_over_the_set() -> None:
    status = LearningStatus(4)
    conf = torch.tensor([[[0.99, 0.99, 0.99, 0.60]], [[0.99, 0.99, 0.70, 0.99]]])
    label = torch.tensor([[[0, 0, 0, 1]], [[0, 0, 1, 1]]])
    valid = torch.ones_like(label, dtype=torch.bool)
    status.update(torch.tensor([0, 2]), conf, label, valid, 0.95)
    # predicted (0, 1): 3 + 2 and 1 + 2 pixels; confident: 3 + 2 and 0 + 1; half the set unseen
    torch.testing.assert_close(status.thresholds(0.95),
                               losses.flexmatch_thresholds(torch.tensor([5, 1]), torch.tensor([5, 3]), 0.5, 0.95))
    status.update(torch.tensor([0]), torch.full((1, 1, 4), 0.99), torch.zeros(1, 1, 4, dtype=torch.long),
                  valid[:1], 0.95)  # sample 0 seen again: its latest prediction replaces the first
    assert status.counts[0].tolist() == [[4, 0], [4, 0]]
    restored = LearningStatus(4)
    restored.load_state_dict(status.state_dict())
    torch.testing.assert_close(restored.thresholds(0.95), status.thresholds(0.95))


def test_ema_teacher_is_checkpointed_and_resumes(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    # the learning status resumes too
    loss = LossConfig(tau=0.6, stabilise=Stabilisers(ema_teacher=0.9, class_thresholds=True))
    straight = tmp_path / "straight"
    train_module.train(tiny_args(data_root, straight, method="fixmatch", loss=loss))
    state = load_checkpoint(straight / "last.pt")
    assert state["teacher"].keys() == state["model"].keys()
    assert any(not torch.equal(state["teacher"][k], v) for k, v in state["model"].items() if v.is_floating_point())
    killed = tmp_path / "killed"
    real_save = train_module.save_checkpoint

    def save_then_die(path: Path, *args: object) -> None:
        real_save(path, *args)
        if path.name == "last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(tiny_args(data_root, killed, method="fixmatch", loss=loss))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train_module.train(tiny_args(data_root, killed, method="fixmatch", loss=loss, resume=True))
    resumed = load_checkpoint(killed / "last.pt")
    for key, value in state["teacher"].items():
        assert torch.equal(value, resumed["teacher"][key]), key
    assert torch.equal(state["learning_status"]["counts"], resumed["learning_status"]["counts"])
    assert bool(resumed["learning_status"]["seen"].all())  # 8 unlabelled pairs, each seen in 2 epochs


def test_resumed_run_ends_with_the_same_weights(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    straight = tmp_path / "straight"
    train_module.train(tiny_args(data_root, straight))
    killed = tmp_path / "killed"
    real_save = train_module.save_checkpoint

    def save_then_die(path: Path, *args: object) -> None:
        real_save(path, *args)
        if path.name == "last.pt":
            raise KeyboardInterrupt  # killed right after epoch 1 was saved

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(tiny_args(data_root, killed))
    assert load_checkpoint(killed / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train_module.train(tiny_args(data_root, killed, resume=True))
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["iteration"] == b["iteration"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    steps = lambda out: [r["iteration"] for r in records(out) if "loss" in r]  # noqa: E731
    assert steps(killed) == steps(straight) == list(range(1, 9))


def test_run_folder_guards(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothing to resume"):
        train_module.train(tiny_args(data_root, tmp_path / "new", resume=True))
    train_module.train(tiny_args(data_root, tmp_path / "old", method="supervised", max_iters=1))
    with pytest.raises(InputError, match="holds a run already; pass --resume"):
        train_module.train(tiny_args(data_root, tmp_path / "old", method="supervised", max_iters=1))


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_bad_flags_and_missing_pseudo_labels_exit_2(data_root: Path, tmp_path: Path) -> None:
    result = run_cli("diffmatch.train", "--data.root", str(data_root), "--label-ratio", "1.5")
    assert result.returncode == 2 and "--label-ratio 1.5: must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("diffmatch.train", "--data.root", str(data_root), "--method", "mean-teacher")
    assert result.returncode == 2
    bare = tmp_path / "bare"
    for i in range(4):
        write_pair(bare, f"q{i}", seed=i)
    result = run_cli("diffmatch.train", "--data.root", str(bare), "--label-ratio", "0.5", "--batch-size", "1",
                     "--out-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert f"{bare / 'pseudo'}: folder not found; run `python -m diffmatch.ceg --root" in result.stderr
    assert "error: data check: 1 problem in 4 of 4 pairs" in result.stderr


def test_two_process_gloo_run(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "diffmatch.train", "--data.root", str(data_root), "--label-ratio", "0.2", "--data.crop-size",
         "32", "--batch-size", "2", "--epochs", "1", "--model.backbone", "resnet18", "--model.weights", "none",
         "--model.decoder-channels",
         "16", "--num-workers", "0", "--device", "cpu", "--log-every", "1", "--out-dir", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x2" in result.stdout and result.stdout.count("test of best.pt") == 1  # rank 0 alone logs
    assert [r["iteration"] for r in records(out) if "loss" in r] == [1, 2]  # 8 unlabelled / (2 x 2)
    assert (out / "best.pt").exists()


def random_batches(n: int = 2, size: int = 32) -> tuple[LabeledSample, UnlabeledSample, UnlabeledSample]:
    g = torch.Generator().manual_seed(0)

    def image() -> torch.Tensor:
        return torch.randn(n, 3, size, size, generator=g)

    def mask() -> torch.Tensor:
        return torch.randint(0, 2, (n, size, size), generator=g)

    x = LabeledSample(image(), image(), mask(), mask(), mask(), mask())
    u, u2 = (UnlabeledSample(image(), image(), image(), image(), torch.zeros(n, size, size, dtype=torch.long),
                             mask(), mask(), mask(), mask(), torch.arange(n)) for _ in range(2))
    return x, u, u2


@pytest.mark.parametrize(
    ("method", "loss", "dual_head"),
    [("diffmatch", LossConfig(), True), ("diffmatch", LossConfig(vl_guidance=False), True),
     ("diffmatch", LossConfig(seg_guidance=False), True), ("diffmatch", LossConfig(vl_guidance=False), False),
     ("diffmatch", LossConfig(contrastive=False), True), ("fixmatch", LossConfig(), True)],
)
def test_ddp_knows_which_parameters_the_losses_reach(tmp_path: Path, method: str, loss: LossConfig,
                                                     dual_head: bool) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", decoder_channels=8, dual_head=dual_head))
    x, u, u2 = random_batches()
    out = compute_losses(model, Batches(x, u, u2), StepSetup(method, replace(loss, tau=0.0)), Weights(0.1))
    out.total.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert (not unused) == uses_every_parameter(method, loss, dual_head), unused
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=not uses_every_parameter(method, loss, dual_head))
        for _ in range(2):  # a wrong flag fails on the second step
            compute_losses(ddp, Batches(x, u, u2), StepSetup(method, loss), Weights(0.1)).total.backward()
    finally:
        dist.destroy_process_group()


def test_resume_refuses_other_settings(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_module.train(tiny_args(data_root, out, method="supervised", max_iters=1))
    with pytest.raises(InputError, match=r"last.pt: trained with other --batch-size, --seed"):
        train_module.train(tiny_args(data_root, out, method="supervised", max_iters=1, batch_size=1, seed=3,
                                     resume=True))


def test_ema_update_follows_mean_teachers_rule() -> None:
    student, teacher = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    nn.init.constant_(student.weight, 1.0)
    nn.init.constant_(teacher.weight, 0.0)
    student.running_mean.fill_(3.0)
    ema_update(teacher, student, 0.9, iteration=100)  # d = min(0.9, 1 - 1/101) = 0.9
    torch.testing.assert_close(teacher.weight.detach(), torch.full((2,), 0.1))
    assert torch.equal(teacher.running_mean, student.running_mean)  # buffers are copied
    ema_update(teacher, student, 0.9, iteration=0)  # d = 0 at the first step: the student itself
    torch.testing.assert_close(teacher.weight.detach(), torch.ones(2))


def test_teacher_gives_the_pseudo_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", decoder_channels=8))
    teacher = build_model(ModelConfig(backbone="resnet18", decoder_channels=8)).eval()
    with torch.no_grad():  # a teacher sure of "change" everywhere
        teacher.diff_decoder.w_cr.bias.copy_(torch.tensor([-50.0, 50.0]))
    seen: list[torch.Size] = []
    teacher.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    x, u, u2 = random_batches()
    result = compute_losses(model, Batches(x, u, u2),
                            StepSetup("diffmatch", LossConfig(), teacher=teacher), Weights(0.1))
    assert seen == [u2.a.shape, u.a.shape] and not teacher.training
    assert float(result.confident) == 1.0  # every valid pixel above τ: the teacher's labels, not the student's
    assert float(compute_losses(model, Batches(x, u, u2),
                                StepSetup("diffmatch", LossConfig()), Weights(0.1)).confident) < 1.0


def test_resume_accepts_a_run_saved_before_a_setting_existed(tmp_path: Path) -> None:
    args = tiny_args(tmp_path, tmp_path / "run")
    saved = to_dict(args)
    del saved["data"]["label_threshold"]  # a checkpoint written before --data.label-threshold
    check_same_run(saved, args, tmp_path / "last.pt")
    with pytest.raises(InputError, match="trained with other --data;"):
        check_same_run(saved, replace(args, data=replace(args.data, label_threshold=128)),
                                    tmp_path / "last.pt")


def test_weak_bn_stats_leave_the_strong_view_out_of_the_running_statistics() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", decoder_channels=8))
    weak_only = copy.deepcopy(model)
    x, u, u2 = random_batches()
    compute_losses(model, Batches(x, u, u2),
                   StepSetup("fixmatch", LossConfig(stabilise=Stabilisers(weak_bn_stats=True))), Weights(0.1))
    with torch.no_grad():  # the one forward pass that should have moved the statistics: x and u-weak
        weak_only(torch.cat([x.a, u.a]), torch.cat([x.b, u.b]), change_only=True)
    bn = [(n, b) for n, b in model.named_buffers() if "running" in n]
    for name, value in bn:
        torch.testing.assert_close(value, dict(weak_only.named_buffers())[name], msg=name)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # restored
    compute_losses(model, Batches(x, u, u2),
                   StepSetup("fixmatch", LossConfig()), Weights(0.1))  # the paper's step: the strong view counts too
    weak_only(torch.cat([x.a, u.a]), torch.cat([x.b, u.b]), change_only=True)
    assert any(not torch.allclose(v, dict(weak_only.named_buffers())[n]) for n, v in bn)


@pytest.mark.parametrize(("save_every", "saves"), [(0.0, 2), (3600.0, 1)])
def test_last_checkpoint_is_saved_at_most_every_save_every_seconds(data_root: Path, tmp_path: Path, monkeypatch,
                                                                   save_every: float, saves: int) -> None:
    saved: list[int] = []
    real_save = train_module.save_checkpoint

    def counting_save(path: Path, state: RunState, config: dict) -> None:
        if path.name == "last.pt":
            saved.append(state.epoch)
        real_save(path, state, config)

    monkeypatch.setattr(train_module, "save_checkpoint", counting_save)
    train_module.train(tiny_args(data_root, tmp_path / "run", save_every=save_every))
    assert saved == [1, 2][-saves:]  # two epochs: each saved, or only the last
