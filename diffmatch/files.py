"""Files: reading images, masks and id lists, listing the images of a folder and matching the pairs of
``A/``, ``B/`` (and ``label/``), writing files atomically (masks as PNG: ``png.py``), the progress line
of long commands, and the error users see on bad input."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
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
    """An image as uint8 (H, W, 3); grey, palette, RGBA, 16-bit and float images are converted (16-bit and
    float scaled by their range, with a one-line notice on stderr for float)."""
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = max(float(array.max()), 1.0)
        image = Image.fromarray((array * (255.0 / top)).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(scale_float(np.asarray(image, dtype=np.float64), path))
    return np.asarray(image.convert("RGB"))


def scale_float(array: np.ndarray, path: Path) -> np.ndarray:
    """Float pixels as uint8: reflectances in [0, 1] times 255, any other range scaled by its maximum;
    negative and non-finite values become 0. Says so in one line on stderr."""
    array = np.where(np.isfinite(array), array, 0.0).clip(min=0.0)
    top = float(array.max())
    scale = 255.0 if top <= 1.0 else 255.0 / top
    print(f"note: {path}: float pixels (0 to {top:.4g}) scaled to 0-255 by {scale:.4g}; convert to 8-bit "
          "yourself to choose the scaling", file=sys.stderr, flush=True)
    return (array * scale).round().clip(0, 255).astype(np.uint8)


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
