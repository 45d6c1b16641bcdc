"""Pseudo labels for a data set, the command ``python -m diffmatch.ceg``: change event generation
(``ceg.py``) over every pair with VLM outputs, and CEG as an unsupervised change detector (§3.2, §4.4,
§4.5.1). It reads ``ROOT/vlm/{A,B}`` for every id with VLM outputs and writes
``ROOT/<out-name>/change/<id>.png`` (the ``--mode`` change label: 0, 1, 255 = ignore) and
``ROOT/<out-name>/{A,B}/<id>.png`` (single-date masks at ``--seg-gamma``: 0, 1, 255). Resumable: an id
whose three files exist is skipped unless ``--overwrite``.

Unsupervised mode: when ``ROOT/label`` exists, every id that has a label is scored and Table 6 is
printed and saved as ``ROOT/<out-name>/metrics.json``, one row per CEG level at the chosen γ and δ:

- ``pixel``: ``|I_A - I_B|`` where reliable (Table 6, rows "γ w/o"),
- ``instance``: the instance-level mask alone, the unsupervised prediction of Table 5 (row "w/o w"),
- ``mixed``: ``pixel * instance`` where reliable (row "γ w").

"Total" scores every pixel (ignore counts as no change), "Valid" only the pixels reliable on both
dates at γ, and "ratio" is their share. Every row is computed whatever ``--mode`` writes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NamedTuple

import numpy as np
import tyro

from diffmatch.atomic import write_bytes, write_json
from diffmatch.ceg import CEGResult, generate
from diffmatch.cli import InputError, Progress
from diffmatch.config import IGNORE, CEGConfig
from diffmatch.images import read_label
from diffmatch.metrics import Confusion, scores
from diffmatch.pairs import images_in, read_id_list
from diffmatch.png import GrayEncoder, image_size, write_png
from diffmatch.vlm import InstanceSource, concepts, list_ids, read_vlm

LEVELS = ("pixel", "instance", "mixed")


@dataclass
class Args:
    """Generate CEG pseudo change labels (and single-date masks) from VLM outputs; score them as an
    unsupervised change detector when the data set has labels."""

    root: Path
    """Data set root with ``vlm/A`` and ``vlm/B`` (and optionally ``A/``, ``label/``, ``list/``)."""
    ceg: Annotated[CEGConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=CEGConfig)
    """Change event generation options."""
    out_name: str = "pseudo"
    """Output folder under ``root``: ``<out-name>/{change,A,B}/<id>.png`` and ``metrics.json``."""
    instances: InstanceSource = "auto"
    """Foreground instances: ``json`` (VLM instances), ``components`` (connected components of the
    foreground mask, JSON ignored) or ``auto`` (JSON when present, else components)."""
    split: str | None = None
    """Only the ids of ``root/list/<split>.txt`` (e.g. ``test`` for Tables 5–6); None: every id."""
    workers: int = 1
    """Worker processes."""
    overwrite: bool = False
    """Rewrite ids whose outputs already exist."""
    label_threshold: int | None = None
    """Binarise labels with values other than 0/255 or 0/1 for scoring: value >= T is change. None: such
    a label is an error naming its values."""


class PairStats(NamedTuple):
    """What one pair adds to the summary and the metrics."""

    pixels: int
    changed: int
    ignored: int
    reliable: int
    evaluated: bool
    total: dict[str, Confusion]
    valid: dict[str, Confusion]


@dataclass(frozen=True)
class _Job:
    """One id and everything a worker needs for it, picklable."""

    image_id: str
    root: Path
    out: Path
    ceg: CEGConfig
    instances: InstanceSource
    write: bool
    size: tuple[int, int] | None
    """(H, W) of the pre-event image, when it exists, to check the VLM outputs against."""
    label_threshold: int | None = None
    """Binarise the label at this value (``images.read_label``)."""


def _process(job: _Job, encoder: GrayEncoder) -> PairStats:
    """CEG of one id: write its files (unless already written) and score it against its label."""
    image_id = job.image_id
    label_path = job.root / "label" / f"{image_id}.png"
    evaluate = label_path.is_file()
    out_a = read_vlm(job.root / "vlm" / "A", image_id, job.ceg, job.instances, job.size)
    out_b = read_vlm(job.root / "vlm" / "B", image_id, job.ceg, job.instances, out_a.probs.shape[1:])
    result = generate(out_a, out_b, concepts(job.ceg), job.ceg,
                      with_instances=evaluate or job.ceg.mode != "pixel")
    change = result.change(job.ceg.mode)
    if job.write:
        _write_mask(job.out / "A" / f"{image_id}.png", result.seg_a, encoder)
        _write_mask(job.out / "B" / f"{image_id}.png", result.seg_b, encoder)
        _write_mask(job.out / "change" / f"{image_id}.png", change, encoder)  # last: marks the id as written
    total: dict[str, Confusion] = {}
    valid: dict[str, Confusion] = {}
    if evaluate:
        label = read_label(label_path, job.label_threshold)
        if label.shape != change.shape:
            raise InputError(f"{label_path}: size {label.shape} differs from the VLM output's "
                             f"{change.shape}; use the label of this image")
        total, valid = level_confusions(result, label)
    return PairStats(change.size, int(np.count_nonzero(change == 1)), int(np.count_nonzero(change == IGNORE)),
                     int(np.count_nonzero(result.reliable)), evaluate, total, valid)


def _write_mask(path: Path, mask: np.ndarray, encoder: GrayEncoder) -> None:
    """``png.write_png`` of a mask, with the encoder (and work arrays) of the pairs before it."""
    data = encoder.encode(mask)
    if data is None:  # over one IDAT chunk: Pillow writes it
        write_png(path, mask)
    else:
        write_bytes(path, data)


def _process_chunk(jobs: list[_Job]) -> list[PairStats]:
    """``_process`` of several ids with one PNG encoder: a worker's unit of work."""
    encoder = GrayEncoder()
    return [_process(job, encoder) for job in jobs]


