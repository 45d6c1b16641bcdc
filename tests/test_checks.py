from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tyro
from conftest import write_pair
from PIL import Image

from diffmatch import evaluate
from diffmatch import run as run_module
from diffmatch import train as train_module
from diffmatch.checks import Need, check_data, check_eval_data, check_training_data, image_header
from diffmatch.cli import InputError
from diffmatch.config import DataConfig, ModelConfig, TrainArgs
from diffmatch.subsets import SemiSplit

ROOT = Path(__file__).resolve().parents[1]
IDS = [f"p{i}" for i in range(8)]


def write_pseudo(root: Path, sample_id: str, size: tuple[int, int] = (32, 32)) -> None:
    for folder in ("change", "A", "B"):
        (root / "pseudo" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(size, 255, np.uint8)).save(root / "pseudo" / folder / f"{sample_id}.png")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def clean_root(tmp_path: Path) -> Path:
    """Eight 32x32 pairs with pseudo labels: train p0-p5, val p6, test p7."""
    root = tmp_path / "data"
    for i, sample_id in enumerate(IDS):
        write_pair(root, sample_id, seed=i)
        write_pseudo(root, sample_id)
    (root / "list").mkdir()
    for name, ids in (("train", IDS[:6]), ("val", IDS[6:7]), ("test", IDS[7:])):
        (root / "list" / f"{name}.txt").write_text("".join(f"{i}.png\n" for i in ids))
    return root


@pytest.fixture
def messy_root(clean_root: Path) -> Path:
    """The clean root with one problem per id: a missing B, a missing label, stray label values, dates of
    different sizes, a missing pseudo label, an RGB pseudo label and, last in the test list, a truncated PNG."""
    root = clean_root
    (root / "B" / "p1.png").unlink()
    (root / "label" / "p2.png").unlink()
    label = np.zeros((32, 32), np.uint8)
    label[:4, :3] = 100
    Image.fromarray(label).save(root / "label" / "p3.png")
    Image.fromarray(np.zeros((31, 32, 3), np.uint8)).save(root / "B" / "p4.png")
    (root / "pseudo" / "change" / "p5.png").unlink()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "pseudo" / "A" / "p0.png")
    truncate(root / "A" / "p7.png")
    return root


def needs(root: Path) -> list[Need]:
    return [Need(root, IDS[:6], True, "pseudo"), Need(root, IDS[6:], True, None)]


