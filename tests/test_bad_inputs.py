"""Every command on bad input: one line on stderr naming the culprit and the fix, exit code 2, and nothing
written or changed; inputs that can be handled (float images) are handled."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro
from conftest import write_pair, write_training_set
from PIL import Image

from diffmatch import evaluate, predict, prepare, pseudo, train
from diffmatch.cli import run_cli
from diffmatch.config import DataConfig, ModelConfig, TrainArgs
from diffmatch.images import read_rgb
from diffmatch.lab import bench, demo, pretrain, synthetic

COMMANDS: dict[str, tuple[object, Callable]] = {
    "train": (TrainArgs, train.train), "evaluate": (evaluate.Args, evaluate.main),
    "predict": (predict.Args, predict.main), "prepare": (prepare.Args, prepare.main), "ceg": (pseudo.Args, pseudo.main),
    "bench": (bench.Args, bench.main), "demo": (demo.Args, demo.main), "synthetic": (synthetic.Args, synthetic.main),
    "pretrain": (pretrain.Args, pretrain.pretrain),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data set root with CEG labels, a raw folder of pairs, a text file and an empty file."""
    top = tmp_path_factory.mktemp("bad")
    write_training_set(top / "data", {"train": 4, "val": 1, "test": 1})
    for i in range(3):
        write_pair(top / "raw", f"scene{i}", size=(64, 64), seed=i)
    (top / "notes.pt").write_text("not a checkpoint\n")
    (top / "empty.pt").touch()
    (top / "noval").mkdir()
    for i in range(2):
        write_pair(top / "noval", f"q{i}", size=(40, 40), seed=i)
    (top / "noval" / "list").mkdir()
    (top / "noval" / "list" / "train.txt").write_text("q0\nq1\n")
    train.train(TrainArgs(data=DataConfig(root=top / "data", crop_size=32), method="supervised", max_iters=1,
                          batch_size=1, label_ratio=0.5, model=ModelConfig(backbone="resnet18", weights="none",
                                                                           decoder_channels=8),
                          out_dir=top / "run0", num_workers=0, device="cpu", check_data=False))
    return top


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# command, arguments ({w} is the fixture folder), a word the message must hold
CASES = [
    ("predict", "--checkpoint {w}/notes.pt --a {w}/raw/A/scene0.png --b {w}/raw/B/scene0.png --out {w}/o.png",
     "notes.pt: not a readable checkpoint"),
    ("predict", "--checkpoint {w}/empty.pt --a {w}/raw/A/scene0.png --b {w}/raw/B/scene0.png --out {w}/o.png",
     "empty.pt: empty file"),
    ("evaluate", "--checkpoint {w}/notes.pt --data.root {w}/data", "notes.pt: not a readable checkpoint"),
    ("evaluate", "--checkpoint {w}/empty.pt --data.root {w}/data", "empty.pt: empty file"),
    ("evaluate", "--checkpoint {w}/missing.pt --data.root {w}/data", "missing.pt: checkpoint not found"),
    ("train", "--data.root {w}/data --model.weights {w}/notes.pt --out-dir {w}/run --batch-size 1 --num-workers 0",
     "notes.pt: not a readable weights file"),
    ("train", "--data.root {w}/data --model.weights {w}/empty.pt --out-dir {w}/run --batch-size 1 --num-workers 0",
     "empty.pt: empty file"),
    ("train", "--data.root {w}/missing --out-dir {w}/run", "missing: data set root not found"),
    ("train", "--data.root {w}/data --label-ratio 0 --out-dir {w}/run", "--label-ratio 0"),
    ("train", "--data.root {w}/data --batch-size 0 --out-dir {w}/run", "--batch-size 0"),
    ("train", "--data.root {w}/noval --out-dir {w}/run --label-ratio 1 --method supervised", "--holdout"),
    ("predict", "--checkpoint {w}/run0/best.pt --a {w}/raw/A/scene0.png --b {w}/raw/B/scene0.png "
     "--out {w}/raw/A/scene0.png", "would overwrite the input image"),
    ("predict", "--checkpoint {w}/run0/best.pt --src {w}/raw --out {w}/raw/B", "would overwrite the input image"),
    ("prepare", "folder --src {w}/raw --out {w}/tiles --tile 0", "--tile 0"),
    ("prepare", "folder --src {w}/raw --out {w}/tiles --tile -5", "--tile -5"),
    ("prepare", "folder --src {w}/raw --out {w}/raw", "inside --src"),
    ("prepare", "folder --src {w}/raw --out {w}/raw/tiles", "inside --src"),
    ("prepare", "folder --src {w}/raw --out {w}/tiles --holdout val=2", "--holdout val=2"),
    ("prepare", "folder --src {w}/raw --out {w}/tiles --holdout val=0.5,test=0.4", "leave none for training"),
    ("prepare", "folder --src {w}/missing --out {w}/tiles", "missing: folder not found"),
    ("ceg", "--root {w}/raw", "python -m diffmatch.vlm_run"),
    ("bench", "--jobs 0", "--jobs 0"),
    ("demo", "--regime.pairs 1", "--regime.pairs 1"),
    ("demo", "--jobs 0", "--jobs 0"),
    ("evaluate", "--checkpoint {w}/notes.pt --data.root {w}/data --batch-size 0", "--batch-size 0"),
    ("predict", "--checkpoint {w}/notes.pt --a {w}/raw/A/scene0.png --b {w}/raw/B/scene0.png --out {w}/o.png "
     "--batch-size 0", "--batch-size 0"),
    ("synthetic", "--out {w}/syn --num-pairs 0", "num_pairs=0"),
    ("pretrain", "--out {w}/enc.pt --crop 500 --size 96", "--crop 500"),
]


@pytest.mark.parametrize(("command", "argv", "culprit"), CASES, ids=[f"{c[0]} {c[2]}" for c in CASES])
def test_bad_input_stops_with_one_line_and_exit_code_2(world: Path, command: str, argv: str, culprit: str,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world)  # a command's default output (bench.json, runs/) would land here
    args_type, main = COMMANDS[command]
    before = snapshot(world)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main(tyro.cli(args_type, args=argv.format(w=world).split())))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(("note:", "warning:", "check data:"))]
    assert stop.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], err
    assert snapshot(world) == before  # nothing written, nothing changed


def test_float_images_are_scaled_with_a_notice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reflectance = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)  # a 0-1 product, one band
    Image.fromarray(reflectance, mode="F").save(tmp_path / "refl.tif")
    rgb = read_rgb(tmp_path / "refl.tif")
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 8, 3)
    assert int(rgb.max()) == 255 and int(rgb.min()) == 0 and len(np.unique(rgb[..., 0])) > 32  # not black
    radiance = reflectance * 4000.0  # any other range: scaled by its maximum
    radiance[0, 0] = np.nan
    Image.fromarray(radiance, mode="F").save(tmp_path / "rad.tif")
    assert int(read_rgb(tmp_path / "rad.tif").max()) == 255 and int(read_rgb(tmp_path / "rad.tif")[0, 0, 0]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 3 and "refl.tif" in notes[0] and "scaled to 0-255" in notes[0]


def test_torch_save_of_something_else_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: evaluate.main(tyro.cli(evaluate.Args, args=["--checkpoint", str(tmp_path / "other.pt"),
                                                                    "--data.root", str(tmp_path)])))
    assert stop.value.code == 2
