"""COCO run-length encoding of masks, and instance IoU computed on the runs without decoding, as used by
change event generation (§3.2). Needs nothing but numpy.

COCO run-length encoding (RLE) of binary masks is done in numpy (no pycocotools). Runs alternate 0s
and 1s over the mask in column-major (Fortran) order, starting with a run of 0s. The compressed string
form stores each run (after the third, as the difference to the run two before) in 5-bit groups offset
by ASCII 48, as pycocotools does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


# ----------------------------------------------------------------------------- COCO RLE
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


# --- Many masks as runs: decoding without masks, IoU on the runs ------------------------------------


class Runs(NamedTuple):
    """The foreground runs of ``count`` binary (H, W) masks, as half-open ranges of column-major pixel
    indices (``row + col * H``), in any order. An empty mask has no run."""

    starts: np.ndarray
    """(R,) int64 first pixel of each run."""
    ends: np.ndarray
    """(R,) int64 one past the last pixel of each run."""
    owner: np.ndarray
    """(R,) int64 index of the mask each run belongs to."""
    count: int
    """Number of masks."""
    height: int
    """H of every mask."""
    width: int
    """W of every mask."""

    def areas(self) -> np.ndarray:
        """(K,) int64 pixel count of each mask (overlapping runs of one mask count twice)."""
        return np.bincount(self.owner, weights=self.ends - self.starts, minlength=self.count).astype(np.int64)

    def union(self, select: np.ndarray | None = None) -> np.ndarray:
        """(H, W) bool union of the masks ``select`` (a (K,) bool array; None: all), C-contiguous; only
        their runs are decoded."""
        starts, ends = (self.starts, self.ends) if select is None else (self.starts[select[self.owner]],
                                                                         self.ends[select[self.owner]])
        col, row = np.divmod(_run_pixels(starts, ends), self.height)
        flat = np.zeros(self.height * self.width, dtype=bool)
        flat[row * self.width + col] = True  # row-major at once: no transposing copy of the whole mask
        return flat.reshape(self.height, self.width)

    def subset(self, keep: np.ndarray) -> Runs:
        """The masks ``keep`` (a (K,) bool array), renumbered in order."""
        index = np.cumsum(keep) - 1
        runs = keep[self.owner]
        return Runs(self.starts[runs], self.ends[runs], index[self.owner[runs]], int(keep.sum()), self.height,
                    self.width)

    def masks(self) -> np.ndarray:
        """(K, H, W) bool masks, each stored column-major (the order of COCO RLE)."""
        pixels = self.height * self.width
        flat = np.zeros(self.count * pixels, dtype=bool)
        flat[_run_pixels(self.starts + self.owner * pixels, self.ends + self.owner * pixels)] = True
        return flat.reshape(self.count, self.width, self.height).transpose(0, 2, 1)


def _run_pixels(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Every pixel index covered by the runs, concatenated."""
    lengths = ends - starts
    return np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)


def runs_of_masks(masks: np.ndarray) -> Runs:
    """The runs of (K, H, W) bool masks."""
    count, height, width = masks.shape
    flat = np.asarray(masks, dtype=bool).transpose(0, 2, 1).reshape(count, height * width)
    edges = np.diff(flat.view(np.int8), axis=1, prepend=0, append=0)  # +1 where a run starts, -1 past its end
    owner, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # row-major order: the k-th end closes the k-th start
    return Runs(starts, ends, owner, count, height, width)


class RLEError(ValueError):
    """A malformed RLE among several; ``index`` is its position."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def runs_of_counts(counts: np.ndarray, lengths: np.ndarray, height: int, width: int) -> Runs:
    """The runs of ``len(lengths)`` masks from their run lengths (COCO counts, 0s first) concatenated,
    ``lengths[k]`` of them for mask k; raises RLEError if a mask's runs are negative or do not fill
    (H, W) exactly."""
    counts, lengths = np.asarray(counts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths  # index of each mask's first run
    ends = np.concatenate(([0], np.cumsum(counts)))
    base, totals = ends[first], ends[first + lengths] - ends[first]  # pixels before each mask, its sum
    bad = (totals != height * width) | (np.bincount(owner, weights=counts < 0, minlength=len(lengths)) > 0)
    if bad.any():
        k = int(np.argmax(bad))
        raise RLEError(k, f"RLE runs sum to {int(totals[k])}, not {height}x{width}={height * width}")
    ends = ends[1:] - base[owner]
    fg = ((np.arange(len(counts)) - first[owner]) % 2 == 1) & (counts > 0)  # the non-empty runs of 1s
    return Runs(ends[fg] - counts[fg], ends[fg], owner[fg], len(lengths), height, width)


def decode_counts_many(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths of many compressed RLE strings at once, as ``decode_counts`` gives them: (all of
    them concatenated, how many per string); raises RLEError on the first malformed string."""
    joined = "".join(texts).encode()
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    v = np.frombuffer(joined, dtype=np.uint8) - np.uint8(48)  # 6-bit groups; other characters wrap above 63
    last = (v & 0x20) == 0  # a number ends at each group without the continuation bit
    is_start = np.empty(len(v), dtype=bool)  # the first group of each number
    is_start[:1], is_start[1:] = True, last[:-1]
    position = np.arange(len(v))
    group = position - np.maximum.accumulate(position * is_start)  # a group's place in its number
    string_ends = np.cumsum(lengths)[lengths > 0] - 1
    if len(joined) != lengths.sum() or (v > 63).any() or not last[string_ends].all() or (group > 6).any():
        return _decode_one_by_one(texts)  # non-ASCII, a bad character, a cut number, one of over 35 bits
    shift = 5 * group
    x = (np.add.reduceat((v & 0x1F).astype(np.int64) << shift, np.flatnonzero(is_start)) if len(v)
         else np.zeros(0, np.int64))
    x -= (v[last] & 0x10).astype(np.int64) << (shift[last] + 1)  # sign bit of a number's last group
    per_string = np.bincount(np.repeat(np.arange(len(texts)), lengths)[last], minlength=len(texts))
    # Runs after the third are stored as the difference to the run two before: running sums over the
    # even and the odd places of the whole array, less their value where the string's lane began (one
    # pass each instead of one per string and lane).
    first = np.repeat(np.cumsum(per_string) - per_string, per_string)  # each run's string's first run
    sums = np.zeros(len(x) + 1, dtype=np.int64)  # sums[1 + m] = x[m] + x[m - 2] + ...
    sums[1::2], sums[2::2] = np.cumsum(x[0::2]), np.cumsum(x[1::2])
    counts = sums[1:] - sums[first + 1 - ((position[:len(x)] - first) & 1)]  # odd lane from 1, even from 2
    counts[first] = x[first]  # a string's first run is stored as it is
    return counts, per_string


def _decode_one_by_one(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``decode_counts_many`` for strings the vectorised path does not take: each with ``decode_counts``."""
    decoded = []
    for i, text in enumerate(texts):
        try:
            decoded.append(decode_counts(text))
        except ValueError as err:
            raise RLEError(i, str(err)) from None
        if any(abs(v) >= 1 << 40 for v in decoded[-1]):  # larger than any image
            raise RLEError(i, "RLE run out of range")
    flat = [v for values in decoded for v in values]
    return np.array(flat, dtype=np.int64), np.array([len(v) for v in decoded], dtype=np.int64)


def runs_intersections(a: Runs, b: Runs) -> np.ndarray:
    """(M, N) int64 pixel counts of ``a``'s masks meeting ``b``'s (same (H, W)); overlapping runs of one
    mask count twice. Runs are cut at column ends, so only pieces of one column can meet."""
    sa, ea, oa = _column_pieces(a)
    sb, eb, ob = _column_pieces(b)
    order = np.argsort(sb, kind="stable")
    sb, eb, ob = sb[order], eb[order], ob[order]
    lo = np.searchsorted(sb, sa - sa % a.height)  # b's pieces starting in a piece's column ...
    hi = np.searchsorted(sb, ea)  # ... before the piece ends
    n = hi - lo
    ia = np.repeat(np.arange(len(sa)), n)
    ib = np.arange(int(n.sum())) + np.repeat(lo - (np.cumsum(n) - n), n)
    overlap = np.minimum(ea[ia], eb[ib]) - np.maximum(sa[ia], sb[ib])
    pair = oa[ia] * b.count + ob[ib]
    inter = np.bincount(pair, weights=np.maximum(overlap, 0), minlength=a.count * b.count)
    return inter.astype(np.int64).reshape(a.count, b.count)


def _column_pieces(runs: Runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starts, ends and owners of the runs cut at every column end."""
    first, last = runs.starts // runs.height, (runs.ends - 1) // runs.height
    pieces = last - first + 1
    if (pieces == 1).all():
        return runs.starts, runs.ends, runs.owner
    index = np.repeat(np.arange(len(pieces)), pieces)
    column = first[index] + np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = np.maximum(runs.starts[index], column * runs.height)
    ends = np.minimum(runs.ends[index], (column + 1) * runs.height)
    return starts, ends, runs.owner[index]