def level_confusions(result: CEGResult, label: np.ndarray) -> tuple[dict[str, Confusion], dict[str, Confusion]]:
    """Total and Valid confusions of every level against a 0/1 label (ignore, 255, counts as no change),
    as ``metrics.confusion`` gives them, from a dozen pixel counts."""

    def count(mask: np.ndarray) -> int:
        return int(np.count_nonzero(mask))

    truth, reliable, instance = label, result.reliable, result.instance  # 0/1 uint8
    changed = {"pixel": reliable & result.pixel, "instance": instance}
    changed["mixed"] = changed["pixel"] & instance
    positives, valid_pixels, valid_positives = count(truth), count(reliable), count(truth & reliable)
    total, valid = {}, {}
    for level in LEVELS:
        pred = changed[level]
        tp, predicted = count(pred & truth), count(pred)
        total[level] = Confusion(tp, predicted - tp, positives - tp, label.size - predicted - positives + tp)
        if level != "instance":  # pixel and mixed change lie where reliable
            tp_valid, predicted_valid = tp, predicted
        else:
            tp_valid, predicted_valid = count(pred & truth & reliable), count(pred & reliable)
        valid[level] = Confusion(tp_valid, predicted_valid - tp_valid, valid_positives - tp_valid,
                                 valid_pixels - predicted_valid - valid_positives + tp_valid)
    return total, valid


def _ids(args: Args) -> list[str]:
    """Ids to process: those with VLM outputs (of the split, if given); errors on a missing date."""
    folder_a, folder_b = args.root / "vlm" / "A", args.root / "vlm" / "B"
    ids_a, ids_b = list_ids(folder_a), list_ids(folder_b)
    if not ids_a and not ids_b:
        raise InputError(f"{args.root / 'vlm'}: no VLM outputs in vlm/A and vlm/B; run the VLM on both "
                         "dates first (see the README)")
    if args.split is not None:
        wanted = set(read_id_list(args.root / "list" / f"{args.split}.txt"))
        ids_a, ids_b = ids_a & wanted, ids_b & wanted
    for missing, folder in ((sorted(ids_a - ids_b), folder_b), (sorted(ids_b - ids_a), folder_a)):
        if missing:
            raise InputError(f"{folder / missing[0]}.npy|.json|.png: no VLM output on this date "
                             f"({len(missing)} ids lack it); run the VLM on that image or remove the id")
    return sorted(ids_a)


def _png_ids(folder: Path) -> set[str]:
    """Ids of the ``<id>.png`` files in ``folder``, from one listing (no call per id)."""
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {e.name[:-4] for e in entries if e.name.endswith(".png") and e.is_file()}


def _image_sizes(root: Path, ids: list[str]) -> dict[str, tuple[int, int]]:
    """(H, W) of the pre-event images that exist, to check the VLM outputs against."""
    sizes = {}
    folder = root / "A"
    names = images_in(folder)
    for image_id in ids:
        if image_id in names:
            sizes[image_id] = image_size(names[image_id])
    return sizes


