"""COCO RLE in numpy: hand-computed strings and run lengths, round trips, malformed input; many masks
as runs and their IoU without decoding."""

from __future__ import annotations

import numpy as np
import pytest

from diffmatch.rle import (
    RLEError,
    Runs,
    counts_to_mask,
    decode_counts,
    decode_counts_many,
    decode_mask,
    encode_counts,
    encode_mask,
    mask_to_counts,
    runs_intersections,
    runs_of_counts,
    runs_of_masks,
    window_counts,
)

# Column-major: column 0 = 0 0 0, column 1 = 1 1 0, column 2 = 0 1 0 -> runs 3, 2, 2, 1, 1.
MASK_3X3 = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=bool)
COUNTS_3X3 = [3, 2, 2, 1, 1]
# Runs after the third are stored as the difference to the run two before: 1 - 2 = -1 -> "O".
STRING_3X3 = "322OO"


def test_counts_of_hand_mask() -> None:
    assert mask_to_counts(MASK_3X3) == COUNTS_3X3
    assert np.array_equal(counts_to_mask(COUNTS_3X3, 3, 3), MASK_3X3)


def test_string_of_hand_mask() -> None:
    assert encode_counts(COUNTS_3X3) == STRING_3X3
    assert decode_counts(STRING_3X3) == COUNTS_3X3
    assert np.array_equal(decode_mask({"size": [3, 3], "counts": STRING_3X3}), MASK_3X3)


@pytest.mark.parametrize(
    ("mask", "counts", "text"),
    [
        (np.ones((2, 2), bool), [0, 4], "04"),  # a mask starting with 1 begins with an empty 0-run
        (np.zeros((10, 10), bool), [100], "T3"),  # 100 = 4 + 3 * 32: two 5-bit groups
        (np.zeros((0, 0), bool), [], ""),
    ],
)
def test_known_strings(mask: np.ndarray, counts: list[int], text: str) -> None:
    assert mask_to_counts(mask) == counts
    assert encode_counts(counts) == text
    assert decode_counts(text) == counts


def test_list_counts_and_bytes() -> None:
    assert np.array_equal(decode_mask({"size": [3, 3], "counts": COUNTS_3X3}), MASK_3X3)
    assert np.array_equal(decode_mask({"size": [3, 3], "counts": STRING_3X3.encode()}), MASK_3X3)


def test_non_square_is_column_major() -> None:
    mask = np.zeros((2, 3), bool)
    mask[0, 1] = True  # flat column-major index 2
    assert mask_to_counts(mask) == [2, 1, 3]


def test_round_trip_random() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.random()
        seg = encode_mask(mask)
        assert seg["size"] == list(mask.shape)
        assert np.array_equal(decode_mask(seg), mask)


@pytest.mark.parametrize(("text", "message"), [("T", "ends inside"), ("3/2", "invalid character"),
                                               ("3 2", "invalid character")])
