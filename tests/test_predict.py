from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import geotiff_tags, write_geotiff
from PIL import Image

from diffmatch.augment import image_to_tensor
from diffmatch.checkpoint import RunState, model_from_checkpoint, save_checkpoint
from diffmatch.cli import InputError
from diffmatch.config import DataConfig, ModelConfig, TrainArgs, to_dict
from diffmatch.geotiff import geo_tags
from diffmatch.predict import Args, change_mask, main, overlay_image, probability_image

ROOT = Path(__file__).resolve().parents[1]
CROP = 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-18 network with random weights, saved as a training run would save it."""
    from diffmatch.model import build_model

    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", decoder_channels=16)
    args = TrainArgs(data=DataConfig(root=Path("data"), crop_size=CROP), model=config, device="cpu")
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint(path, RunState(build_model(config), epoch=1, iteration=1, best=0.0), to_dict(args))
    return path


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def pair(root: Path, name: str, size: tuple[int, int], seed: int = 0, ext: str = ".png") -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    return tuple(save(root / folder / f"{name}{ext}", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
                 for folder in ("A", "B"))


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def margin_by_hand(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, tile: int) -> np.ndarray:
    """Run the model on each tile x tile crop of the pair and put the margins together."""
    out = np.zeros(a.shape[:2], np.float32)
    with torch.no_grad():
        for y in range(0, a.shape[0], tile):
            for x in range(0, a.shape[1], tile):
                crops = [image_to_tensor(Image.fromarray(im[y : y + tile, x : x + tile]))[None] for im in (a, b)]
                logits = model(*crops, change_only=True).change[0]
                out[y : y + tile, x : x + tile] = (logits[1] - logits[0]).numpy()
    return out


def test_exact_tiles_match_the_model_on_each_crop(checkpoint: Path, tmp_path: Path) -> None:
    path_a, path_b = pair(tmp_path, "big", (700, 1100))
    out = tmp_path / "change.png"
    main(Args(checkpoint=checkpoint, a=path_a, b=path_b, out=out, tile=100, overlap=0, batch_size=16,
              probability=True, overlay=True))
    model, _ = model_from_checkpoint(checkpoint)
    expected = margin_by_hand(model, read(path_a), read(path_b), tile=100)
    sure = np.abs(expected) > 1e-3  # a pixel on the decision boundary may round either way
    assert 0 < (expected > 0).mean() < 1
    assert np.array_equal(read(out)[sure], np.where(expected > 0, 255, 0)[sure])
    prob = read(tmp_path / "change_prob.png").astype(int)
    assert np.abs(prob - np.rint(255 / (1 + np.exp(-expected)))).max() <= 1
    assert read(tmp_path / "change_overlay.png").shape == (700, 1100, 3)


def test_pair_smaller_than_one_tile(checkpoint: Path, tmp_path: Path) -> None:
    path_a, path_b = pair(tmp_path, "small", (50, 70), ext=".jpg")
    out = tmp_path / "small.png"
    main(Args(checkpoint=checkpoint, a=path_a, b=path_b, out=out))  # tile: the checkpoint's crop, 96
    model, _ = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        logits = model(*(image_to_tensor(Image.open(p).convert("RGB"))[None] for p in (path_a, path_b)),
                       change_only=True).change[0]
    expected = (logits[1] - logits[0]).numpy()
    sure = np.abs(expected) > 1e-3
    assert read(out).shape == (50, 70)
    assert set(np.unique(read(out))) <= {0, 255}
    assert np.array_equal(read(out)[sure], np.where(expected > 0, 255, 0)[sure])


def test_threshold_probability_and_overlay_values() -> None:
    margin = np.array([[-2.0, 0.0, 1e-6], [np.log(3) - 1e-4, np.log(3) + 1e-4, 10.0]], np.float32)
    assert change_mask(margin).tolist() == [[0, 0, 255], [255, 255, 255]]  # 0.5: margin > 0, the argmax
    assert change_mask(margin, 0.75).tolist() == [[0, 0, 0], [0, 255, 255]]  # p > 0.75 <=> margin > ln 3
    assert probability_image(margin).tolist() == [[30, 128, 128], [191, 191, 255]]
    image = np.full((2, 3, 3), 100, np.uint8)
    tinted = overlay_image(image, change_mask(margin))
    assert tinted[0, 0].tolist() == [100, 100, 100] and tinted[0, 2].tolist() == [178, 50, 50]
    with pytest.raises(InputError, match="--threshold 1"):
        change_mask(margin, 1.0)


def test_folder_mode_resumes_and_overwrites(checkpoint: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    pair(src, "x1", (40, 150), seed=1)  # two windows of 96 overlapping by 42
    pair(src, "x2", (80, 30), seed=2, ext=".tif")  # a TIFF without geo-referencing: PNG outputs
    args = Args(checkpoint=checkpoint, src=src, out=out, overlap=16, probability=True)
    assert main(args) == [out / "x1.png", out / "x2.png"]
    assert capsys.readouterr().out.splitlines()[-1] == f"predict: wrote 2 mask(s) in {out} (with probability maps)"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["prob/x1.png", "prob/x2.png", "x1.png", "x2.png"]
    assert read(out / "x2.png").shape == (80, 30) and read(out / "prob" / "x2.png").shape == (80, 30)
    first = read(out / "x1.png")
    assert main(args) == []  # everything exists: nothing is read again
    assert capsys.readouterr().out.splitlines()[-1] == "predict: wrote 0 mask(s) (with probability maps); 2 pair(s) " \
                                                      "already done, kept"
    (out / "prob" / "x2.png").unlink()
    assert main(args) == [out / "x2.png"]
    assert main(Args(**{**vars(args), "overwrite": True})) == [out / "x1.png", out / "x2.png"]
    assert np.array_equal(read(out / "x1.png"), first)
    assert main(Args(**{**vars(args), "overlay": True})) == [out / "x1.png", out / "x2.png"]
    assert read(out / "overlay" / "x1.png").shape == (40, 150, 3)


def test_folder_mode_pair_named_like_an_output(checkpoint: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    pair(src, "x", (30, 40), seed=1)
    pair(src, "x_prob", (50, 20), seed=2)  # its mask must not overwrite, or be taken for, x's probability
    args = Args(checkpoint=checkpoint, src=src, out=out, probability=True, overlay=True)
    assert main(args) == [out / "x.png", out / "x_prob.png"]
    assert read(out / "x_prob.png").shape == (50, 20) and set(np.unique(read(out / "x_prob.png"))) <= {0, 255}
    assert read(out / "prob" / "x.png").shape == (30, 40) and read(out / "prob" / "x_prob.png").shape == (50, 20)
    assert read(out / "overlay" / "x.png").shape == (30, 40, 3)
    (out / "prob" / "x.png").unlink()
    assert main(args) == [out / "x.png"]  # x's probability is missing, whatever x_prob.png holds


def test_bad_input_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    path_a, _ = pair(tmp_path / "one", "p", (30, 40))
    other = save(tmp_path / "other.png", np.zeros((30, 41, 3), np.uint8))
    with pytest.raises(InputError, match=r"p.png is 40x30, .*other.png is 41x30"):
        main(Args(checkpoint=checkpoint, a=path_a, b=other, out=tmp_path / "c.png"))
    with pytest.raises(InputError, match="nope.pt: checkpoint not found"):
        main(Args(checkpoint=tmp_path / "nope.pt", a=path_a, b=path_a, out=tmp_path / "c.png"))
    save(tmp_path / "src" / "A" / "lonely.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "src" / "B").mkdir()
    with pytest.raises(InputError, match="A/lonely.png: no B image named lonely"):
        main(Args(checkpoint=checkpoint, src=tmp_path / "src", out=tmp_path / "out"))
    (tmp_path / "src" / "A" / "lonely.png").unlink()
    with pytest.raises(InputError, match="no images found"):
        main(Args(checkpoint=checkpoint, src=tmp_path / "src", out=tmp_path / "out"))
    with pytest.raises(InputError, match="--a/--b"):
        main(Args(checkpoint=checkpoint, a=path_a, out=tmp_path / "c.png"))
    with pytest.raises(InputError, match="--overlap 96"):
        main(Args(checkpoint=checkpoint, a=path_a, b=path_a, out=tmp_path / "c.png", overlap=96))


def test_cli_exits_2_on_bad_input(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    cmd = [sys.executable, "-m", "diffmatch.predict", "--checkpoint", str(tmp_path / "best.pt"),
           "--a", str(missing), "--b", str(missing), "--out", str(tmp_path / "c.png")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {missing}: file not found"]


def tiff_fields(path: Path) -> dict[int, tuple[int, int]]:
    """Tag number -> (field type, count) of a TIFF's first directory, parsed from the bytes (not by Pillow)."""
    data = path.read_bytes()
    order = {b"II": "<", b"MM": ">"}[data[:2]]
    assert struct.unpack(order + "H", data[2:4])[0] == 42
    offset = struct.unpack(order + "I", data[4:8])[0]
    (count,) = struct.unpack(order + "H", data[offset : offset + 2])
    entries = [struct.unpack(order + "HHI", data[offset + 2 + 12 * k : offset + 10 + 12 * k]) for k in range(count)]
    return {tag: (kind, n) for tag, kind, n in entries}


