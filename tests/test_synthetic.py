"""The synthetic data set: the layout and the VLM files of docs/data.md, determinism, resumability,
plausibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmatch.cli import InputError
from diffmatch.lab import synthetic
from diffmatch.lab.synthetic import scene
from diffmatch.rle import decode_mask, encode_mask

SIZE = 64
NUM = 12


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(synthetic.Args(out, num_pairs=NUM, size=SIZE, vlm_kinds=("npy", "json", "png"), seed=3),
                       verbose=False)
    return out


def test_layout_and_lists(root: Path) -> None:
    lists = {s: (root / "list" / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert [len(lists[s]) for s in ("train", "val", "test")] == [9, 1, 2]  # 12 * (0.7, 0.1, 0.2), rounded
    ids = lists["train"] + lists["val"] + lists["test"]
    assert ids == [f"syn_{i:05d}" for i in range(NUM)]
    for i in ids:
        a, b, label = (Image.open(root / d / f"{i}.png") for d in ("A", "B", "label"))
        assert (a.mode, b.mode, label.mode) == ("RGB", "RGB", "L")
        assert a.size == b.size == label.size == (SIZE, SIZE)
        assert set(np.unique(np.asarray(label))) <= {0, 255}
    assert sorted(p.name for p in root.iterdir()) == ["A", "B", "label", "list", "vlm"]


def test_vlm_files(root: Path) -> None:
    classes = synthetic.CLASSES
    assert classes == ("house", "building", "road", "grass", "tree", "water")
    for i in (f"syn_{k:05d}" for k in range(NUM)):
        for date in ("A", "B"):
            probs = np.load(root / "vlm" / date / f"{i}.npy")
            assert probs.shape == (6, SIZE, SIZE) and probs.dtype == np.float16
            assert probs.min() >= 0 and probs.max() <= 1
            np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=0.01)
            class_map = np.asarray(Image.open(root / "vlm" / date / f"{i}.png"))
            assert class_map.shape == (SIZE, SIZE) and set(np.unique(class_map)) <= {*range(6), 255}
            for rec in json.loads((root / "vlm" / date / f"{i}.json").read_text()):
                assert rec["image_id"] == f"{i}.png" and 0 < rec["score"] <= 1
                assert classes[rec["category_id"]] == rec["category_name"]
                mask = decode_mask(rec["segmentation"])
                assert mask.shape == (SIZE, SIZE) and mask.any()
                x, y, w, h = rec["bbox"]
                assert mask[y : y + h, x : x + w].sum() == mask.sum()
                assert mask[y, x : x + w].any() and mask[y + h - 1, x : x + w].any()


def test_deterministic_and_independent_of_workers(root: Path, tmp_path: Path) -> None:
    synthetic.generate(synthetic.Args(tmp_path / "same", num_pairs=NUM, size=SIZE, vlm_kinds=("npy", "json", "png"),
                                      seed=3, workers=2), verbose=False)
    assert _files(tmp_path / "same") == _files(root)
    synthetic.generate(synthetic.Args(tmp_path / "other", num_pairs=2, size=SIZE, seed=4), verbose=False)
    other = _files(tmp_path / "other")
    assert all(other[k] != _files(root)[k] for k in ("A/syn_00000.png", "vlm/B/syn_00001.npy"))


def test_pair_does_not_depend_on_vlm_noise() -> None:
    clean, noisy = synthetic.make_pair(5, size=SIZE, vlm_noise=0), synthetic.make_pair(5, size=SIZE, vlm_noise=2)
    assert np.array_equal(clean.scene.b.image, noisy.scene.b.image)
    assert np.array_equal(clean.scene.label, noisy.scene.label)


def test_change_statistics_like_levir() -> None:
    shares = [(synthetic.scene.draw_pair(np.random.default_rng([1, i]), 128, 0.5).label > 0).mean()
              for i in range(60)]  # fmt: skip
    assert 0.01 < np.mean(shares) < 0.1  # LEVIR-CD: a few % of the pixels change
    assert 0.3 < np.mean(np.array(shares) == 0) < 0.8  # many crops have no change
    none = [scene.draw_pair(np.random.default_rng([1, i]), SIZE, 0.0).label.any() for i in range(10)]
    assert not any(none)


def test_misregistration_shifts_unchanged_buildings() -> None:
    found = 0
    for index in range(20):
        pair = synthetic.make_pair(index, size=128, vlm_noise=0)
        dy, dx = pair.scene.shift
        assert (dy, dx) != (0, 0) and max(abs(dy), abs(dx)) <= 3
        a, b = pair.scene.a.instances, pair.scene.b.instances
        kept = np.intersect1d(a[a > 0], b[b > 0])
        if not len(kept):
            continue
        found += 1
        # B's pixel (i, j) shows A's (i + dy, j + dx): unchanged buildings are shifted, not redrawn
        rows, cols = slice(max(0, -dy), 128 - max(0, dy)), slice(max(0, -dx), 128 - max(0, dx))
        a_rows, a_cols = slice(rows.start + dy, rows.stop + dy), slice(cols.start + dx, cols.stop + dx)
        seen_b = np.where(np.isin(b[rows, cols], kept), b[rows, cols], 0)
        seen_a = np.where(np.isin(a[a_rows, a_cols], kept), a[a_rows, a_cols], 0)
        assert np.array_equal(seen_a, seen_b)
        # so pixel-level change (Eq. 7) on a perfect VLM marks thin edges that are not in the label
        fg_a, fg_b = (p[:2].max(0) >= p[2:].max(0) for p in pair.probs)
        stray = (fg_a != fg_b) & (pair.scene.label == 0)
        assert stray.any()
    assert found >= 5


def test_vlm_noise_zero_is_near_perfect() -> None:
    for index in range(8):
        pair = synthetic.make_pair(index, size=SIZE, vlm_noise=0)
        for view, probs, records in zip((pair.scene.a, pair.scene.b), pair.probs, pair.records, strict=True):
            truth = view.instances > 0
            fg = probs[:2].max(0) >= probs[2:].max(0)
            assert (fg != truth).mean() < 0.03
            buildings = [r for r in records if r["category_id"] < 2]
            assert len(buildings) == len(np.unique(view.instances[truth]))


def test_instances_agree_with_probabilities() -> None:
    means = []
    for index in range(8):
        pair = synthetic.make_pair(index, size=SIZE, vlm_noise=1)
        for probs, records in zip(pair.probs, pair.records, strict=True):
            fg = probs[:2].astype(np.float32).max(0)
            means += [fg[decode_mask(r["segmentation"])].mean() for r in records if r["category_id"] < 2]
    assert len(means) > 10 and np.median(means) > 0.7


def test_resume_skips_complete_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    synthetic.main(synthetic.Args(out=out, num_pairs=3, size=32))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    (out / "vlm" / "B" / "syn_00001.json").unlink()
    synthetic.generate(synthetic.Args(out, num_pairs=3, size=32))
    assert "1 pairs to write, 2 complete already" in capsys.readouterr().out
    assert (out / "vlm" / "B" / "syn_00001.json").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.stem in ("syn_00000", "syn_00002"))
    synthetic.generate(synthetic.Args(out, num_pairs=3, size=32, overwrite=True), verbose=False)
    assert (out / "A" / "syn_00000.png").stat().st_mtime_ns != stamps[out / "A" / "syn_00000.png"]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    "options",
    [{"num_pairs": 0}, {"size": 16}, {"seed": -1}, {"vlm_kinds": ("tif",)},
     {"val_fraction": 0.5, "test_fraction": 0.5}],
)
def test_bad_options(tmp_path: Path, options: dict) -> None:
    with pytest.raises(InputError):
        synthetic.generate(synthetic.Args(tmp_path, **{"num_pairs": 2, "size": 32, **options}))


def test_record_of_windowed_fortran_mask() -> None:
    mask = np.zeros((6, 5), bool, order="F")
    mask[2:4, 1] = mask[3, 2] = True  # column-major runs: 7 zeros, 2 ones, 3 zeros, 1 one, 17 zeros
    record = synthetic._record(mask, (slice(1, 5), slice(0, 4)), 0, 0.71234, "x.png")
    assert record["bbox"] == [1, 2, 2, 2]  # x, y, w, h
    assert record["score"] == 0.7123 and record["category_name"] == "house"
    assert np.array_equal(decode_mask(record["segmentation"]), mask)
    assert record["segmentation"] == encode_mask(np.ascontiguousarray(mask))