def test_malformed_strings(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_counts(text)


def test_runs_not_filling_the_mask() -> None:
    with pytest.raises(ValueError, match="sum to 8"):
        decode_mask({"size": [3, 3], "counts": [3, 2, 2, 1]})
    with pytest.raises(ValueError):
        counts_to_mask([10, -1], 3, 3)


def test_long_and_negative_deltas_round_trip() -> None:
    counts = [0, 70000, 3, 1, 40000, 2, 5, 123456789, 1]  # deltas to the run two before go negative
    assert decode_counts(encode_counts(counts)) == counts


# --- Many masks as runs -------------------------------------------------------------------------------


def test_decode_many_strings_at_once() -> None:
    # "322OO" = 3 2 2 1 1 (the last two stored as -1 against the run two before), "" = no runs,
    # "T3" = 100 in two groups, "04" = 0 4.
    counts, lengths = decode_counts_many([STRING_3X3, "", "T3", "04"])
    assert counts.tolist() == [3, 2, 2, 1, 1, 100, 0, 4] and lengths.tolist() == [5, 0, 1, 2]
    counts, lengths = decode_counts_many([])
    assert counts.tolist() == [] and lengths.tolist() == []


@pytest.mark.parametrize(("texts", "index", "message"), [
    (["322OO", "3/2"], 1, "invalid character '/'"),
    (["T", "04"], 0, "ends inside"),  # a number cut at the end of its string, though the next one goes on
    (["04", "322OO", "é4"], 2, "invalid character"),
    (["04", "ooooooooooo0"], 1, "out of range"),  # eleven continued groups: a run of 60 bits
])
def test_decode_many_names_the_bad_string(texts: list[str], index: int, message: str) -> None:
    with pytest.raises(RLEError, match=message) as err:
        decode_counts_many(texts)
    assert err.value.index == index


def test_decode_many_long_numbers_as_decode_counts() -> None:
    counts = [0, 70000, 3, 1, 40000, 2, 5, 123456789, 1]
    texts = [encode_counts(counts), encode_counts([5, 2**34, 7]), "0" + "P" * 8 + "0"]  # last: 0 0, padded
    values, lengths = decode_counts_many(texts)
    assert values.tolist() == [v for t in texts for v in decode_counts(t)] and lengths.tolist() == [9, 3, 2]


def test_runs_of_counts_by_hand() -> None:
    # MASK_3X3 column-major: 0 0 0 | 1 1 0 | 0 1 0 -> runs [3, 5) and [7, 8); then a full and an empty mask.
    runs = runs_of_counts(np.array([3, 2, 2, 1, 1, 0, 9, 9]), np.array([5, 2, 1]), 3, 3)
    assert runs.count == 3 and (runs.height, runs.width) == (3, 3)
    assert runs.starts.tolist() == [3, 7, 0] and runs.ends.tolist() == [5, 8, 9]
    assert runs.owner.tolist() == [0, 0, 1] and runs.areas().tolist() == [3, 9, 0]
    assert np.array_equal(runs.masks()[0], MASK_3X3) and runs.masks()[1].all() and not runs.masks()[2].any()
    with pytest.raises(RLEError, match="sum to 8, not 3x3=9") as err:
        runs_of_counts(np.array([9, 3, 2, 2, 1]), np.array([1, 4]), 3, 3)
    assert err.value.index == 1
    with pytest.raises(RLEError, match="sum to 9"):  # a negative run, though the sum is right
        runs_of_counts(np.array([10, -1]), np.array([2]), 3, 3)


def test_runs_union_subset_and_intersections_by_hand() -> None:
    # 3x4 masks; a0 is the left two columns (one run over both), a1 pixel (2, 3); b0 rows 0-1 of columns
    # 1-2, b1 column 3.
    a = np.zeros((2, 3, 4), bool)
    a[0, :, :2] = True
    a[1, 2, 3] = True
    b = np.zeros((2, 3, 4), bool)
    b[0, :2, 1:3] = True
    b[1, :, 3] = True
    runs_a, runs_b = runs_of_masks(a), runs_of_masks(b)
    assert runs_a.starts.tolist() == [0, 11] and runs_a.ends.tolist() == [6, 12]  # the run crosses a column
    # a0 & b0: rows 0-1 of column 1 = 2 pixels; a1 & b1: 1 pixel.
    assert runs_intersections(runs_a, runs_b).tolist() == [[2, 0], [0, 1]]
    assert runs_intersections(runs_b, runs_a).tolist() == [[2, 0], [0, 1]]
    assert np.array_equal(runs_a.union(np.array([False, True])), a[1])
    assert np.array_equal(runs_b.union(), b.any(0))
    kept = runs_b.subset(np.array([False, True]))
    assert kept.count == 1 and np.array_equal(kept.masks(), b[1:])
    empty = runs_of_masks(np.zeros((0, 3, 4), bool))
    assert runs_intersections(runs_a, empty).shape == (2, 0) and not empty.union().any()


def test_decode_counts_many_restarts_the_differences_at_every_string() -> None:
    # Strings of 0 to 7 runs in a row: their first runs fall on even and odd places of the joined runs
    lists = [[5], [0, 3], [2, 4, 6], [7, 1, 1, 9], [], [3, 3, 8, 2, 5], [1, 2, 3, 4, 5, 6], [9, 0, 9, 0, 9, 0, 9],
             [40, 1, 3, 2, 30, 7]]
    texts = [encode_counts(c) for c in lists]
    counts, lengths = decode_counts_many(texts)
    assert counts.tolist() == [v for c in lists for v in c]
    assert lengths.tolist() == [len(c) for c in lists]
    for start in range(len(texts)):  # each string first, at place 0
        counts, _ = decode_counts_many(texts[start:])
        assert counts.tolist() == [v for c in lists[start:] for v in c]


def test_runs_match_decoded_masks_random() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = int(rng.integers(1, 25)), int(rng.integers(1, 25))
        masks_a = rng.random((int(rng.integers(0, 6)), h, w)) < rng.random()
        masks_b = rng.random((int(rng.integers(0, 6)), h, w)) < rng.random()
        if len(masks_a) and trial % 3 == 0:
            masks_a[0] = False  # an empty mask: no runs
        texts = [encode_mask(m)["counts"] for m in masks_a]
        counts, lengths = decode_counts_many(texts)
        assert counts.tolist() == [v for t in texts for v in decode_counts(t)]
        runs_a = runs_of_counts(counts, lengths, h, w)
        runs_b = runs_of_masks(masks_b)
        assert np.array_equal(runs_a.masks(), masks_a) and np.array_equal(runs_b.masks(), masks_b)
        assert runs_a.areas().tolist() == masks_a.sum((1, 2)).tolist()
        dense = np.einsum("mhw,nhw->mn", masks_a.astype(np.int64), masks_b.astype(np.int64))
        assert np.array_equal(runs_intersections(runs_a, runs_b), dense)
        select = rng.random(len(masks_a)) < 0.5
        union = runs_a.union(select)
        assert np.array_equal(union, masks_a[select].any(0)) and union.flags.c_contiguous


def test_runs_are_a_named_tuple_of_arrays() -> None:
    runs = runs_of_masks(MASK_3X3[None])
    assert isinstance(runs, Runs) and runs.starts.dtype == runs.ends.dtype == np.int64
def test_window_counts_are_those_of_the_pasted_mask() -> None:
    # A 2x2 window at (1, 1) of a 3x3 mask: column 1 = 0 1 1, column 2 = 0 1 0.
    assert window_counts(np.array([[1, 1], [1, 0]], bool), 1, 1, 3, 3) == [4, 2, 1, 1, 1]
    # As tall as the mask: the run at the bottom of column 0 goes on at the top of column 1 (one run).
    assert window_counts(np.array([[0, 1], [1, 0]], bool), 0, 0, 2, 2) == [1, 2, 1]
    assert window_counts(np.ones((2, 2), bool), 0, 1, 2, 3) == [2, 4]  # ends in 1s: no empty last run
    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = rng.integers(1, 9, 2)
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        window = rng.random((h, w)) < rng.random()
        full = np.zeros((height, width), bool)
        full[top : top + h, left : left + w] = window
        assert window_counts(window, top, left, height, width) == mask_to_counts(full)
    with pytest.raises(ValueError, match="does not fit"):
        window_counts(np.ones((2, 2), bool), 2, 0, 3, 3)
