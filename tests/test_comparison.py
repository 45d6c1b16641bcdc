"""The methods comparison: the encoder stand-in, the summary over seeds and the bench command that runs it."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmatch.encoder import SiameseEncoder
from diffmatch.lab import comparison, pretrain
from diffmatch.lab.comparison import Launch, Regime, format_summary, run_args, summarise

ROOT = Path(__file__).resolve().parents[1]


def test_pretrained_encoder_loads_as_model_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "enc.pt"
    result = pretrain.pretrain(pretrain.Args(out=out, scenes=2, size=48, crop=32, iters=2, batch_size=2))
    assert np.isfinite(result["loss"]) and 0 <= result["pixel_accuracy"] <= 100
    state = torch.load(out, weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith(("fc.", "decoder.")) for k in state)
    capsys.readouterr()
    encoder = SiameseEncoder(backbone="resnet18", weights=str(out))
    assert "warning" not in capsys.readouterr().out  # every key matches
    torch.manual_seed(0)
    fresh = SiameseEncoder(backbone="resnet18")
    assert torch.equal(encoder.conv1.weight, state["conv1.weight"])
    assert not torch.equal(encoder.conv1.weight, fresh.conv1.weight)


def test_pretraining_scenes_cover_seven_classes_and_are_normalised() -> None:
    images, covers = pretrain.draw_scenes(3, 48)
    assert images.shape == (6, 3, 48, 48) and covers.shape == (6, 48, 48)
    assert int(covers.min()) >= 0 and int(covers.max()) < pretrain.NUM_COVER
    assert abs(float(images.mean())) < 3 and images.dtype == torch.float32
    x, y = pretrain.random_batch(images, covers, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 32, 32)


def test_summary_over_seeds_by_hand() -> None:
    runs = {"0": {"best": {"iou": 10.0, "f1": 20.0}, "last": {"iou": 8.0, "f1": 16.0}},
            "1": {"best": {"iou": 14.0, "f1": 24.0}, "last": {"iou": 8.0, "f1": 16.0}}}
    s = summarise(runs)
    assert s["best"]["iou"] == {"mean": 12.0, "std": pytest.approx(2**0.5 * 2), "n": 2}  # sample std of 10, 14
    assert s["last"]["iou"]["std"] == 0.0
    one = summarise({"3": runs["0"]})
    assert one["best"]["f1"] == {"mean": 20.0, "std": 0.0, "n": 1}
    assert "teacher" not in s
    lines = format_summary({"supervised": one, "diffmatch": s}).splitlines()
    assert lines[0].startswith("supervised  IoU^c  10.0 ±  0.0   F1^c  20.0 ±  0.0")
    assert lines[1].startswith("diffmatch   IoU^c  12.0 ±  2.8") and lines[1].endswith("2 seeds)")


def test_paired_differences_by_hand() -> None:
    def run(iou: float, last: float) -> dict:
        return {"best": {"iou": iou, "f1": 0.0}, "last": {"iou": last, "f1": 0.0}}

    sup = {"0": run(40, 40), "1": run(50, 44), "2": run(45, 45)}
    fix = {"0": run(42, 41), "1": run(53, 44), "2": run(46, 48), "7": run(99, 99)}  # seed 7 has no pair
    d = comparison.paired_difference(fix, sup)
    assert d["per_seed"] == {"0": 2, "1": 3, "2": 1} and d["n"] == 3 and d["mean"] == pytest.approx(2.0)
    half = 4.302653 * 1.0 / 3**0.5  # t(0.975, 2) * sample std of (2, 3, 1) / sqrt(3)
    assert (d["low"], d["high"]) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, abs=1e-5))
    pairs = comparison.paired_differences({"supervised": sup, "fixmatch": fix})
    assert list(pairs) == ["fixmatch-supervised"]
    assert pairs["fixmatch-supervised"]["last"]["mean"] == pytest.approx(4 / 3)
    lone = comparison.paired_difference({"0": run(1, 1)}, {"0": run(0, 0)})
    assert lone["low"] is None and lone["high"] is None
    line = format_summary({}, pairs).splitlines()[0]
    assert line.startswith("fixmatch-supervised  IoU^c  +2.0, 95 % CI [-0.5, +4.5]")
    assert line.endswith("3 paired seeds)")


def test_bench_methods_prints_one_line_per_method(tmp_path: Path) -> None:
    out = tmp_path / "methods.json"
    result = subprocess.run(
        [sys.executable, "-m", "diffmatch.bench", "--parts", "methods", "--seeds", "0", "1", "--device", "cpu",
         "--regime.pairs", "20", "--regime.size", "48", "--regime.crop", "32", "--regime.iters", "2",
         "--regime.eval-interval", "1", "--regime.batch-size", "2", "--regime.label-ratio", "0.2",
         "--regime.pretrain-iters", "1", "--regime.pretrain-scenes", "2", "--regime.loss.stabilise.warmup-iters", "1",
         "--regime.decoder-channels", "16", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["supervised", "fixmatch", "diffmatch", "fixmatch-supervised",
                                                   "diffmatch-fixmatch", "diffmatch-supervised"]
    report = json.loads(out.read_text())["results"]["methods"]
    assert set(report["runs"]["diffmatch"]) == {"0", "1"}
    assert report["summary"]["fixmatch"]["best"]["iou"]["n"] == 2
    assert report["pairs"]["diffmatch-supervised"]["best"]["n"] == 2
    assert "teacher" in report["runs"]["fixmatch"]["0"]  # the regime's EMA teacher, tested at the end
    for method in ("supervised", "fixmatch", "diffmatch"):
        config = json.loads((tmp_path / "runs" / f"{method}-seed1" / "config.json").read_text())
        assert config["max_iters"] == 2 and config["eval_interval"] == 1 and config["seed"] == 1
        assert config["model"]["weights"].endswith("encoder-resnet18-2x1-no-buildings.pt")


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "diffmatch"])
def test_every_method_gets_the_regime_s_iterations(tmp_path: Path, method: str) -> None:
    (tmp_path / "data" / "list").mkdir(parents=True)
    (tmp_path / "data" / "list" / "train.txt").write_text("".join(f"p{i}\n" for i in range(1000)))
    regime = Regime(iters=400, batch_size=8, label_ratio=0.05)
    args = run_args(Launch(tmp_path / "data", tmp_path / "runs"), method, 3, regime, "none")
    per_epoch = 50 // 8 if method == "supervised" else 950 // 8  # 50 labelled, 950 unlabelled pairs
    assert args.max_iters == 400 and args.epochs == -(-400 // per_epoch)  # enough epochs; max_iters stops it
    assert args.out_dir == tmp_path / "runs" / f"{method}-seed3" and args.seed == 3
    assert args.data.root == tmp_path / "data"


def test_regime_and_launch_settings_reach_the_run(tmp_path: Path) -> None:
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "train.txt").write_text("".join(f"p{i}\n" for i in range(100)))
    regime = Regime(dual_head=False, loss=replace(Regime().loss, contrastive=False))
    launch = Launch(tmp_path, tmp_path / "runs", device="cpu", workers=2)
    args = run_args(launch, "diffmatch", 0, regime, "enc.pt")
    assert args.model.dual_head is False and args.loss.contrastive is False
    assert (args.device, args.num_workers, args.model.weights) == ("cpu", 2, "enc.pt")
    assert run_args(launch, "diffmatch", 0, Regime(), "none").model.dual_head is True


def test_runs_in_spawned_processes_give_their_loaders_the_platform_start_method(
        monkeypatch: pytest.MonkeyPatch) -> None:
    default = multiprocessing.get_start_method()
    monkeypatch.setattr(comparison, "run_method", lambda args: {"start": multiprocessing.get_start_method()})
    threads = torch.get_num_threads()
    multiprocessing.set_start_method("spawn", force=True)  # as in a process of compare(..., jobs=2)
    try:
        assert comparison._run_in_process(None, threads) == {"start": default}
    finally:
        multiprocessing.set_start_method(default, force=True)
        torch.set_num_threads(threads)


def test_data_seed_draws_another_synthetic_set(tmp_path: Path) -> None:
    def labels(root: Path, data_seed: int) -> list[bytes]:
        comparison.prepare_data(root, Regime(pairs=6, size=32, data_seed=data_seed))
        assert len(list((root / "pseudo").iterdir())) > 0  # CEG labels for the training split
        return [p.read_bytes() for p in sorted((root / "label").iterdir())]

    first = labels(tmp_path / "a", 0)
    assert labels(tmp_path / "b", 0) == first
    assert labels(tmp_path / "c", 1) != first
