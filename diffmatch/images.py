"""Reading images and masks: any of the usual formats and modes as uint8 RGB, change labels checked
to be {0, 1} or {0, 255}, pseudo-label masks as stored, image sizes from the headers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from diffmatch.cli import InputError

IMAGE_EXTS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        image = Image.open(path)
        image.load()
    except Exception as err:  # PIL raises many types for broken files
        raise InputError(f"{path}: cannot read image ({err}); re-export it as PNG") from None
    return image


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
