"""PNG files of single-channel uint8 masks, byte for byte as Pillow writes them at ``compress_level=1``
(with the same zlib), sooner.

Pillow filters each row with whichever of the PNG filters none, up, sub and Paeth (tried in that order)
gives the least sum of the bytes read as signed, and deflates the rows with ``Z_FILTERED``; the file
holds IHDR, the image data in one IDAT chunk of up to 64 KiB, and IEND. Here the filters of all rows
are computed at once, on the image read flat so that every step is one pass over contiguous memory,
every numpy operation writing into work arrays that a ``GrayEncoder`` keeps from one image to the next
(allocating fresh ones for each of its dozens of steps costs more than the arithmetic), and the rows
deflated in one call. Needs numpy, Pillow (for the images it leaves to Pillow) and ``atomic.py`` (the
atomic write).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from diffmatch.atomic import atomic_path, write_bytes

MAX_IDAT = 65536
"""Pillow splits longer image data over several IDAT chunks; ``encode_gray`` leaves those images to it."""
FILTER_TYPES = np.array([0, 2, 1, 4], dtype=np.uint8)
"""PNG filter type bytes of none, up, sub and Paeth, in the order Pillow tries them."""


def _select(condition: np.ndarray, x: np.ndarray, y: np.ndarray, out: np.ndarray,
            scratch: tuple[np.ndarray, np.ndarray]) -> None:
    """``out = np.where(condition, x, y)`` for uint8 arrays, as bit operations, with two uint8 work arrays of
    their size; ``out`` may be ``y``."""
    mask, work = scratch
    np.negative(condition.view(np.uint8), out=mask)  # 255 where the condition holds
    np.bitwise_and(np.bitwise_xor(x, y, out=work), mask, out=work)
    np.bitwise_xor(y, work, out=out)


def _distance(x: np.ndarray, y: np.ndarray, out: np.ndarray, work: np.ndarray) -> None:
    """``out = |x - y|`` for uint8 arrays."""
    np.subtract(np.maximum(x, y, out=out), np.minimum(x, y, out=work), out=out)


class GrayEncoder:
    """Encodes (H, W) uint8 images as PNG files (``encode_gray``'s bytes), keeping its work arrays from
    one image to the next of the same size: fresh arrays for every image cost more than the arithmetic
    (the system maps and clears their pages anew)."""

    def __init__(self, level: int = 1) -> None:
        self.level = level
        self._shape: tuple[int, int] | None = None

    def _allocate(self, height: int, width: int) -> None:
        stride = width + 1  # each row behind one byte: 0 in the padded image, the filter type in the output
        size = height * stride
        self._shape = (height, width)
        self._padded = np.zeros(1 + (height + 1) * stride, dtype=np.uint8)  # one byte, a zero row, the rows
        self._candidates = np.empty((4, size), dtype=np.uint8)  # none, up, sub, Paeth
        self._work = np.empty((5, size), dtype=np.uint8)
        self._picks = np.empty((2, size), dtype=bool)
        self._costs = np.empty((4, height), dtype=np.uint16 if stride * 128 < 2**16 else np.uint32)
        self._rows = np.empty((height, stride), dtype=np.uint8)
        self._row_index = np.arange(height)

    def filter_rows(self, image: np.ndarray) -> np.ndarray:
        """(H, W + 1) uint8: each row of ``image`` filtered as Pillow chooses, behind its filter type
        byte; the encoder's own array, overwritten by the next image."""
        height, width = image.shape
        if self._shape != (height, width):
            self._allocate(height, width)
        stride = width + 1
        size = height * stride
        padded = self._padded
        padded[1:].reshape(height + 1, stride)[1:, 1:] = image
        # The padded image read flat: each pixel and its left, up and up-left neighbours are four slices
        # one apart, and every step below is one pass over contiguous memory. The values computed at
        # the padding bytes (the first of each row) are not pixels: they are cleared before the costs.
        x, a, b, c = padded[1 + stride:], padded[stride:-1], padded[1:1 + size], padded[:size]
        none, up, sub, paeth = self._candidates
        none[...] = x
        np.subtract(x, b, out=up)  # differences wrap modulo 256, as PNG's do
        np.subtract(x, a, out=sub)
        # Paeth predicts a if |p - a| <= |p - b| and <= |p - c|, else b if |p - b| <= |p - c|, else c, with
        # p = a + b - c: |p - a| = |b - c|, |p - b| = |a - c|, and |p - c| = |a - c + b - c| is their sum (no
        # smaller than either: 255 stands for it) when a and b lie on one side of c, else their difference.
        pa, pb, pc, work, predictor = self._work
        pick_b, pick_a = self._picks
        _distance(b, c, pa, work)
        _distance(a, c, pb, work)
        _distance(pa, pb, pc, work)
        one_side = np.equal(np.greater(a, c, out=pick_a), np.greater(b, c, out=pick_b), out=pick_a)
        np.bitwise_or(pc, np.negative(one_side.view(np.uint8), out=work), out=pc)
        np.less_equal(pb, pc, out=pick_b)
        np.logical_and(np.less_equal(pa, pb, out=pick_a), np.less_equal(pa, pc, out=work.view(bool)), out=pick_a)
        _select(pick_b, b, c, predictor, (pa, pb))
        _select(pick_a, a, predictor, predictor, (pa, pb))
        np.subtract(x, predictor, out=paeth)
        rows = self._candidates.reshape(4 * height, stride)
        rows[:, 0] = 0
        cost = self._work[:4]  # per row, the sum of |byte read as int8|; -128 stays -128: 128 read as uint8
        np.abs(self._candidates.view(np.int8), out=cost.view(np.int8))
        np.add.reduce(cost.reshape(4, height, stride), axis=2, dtype=self._costs.dtype, out=self._costs)
        choice = self._costs.argmin(axis=0)  # the first filter of least cost
        np.take(rows, choice * height + self._row_index, axis=0, out=self._rows, mode="clip")  # clip: unbuffered
        self._rows[:, 0] = FILTER_TYPES[choice]
        return self._rows

    def encode(self, image: np.ndarray) -> bytes | None:
        """PNG file of an (H, W) uint8 image as Pillow's ``save(format="PNG", compress_level=level)``
        writes it; None when its image data would not fit one IDAT chunk of Pillow's."""
        height, width = image.shape
        compressor = zlib.compressobj(self.level, zlib.DEFLATED, 15, 9, zlib.Z_FILTERED)
        rows = self.filter_rows(np.asarray(image, dtype=np.uint8))
        data = compressor.compress(rows) + compressor.flush()
        if len(data) >= MAX_IDAT:
            return None
        header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, not interlaced
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def filter_rows(image: np.ndarray) -> np.ndarray:
    """(H, W + 1) uint8: each row of an (H, W) uint8 image filtered as Pillow chooses, behind its filter
    type byte."""
    return GrayEncoder().filter_rows(image)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_gray(image: np.ndarray, level: int = 1) -> bytes | None:
    """PNG file of an (H, W) uint8 image as Pillow's ``save(format="PNG", compress_level=level)`` writes
    it; None when its image data would not fit one IDAT chunk of Pillow's. ``GrayEncoder`` for many."""
    return GrayEncoder(level).encode(image)


def write_png(path: Path, array: np.ndarray, compress_level: int = 1) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (fast zlib level by default)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = encode_gray(array, compress_level) if array.ndim == 2 else None  # Pillow's bytes, sooner
    if data is not None:
        write_bytes(path, data)
        return
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image, from the IHDR chunk of a PNG (a tenth of Pillow's time), else as Pillow reads
    it from the header."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return height, width
    with Image.open(path) as image:  # reads the header only
        return image.height, image.width
