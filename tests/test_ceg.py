"""Change event generation (§3.2, Eq. 4–11): hand-computed cases, the test vectors of tests/data, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA
from PIL import Image

from diffmatch.ceg import (
    CEGResult,
    concept_probs,
    generate,
    instance_change,
    instance_iou,
    mixed_change,
    pixel_change,
    reliable,
    segment,
    single_date_mask,
)
from diffmatch.cli import InputError
from diffmatch.config import CEGConfig
from diffmatch.metrics import confusion
from diffmatch.pseudo import LEVELS, Args, level_confusions, main
from diffmatch.rle import Runs, encode_mask, runs_of_masks
from diffmatch.vlm import VLMOutput, concepts

VECTORS = DATA / "ceg-vectors"
VECTOR_IDS = ["vec_000", "vec_004", "vec_005", "vec_006", "vec_011"]
CFG = CEGConfig(classes=("house", "road"), foreground=("house",), background=("road",))


def masks(*instances: list[list[int]]) -> Runs:
    return runs_of_masks(np.array(instances, dtype=bool))


def empty(h: int = 2, w: int = 3) -> Runs:
    return runs_of_masks(np.zeros((0, h, w), bool))


# --- Eq. 4-7: concepts, segmentation, reliability, pixel-level change -----------------------------


def test_concept_probs_take_the_max_per_concept() -> None:
    probs = np.array([0.1, 0.5, 0.3, 0.2, 0.7, 0.0], np.float32)[:, None, None]
    fg, bg = concept_probs(probs, concepts(CEGConfig()))  # fg = house, building; bg = the rest (Eq. 4)
    assert fg.item() == np.float32(0.5) and bg.item() == np.float32(0.7)


def test_checked_masks_skip_the_float16_check_and_agree() -> None:
    fg = np.array([[0.9, 0.2, 0.5]], np.float16)
    bg = np.array([[0.1, 0.7, 0.5]], np.float16)
    assert segment(fg, bg, checked=True).tolist() == segment(fg, bg).tolist() == [[1, 0, 1]]
    assert reliable(fg, bg, 0.8, checked=True).tolist() == reliable(fg, bg, 0.8).tolist() == [[True, False, False]]
    # Unchecked, negative float16 values are compared as values, not as bit patterns
    neg_fg, neg_bg = np.array([[-0.5]], np.float16), np.array([[-0.25]], np.float16)
    assert segment(neg_fg, neg_bg).tolist() == [[0]] and segment(neg_bg, neg_fg).tolist() == [[1]]
    # concept_probs returns float16 only for finite values >= 0 (else float32): what checked relies on
    probs = np.array([-0.5, 0.1, 0.2, 0.3, 0.4, -0.25], np.float16)[:, None, None]
    assert all(a.dtype == np.float32 for a in concept_probs(probs, concepts(CEGConfig())))


def test_masks_are_uint8_and_any_nonzero_is_valid() -> None:
    fg = np.array([[0.9, 0.2]], np.float32)
    bg = np.array([[0.1, 0.7]], np.float32)
    seg = segment(fg, bg)  # a uint8 view of the comparison
    assert seg.dtype == np.uint8 and seg.tolist() == [[1, 0]]
    assert pixel_change(seg, seg[:, ::-1]).dtype == np.uint8
    values = np.array([[0, 1, 1, 0]], np.uint8)
    for valid in (np.array([[1, 1, 0, 0]], bool), np.array([[2, 1, 0, 0]], np.uint8)):
        assert single_date_mask(values, valid).tolist() == [[0, 1, 255, 255]]
        assert mixed_change(values, np.ones_like(values), valid).tolist() == [[0, 1, 255, 255]]


def test_one_worker_start_up_imports_no_process_pool() -> None:
    code = "import sys, diffmatch.ceg; print(sorted({'multiprocessing', 'concurrent.futures'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


def test_segment_ties_go_to_foreground_and_reliable_at_exactly_gamma() -> None:
    fg = np.array([[0.8, 0.3, 0.5]], np.float32)
    bg = np.array([[0.1, 0.8, 0.5]], np.float32)
    assert segment(fg, bg).tolist() == [[1, 0, 1]]  # Eq. 5, tie -> 1
    assert reliable(fg, bg, 0.8).tolist() == [[True, True, False]]  # Eq. 6, >= γ (float32 0.8)
    assert reliable(fg, bg, 0.5).tolist() == [[True, True, True]]


def test_pixel_change_and_single_date_mask() -> None:
    a, b = np.array([[0, 1, 1, 0]], np.uint8), np.array([[0, 0, 1, 1]], np.uint8)
    assert pixel_change(a, b).tolist() == [[0, 1, 0, 1]]  # Eq. 7
    valid = np.array([[True, False, True, True]])
    assert single_date_mask(a, valid).tolist() == [[0, 255, 1, 0]]


def test_float16_gives_what_float32_gives() -> None:
    # Every finite float16 value >= 0 against thresholds on, between and beyond float16 values.
    values = np.arange(0x7C00, dtype=np.uint16).view(np.float16)
    zero = np.zeros_like(values)
    for gamma in (0.0, -1.0, 2.0**-25, 2.0**-24, 1 / 3, 0.5, 0.8, 0.99951171875, 0.9995, 1.0, 65504.0, 65519.0,
                  7e4, float("nan")):
        want = reliable(values.astype(np.float32), zero.astype(np.float32), gamma)
        assert np.array_equal(reliable(values, zero, gamma), want), gamma
    # Random maps with ties, zeros and subnormals; negative values take the float32 way.
    rng = np.random.default_rng(0)
    for low in (0.0, -0.5):
        probs = rng.choice(np.array([low, 0, 2.0**-20, 0.25, 0.5, 0.8, 1], np.float16), (6, 9, 11))
        fg, bg = concept_probs(probs, concepts(CEGConfig()))
        fg32, bg32 = concept_probs(probs.astype(np.float32), concepts(CEGConfig()))
        assert np.array_equal(fg.astype(np.float32), fg32) and np.array_equal(bg.astype(np.float32), bg32)
        assert np.array_equal(segment(fg, bg), segment(fg32, bg32))
        assert np.array_equal(reliable(fg, bg, 0.8), reliable(fg32, bg32, 0.8))
    # Only the concepts' planes are checked: a negative value elsewhere keeps the float16 way.
    probs = rng.choice(np.array([0, 0.25, 0.5, 1], np.float16), (7, 9, 11))
    probs[6] = -1
    fg, bg = concept_probs(probs, concepts(CEGConfig()))
    fg32, bg32 = concept_probs(probs.astype(np.float32), concepts(CEGConfig()))
    assert fg.dtype == np.float16 and np.array_equal(fg.astype(np.float32), fg32)
    assert np.array_equal(bg.astype(np.float32), bg32)


# --- Eq. 8-10: instance-level change --------------------------------------------------------------


def test_instance_iou_hand_computed() -> None:
    a = masks([[1, 1, 0], [1, 1, 0]], [[0, 0, 0], [0, 0, 1]])
    b = masks([[0, 1, 1], [0, 1, 1]], [[1, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]])
    # a0 & b0: 2 of 6; a0 & b1: 1 of 4; a1 & b0: 1 of 4; the empty b2 has IoU 0 everywhere.
    assert np.allclose(instance_iou(a, b), [[2 / 6, 1 / 4, 0], [1 / 4, 0, 0]])
    assert instance_iou(a, empty()).shape == (2, 0)


def test_instance_change_matched_and_unmatched() -> None:
    a = masks([[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]])
    b = masks([[0, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 0, 0]])
    # a0 overlaps b0 (kept); a1 and b1 overlap nothing: change events (Eq. 10 with δ = 0).
    assert instance_change(a, b).tolist() == [[0, 0, 0], [1, 0, 1]]


def test_overlapping_instances_sum_their_ious() -> None:
    a = masks([[1, 1, 1], [1, 1, 1]])
    b = masks([[1, 0, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 0]])
    # Row sum of a0: 1/6 + 1/6 = 1/3; b0, b1: 1/6 each.
    assert instance_change(a, b, delta=0.0).sum() == 0
    assert instance_change(a, b, delta=0.2).tolist() == [[1, 0, 1], [0, 0, 0]]  # b0, b1 <= 0.2
    assert instance_change(a, b, delta=1 / 3).all()  # a0's sum 1/3 <= δ too
    a2 = masks([[1, 1, 0], [0, 0, 0]], [[0, 1, 1], [0, 0, 0]])  # overlapping on one date
    assert instance_change(a2, empty()).tolist() == [[1, 1, 1], [0, 0, 0]]


def test_empty_instance_sets() -> None:
    a = masks([[1, 0, 0], [0, 0, 0]])
    assert instance_change(a, empty()).tolist() == [[1, 0, 0], [0, 0, 0]]  # all of A change
    assert instance_change(empty(), a).tolist() == [[1, 0, 0], [0, 0, 0]]  # all of B change
    assert instance_change(empty(), empty()).tolist() == [[0, 0, 0], [0, 0, 0]]



def test_instance_iou_matches_dense_counts_in_any_memory_layout() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 7, 9)) < 0.3, rng.random((4, 7, 9)) < 0.3
    a[2] = False  # an empty instance: IoU 0 against every other
    inter = np.einsum("mhw,nhw->mn", a.astype(int), b.astype(int))
    union = a.sum((1, 2))[:, None] + b.sum((1, 2))[None, :] - inter
    expected = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0).astype(np.float32)
    column_major = np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1)  # as COCO RLE stores them
    for masks_a in (a, column_major):
        iou = instance_iou(runs_of_masks(masks_a), runs_of_masks(b))
        assert iou.dtype == np.float32 and np.array_equal(iou, expected)
    change = instance_change(runs_of_masks(column_major), runs_of_masks(b))
    assert change.flags.c_contiguous and change.dtype == np.uint8


# --- Eq. 11 and the whole pair ----------------------------------------------------------------------


def test_mixed_change() -> None:
    pixel = np.array([[1, 1, 0, 1]], np.uint8)
    instance = np.array([[1, 0, 1, 1]], np.uint8)
    valid = np.array([[True, True, True, False]])
    assert mixed_change(pixel, instance, valid).tolist() == [[1, 0, 0, 255]]


def vlm(house: list[list[float]], road: list[list[float]], instances: Runs) -> VLMOutput:
    probs = np.array([house, road], np.float32)
    return VLMOutput(probs, instances, np.zeros(instances.count, np.int64))


def test_generate_pair_by_hand() -> None:
    out_a = vlm([[0.9, 0.9, 0.1, 0.6]], [[0.1, 0.0, 0.9, 0.6]], masks([[1, 1, 0, 0]]))
    out_b = vlm([[0.9, 0.2, 0.9, 0.0]], [[0.0, 0.8, 0.0, 0.5]], masks([[1, 0, 0, 0]], [[0, 0, 1, 0]]))
    cfg = CEGConfig(classes=CFG.classes, foreground=CFG.foreground, background=CFG.background,
                    gamma=0.8, seg_gamma=0.5)
    r = generate(out_a, out_b, concepts(cfg), cfg)
    assert r.pixel.tolist() == [[0, 1, 1, 1]]  # I_A = 1 1 0 1 (tie at 0.6), I_B = 1 0 1 0
    assert r.instance.tolist() == [[0, 0, 1, 0]]  # B's second instance is new
    assert r.reliable.tolist() == [[1, 1, 1, 0]]
    assert r.change("mixed").tolist() == [[0, 0, 1, 255]]
    assert r.change("pixel").tolist() == [[0, 1, 1, 255]]
    assert r.change("instance").tolist() == [[0, 0, 1, 0]]
    assert r.seg_a.tolist() == [[1, 1, 0, 1]] and r.seg_b.tolist() == [[1, 0, 1, 0]]  # reliable at 0.5


def test_level_confusions_are_those_of_each_level() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        label, pixel, instance, both = (rng.random((4, 9, 11)) < rng.random((4, 1, 1))).astype(np.uint8)
        result = CEGResult(pixel, instance, both, pixel, pixel)
        total, valid = level_confusions(result, label)
        for level in LEVELS:
            pred = result.change(level) == 1  # ignore (255) counts as no change
            assert total[level] == confusion(pred, label) and valid[level] == confusion(pred, label, both)


# --- The test vectors through the CLI ---------------------------------------------------------------


@pytest.fixture
def vectors(tmp_path: Path) -> Path:
    root = tmp_path / "vectors"
    shutil.copytree(VECTORS, root, ignore=shutil.ignore_patterns("expected"))
    return root


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize(
    ("args", "outputs"),
    [
        ({}, {"mixed": "change", "seg_A": "A", "seg_B": "B"}),
        ({"ceg": CEGConfig(mode="instance"), "instances": "json"}, {"instance": "change"}),
        ({"instances": "components"}, {"cc_mixed": "change"}),
    ],
)
def test_cli_reproduces_the_vectors(vectors: Path, args: dict, outputs: dict[str, str]) -> None:
    main(Args(root=vectors, out_name="out", **args))
    ids = sorted(p.stem for p in (VECTORS / "expected" / "mixed").glob("*.png"))
    assert ids == VECTOR_IDS
    for expected, written in outputs.items():
        for image_id in ids:
            want, got = read(VECTORS / "expected" / expected / f"{image_id}.png"), read(
                vectors / "out" / written / f"{image_id}.png")
            assert got.dtype == np.uint8 and np.array_equal(got, want), (expected, image_id)


def test_metrics_table(vectors: Path) -> None:
    table = main(Args(root=vectors, out_name="out"))
    assert table == json.loads((vectors / "out" / "metrics.json").read_text())
    assert table["pairs"] == 5 and set(table["rows"]) == {"pixel", "instance", "mixed"}
    label = np.stack([read(vectors / "label" / f"{i}.png") > 0 for i in VECTOR_IDS])
    instance = np.stack([read(VECTORS / "expected" / "instance" / f"{i}.png") for i in VECTOR_IDS])
    mixed = np.stack([read(VECTORS / "expected" / "mixed" / f"{i}.png") for i in VECTOR_IDS])
    tp = int((label & (instance == 1)).sum())
    union = int((label | (instance == 1)).sum())
    assert table["rows"]["instance"]["total"]["iou"] == pytest.approx(100 * tp / union)
    valid = mixed != 255
    assert table["rows"]["mixed"]["ratio"] == pytest.approx(100 * valid.mean())
    tp_v = int((label & (mixed == 1) & valid).sum())
    assert table["rows"]["mixed"]["valid"]["iou"] == pytest.approx(
        100 * tp_v / int(((label | (mixed == 1)) & valid).sum()))
    # Mixed only removes changes from pixel-level ones: its precision on valid pixels is no lower.
    assert table["rows"]["mixed"]["valid"]["tp"] <= table["rows"]["pixel"]["valid"]["tp"]


def test_resume_and_overwrite(vectors: Path) -> None:
    main(Args(root=vectors, out_name="out"))
    change = vectors / "out" / "change" / "vec_000.png"
    marker = np.full((96, 96), 7, np.uint8)
    Image.fromarray(marker).save(change)
    (vectors / "out" / "A" / "vec_004.png").unlink()  # an id counts as written only when complete
    shutil.rmtree(vectors / "label")
    main(Args(root=vectors, out_name="out"))
    assert np.array_equal(read(change), marker)  # skipped
    assert np.array_equal(read(vectors / "out" / "A" / "vec_004.png"),
                          read(VECTORS / "expected" / "seg_A" / "vec_004.png"))
    main(Args(root=vectors, out_name="out", overwrite=True))
    assert np.array_equal(read(change), read(VECTORS / "expected" / "mixed" / "vec_000.png"))
    assert not list((vectors / "out").rglob("*.tmp"))


def test_workers_give_the_same_files(vectors: Path) -> None:
    main(Args(root=vectors, out_name="one"))
    main(Args(root=vectors, out_name="two", workers=2))
    for path in sorted((vectors / "one").rglob("*.png")):
        assert np.array_equal(read(path), read(vectors / "two" / path.relative_to(vectors / "one")))


def test_worker_processes_of_the_command(vectors: Path) -> None:
    # A fresh interpreter without torch: the workers are forked.
    proc = subprocess.run([sys.executable, "-m", "diffmatch.ceg", "--root", str(vectors), "--workers", "2"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    for expected, written in (("mixed", "change"), ("seg_A", "A"), ("seg_B", "B")):
        for path in sorted((VECTORS / "expected" / expected).glob("*.png")):
            assert np.array_equal(read(vectors / "pseudo" / written / path.name), read(path)), path.name


def test_missing_date_is_an_error(vectors: Path) -> None:
    for path in (vectors / "vlm" / "B").glob("vec_005.*"):
        path.unlink()
    with pytest.raises(InputError, match=r"vlm/B/vec_005.npy\|.json\|.png: no VLM output on this date"):
        main(Args(root=vectors))


def test_sizes_must_agree(vectors: Path) -> None:
    np.save(vectors / "vlm" / "B" / "vec_006.npy", np.zeros((6, 96, 95), np.float32))
    with pytest.raises(InputError, match=r"vlm/B/vec_006.npy: size 96x95 differs from the expected 96x96"):
        main(Args(root=vectors))


def test_split_selects_ids(vectors: Path) -> None:
    (vectors / "list").mkdir()
    (vectors / "list" / "test.txt").write_text("vec_011.png\nvec_004\n")
    table = main(Args(root=vectors, split="test"))
    assert table is not None and table["pairs"] == 2
    assert sorted(p.name for p in (vectors / "pseudo" / "change").iterdir()) == ["vec_004.png", "vec_011.png"]


def test_json_only_inputs(tmp_path: Path) -> None:
    house = np.zeros((4, 4), bool)
    house[:2, :2] = True
    for date, records in (("A", []), ("B", [{"category_id": 0, "score": 0.9,
                                              "segmentation": encode_mask(house)}])):
        (tmp_path / "vlm" / date).mkdir(parents=True)
        (tmp_path / "vlm" / date / "p.png.json").write_text(json.dumps(records))
    (tmp_path / "A").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "A" / "p.png")  # gives A's size
    main(Args(root=tmp_path, ceg=CEGConfig(classes=("house", "road"), foreground=("house",),
                                           background=("road",))))
    # A: no instance, all probabilities 0 -> unreliable; B: the house at 0.9 is reliable.
    assert read(tmp_path / "pseudo" / "change" / "p.png").tolist() == [[255] * 4] * 4
    assert read(tmp_path / "pseudo" / "B" / "p.png")[:2, :2].tolist() == [[1, 1], [1, 1]]


def test_cli_exit_code_on_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "diffmatch.ceg", "--root", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {tmp_path / 'missing' / 'vlm'}: not found; --root must hold vlm/A "
                                          "and vlm/B: write them with `python -m diffmatch.vlm_run --root")
