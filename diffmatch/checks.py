"""Checking a data set before a long command: every file of every id it will read, in one pass.

A missing, truncated or corrupted file, dates of different sizes, a label with stray values or a
missing pseudo label would otherwise stop a training run when its loader reaches that id, possibly an
hour in. ``check_data`` finds them all up front, prints one line per problem (the first few, then a
count) and stops with exit code 2; on success it prints how long it took. Images are checked without
decoding their pixels where that is safe and fast: a PNG's header and the checksum of every chunk
(which a truncated or corrupted file fails); other formats are decoded. Labels are read in full, to
check their values.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal, NamedTuple

from PIL import Image

from diffmatch.cli import InputError, Progress
from diffmatch.config import DataConfig
from diffmatch.data import LABEL_FLAG, image_path, pseudo_hint
from diffmatch.images import read_label
from diffmatch.subsets import SemiSplit, eval_ids

SHOWN = 5
"""Problems printed one per line; the rest are counted."""
HINT = "check the data set root and its list files"


class Need(NamedTuple):
    """Ids of one data set root and the files each must have besides its two dates."""

    root: Path
    ids: list[str]
    label: bool
    """``label/<id>`` must exist, match the image size and hold 0/255 or 0/1 (or be binarised)."""
    pseudo_dir: str | None
    """``<pseudo_dir>/{change,A,B}/<id>`` must exist as single-band masks of the image size."""


def image_header(path: Path) -> tuple[tuple[int, int], int]:
    """((height, width), number of bands) of an image that decodes: for a PNG, its header and the
    checksum of every chunk (no pixel is decoded); for other formats, a full decode."""
    with Image.open(path) as image:
        size, bands = (image.height, image.width), len(image.getbands())
        if image.format == "PNG":
            image.verify()
        else:
            image.load()
    return size, bands


class Expected(NamedTuple):
    """A file every id of a data set root must have in one folder."""

    folder: Path
    kind: Literal["image", "label", "mask"]
    """``image``: decodes; ``label``: holds 0/255 or 0/1 (or is binarised); ``mask``: a single band."""
    hint: str
    """The fix named when the file is missing or unreadable."""
    mismatch: str = ""
    """The fix named when its size differs from the pre-event image's."""


def expected_files(root: Path, label: bool, pseudo_dir: str | None) -> list[Expected]:
    """The files of each id under ``root``: the two dates first (A, then B), the label when ``label``, the CEG
    outputs when ``pseudo_dir`` is given."""
    files = [Expected(root / "A", "image", HINT),
             Expected(root / "B", "image", HINT, "the two dates must be co-registered")]
    if label:
        files.append(Expected(root / "label", "label", HINT, "use the label of this image"))
    if pseudo_dir is not None:
        hint = pseudo_hint(root, pseudo_dir)
        files += [Expected(root / pseudo_dir / folder, "mask", hint, hint) for folder in ("change", "A", "B")]
    return files


def file_size(expected: Expected, sample_id: str,
              label_threshold: int | None) -> tuple[tuple[int, int] | None, list[str]]:
    """(height, width) of the file of one id (None when it cannot be read) and what is wrong with it."""
    path = image_path(expected.folder.parent, expected.folder.name, sample_id)
    if not path.is_file():
        return None, [f"{path}: file not found; {expected.hint}"]
    try:
        if expected.kind == "label":
            return read_label(path, label_threshold, LABEL_FLAG).shape, []
        size, bands = image_header(path)
    except InputError as err:
        return None, [str(err)]
    except Exception as err:  # PIL raises many types for broken files
        return None, [f"{path}: cannot read image ({err}); re-export it"]
    if expected.kind == "mask" and bands != 1:
        return size, [f"{path}: expected a single-band mask, found {bands} bands; {expected.hint}"]
    return size, []


def pair_problems(sample_id: str, files: list[Expected], *, label_threshold: int | None,
                  absent: set[Path]) -> list[str]:
    """What is wrong with the ``files`` of one id (``expected_files``; empty when nothing is). Folders in
    ``absent`` are reported elsewhere, once."""
    problems: list[str] = []
    size_a = None
    for index, expected in enumerate(files):
        if expected.folder in absent:
            continue
        size, found = file_size(expected, sample_id, label_threshold)
        problems += found
        if index == 0:
            size_a = size
        elif size is not None and size_a is not None and size != size_a:
            path = image_path(expected.folder.parent, expected.folder.name, sample_id)
            problems.append(f"{path}: size {size[1]}x{size[0]} differs from A's {size_a[1]}x{size_a[0]}; "
                            f"{expected.mismatch}")
    return problems