def test_clean_data_passes_and_says_how_long(clean_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seconds = check_data(needs(clean_root))
    out = capsys.readouterr().out
    assert seconds > 0 and out.splitlines()[-1] == f"data check: 8 pairs, no problems ({seconds:.1f} s; " \
                                                  "--no-check-data skips it)"


def test_every_problem_is_one_line(messy_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match=r"^data check: 7 problems in 7 of 8 pairs \(the first 5 above, "
                                         r"found in \d+\.\d s\); fix them and run again$"):
        check_data(needs(messy_root))
    lines = capsys.readouterr().err.splitlines()
    ceg = f"run `python -m diffmatch.ceg --root {messy_root} --out-name pseudo` first"
    expected = {
        "p0": f"{messy_root}/pseudo/A/p0.png: expected a single-band mask, found 3 bands; {ceg}",
        "p1": f"{messy_root}/B/p1.png: file not found; check the data set root and its list files",
        "p2": f"{messy_root}/label/p2.png: file not found; check the data set root and its list files",
        "p3": f"{messy_root}/label/p3.png: 12 of 1,024 label pixels have values {{100}}, not 0 or 255; pass "
              "--data.label-threshold 128 to binarise the labels (value >= 128 is change)",
        "p4": f"{messy_root}/B/p4.png: size 32x31 differs from A's 32x32; the two dates must be co-registered",
        "p5": f"{messy_root}/pseudo/change/p5.png: file not found; {ceg}",
    }
    assert lines == [*list(expected.values())[:5], "... and 2 more problems"]
    for sample_id, line in expected.items():
        with pytest.raises(InputError, match=r"^data check: 1 problem in 1 of 1 pairs \(listed above"):
            check_data([Need(messy_root, [sample_id], True, "pseudo")])
        assert capsys.readouterr().err.splitlines() == [line], sample_id
    with pytest.raises(InputError, match="1 problem in 1 of 1 pairs"):
        check_data([Need(messy_root, ["p7"], True, "pseudo")])  # the truncated PNG, last in the test list
    assert capsys.readouterr().err.startswith(f"{messy_root}/A/p7.png: cannot read image (")
    check_data([Need(messy_root, ["p6"], True, "pseudo")])


def test_label_threshold_and_quiet_ranks(messy_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match=r"^data check: 6 problems in 6 of 8 pairs \(the first 5 above"):
        check_data(needs(messy_root), label_threshold=50)  # p3's label is binarised: one problem fewer
    assert "p3" not in capsys.readouterr().err
    with pytest.raises(InputError, match="7 problems"):
        check_data(needs(messy_root), show=False)  # other ranks: the same verdict, nothing printed
    assert capsys.readouterr() == ("", "")


def test_missing_folders_are_one_line_each(clean_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="1 problem in 8 of 8 pairs"):
        check_data([Need(clean_root, IDS, False, "pseudo_pixel")])
    assert capsys.readouterr().err.splitlines() == [
        f"{clean_root}/pseudo_pixel: folder not found; run `python -m diffmatch.ceg --root {clean_root} "
        "--out-name pseudo_pixel` first"]
    (clean_root / "pseudo_pixel" / "A").mkdir(parents=True)
    with pytest.raises(InputError, match="10 problems in 8 of 8 pairs"):  # two folders, eight files of A
        check_data([Need(clean_root, IDS, False, "pseudo_pixel")])
    assert [line.split(":")[0] for line in capsys.readouterr().err.splitlines()[:3]] == [
        f"{clean_root}/pseudo_pixel/B", f"{clean_root}/pseudo_pixel/change", f"{clean_root}/pseudo_pixel/A/p0.png"]


@pytest.mark.parametrize(("fmt", "cut"), [("PNG", 0.5), ("PNG", 0.98), ("PNG", 0.0), ("JPEG", 0.9),
                                          ("BMP", 0.9), ("TIFF", 0.9)])
def test_truncated_files_fail_and_whole_ones_pass(tmp_path: Path, fmt: str, cut: float) -> None:
    array = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(buffer.getvalue())
    assert image_header(path) == ((48, 40), 3)
    end = len(buffer.getvalue()) - 12 if cut == 0.0 else int(len(buffer.getvalue()) * cut)  # 0.0: no IEND
    path.write_bytes(buffer.getvalue()[:end])
    with pytest.raises(Exception):  # noqa: B017 - PIL raises OSError, SyntaxError, ...
        image_header(path)


def test_each_id_is_checked_once(clean_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = DataConfig(root=clean_root)
    check_training_data(data, SemiSplit(IDS[:2], IDS[2:6]), pseudo_dir="pseudo", eval_splits=("val", "test", "test"))
    assert "data check: 8 pairs, no problems" in capsys.readouterr().out
    check_training_data(data, SemiSplit(IDS[:6] * 3, IDS[:6]), pseudo_dir=None, eval_splits=("test",))
    assert "data check: 7 pairs, no problems" in capsys.readouterr().out


def tiny_args(root: Path, out: Path, **overrides: object) -> TrainArgs:
    args = TrainArgs(data=DataConfig(root=root, crop_size=32), label_ratio=0.5, epochs=1, batch_size=2,
                     model=ModelConfig(backbone="resnet18", decoder_channels=16), out_dir=out, num_workers=0,
                     device="cpu", max_iters=1)
    return replace(args, **overrides)


def test_train_checks_before_building_the_model(messy_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: object) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr(run_module, "build_model", no_model)  # the run's setup builds the network
    out = tmp_path / "run"
    with pytest.raises(InputError, match="data check: 7 problems in 7 of 8 pairs"):
        train_module.train(tiny_args(messy_root, out))
    assert not out.exists()
    # Supervised reads no pseudo labels and no unlabelled pair: only the labelled ids, val and test count.
    with pytest.raises(InputError, match=r"problems in \d of 5 pairs"):
        train_module.train(tiny_args(messy_root, out, method="supervised"))
    # Without the check, the first problem surfaces later, one at a time (here when the loaders are built).
    with pytest.raises(InputError, match="file not found"):
        train_module.train(tiny_args(messy_root, out, check_data=False))


def test_evaluate_checks_before_loading_the_checkpoint(messy_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = evaluate.Args(checkpoint=tmp_path / "nope.pt", data=DataConfig(root=messy_root), split="test")
    with pytest.raises(InputError, match=r"data check: 1 problem in 1 of 1 pairs"):
        evaluate.main(args)
    assert f"{messy_root}/A/p7.png: cannot read image" in capsys.readouterr().err
    with pytest.raises(InputError, match="nope.pt: checkpoint not found"):
        evaluate.main(replace(args, check_data=False))
    check_eval_data(DataConfig(root=messy_root), "val")  # p6 is fine


def test_flags_are_named_as_documented(capsys: pytest.CaptureFixture[str]) -> None:
    for config, argv in ((TrainArgs, ["--data.root", "d"]), (evaluate.Args, ["--data.root", "d", "--checkpoint", "c"])):
        parsed = tyro.cli(config, args=[*argv, "--no-check-data", "--data.label-threshold", "128"])
        assert parsed.check_data is False and parsed.data.label_threshold == 128
        assert tyro.cli(config, args=argv).check_data is True


def test_cli_lists_the_problems_and_exits_2(messy_root: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "diffmatch.train", "--data.root", str(messy_root), "--label-ratio", "0.5",
           "--model.backbone", "resnet18", "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 7 and lines[5] == "... and 2 more problems"
    assert lines[-1].startswith("error: data check: 7 problems in 7 of 8 pairs (the first 5 above")
    assert not (tmp_path / "run").exists()
