"""Tiles and their lists, the parts of ``python -m diffmatch.prepare`` its subcommands share: cutting an
image into square tiles written as ``OUT/<kind>/<id>.png``, writing ``OUT/list/<name>.txt``, and sorting
tiles into splits (``--split-dir`` lists, ``--holdout`` draws of whole source pairs)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from diffmatch.cli import InputError, Progress
from diffmatch.images import read_label, read_rgb
from diffmatch.pairs import write_id_list
from diffmatch.png import write_png

TILE = 256
"""Side of the LEVIR-CD256 and WHU-CD-256 tiles, the default of ``prepare folder --tile``."""


def cut(array: np.ndarray, row: int, col: int, tile: int) -> np.ndarray:
    """Tile (row, col) of ``array``, zero-padded to ``tile`` x ``tile`` where it overhangs."""
    piece = array[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile]
    pad = [(0, tile - piece.shape[0]), (0, tile - piece.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(piece, pad) if piece.shape[:2] != (tile, tile) else piece


class Tiling(NamedTuple):
    """Where tiles go and how they are cut."""

    out: Path
    """Output data set root: tiles go to ``OUT/<kind>/<id>.png``."""
    tile: int
    """Side of the square tiles."""
    overwrite: bool
    """Rewrite tiles that exist; else a source whose tiles all exist is not read (resume)."""
    label_threshold: int | None
    """Binarise labels at this value when given (``images.read_label``)."""


def write_tiles(tiling: Tiling, sources: dict[str, Path], ids: list[list[str]],
                progress: Progress | None = None) -> list[str]:
    """Cut each source (kind -> file) into tiles named ``ids[row][col]``; return the ids, row-major.
    ``progress`` steps once per row of tiles."""
    out, flat = tiling.out, [i for row in ids for i in row]
    for kind, path in sources.items():
        if not tiling.overwrite and all((out / kind / f"{i}.png").is_file() for i in flat):
            if progress:
                progress.step(len(ids))
            continue
        array = read_label(path, tiling.label_threshold) * np.uint8(255) if kind == "label" else read_rgb(path)
        for r, row in enumerate(ids):
            for c, tile_id in enumerate(row):
                write_png(out / kind / f"{tile_id}.png", cut(array, r, c, tiling.tile))
            if progress:
                progress.step()
    return flat


def say_written(command: str, out: Path, lists: dict[str, list[str]]) -> None:
    """One line: how many tiles were written and how many each list holds."""
    counts = ", ".join(f"{len(ids)} in list/{name}.txt" for name, ids in lists.items())
    print(f"{command}: wrote {sum(map(len, lists.values()))} tiles to {out}/{{A,B,label}} ({counts})", flush=True)


def write_list(out: Path, name: str, ids: list[str]) -> None:
    """Write ``list/<name>.txt``, ids with ``.png``, atomically."""
    write_id_list(out / "list" / f"{name}.txt", ids, suffix=".png")


def read_split(split_dir: Path) -> dict[str, list[str]]:
    """Ids (without extension) of ``train.txt``, ``val.txt`` and ``test.txt`` in a split folder."""
    lists = {}
    for split in ("train", "val", "test"):
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            raise InputError(f"{path}: file not found; --split-dir must hold train.txt, val.txt, test.txt")
        lists[split] = [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]
    return lists


def parse_holdout(text: str) -> dict[str, float]:
    """``val=0.1,test=0.2`` as {"val": 0.1, "test": 0.2}; shares of val and test only, summing below 1."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            shares[name.strip()] = float(value)
        except ValueError:
            shares[name.strip()] = -1.0
    if not shares or set(shares) - {"val", "test"} or min(shares.values()) < 0 or sum(shares.values()) >= 1:
        raise InputError(f"--holdout {text}: give shares of val and/or test that sum below 1, e.g. "
                         "--holdout val=0.1,test=0.2")
    return shares


def holdout_splits(sources: list[dict[str, Path]], holdout: str | None, train: str, seed: int) -> list[str]:
    """The list each labelled source pair goes to (``unlabeled`` for those without a label): whole pairs
    drawn for val and test by ``seed``, at least one of each share above 0, the rest ``train``."""
    names = [train if "label" in pair else "unlabeled" for pair in sources]
    if holdout is None:
        return names
    shares, labelled = parse_holdout(holdout), [i for i, pair in enumerate(sources) if "label" in pair]
    counts = {split: max(1, round(share * len(labelled))) for split, share in shares.items() if share > 0}
    if sum(counts.values()) >= len(labelled):
        raise InputError(f"--holdout {holdout}: {len(labelled)} labelled source pair(s) leave none for training; "
                         "hold out smaller shares or add pairs")
    order = [labelled[k] for k in np.random.default_rng(seed).permutation(len(labelled))]
    start = 0
    for split, count in counts.items():
        for index in order[start:start + count]:
            names[index] = split
        start += count
    return names