@pytest.mark.parametrize("transformation", [False, True])
def test_geotiff_in_geotiff_out(checkpoint: Path, tmp_path: Path, transformation: bool,
                                capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(3)
    tags = geotiff_tags(transformation)
    paths = [write_geotiff(tmp_path / "src" / date / "scene.tif", rng.integers(0, 256, (70, 110, 3), np.uint8), tags)
             for date in ("A", "B")]
    assert geo_tags(paths[0]) == tags
    main(Args(checkpoint=checkpoint, a=paths[0], b=paths[1], out=tmp_path / "change.png"))
    assert "name --out with .tif" in capsys.readouterr().out
    main(Args(checkpoint=checkpoint, a=paths[0], b=paths[1], out=tmp_path / "change.tif", probability=True,
              overlay=True))
    main(Args(checkpoint=checkpoint, src=tmp_path / "src", out=tmp_path / "maps", probability=True))
    outputs = {"change.tif": (70, 110), "change_prob.tif": (70, 110), "change_overlay.tif": (70, 110, 3),
               "maps/scene.tif": (70, 110), "maps/prob/scene.tif": (70, 110)}
    for name, shape in outputs.items():
        assert geo_tags(tmp_path / name) == tags, name
        fields = tiff_fields(tmp_path / name)
        expected = {33550: (12, 3), 33922: (12, 6)} if not transformation else {34264: (12, 16)}
        expected |= {34735: (3, len(tags[34735][1])), 34736: (12, 2), 34737: (2, 23)}  # ASCII ends with NUL
        assert {tag: fields[tag] for tag in expected} == expected, name
        assert read(tmp_path / name).shape == shape
    assert np.array_equal(read(tmp_path / "change.tif"), read(tmp_path / "change.png"))
    assert np.array_equal(read(tmp_path / "maps" / "scene.tif"), read(tmp_path / "change.png"))
    assert np.array_equal(read(tmp_path / "maps" / "prob" / "scene.tif"), read(tmp_path / "change_prob.tif"))
    assert not (tmp_path / "maps" / "scene.png").exists()
