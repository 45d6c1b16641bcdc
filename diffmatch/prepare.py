"""Cut raw change-detection data into the project's layout of 256x256 tiles (docs/data.md).

Every subcommand writes ``OUT/{A,B,label}/<id>.png`` (labels 0/255) and ``OUT/list/<name>.txt`` (ids
with ``.png``, as in the UniMatch/DiffMatch split lists). Tile ids:

- ``levir`` (official ``SRC/{train,val,test}/{A,B,label}/<scene>.png``, 1024x1024): ``<scene>_<c>``,
  c = 1..16 row-major (row 1: c = 1..4), the naming of LEVIR-CD256 and its split lists.
- ``whu`` (one large image per date and a change label): ``whucd_<n>``, n = 1, 2, ... (5 digits),
  row-major over the whole tiles; right and bottom leftovers are dropped, so the published
  32,507 x 15,354 pair gives 126 x 59 = 7,434 tiles, the count of the WHU-CD-256 split lists (whether
  that archive numbered its tiles in this order is not known; ``--split-dir`` reuses its lists as is).
- ``folder`` (any ``SRC/{A,B[,label]}``, any size and image format, GeoTIFF included: the PNG tiles do
  not keep its geo-referencing): ``<stem>_<row>_<col>``, 0-based; leftovers padded (image 0, label 0 =
  no change) or dropped. Pairs without a label are written as A/B only and listed in
  ``list/unlabeled.txt``; pairs missing a date or of differing sizes stop the command, or with
  ``--mismatch skip`` are left out with one line each.

Resumable: a scene, pair or WHU date whose tiles all exist is not read again unless ``--overwrite``;
files are written atomically. Example: ``python -m diffmatch.prepare levir --src LEVIR-CD --out LEVIR-CD256``
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

from diffmatch.cli import InputError, Progress, run_cli
from diffmatch.geotiff import geo_tags
from diffmatch.images import IMAGE_EXTS, no_pixel_limit, pair_size
from diffmatch.pairs import KINDS, find_pairs, scan_pairs
from diffmatch.subsets import split_folder
from diffmatch.tiles import TILE, Tiling, holdout_splits, read_split, say_written, write_list, write_tiles

WHU_SIZES = {"train": 5947, "val": 743, "test": 744}  # published split of 7,434 tiles


@dataclass
class LevirArgs:
    """Official LEVIR-CD scenes -> LEVIR-CD256 tiles ``<scene>_<c>.png``."""

    src: Path
    """Official layout: ``SRC/{train,val,test}/{A,B,label}/<scene>.png``."""
    out: Path
    """Output data set root."""
    splits: tuple[str, ...] = ("train", "val", "test")
    """Split folders to convert; each must exist under ``src``."""
    label_threshold: int | None = None
    """Binarise labels with values other than 0/255 or 0/1 (stray greys from an annotation tool, JPEG
    noise): value >= T is change. None: such a label stops the command, naming its values."""
    overwrite: bool = False
    """Rewrite tiles that already exist (default: skip finished scenes)."""


@dataclass
class WhuArgs:
    """WHU-CD image pair -> WHU-CD-256 tiles ``whucd_NNNNN.png`` and a train/val/test split."""

    out: Path
    """Output data set root."""
    src: Path | None = None
    """Folder searched for ``before.*``, ``after.*`` and ``change_label.*`` (used for any of
    ``--a``, ``--b``, ``--label`` not given)."""
    a: Path | None = None
    """Pre-event image (2012)."""
    b: Path | None = None
    """Post-event image (2016)."""
    label: Path | None = None
    """Change label image."""
    split_dir: Path | None = None
    """Folder with ``train.txt``, ``val.txt``, ``test.txt`` to copy to ``list/``, or ``whu`` for the
    published lists shipped with the package. None: a seeded split of the published sizes (scaled to
    the number of tiles)."""
    seed: int = 0
    """Seed of the split drawn without ``--split-dir``."""
    label_threshold: int | None = None
    """Binarise labels with values other than 0/255 or 0/1 (stray greys from an annotation tool, JPEG
    noise): value >= T is change. None: such a label stops the command, naming its values."""
    overwrite: bool = False
    """Rewrite tiles that already exist (default: skip dates whose tiles all exist)."""


@dataclass
class FolderArgs:
    """Any folder of A/B(/label) image pairs -> tiles ``<stem>_<row>_<col>.png``."""

    src: Path
    """Folder with ``A/``, ``B/`` and optionally ``label/``; files pair up by name without extension."""
    out: Path
    """Output data set root."""
    tile: int = TILE
    """Side of the square tiles."""
    border: Literal["pad", "drop"] = "pad"
    """Tiles that overhang the image: ``pad`` (image 0, label 0 = no change) or ``drop``."""
    list_name: str = "train"
    """Name of the list of labelled tiles, ``list/<name>.txt``."""
    mismatch: Literal["error", "skip"] = "error"
    """Pairs missing a date (an A without a B or the reverse), or whose A, B or label differ in size:
    stop with an error, or skip them with one warning line each (a pair without a label is not skipped:
    it is listed as unlabelled)."""
    label_threshold: int | None = None
    """Binarise labels with values other than 0/255 or 0/1 (stray greys from an annotation tool, JPEG
    noise): value >= T is change. None: such a label stops the command, naming its values."""
    holdout: str | None = None
    """Hold out whole labelled source pairs for evaluation, e.g. ``val=0.1,test=0.2``: each goes with all its
    tiles to ``list/val.txt``, ``list/test.txt`` or ``list/<list-name>.txt`` (a seeded draw, ``--seed``), so
    no scene has tiles in two splits. None: every labelled tile in ``list/<list-name>.txt``."""
    seed: int = 0
    """Seed of the ``--holdout`` draw."""
    overwrite: bool = False
    """Rewrite tiles that already exist (default: skip finished pairs)."""


Args = (
    Annotated[LevirArgs, tyro.conf.subcommand("levir")]
    | Annotated[WhuArgs, tyro.conf.subcommand("whu")]
    | Annotated[FolderArgs, tyro.conf.subcommand("folder")]
)


def prepare_levir(args: LevirArgs) -> dict[str, list[str]]:
    """Cut every scene of every split into 4x4 tiles; return the tile ids of each split."""
    scenes = {split: find_pairs(args.src / split, need_label=True) for split in args.splits}
    progress = Progress("levir", sum(len(s) for s in scenes.values()), "scenes")
    lists: dict[str, list[str]] = {}
    for split, pairs in scenes.items():
        lists[split] = []
        for sources in pairs:
            height, width = pair_size(sources)
            if height % TILE or width % TILE:
                raise InputError(f"{sources['A']}: {width}x{height} is not a multiple of {TILE}; "
                                 "use `prepare folder` for scenes of other sizes")
            rows, cols, stem = height // TILE, width // TILE, sources["A"].stem
            ids = [[f"{stem}_{r * cols + c + 1}" for c in range(cols)] for r in range(rows)]
            lists[split] += write_tiles(Tiling(args.out, TILE, args.overwrite, args.label_threshold), sources, ids)
            progress.step()
        write_list(args.out, split, lists[split])
    say_written("levir", args.out, lists)
    return lists


def find_whu(args: WhuArgs) -> dict[str, Path]:
    """The three WHU-CD files: those given, else the one image under ``--src`` named ``before``,
    ``after`` or ``change_label`` (as in the published release; any image extension)."""
    found = {"A": args.a, "B": args.b, "label": args.label}
    missing = [kind for kind, path in found.items() if path is None]
    if missing and (args.src is None or not args.src.is_dir()):
        raise InputError(f"{args.src or '--src'}: folder not found; pass the WHU-CD folder as --src "
                         "or the files as --a, --b, --label")
    files = [p for p in args.src.rglob("*") if p.suffix.lower() in IMAGE_EXTS] if args.src and missing else []
    for kind in missing:
        pattern = {"A": "before", "B": "after", "label": "change[_ -]?label|change"}[kind]
        hits = [p for p in files if re.fullmatch(pattern, p.stem.lower())]
        if len(hits) != 1:
            raise InputError(f"{args.src}: {len(hits) or 'no'} image(s) named like '{pattern}' for {kind}; "
                             f"pass it as --{kind.lower()} FILE")
        found[kind] = hits[0]
    return {kind: Path(path) for kind, path in found.items() if path is not None}


def split_sizes(n: int, seed_sizes: dict[str, int] = WHU_SIZES) -> dict[str, int]:
    """Published split sizes scaled to ``n`` tiles (val and test rounded, train takes the rest)."""
    total = sum(seed_sizes.values())
    val, test = (round(n * seed_sizes[s] / total) for s in ("val", "test"))
    return {"train": n - val - test, "val": val, "test": test}


def prepare_whu(args: WhuArgs) -> dict[str, list[str]]:
    """Cut the WHU-CD pair into whole 256x256 tiles, row-major; return the ids of each split.

    Each date is decoded whole (PIL loads a whole compressed TIFF to crop it), one date at a time:
    peak memory is about 3x one decoded image (~4.5 GB for the published 1.5 GB RGB images).
    """
    sources = find_whu(args)
    given = read_split(split_folder(args.split_dir)) if args.split_dir is not None else None
    with no_pixel_limit():
        height, width = pair_size(sources)
        rows, cols = height // TILE, width // TILE
        if rows * cols == 0:
            raise InputError(f"{sources['A']}: {width}x{height} is smaller than one {TILE}x{TILE} tile")
        ids = [[f"whucd_{r * cols + c + 1:05d}" for c in range(cols)] for r in range(rows)]
        progress = Progress("whu", len(KINDS) * rows, "tile rows")
        flat = write_tiles(Tiling(args.out, TILE, args.overwrite, args.label_threshold), sources, ids, progress)
    if given is not None:
        written = set(flat)
        missing = [i for ids_ in given.values() for i in ids_ if i not in written]
        if missing:
            raise InputError(f"{args.split_dir}: {len(missing)} listed ids (e.g. {missing[0]}) are not among "
                             f"the {len(flat)} tiles cut; check the images or drop --split-dir")
        lists = given
    else:
        sizes = split_sizes(len(flat))
        parts = np.split(np.random.default_rng(args.seed).permutation(len(flat)), np.cumsum([*sizes.values()])[:-1])
        lists = {split: [flat[k] for k in sorted(part)] for split, part in zip(sizes, parts, strict=True)}
    for split, ids_ in lists.items():
        write_list(args.out, split, ids_)
    say_written("whu", args.out, lists)
    return lists


def prepare_folder(args: FolderArgs) -> dict[str, list[str]]:
    """Cut every pair of a folder into tiles; return the tile ids of each list (labelled, unlabelled and,
    with ``--holdout``, val and test)."""
    if args.tile < 32:
        raise InputError(f"--tile {args.tile}: must be at least 32 (the network's output stride is 16); "
                         f"LEVIR-CD-like tiles are {TILE}")
    skip, hint = args.mismatch == "skip", " (or pass --mismatch skip)"
    scan = scan_pairs(args.src, need_label=False)
    if scan.missing and not skip:
        raise InputError(f"{scan.missing[0]}; add it{hint}")
    splits = holdout_splits(scan.pairs, args.holdout, args.list_name, args.seed)
    for line in scan.missing:
        print(f"skipped: {line}", flush=True)
    lists: dict[str, list[str]] = {name: [] for name in dict.fromkeys([args.list_name, "unlabeled", *splits])}
    progress, mismatched, geo = Progress("folder", len(scan.pairs), "pairs"), 0, None
    for sources, name in zip(scan.pairs, splits, strict=True):
        size = pair_size(sources, skip, hint=hint)
        if size is None:
            mismatched += 1
            progress.step()
            continue
        geo = geo or next((path for path in sources.values() if geo_tags(path)), None)
        extra = args.tile - 1 if args.border == "pad" else 0  # pad: round the grid up
        rows, cols = (size[0] + extra) // args.tile, (size[1] + extra) // args.tile
        stem = sources["A"].stem
        ids = [[f"{stem}_{r}_{c}" for c in range(cols)] for r in range(rows)]
        lists[name] += write_tiles(Tiling(args.out, args.tile, args.overwrite, args.label_threshold), sources, ids)
        progress.step()
    for name, ids_ in lists.items():
        if ids_:
            write_list(args.out, name, ids_)
    written = [f"{len(ids_)} {'unlabelled' if name == 'unlabeled' else 'labelled'} tiles in list/{name}.txt"
               for name, ids_ in lists.items() if ids_]
    if len(written) > 1:
        written = [", ".join(written[:-1]), written[-1]]
    skipped = len(scan.missing) + mismatched
    print(f"folder: cut {len(scan.pairs) - mismatched} pairs into {' and '.join(written) or 'no tiles'}; skipped "
          f"{skipped} pair{'' if skipped == 1 else 's'} ({len(scan.missing)} missing a date, {mismatched} of "
          "differing sizes)", flush=True)
    if geo is not None:
        print(f"note: GeoTIFF input (e.g. {geo}): the PNG tiles do not keep its geo-referencing; predict on "
              "the whole pair writes geo-referenced maps", flush=True)
    return lists


def check_out(src: Path, out: Path) -> None:
    """Refuse an output folder that is the source folder or inside it (tiles would land among the sources,
    and the next run would cut them again)."""
    src, target = src.resolve(), out.resolve()
    if target == src or src in target.parents:
        raise InputError(f"--out {out}: inside --src {src}; the tiles would land among the sources: choose an "
                         "--out outside --src")


def main(args: LevirArgs | WhuArgs | FolderArgs) -> dict[str, list[str]]:
    """Run one subcommand; return the tile ids written per list."""
    if isinstance(args, WhuArgs):
        return prepare_whu(args)
    if not args.src.is_dir():
        raise InputError(f"{args.src}: folder not found; pass the data set folder as --src")
    check_out(args.src, args.out)
    return prepare_levir(args) if isinstance(args, LevirArgs) else prepare_folder(args)


if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.prepare")))
