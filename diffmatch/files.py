"""Files: reading images, masks and id lists, listing the images of a folder and matching the pairs of
``A/``, ``B/`` (and ``label/``), writing files atomically (masks as PNG: Pillow's bytes, sooner), the
progress line of long commands, and the error users see on bad input."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np
from PIL import Image

IMAGE_EXTS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """Bad user input (a file, a folder or a value): one line naming it and the fix. CLIs exit 2."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a CLI's main; an ``InputError`` becomes one line on stderr and exit code 2."""
    try:
        main()
    except InputError as err:
        # An error raised in a DataLoader worker arrives with the worker's traceback: keep its last line.
        message = str(err).strip().splitlines()[-1] if str(err).strip() else "bad input"
        print(f"error: {message.removeprefix(f'{InputError.__module__}.InputError: ')}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        image = Image.open(path)
        image.load()
    except Exception as err:  # PIL raises many types for broken files
        raise InputError(f"{path}: cannot read image ({err}); re-export it as PNG") from None
    return image


def read_id_list(path: Path) -> list[str]:
    """Ids of a list file, one per line, with or without an image extension."""
    if not path.is_file():
        raise InputError(f"{path}: list file not found; check the path or the split folder")
    ids = []
    for line in path.read_text().splitlines():
        name = line.strip()
        if name:
            ids.append(name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_EXTS else name)
    if not ids:
        raise InputError(f"{path}: the list is empty; it needs one id per line")
    return ids


def read_rgb(path: Path) -> np.ndarray:
    """An image as uint8 (H, W, 3); grey, palette, RGBA and 16-bit images are converted."""
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = max(float(array.max()), 1.0)
        image = Image.fromarray((array * (255.0 / top)).astype(np.uint8))
    return np.asarray(image.convert("RGB"))


def read_label(path: Path, threshold: int | None = None, flag: str = "--label-threshold") -> np.ndarray:
    """A change mask as uint8 (H, W) in {0, 1}; accepts {0, 255} or {0, 1}, grey, RGB(A) or palette.

    Any other value is an error naming the file, the values, their pixel count and ``flag``; with
    ``threshold`` T such a label is binarised instead: value >= T is change (for colour labels, the
    brightest channel). Labels already in {0, 255} or {0, 1} are read as they are, whatever T.
    """
    if threshold is not None and threshold < 1:
        raise InputError(f"{flag} {threshold}: must be at least 1 (value >= T is change)")
    image = _open(path)
    if image.mode == "P":
        image = image.convert("RGBA")
    array = np.asarray(image)
    if array.ndim == 3:
        channels = array[..., :3] if array.shape[2] >= 3 else array[..., :1]
        if image.mode in ("LA", "RGBA") and array.shape[2] in (2, 4):
            channels = np.where(array[..., -1:] == 0, 0, channels)  # transparent = no change
        if not (channels == channels[..., :1]).all():
            if threshold is None:
                raise InputError(f"{path}: label has differing colour channels; save it as a grey 0/255 PNG "
                                 f"or pass {flag} T (brightest channel >= T is change)")
            channels = channels.max(axis=2, keepdims=True)
        array = channels[..., 0]
    full = array == 255
    if (full | (array == 0)).all():  # comparisons, not a sort: labels are read every epoch
        return full.astype(np.uint8)
    if (array <= 1).all() and (array >= 0).all():
        return array.astype(np.uint8)
    if threshold is not None:
        return (array >= threshold).astype(np.uint8)
    values = np.unique(array)
    high = 1 if 1 in values and 255 not in values else 255  # {0, 1, 2} is a 0/1 label, {0, 21, 252} a 0/255 one
    stray = values[~np.isin(values, (0, high))]
    count = int(np.isin(array, stray).sum())
    shown = [str(v) for v in stray] if len(stray) <= 6 else [*map(str, stray[:5]), "...", str(stray[-1])]
    many = f" ({len(stray)} values)" if len(stray) > 6 else ""
    cut = 128 if high == 255 else 1
    raise InputError(f"{path}: {count:,} of {array.size:,} label pixels have values {{{', '.join(shown)}}}{many}, "
                     f"not 0 or {high}; pass {flag} {cut} to binarise the labels (value >= {cut} is change)")


def read_mask(path: Path) -> np.ndarray:
    """A pseudo-label mask as uint8 (H, W) with values kept as stored (0, 1, 255)."""
    array = np.asarray(_open(path))
    if array.ndim != 2:
        raise InputError(f"{path}: expected a single-channel mask; regenerate it")
    return array.astype(np.uint8)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, making its folder if missing: as ``atomic_path`` does, in
    half the system calls (CEG writes thousands of small files): ``.<name>.<pid>.tmp`` is created with
    the usual permissions, written and renamed."""
    name = os.fspath(path)
    tmp = os.path.join(os.path.dirname(name), f".{os.path.basename(name)}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # no newline translation
    try:
        fd = os.open(tmp, flags, 0o666)  # 0o666 less the umask, as for any new file
    except FileNotFoundError:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    except FileExistsError:  # left by a killed process of the same id, or written by another thread
        with atomic_path(Path(name)) as other:
            other.write_bytes(data)
        return
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- PNG files of masks
# PNG files of single-channel uint8 masks, byte for byte as Pillow writes them at ``compress_level=1``
# (with the same zlib), sooner.
#
# Pillow filters each row with whichever of the PNG filters none, up, sub and Paeth (tried in that order)
# gives the least sum of the bytes read as signed, and deflates the rows with ``Z_FILTERED``; the file
# holds IHDR, the image data in one IDAT chunk of up to 64 KiB, and IEND. Here the filters of all rows
# are computed at once, on the image read flat so that every step is one pass over contiguous memory,
# every numpy operation writing into work arrays that a ``GrayEncoder`` keeps from one image to the next
# (allocating fresh ones for each of its dozens of steps costs more than the arithmetic), and the rows
# deflated in one call.

MAX_IDAT = 65536
"""Pillow splits longer image data over several IDAT chunks; ``encode_gray`` leaves those images to it."""
FILTER_TYPES = np.array([0, 2, 1, 4], dtype=np.uint8)
"""PNG filter type bytes of none, up, sub and Paeth, in the order Pillow tries them."""


def _select(condition: np.ndarray, x: np.ndarray, y: np.ndarray, out: np.ndarray, mask: np.ndarray,
            work: np.ndarray) -> None:
    """``out = np.where(condition, x, y)`` for uint8 arrays, as bit operations; ``out`` may be ``y``."""
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
        _select(pick_b, b, c, predictor, pa, pb)
        _select(pick_a, a, predictor, predictor, pa, pb)
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


def write_json(path: Path, obj: Any) -> None:
    """Write JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_id_list(path: Path, ids: list[str], suffix: str = "") -> None:
    """Write an id list, one id (plus ``suffix``, e.g. ``.png``) per line, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{i}{suffix}\n" for i in ids))


# ----------------------------------------------------------------------------- progress


class Progress:
    """Prints ``name: done/total unit, rate, ETA`` at most once a second and when finished."""

    def __init__(self, name: str, total: int, unit: str, *, file: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.name, self.total, self.unit, self.file, self.enabled = name, total, unit, file, enabled
        self.done, self.start, self.shown = 0, time.monotonic(), 0.0

    def step(self, n: int = 1) -> None:
        self.done, now = self.done + n, time.monotonic()
        if self.enabled and (now - self.shown >= 1.0 or self.done >= self.total):
            self.shown, rate = now, self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            line = f"{self.name}: {self.done}/{self.total} {self.unit}, {rate:.3g}/s, ETA {eta:.0f}s"
            print(line, file=self.file or sys.stdout, flush=True)


# ----------------------------------------------------------------------------- image pairs on disk
KINDS = ("A", "B", "label")


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders ``train_2`` before ``train_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def images_in(folder: Path) -> dict[str, Path]:
    """Image files of a folder by name without extension; two files with one name are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_EXTS and not path.name.startswith("."):
            if path.stem in found:
                raise InputError(f"{path}: same name as {found[path.stem].name}; keep one of the two")
            found[path.stem] = path
    return found


class Scan(NamedTuple):
    """The complete pairs of a folder and a line for every name that lacks a file."""

    pairs: list[dict[str, Path]]
    """``{A, B[, label]} -> file`` per complete pair, in natural name order."""
    missing: list[str]
    """For each name with an image on one date only (or without a label, when labels are needed): the
    file that exists and what is missing, in natural name order."""


def scan_pairs(root: Path, need_label: bool) -> Scan:
    """Match the images of ``root/A``, ``root/B`` (and ``root/label``) by name without extension."""
    for kind in KINDS if need_label else ("A", "B"):
        if not (root / kind).is_dir():
            raise InputError(f"{root / kind}: folder not found; {root} must hold A/, B/"
                             f"{' and label/' if need_label else ' (and label/ for labels)'}")
    found = {kind: images_in(root / kind) for kind in KINDS}
    if not found["A"]:
        raise InputError(f"{root / 'A'}: no images found ({', '.join(IMAGE_EXTS)})")
    needed = KINDS if need_label else ("A", "B")
    pairs, missing = [], []
    for stem in sorted(found["A"].keys() | found["B"].keys(), key=natural_key):
        have = {kind: found[kind][stem] for kind in KINDS if stem in found[kind]}
        lacking = [kind for kind in needed if kind not in have]
        if lacking:
            where = ", ".join(str(root / kind) for kind in lacking)
            missing.append(f"{next(iter(have.values()))}: no {' or '.join(lacking)} image named {stem}.* in {where}")
        else:
            pairs.append(have)
    return Scan(pairs, missing)


def find_pairs(root: Path, need_label: bool) -> list[dict[str, Path]]:
    """``{A, B[, label]} -> file`` for every image of ``root/A`` and ``root/B``, in natural name order; a
    name without an image on either date (or without a label, when needed) is an error."""
    scan = scan_pairs(root, need_label)
    if scan.missing:
        raise InputError(scan.missing[0])
    return scan.pairs


def pair_size(sources: dict[str, Path], skip_mismatch: bool = False, hint: str = "") -> tuple[int, int] | None:
    """(height, width) of the images, read from the file headers. Differing sizes are an error naming
    the files (plus ``hint``), or with ``skip_mismatch`` a printed warning and None."""
    sizes = {}
    for path in sources.values():
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        try:
            with Image.open(path) as image:
                sizes[path] = image.height, image.width
        except Exception as err:  # PIL raises many types for broken files
            raise InputError(f"{path}: cannot read image ({err}); re-export it as PNG") from None
    if len(set(sizes.values())) == 1:
        return next(iter(sizes.values()))
    error = "image sizes differ: " + ", ".join(f"{path} is {w}x{h}" for path, (h, w) in sizes.items())
    if not skip_mismatch:
        raise InputError(f"{error}; crop them to one size{hint}")
    print(f"skipped: {error}; crop them to one size", flush=True)
    return None


@contextmanager
def no_pixel_limit() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit for scenes we mean to read whole (WHU-CD is ~500 M pixels),
    then restore it."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit
