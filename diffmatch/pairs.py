"""Image pairs on disk: ``A/``, ``B/`` (and ``label/``) files matched by name without extension, their
size read from the file headers, and PIL's pixel limit lifted for large scenes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from diffmatch.files import IMAGE_EXTS, InputError

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
