from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_pair
from torch import nn

from diffmatch.checkpoint import RunState, load_checkpoint, model_from_checkpoint, save_checkpoint
from diffmatch.cli import InputError
from diffmatch.config import DataConfig, ModelConfig, TrainArgs, to_dict
from diffmatch.data import EvalSet
from diffmatch.evaluate import Windows, evaluate_model, visualise, write_per_image_csv
from diffmatch.model import ModelOutput, build_model

ROOT = Path(__file__).resolve().parents[1]


class FixedModel(nn.Module):
    """Predicts 'change' exactly where the pre-event image's red channel is bright."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, *, change_only: bool = False) -> ModelOutput:
        change = (a[:, :1] > 0).float()
        return ModelOutput(change=torch.cat([1 - change, change], dim=1))


def test_metrics_match_a_hand_count(tmp_path: Path) -> None:
    # Pair 1: label = left half, prediction = top half of 8x8 -> TP 16, FP 16, FN 16, TN 16 (4x4 quarters).
    # Pair 2: label empty, prediction = one 2x2 block -> FP 4, TN 60.
    label1 = np.zeros((8, 8), np.uint8)
    label1[:, :4] = 255
    write_pair(tmp_path, "one", size=(8, 8), label=label1)
    write_pair(tmp_path, "two", size=(8, 8), label=np.zeros((8, 8), np.uint8))
    from PIL import Image

    for sample_id, region in (("one", (slice(0, 4), slice(None))), ("two", (slice(2, 4), slice(2, 4)))):
        image = np.zeros((8, 8, 3), np.uint8)
        image[region] = 255
        Image.fromarray(image).save(tmp_path / "A" / f"{sample_id}.png")
    result = evaluate_model(FixedModel(), EvalSet(tmp_path, ["one", "two"]), windows=Windows(8, batch_size=2))
    tp, fp, fn, tn = 16, 20, 16, 76
    s = result.scores
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (tp, fp, fn, tn)
    assert s["iou"] == pytest.approx(100 * tp / (tp + fp + fn))  # 30.19, pooled, not a mean of images
    assert s["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    assert s["precision"] == pytest.approx(100 * 16 / 36) and s["recall"] == pytest.approx(50.0)
    assert s["accuracy"] == pytest.approx(100 * 92 / 128)
    assert result.per_image["two"].fp == 4 and result.per_image["two"].tp == 0
    write_per_image_csv(tmp_path / "per_image.csv", result.per_image)
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert [r["id"] for r in rows] == ["one", "two"] and rows[0]["iou"] == f"{100 / 3:.3f}"
    # Sliding windows over a larger image give the same counts.
    tiled = evaluate_model(FixedModel(), EvalSet(tmp_path, ["one", "two"]), windows=Windows(4, 2, 1))
    assert tiled.scores == s


def test_visualisation_colours() -> None:
    label = torch.tensor([[1, 1], [0, 0]])
    pred = torch.tensor([[1, 0], [1, 0]])
    image = torch.zeros(3, 2, 2)
    picture = visualise(image, image, label, pred)
    assert picture.shape == (2, 4 * 2 + 3 * 4, 3)
    colours = picture[:, -2:]
    assert colours[0, 0].tolist() == [255, 255, 255]  # TP white
    assert colours[0, 1].tolist() == [0, 255, 0]  # FN green
    assert colours[1, 0].tolist() == [255, 0, 0]  # FP red
    assert colours[1, 1].tolist() == [0, 0, 0]


def tiny_checkpoint(path: Path, root: Path, backbone: str = "resnet18") -> None:
    args = TrainArgs(data=DataConfig(root=root, crop_size=16), model=ModelConfig(backbone=backbone,
                                                                                 decoder_channels=8))
    torch.manual_seed(0)
    save_checkpoint(path, RunState(build_model(args.model), epoch=1, iteration=1, best=0.0), to_dict(args))


def test_checkpoint_errors(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path / "ok.pt", tmp_path)
    model, args = model_from_checkpoint(tmp_path / "ok.pt")
    assert args.model.backbone == "resnet18" and not model.training
    state = load_checkpoint(tmp_path / "ok.pt")
    state["config"]["model"]["backbone"] = "resnet34"
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(InputError, match="other.pt: weights do not fit this model"):
        model_from_checkpoint(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:1000])
    with pytest.raises(InputError, match="broken.pt: not a readable checkpoint"):
        model_from_checkpoint(tmp_path / "broken.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="foreign.pt: not a diffmatch checkpoint"):
        model_from_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="missing.pt: checkpoint not found"):
        model_from_checkpoint(tmp_path / "missing.pt")


def test_evaluate_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(3):
        write_pair(data, f"e{i}", size=(24, 24), seed=i)
    tiny_checkpoint(tmp_path / "best.pt", data)
    command = [sys.executable, "-m", "diffmatch.evaluate", "--checkpoint", str(tmp_path / "best.pt"),
               "--data.root", str(data), "--save-vis", str(tmp_path / "vis"), "--per-image-csv",
               str(tmp_path / "per.csv"), "--device", "cpu", "--num-workers", "0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "test (3 pairs): IoU^c" in result.stdout
    metrics = json.loads((tmp_path / "eval_test.json").read_text())
    assert metrics["pairs"] == 3 and metrics["tp"] + metrics["fp"] + metrics["fn"] + metrics["tn"] == 3 * 24 * 24
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["e0.png", "e1.png", "e2.png"]
    bad = subprocess.run([*command[:3], "--checkpoint", str(tmp_path / "nope.pt"), *command[5:]], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "nope.pt: checkpoint not found" in bad.stderr
