"""COCO RLE in numpy: hand-computed strings and run lengths, round trips, malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from diffmatch.rle import (
    counts_to_mask,
    decode_counts,
    decode_mask,
    encode_counts,
    encode_mask,
    mask_to_counts,
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
