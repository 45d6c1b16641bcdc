from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_pair, write_training_set
from PIL import Image

from diffmatch import train as train_module
from diffmatch.board import INSTALL, Board, MapGrid, change_grid, step_scalars
from diffmatch.checkpoint import load_checkpoint
from diffmatch.cli import InputError
from diffmatch.config import DataConfig, LossConfig, ModelConfig, TrainArgs
from diffmatch.data import EvalSet
from diffmatch.evaluate import Report, Windows, evaluate_model
from diffmatch.model import build_model, param_groups

ROOT = Path(__file__).resolve().parents[1]
TERMS = ("loss/total", "loss/s", "loss/u", "loss/c", "loss/vl")
VAL = ("val/iou", "val/f1", "val/precision", "val/recall", "val/accuracy")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs of 40x40 with CEG pseudo labels: train 6 (2 labelled, so 2 iterations an epoch at batch 2),
    val 5 (the grid shows the first 4), test 2."""
    return write_training_set(tmp_path_factory.mktemp("board") / "data", {"train": 6, "val": 5, "test": 2})


def tiny_args(root: Path, out: Path, **overrides: object) -> TrainArgs:
    args = TrainArgs(data=DataConfig(root=root, crop_size=32), label_ratio=1 / 3, epochs=2, batch_size=2,
                     model=ModelConfig(backbone="resnet18", decoder_channels=16), out_dir=out, num_workers=0,
                     log_every=1, eval_interval=2, device="cpu", tensorboard=True, save_every=0)
    return replace(args, **overrides)


def records(out: Path, key: str) -> list[dict]:
    """The ``metrics.jsonl`` records that hold ``key``."""
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def read_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list]]:
    """Scalars (tag -> [(step, value)]) and images and texts (tag -> events) as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    reader.Reload()
    tags = reader.Tags()
    scalars = {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, {tag: reader.Images(tag) for tag in tags["images"]} | {
        tag: reader.Tensors(tag) for tag in tags["tensors"]}


def test_two_iterations_write_every_curve_and_the_change_maps(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_module.train(tiny_args(data_root, out, max_iters=2, loss=LossConfig(tau=0.0)))  # τ = 0: L_u is on
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars, images = read_events(out / "tensorboard")
    jsonl = records(out, "loss")
    for tag in (*TERMS, "lr/encoder", "lr/decoders", "train/lambda_vl", "train/confident", "train/pairs_per_s"):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
    for key in ("s", "u", "c", "vl"):
        assert [v for _, v in scalars[f"loss/{key}"]] == pytest.approx([r[f"loss_{key}"] for r in jsonl], abs=1e-5)
        assert all(v > 0 for _, v in scalars[f"loss/{key}"])  # diffmatch: every term is on
    assert scalars["lr/decoders"][0][1] == pytest.approx(10 * scalars["lr/encoder"][0][1])
    assert scalars["train/lambda_vl"][0][1] == pytest.approx(0.1)
    assert all(v > 0 for _, v in scalars["train/pairs_per_s"])
    val = [r["val"] for r in records(out, "val")]
    for tag in VAL:
        assert scalars[tag] == [(2, pytest.approx(val[0][tag[4:]], abs=1e-4))]
    [grid] = images["val/change_maps"]
    assert grid.step == 2
    # 4 rows of 40 + 3 gaps; 4 columns of 40 + 3 gaps
    assert (grid.height, grid.width) == (4 * 40 + 3 * 4, 4 * 40 + 3 * 4)
    [ids] = images["val/change_map_ids/text_summary"]
    assert ids.step == 0 and b"rows, top to bottom: p06, p07, p08, p09 (" in ids.tensor_proto.string_val[0]


def test_resume_continues_the_event_files_without_repeating_steps(data_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "killed"
    real_losses, calls = train_module.compute_losses, []

    def die_in_iteration_4(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # after step 3 was logged, past the checkpoint of iteration 2
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_losses", die_in_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(tiny_args(data_root, out))
    assert load_checkpoint(out / "last.pt")["iteration"] == 2
    assert [s for s, _ in read_events(out / "tensorboard")[0]["loss/s"]] == [1, 2, 3]
    monkeypatch.setattr(train_module, "compute_losses", real_losses)
    train_module.train(tiny_args(data_root, out, resume=True))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars, images = read_events(out / "tensorboard")
    for tag in (*TERMS, "lr/encoder", "train/confident"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
    for tag in VAL:
        assert [step for step, _ in scalars[tag]] == [2, 4], tag
    assert [e.step for e in images["val/change_maps"]] == [2, 4]
    assert [v for _, v in scalars["loss/s"]] == pytest.approx([r["loss_s"] for r in records(out, "loss")], abs=1e-5)


def test_a_new_run_replaces_the_event_files_of_one_killed_before_its_checkpoint(data_root: Path,
                                                                               tmp_path: Path) -> None:
    stale = tmp_path / "run" / "tensorboard" / "events.out.tfevents.1.host.1.0"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    train_module.train(tiny_args(data_root, tmp_path / "run", max_iters=1, method="supervised"))
    files = list(stale.parent.glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0] != stale


def test_change_grid_rows_are_the_save_vis_pictures_of_the_first_pairs(data_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", decoder_channels=16)).train()
    val = EvalSet(data_root, [f"p{i:02d}" for i in range(6, 11)])
    evaluate_model(model, val, windows=Windows(32, batch_size=1), report=Report(vis_dir=tmp_path / "vis"))
    model.train()
    grid = change_grid(model, [val[i] for i in range(4)], windows=Windows(32))
    assert model.training  # left as it came
    rows = [np.asarray(Image.open(tmp_path / "vis" / f"p{i:02d}.png")) for i in range(6, 10)]
    assert grid.shape == (4 * 40 + 3 * 4, rows[0].shape[1], 3)
    for k, row in enumerate(rows):
        assert np.array_equal(grid[k * 44 : k * 44 + 40], row), k
    assert (grid[40:44] == 128).all()


def test_change_grid_pads_narrow_rows(data_root: Path, tmp_path: Path) -> None:
    write_pair(tmp_path, "wide", size=(24, 48), seed=1)
    write_pair(tmp_path, "small", size=(24, 24), seed=2)
    model = build_model(ModelConfig(backbone="resnet18", decoder_channels=8))
    val = EvalSet(tmp_path, ["small", "wide"])
    grid = change_grid(model, [val[0], val[1]], windows=Windows(32))
    assert grid.shape == (24 + 4 + 24, 4 * 48 + 3 * 4, 3)
    assert (grid[:24, 4 * 24 + 3 * 4 :] == 128).all()


def test_step_scalars_name_every_number_of_the_record() -> None:
    net = build_model(ModelConfig(backbone="resnet18", decoder_channels=8))
    optimizer = torch.optim.SGD(param_groups(net, lr=0.02, decoder_lr_mult=10, weight_decay=0), lr=0.02)
    record = {"iteration": 7, "epoch": 0, "loss": 1.5, "loss_s": 0.5, "loss_u": 0.25, "loss_c": 3.0,
              "loss_vl": 0.7, "lr": 0.02, "lambda_vl": 0.09, "confident": 0.9}
    assert step_scalars(record, optimizer, 12.5) == {
        "loss/total": 1.5, "loss/s": 0.5, "loss/u": 0.25, "loss/c": 3.0, "loss/vl": 0.7,
        "train/lambda_vl": 0.09, "train/confident": 0.9, "lr/encoder": 0.02, "lr/decoders": pytest.approx(0.2),
        "train/pairs_per_s": 12.5}


def test_board_off_or_on_another_rank_writes_nothing(data_root: Path, tmp_path: Path) -> None:
    val = EvalSet(data_root, ["p06"])
    for enabled, write in ((False, True), (True, False)):
        board = Board.open(tmp_path / "tb", MapGrid(val, "val", Windows(32)), enabled=enabled, write=write, start=0)
        board.log_scalars(1, {"loss/s": 1.0})
        board.close()
    assert not (tmp_path / "tb").exists()


def test_without_the_package_the_flag_is_a_one_line_error(data_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.startswith(("tensorboard", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    message = r'^--tensorboard needs the tensorboard package: pip install -e "\.\[tensorboard\]"$'
    with pytest.raises(InputError, match=message):
        Board.open(tmp_path / "tb", MapGrid(EvalSet(data_root, ["p06"]), "val", Windows(32)), enabled=True,
                   write=False, start=0)
    Board.open(tmp_path / "tb", MapGrid(EvalSet(data_root, ["p06"]), "val", Windows(32)), enabled=False, write=True,
               start=0)  # the flag off needs nothing


def test_cli_without_the_package_exits_2_and_nothing_else_imports_it(data_root: Path, tmp_path: Path) -> None:
    hidden = tmp_path / "hide"
    (hidden / "tensorboard").mkdir(parents=True)
    (hidden / "tensorboard" / "__init__.py").write_text("raise ImportError('hidden')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = ["--data.root", str(data_root), "--label-ratio", "0.34", "--data.crop-size", "32", "--batch-size", "2",
            "--model.backbone", "resnet18", "--model.weights", "none", "--model.decoder-channels", "16",
            "--num-workers", "0", "--device",
            "cpu", "--out-dir", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "-m", "diffmatch.train", *argv, "--tensorboard"], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"error: --tensorboard needs the tensorboard package: {INSTALL}\n"
    modules = [p.stem for p in (ROOT / "diffmatch").glob("*.py")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module('diffmatch.' + m)\n"
            "print(sorted(m for m in sys.modules if 'tensorboard' in m))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


def test_two_processes_one_writer(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         "-m", "diffmatch.train", "--data.root", str(data_root), "--label-ratio", "0.34", "--data.crop-size",
         "32", "--batch-size", "1", "--max-iters", "1", "--model.backbone", "resnet18", "--model.weights",
         "none", "--model.decoder-channels", "16", "--num-workers", "0", "--device", "cpu", "--log-every", "1",
         "--out-dir", str(out), "--tensorboard"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars, images = read_events(out / "tensorboard")
    assert [s for s, _ in scalars["loss/total"]] == [1]
    assert scalars["train/pairs_per_s"][0][1] > 0
    assert [e.step for e in images["val/change_maps"]] == [1]