def merge(needs: list[Need]) -> dict[tuple[Path, str], tuple[bool, str | None]]:
    """(root, id) -> (whether it needs a label, its pseudo-label folder), each pair once."""
    merged: dict[tuple[Path, str], tuple[bool, str | None]] = {}
    for need in needs:
        for sample_id in need.ids:
            label, pseudo = merged.get((need.root, sample_id), (False, None))
            merged[(need.root, sample_id)] = (label or need.label, pseudo or need.pseudo_dir)
    return merged


def absent_folders(needs: list[Need]) -> tuple[set[Path], list[str]]:
    """The folders the ids of ``needs`` read from that do not exist, and one line for each (one for the
    folders of a missing parent)."""
    problems, absent = [], set()
    folders = {(need.root / name, HINT) for need in needs if need.ids
               for name in ("A", "B", *(("label",) if need.label else ()))}
    folders |= {(need.root / need.pseudo_dir / name, pseudo_hint(need.root, need.pseudo_dir))
                for need in needs if need.ids and need.pseudo_dir is not None for name in ("change", "A", "B")}
    for folder, hint in sorted(folders):
        if not folder.is_dir():
            absent.add(folder)
            line = f"{folder.parent if not folder.parent.is_dir() else folder}: folder not found; {hint}"
            problems += [line] if line not in problems else []  # a missing parent: one line for its folders
    return absent, problems


def failure(problems: list[str], bad: int, pairs: int, seconds: float, show: bool) -> InputError:
    """The error of a check that found ``problems`` in ``bad`` of ``pairs`` pairs, after printing the first
    ``SHOWN`` of them (when ``show``)."""
    if show:
        for line in problems[:SHOWN]:
            print(line, file=sys.stderr)
        if len(problems) > SHOWN:
            print(f"... and {len(problems) - SHOWN:,} more problems", file=sys.stderr, flush=True)
    listed = "listed above" if len(problems) <= SHOWN else f"the first {SHOWN} above"
    count = f"{len(problems):,} problem{'s' if len(problems) > 1 else ''}"
    return InputError(f"data check: {count} in {bad:,} of {pairs:,} pairs ({listed}, found in {seconds:.1f} s); "
                      "fix them and run again")


def check_data(needs: list[Need], *, label_threshold: int | None = None, show: bool = True) -> float:
    """Check every id of ``needs`` (each once); return the seconds taken. On problems, print the first
    ``SHOWN`` (when ``show``) and raise ``InputError`` with their count."""
    start = time.perf_counter()
    merged = merge(needs)
    absent, problems = absent_folders(needs)
    progress = Progress("check data", len(merged), "pairs", enabled=show)
    bad = 0
    for (root, sample_id), (label, pseudo) in merged.items():
        files = expected_files(root, label, pseudo)
        found = pair_problems(sample_id, files, label_threshold=label_threshold, absent=absent)
        problems += found
        bad += bool(found) or not absent.isdisjoint(expected.folder for expected in files)
        progress.step()
    seconds = time.perf_counter() - start
    if problems:
        raise failure(problems, bad, len(merged), seconds, show)
    if show:
        print(f"data check: {len(merged):,} pairs, no problems ({seconds:.1f} s; --no-check-data skips it)",
              flush=True)
    return seconds


def check_training_data(data: DataConfig, split: SemiSplit, *, pseudo_dir: str | None, eval_splits: tuple[str, ...],
                        show: bool = True) -> float:
    """Check the labelled and unlabelled training ids of ``split`` (with pseudo labels when ``pseudo_dir`` is
    given) and every evaluation split a run reads; return the seconds taken."""
    needs = [Need(data.root, split.labeled, True, pseudo_dir),
             Need(data.unlabeled_root or data.root, split.unlabeled, False, pseudo_dir)]
    needs += [Need(data.root, eval_ids(data, name), True, None) for name in dict.fromkeys(eval_splits)]
    return check_data(needs, label_threshold=data.label_threshold, show=show)


def check_eval_data(data: DataConfig, split: str) -> float:
    """Check every pair of an evaluation split and its label; return the seconds taken."""
    return check_data([Need(data.root, eval_ids(data, split), True, None)], label_threshold=data.label_threshold)
