"""VLM output readers (docs/data.md, "VLM file formats"): the three file kinds, the fallbacks and every
malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmatch.cli import InputError
from diffmatch.config import CEGConfig
from diffmatch.rle import encode_mask, mask_to_counts
from diffmatch.vlm import concepts, find_files, list_ids, read_instances, read_vlm, vlm_id

CFG = CEGConfig()  # house, building | road, grass, tree, water
H, W = 4, 5


def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:bottom, left:right] = True
    return mask


def record(k: int, mask: np.ndarray, score: float = 0.9, compressed: bool = True) -> dict:
    seg = encode_mask(mask) if compressed else {"size": list(mask.shape), "counts": mask_to_counts(mask)}
    return {"image_id": "x.png", "category_id": k, "score": score, "segmentation": seg, "bbox": [0, 0, 0, 0]}


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_concepts_and_unknown_class() -> None:
    fg, bg = concepts(CFG)
    assert fg.tolist() == [0, 1] and bg.tolist() == [2, 3, 4, 5]
    with pytest.raises(InputError, match="'roof' is not in --classes"):
        concepts(CEGConfig(foreground=("roof",)))


def test_ids_and_file_names(tmp_path: Path) -> None:
    for name in ("a.npy", "b.png.json", "c.json", "d.png", "e.txt", ".a.npy.tmp"):
        (tmp_path / name).write_text("")
    assert list_ids(tmp_path) == {"a", "b", "c", "d"}
    assert list_ids(tmp_path / "missing") == set()
    assert vlm_id("scene_3.png.json") == "scene_3"
    write_json(tmp_path / "b.json", [])
    assert find_files(tmp_path, "b").json == tmp_path / "b.png.json"  # APE's own name wins


def test_npy_float16_is_kept_and_float64_becomes_float32(tmp_path: Path) -> None:
    probs = np.random.default_rng(0).random((6, H, W))
    np.save(tmp_path / "x.npy", probs.astype(np.float16))
    out = read_vlm(tmp_path, "x", CFG)
    assert out.probs.dtype == np.float16 and np.array_equal(out.probs, probs.astype(np.float16))
    np.save(tmp_path / "x.npy", probs)
    out = read_vlm(tmp_path, "x", CFG)
    assert out.probs.dtype == np.float32 and np.array_equal(out.probs, probs.astype(np.float32))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_float16_non_finite_is_an_error(tmp_path: Path, bad: float) -> None:
    probs = np.full((6, H, W), -0.5, np.float16)  # negative values: the slow check
    probs[3, 1, 2] = bad
    np.save(tmp_path / "x.npy", probs)
    with pytest.raises(InputError, match="NaN or inf"):
        read_vlm(tmp_path, "x", CFG)


def test_json_instances_keep_only_foreground(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((6, H, W), np.float32))
    write_json(tmp_path / "x.png.json", [record(0, box(0, 0, 2, 2)), record(3, box(2, 2, 4, 5)),
                                         record(1, box(1, 1, 3, 3), compressed=False)])
    out = read_vlm(tmp_path, "x", CFG)
    assert out.instance_classes.tolist() == [0, 1]
    assert np.array_equal(out.instances.masks(), np.stack([box(0, 0, 2, 2), box(1, 1, 3, 3)]))


def test_counts_as_strings_and_lists(tmp_path: Path) -> None:
    masks = [box(0, 0, 2, 2), box(1, 1, 3, 3), box(2, 0, 4, 5)]
    records = [record(0, masks[0]), record(1, masks[1], compressed=False), record(0, masks[2])]
    write_json(tmp_path / "x.json", records)
    inst = read_instances(tmp_path / "x.json", 6, (H, W))
    assert np.array_equal(inst.runs.masks(), np.stack(masks)) and inst.classes.tolist() == [0, 1, 0]
    assert inst.scores.dtype == np.float32 and np.allclose(inst.scores, 0.9)


def test_bad_rle_names_its_record_among_skipped_ones(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((6, H, W), np.float32))
    bad = {"category_id": 1, "segmentation": {"size": [H, W], "counts": "0"}}  # runs sum to 0, not 20
    write_json(tmp_path / "x.json", [record(3, box(0, 0, 1, 1)), record(0, box(0, 0, 1, 1)), bad])
    with pytest.raises(InputError, match=r"x.json: record 2: bad RLE \(RLE runs sum to 0, not 4x5=20\)"):
        read_vlm(tmp_path, "x", CFG)


def test_probs_from_instance_scores(tmp_path: Path) -> None:
    # Two overlapping houses (0.6, 0.9) and one road (0.7): per class, the max score covering the pixel.
    write_json(tmp_path / "x.json", [record(0, box(0, 0, 2, 3), 0.6), record(0, box(1, 2, 3, 4), 0.9),
                                     record(2, box(3, 0, 4, 5), 0.7)])
    out = read_vlm(tmp_path, "x", CFG)
    house = np.zeros((H, W), np.float32)
    house[0:2, 0:3] = 0.6
    house[1:3, 2:4] = 0.9
    assert np.allclose(out.probs[0], house)
    assert np.allclose(out.probs[2], box(3, 0, 4, 5) * 0.7)
    assert not out.probs[[1, 3, 4, 5]].any()
    assert out.instances.count == 2


def test_class_map_png_and_components(tmp_path: Path) -> None:
    labels = np.array([[0, 2, 1, 2, 255],
                       [2, 1, 2, 2, 255],
                       [2, 2, 2, 5, 5],
                       [1, 1, 2, 5, 5]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "x.png")
    out = read_vlm(tmp_path, "x", CFG)
    assert out.probs.shape == (6, H, W) and out.probs[:, 0, 4].sum() == 0  # 255 = unknown: all 0
    assert out.probs[5, 2, 3] == 1 and out.probs.sum() == (labels != 255).sum()
    # Foreground (fg >= bg): the classes 0/1 plus the unknown pixels (tie 0 >= 0).
    assert out.instances.count == 3  # 8-connected: {(0,0),(1,1),(0,2)}, unknown column, bottom-left pair
    assert (out.instance_classes == -1).all()
    four = read_vlm(tmp_path, "x", CEGConfig(connectivity=4))
    assert four.instances.count == 5  # the diagonal trio splits in three
    assert np.array_equal(four.instances.masks().sum(0), out.instances.masks().sum(0))  # a partition of the same mask


def test_components_instead_of_json(tmp_path: Path) -> None:
    probs = np.zeros((6, H, W), np.float32)
    probs[2] = 1.0
    probs[0][box(0, 0, 2, 2)] = 1.0
    np.save(tmp_path / "x.npy", probs)
    write_json(tmp_path / "x.json", [record(0, box(3, 3, 4, 5))])
    assert np.array_equal(read_vlm(tmp_path, "x", CFG, "json").instances.masks(), box(3, 3, 4, 5)[None])
    assert np.array_equal(read_vlm(tmp_path, "x", CFG, "components").instances.masks(), box(0, 0, 2, 2)[None])


def test_npy_layouts_are_read_as_numpy_reads_them(tmp_path: Path) -> None:
    # Mapped from the file: C and Fortran order, header format 2.0, big-endian float16 (as float32).
    rng = np.random.default_rng(0)
    probs = rng.random((6, H, W)).astype(np.float16)
    for name, array in (("c", probs), ("f", np.asfortranarray(probs)), ("big", probs.astype(">f2"))):
        np.save(tmp_path / f"{name}.npy", array)
        out = read_vlm(tmp_path, name, CFG).probs
        assert np.array_equal(out, np.load(tmp_path / f"{name}.npy"))
        assert (out.dtype, out.flags.writeable) == ((np.float32, True) if name == "big" else (np.float16, False))
    with open(tmp_path / "v2.npy", "wb") as f:
        np.lib.format.write_array(f, probs, version=(2, 0))
    assert np.array_equal(read_vlm(tmp_path, "v2", CFG).probs, probs)
    data = (tmp_path / "c.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-2])
    with pytest.raises(InputError, match="cut.npy: cannot read .npy"):
        read_vlm(tmp_path, "cut", CFG)
    np.save(tmp_path / "obj.npy", np.array([{}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy: cannot read .npy"):
        read_vlm(tmp_path, "obj", CFG)


def test_empty_json_with_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((6, H, W), np.float32))
    write_json(tmp_path / "x.json", [])
    assert read_vlm(tmp_path, "x", CFG).instances.masks().shape == (0, H, W)


def bad_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((5, H, W), np.float32))


def nan_npy(tmp_path: Path) -> None:
    probs = np.zeros((6, H, W), np.float32)
    probs[1, 2, 3] = np.nan
    np.save(tmp_path / "x.npy", probs)


def int_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((6, H, W), np.int64))


def bad_rle(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", [{"category_id": 0, "segmentation": {"size": [H, W], "counts": "3/"}}])


def short_rle(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", [{"category_id": 0, "segmentation": {"size": [H, W], "counts": [3, 2]}}])


def unknown_category(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", [record(6, box(0, 0, 1, 1))])


def size_mismatch(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((6, H, W), np.float32))
    write_json(tmp_path / "x.json", [record(0, np.zeros((H + 1, W), bool))])


def not_a_list(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"annotations": []}')


def broken_json(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("[{")


def no_category(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", [{"segmentation": encode_mask(box(0, 0, 1, 1))}])


def bad_class_map(tmp_path: Path) -> None:
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(tmp_path / "x.png")


def rgb_class_map(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "x.png")


def nothing(tmp_path: Path) -> None:
    pass


@pytest.mark.parametrize(
    ("make", "file", "message"),
    [
        (bad_npy, "x.npy", r"expected float \(C=6, H, W\).*got float32 \(5, 4, 5\); fix --classes"),
        (nan_npy, "x.npy", "NaN or inf; re-export"),
        (int_npy, "x.npy", "got int64"),
        (bad_rle, "x.json", "record 0: bad RLE .*invalid character.*; re-export"),
        (short_rle, "x.json", "record 0: bad RLE .*sum to 5"),
        (unknown_category, "x.json", r"category_id 6 is outside --classes \(0..5\); fix --classes"),
        (size_mismatch, "x.json", "mask size 5x5 differs from the image's 4x5; run the VLM on the original"),
        (not_a_list, "x.json", "expected a list of COCO result records"),
        (broken_json, "x.json", "cannot read JSON"),
        (no_category, "x.json", "lacks category_id"),
        (bad_class_map, "x.png", "class index 7 is outside --classes"),
        (rgb_class_map, "x.png", "must be single-channel"),
        (nothing, "x.npy|.json|.png", "no VLM output for 'x' on this date"),
    ],
)
def test_malformed_inputs_name_the_file(tmp_path: Path, make, file: str, message: str) -> None:
    make(tmp_path)
    with pytest.raises(InputError, match=message) as err:
        read_vlm(tmp_path, "x", CFG)
    assert str(err.value).startswith(str(tmp_path / file))


def test_size_checked_against_expected(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((6, H, W), np.float32))
    with pytest.raises(InputError, match=r"x.npy: size 4x5 differs from the expected 4x6"):
        read_vlm(tmp_path, "x", CFG, size=(H, W + 1))


def test_json_required_when_asked(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((6, H, W), np.float32))
    with pytest.raises(InputError, match="--instances json asks for it"):
        read_vlm(tmp_path, "x", CFG, "json")
