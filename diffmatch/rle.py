"""COCO run-length encoding of binary masks, in numpy (no pycocotools).

Runs alternate 0s and 1s over the mask in column-major (Fortran) order, starting with a run of 0s.
The compressed string form stores each run (after the third, as the difference to the run two
before) in 5-bit groups offset by ASCII 48, as pycocotools does.
"""

from __future__ import annotations

import numpy as np


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary (H, W) mask in column-major order, starting with 0s."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def window_counts(mask: np.ndarray, top: int, left: int, height: int, width: int) -> list[int]:
    """``mask_to_counts`` of a (height, width) mask that is 0 except for the (h, w) ``mask`` at (top, left),
    without building the large mask (a window's instance in a scene)."""
    h, w = mask.shape
    if top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(f"a {h}x{w} window at ({top}, {left}) does not fit in {height}x{width}")
    padded = np.zeros((w, h + 2), dtype=np.int8)
    padded[:, 1:-1] = np.asarray(mask, dtype=bool).T  # column by column, the order of COCO RLE
    cols, rows = np.nonzero(np.diff(padded, axis=1))  # each run of 1s: its first pixel, then the one after it
    bounds = (left + cols).astype(np.int64) * height + top + rows
    if len(bounds):  # a run that goes on at the top of the next column (a window as tall as the mask) is one run
        joined = np.flatnonzero(bounds[1:-1:2] == bounds[2::2])
        bounds = np.delete(bounds, np.concatenate([2 * joined + 1, 2 * joined + 2]))
    runs = np.diff(np.concatenate(([0], bounds, [height * width]))).tolist()
    return runs[:-1] if len(runs) > 1 and runs[-1] == 0 else runs


def counts_to_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of run lengths; raises ValueError if they do not fill it exactly."""
    runs = np.asarray(counts, dtype=np.int64)
    if (runs < 0).any() or int(runs.sum()) != height * width:
        raise ValueError(f"RLE runs sum to {int(runs.sum())}, not {height}x{width}={height * width}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")


def encode_counts(counts: list[int]) -> str:
    """Compress run lengths into COCO's RLE string."""
    out = []
    for i, run in enumerate(counts):
        x = run - counts[i - 2] if i > 2 else run
        while True:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(48 + (c | 0x20 if more else c)))
            if not more:
                break
    return "".join(out)


def decode_counts(text: str) -> list[int]:
    """Decompress COCO's RLE string into run lengths; raises ValueError on a malformed string."""
    counts: list[int] = []
    x = shift = 0  # the number being read and the bit position of its next 5-bit group
    for pos, c in enumerate(map(ord, text)):
        c -= 48
        if not 0 <= c < 64:
            raise ValueError(f"RLE string has an invalid character {text[pos]!r}")
        x |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:  # continuation bit: more groups follow
            continue
        if c & 0x10:  # sign bit of the last group
            x |= -1 << shift
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
        x = shift = 0
    if shift:
        raise ValueError("RLE string ends inside a number")
    return counts


def encode_mask(mask: np.ndarray) -> dict:
    """A binary (H, W) mask as a COCO segmentation: ``{"size": [H, W], "counts": str}``."""
    height, width = mask.shape
    return {"size": [height, width], "counts": encode_counts(mask_to_counts(mask))}


def decode_mask(segmentation: dict) -> np.ndarray:
    """The (H, W) bool mask of a COCO segmentation with compressed (str) or list counts."""
    height, width = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = decode_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    return counts_to_mask(runs, height, width)