def _run(jobs: list[_Job], workers: int) -> Iterator[PairStats]:
    """Process every id in order, in worker processes when ``workers > 1``."""
    if workers <= 1:
        encoder = GrayEncoder()
        yield from (_process(job, encoder) for job in jobs)
        return
    import multiprocessing  # imported here: a one-worker run is spared their import (about 15 ms)
    from concurrent.futures import ProcessPoolExecutor

    # Forked workers start at once, spawned ones import everything anew. Spawned all the same off Linux
    # (macOS system libraries do not survive a fork) and once torch is loaded (a forked copy of a process
    # whose torch threads have run can hang), as when diffmatch.bench calls this.
    method = "fork" if sys.platform == "linux" and "torch" not in sys.modules else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        size = max(1, min(32, len(jobs) // (8 * workers)))  # chunks: a few per worker, for balance
        for stats in pool.map(_process_chunk, [jobs[i:i + size] for i in range(0, len(jobs), size)]):
            yield from stats


def _metrics_table(stats: list[PairStats], cfg: CEGConfig) -> dict:
    """Table 6 at γ, δ: Total and Valid scores per CEG level, and the reliable share."""
    scored = [s for s in stats if s.evaluated]
    pixels = sum(s.pixels for s in scored)
    ratio = 100 * sum(s.reliable for s in scored) / max(pixels, 1)
    rows = {level: {"total": scores(sum((s.total[level] for s in scored), Confusion())),
                    "valid": scores(sum((s.valid[level] for s in scored), Confusion())),
                    "ratio": ratio} for level in LEVELS}
    return {"pairs": len(scored), "gamma": cfg.gamma, "delta": cfg.delta, "mode": cfg.mode, "rows": rows}


def _print_table(table: dict) -> None:
    print(f"CEG as an unsupervised change detector: {table['pairs']} pairs, gamma={table['gamma']}, "
          f"delta={table['delta']} (percent)")
    print(f"{'level':<9}| {'Total IoU':>9} {'F1':>5} {'P':>5} {'R':>5} | {'Valid IoU':>9} {'F1':>5} "
          f"{'P':>5} {'R':>5} | {'ratio':>5}")
    for level, row in table["rows"].items():
        t, v = row["total"], row["valid"]
        print(f"{level:<9}| {t['iou']:9.1f} {t['f1']:5.1f} {t['precision']:5.1f} {t['recall']:5.1f} | "
              f"{v['iou']:9.1f} {v['f1']:5.1f} {v['precision']:5.1f} {v['recall']:5.1f} | {row['ratio']:5.1f}")


def main(args: Args) -> dict | None:
    """Write the CEG outputs of every pair; return (and save) the metrics when labels exist."""
    if not (args.root / "vlm").is_dir():
        raise InputError(f"{args.root / 'vlm'}: not found; --root must hold vlm/A and vlm/B: write them with "
                         f"`python -m diffmatch.vlm_run --root {args.root}` (open models) or APE (see the README)")
    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be at least 1")
    concepts(args.ceg)  # fail early on unknown class names
    out = args.root / args.out_name
    ids = _ids(args)
    evaluate = (args.root / "label").is_dir()

    written = set.intersection(*(_png_ids(out / sub) for sub in ("A", "B", "change")))
    todo = {i: i not in written or args.overwrite for i in ids}
    if not evaluate:  # already-written ids need no work unless they are scored
        todo = {i: w for i, w in todo.items() if w}
    sizes = _image_sizes(args.root, list(todo))
    jobs = [_Job(i, args.root, out, args.ceg, args.instances, w, sizes.get(i), args.label_threshold)
            for i, w in todo.items()]
    stats, progress = [], Progress("ceg", len(jobs), "pairs", file=sys.stderr)
    for stat in _run(jobs, args.workers):
        stats.append(stat)
        progress.step()
    wrote = [s for s, w in zip(stats, todo.values(), strict=True) if w]
    pixels = max(sum(s.pixels for s in wrote), 1)
    print(f"wrote {len(wrote)} pairs to {out} ({len(ids) - len(wrote)} already there, mode {args.ceg.mode}): "
          f"changed {100 * sum(s.changed for s in wrote) / pixels:.2f} % of pixels, "
          f"ignored {100 * sum(s.ignored for s in wrote) / pixels:.2f} %")
    if not evaluate or not any(s.evaluated for s in stats):
        return None
    table = _metrics_table(stats, args.ceg)
    _print_table(table)
    write_json(out / "metrics.json", table)
    return table
