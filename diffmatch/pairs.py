"""The data set on disk: id lists, and the image pairs of ``A/``, ``B/`` (and ``label/``) matched by
name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from diffmatch.atomic import atomic_path
from diffmatch.cli import InputError
from diffmatch.images import IMAGE_EXTS


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


def write_id_list(path: Path, ids: list[str], suffix: str = "") -> None:
    """Write an id list, one id (plus ``suffix``, e.g. ``.png``) per line, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{i}{suffix}\n" for i in ids))


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
