"""Change event generation (CEG, §3.2): pseudo change labels from two single-date VLM outputs.

The equations are pure numpy functions, one per equation, as docs/differences.md fixes them:

- concept probabilities ``fg``/``bg`` = max over the foreground/background classes (Eq. 4);
- segmentation ``I_t = fg >= bg`` (Eq. 5; ties go to foreground), reliability ``max(fg, bg) >= γ``
  (Eq. 6);
- pixel-level change ``|I_A - I_B|`` (Eq. 7);
- instance-level change: IoU matrix of the foreground instances (Eq. 8–9), on their run-length
  encoding; an instance is a change event when its row (A) or column (B) sum is ``<= δ`` (Eq. 10);
  the mask is their union;
- mixed change ``pixel * instance`` where both dates are reliable, else 255 (Eq. 11, with the cases
  as the text and the authors' scripts mean them);
- single-date masks ``I_t`` where reliable at ``seg_gamma``, else 255 (§3.5).

Below the equations, the command ``python -m diffmatch.ceg``: CEG pseudo labels for a data set, and
CEG as an unsupervised change detector (§3.2, §4.4, §4.5.1). It reads ``ROOT/vlm/{A,B}``
for every id with VLM outputs and writes ``ROOT/<out-name>/change/<id>.png`` (the ``--mode`` change
label: 0, 1, 255 = ignore) and ``ROOT/<out-name>/{A,B}/<id>.png`` (single-date masks at
``--seg-gamma``: 0, 1, 255). Resumable: an id whose three files exist is skipped unless ``--overwrite``.

Unsupervised mode: when ``ROOT/label`` exists, every id that has a label is scored and Table 6 is
printed and saved as ``ROOT/<out-name>/metrics.json``, one row per CEG level at the chosen γ and δ:

- ``pixel``: ``|I_A - I_B|`` where reliable (Table 6, rows "γ w/o"),
- ``instance``: the instance-level mask alone, the unsupervised prediction of Table 5 (row "w/o w"),
- ``mixed``: ``pixel * instance`` where reliable (row "γ w").

"Total" scores every pixel (ignore counts as no change), "Valid" only the pixels reliable on both
dates at γ, and "ratio" is their share. Every row is computed whatever ``--mode`` writes.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NamedTuple

import numpy as np
import tyro

from diffmatch.atomic import write_bytes, write_json
from diffmatch.cli import InputError, Progress
from diffmatch.config import IGNORE, CEGConfig
from diffmatch.images import read_label
from diffmatch.metrics import Confusion, scores
from diffmatch.pairs import images_in, read_id_list
from diffmatch.png import GrayEncoder, image_size, write_png
from diffmatch.rle import Runs, runs_intersections
from diffmatch.vlm import Concepts, InstanceSource, VLMOutput, concepts, list_ids, read_vlm


def concept_probs(probs: np.ndarray, concepts: Concepts) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background concept probabilities (H, W) of (C, H, W) class probabilities (Eq. 4),
    in the probabilities' dtype."""
    if probs.dtype == np.float16:  # the max of the bit patterns, checked on the maxima alone (_half_keys)
        keys = probs.view(np.uint16)
        fg, bg = _max_planes(keys, concepts.foreground), _max_planes(keys, concepts.background)
        if _half_keys(fg.view(np.float16), bg.view(np.float16)) is not None:
            return fg.view(np.float16), bg.view(np.float16)
        probs = probs.astype(np.float32)  # negative values: numpy's slow float16 loops are avoided all the same
    return _max_planes(probs, concepts.foreground), _max_planes(probs, concepts.background)


def _max_planes(stack: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Element-wise max of the planes ``indices`` of a (C, H, W) array."""
    if len(indices) == 1:
        return stack[indices[0]].copy()
    out = np.maximum(stack[indices[0]], stack[indices[1]])
    for k in indices[2:]:
        np.maximum(out, stack[k], out=out)
    return out


def _half_keys(*arrays: np.ndarray, checked: bool = False) -> list[np.ndarray] | None:
    """The uint16 bit patterns of float16 arrays whose values are all finite and >= 0: they sort as the
    values do, and numpy's float16 arithmetic is several times slower than its uint16 one. None when an
    array is not float16 or has other values (whose patterns, 0x7C00 and above, sort above all of these:
    the max of the patterns of several arrays passes this check exactly when all of them do).
    ``checked``: float16 arrays are known to hold such values (``concept_probs`` returns only those)."""
    if any(a.dtype != np.float16 for a in arrays):
        return None
    keys = [a.view(np.uint16) for a in arrays]
    if checked:
        return keys
    return keys if all(k.max(initial=0) < 0x7C00 for k in keys) else None  # 0x7C00: inf; above: NaN, < 0


@functools.lru_cache(maxsize=16)  # the same γ for every pair: its numpy scalar steps cost 20 µs a call
def _half_threshold(gamma: float) -> int:
    """The bit pattern of the least float16 value ``>= float32(gamma)``: float16 values ``>= gamma`` are
    those whose bit patterns reach it (0x7C00, inf, when no finite one does)."""
    target = np.float32(gamma)
    if np.isnan(target):
        return 0xFFFF  # above every finite bit pattern
    if target <= 0:
        return 0
    with np.errstate(over="ignore"):  # inf beyond the float16 range
        half = target.astype(np.float16)  # the nearest
        if half.astype(np.float32) < target:
            half = np.nextafter(half, np.float16(np.inf))
    return int(half.view(np.uint16))


def segment(fg: np.ndarray, bg: np.ndarray, checked: bool = False) -> np.ndarray:
    """Single-date mask ``I_t``: 1 where the foreground concept wins, ties included (Eq. 5).
    ``checked``: ``fg`` and ``bg`` come from ``concept_probs``, which checked float16 values."""
    keys = _half_keys(fg, bg, checked=checked)
    return (fg >= bg if keys is None else keys[0] >= keys[1]).view(np.uint8)  # bool is one byte, 0/1: no copy


def reliable(fg: np.ndarray, bg: np.ndarray, gamma: float, checked: bool = False) -> np.ndarray:
    """Pixels whose winning concept probability reaches ``gamma`` (one date's factor of Eq. 6).
    ``checked``: as for ``segment``."""
    keys = _half_keys(fg, bg, checked=checked)
    if keys is None:
        return np.maximum(fg, bg) >= np.float32(gamma)
    return np.maximum(keys[0], keys[1]) >= _half_threshold(gamma)


def pixel_change(seg_a: np.ndarray, seg_b: np.ndarray) -> np.ndarray:
    """Pixel-level change ``|I_A - I_B|`` as uint8 0/1 (Eq. 7)."""
    return (seg_a != seg_b).view(np.uint8)


def instance_iou(inst_a: Runs, inst_b: Runs) -> np.ndarray:
    """(M, N) float32 IoU matrix T between the M instances of A and the N of B (Eq. 8–9), computed on
    their runs without decoding a mask; 0 for an empty union."""
    inter = runs_intersections(inst_a, inst_b).astype(np.float32)  # exact: counts stay far below 2**24
    area_a = inst_a.areas().astype(np.float32)
    area_b = inst_b.areas().astype(np.float32)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def instance_change(inst_a: Runs, inst_b: Runs, delta: float = 0.0) -> np.ndarray:
    """Instance-level change as uint8 0/1: the union of the instances whose IoU row (A) or column (B)
    sum is ``<= delta`` (Eq. 10); only those instances are decoded. With no instance on one date, every
    instance of the other is a change; with none on either, nothing is."""
    iou = instance_iou(inst_a, inst_b)
    events = inst_a.union(iou.sum(1) <= delta) | inst_b.union(iou.sum(0) <= delta)
    return events.view(np.uint8)


def mixed_change(pixel: np.ndarray, instance: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mixed change ``pixel * instance`` where ``valid`` (= R_A and R_B), else 255 (Eq. 11)."""
    return _ignore_outside(pixel * instance, valid)


def single_date_mask(seg: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Single-date label ``I_t`` where ``valid``, else 255 (§3.5)."""
    return _ignore_outside(seg, valid)


def _ignore_outside(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """uint8 ``values`` where ``valid``, else 255 (IGNORE): ``np.where`` as bit operations, as numpy's
    uint8 ``where`` is slow: ``valid - 1`` is 0 where valid and wraps to 255 elsewhere."""
    return values.astype(np.uint8, copy=False) | (valid.astype(bool, copy=False).view(np.uint8) - np.uint8(1))


class CEGResult(NamedTuple):
    """Every CEG mask of one pair, (H, W) uint8."""

    pixel: np.ndarray
    """Pixel-level change 0/1 (Eq. 7), before the reliability mask."""
    instance: np.ndarray
    """Instance-level change 0/1 (Eq. 10)."""
    reliable: np.ndarray
    """1 where both dates are reliable at γ (Eq. 6)."""
    seg_a: np.ndarray
    """Single-date mask of A: 0/1, 255 where unreliable at ``seg_gamma``."""
    seg_b: np.ndarray
    """Single-date mask of B: 0/1, 255 where unreliable at ``seg_gamma``."""

    def change(self, mode: str) -> np.ndarray:
        """The change label of ``mode``: ``pixel`` and ``mixed`` 0/1/255 (255 where unreliable),
        ``instance`` 0/1."""
        if mode == "instance":
            return self.instance
        if mode == "pixel":
            return _ignore_outside(self.pixel, self.reliable)
        return mixed_change(self.pixel, self.instance, self.reliable)


def generate(out_a: VLMOutput, out_b: VLMOutput, concepts: Concepts, cfg: CEGConfig,
             with_instances: bool = True) -> CEGResult:
    """All CEG masks of one pair (§3.2). ``with_instances=False`` skips Eq. 8–10 (instance all 0)."""
    fg_a, bg_a = concept_probs(out_a.probs, concepts)
    fg_b, bg_b = concept_probs(out_b.probs, concepts)
    # concept_probs checked its float16 values: the masks skip checking them again (a pass over each)
    seg_a, seg_b = segment(fg_a, bg_a, checked=True), segment(fg_b, bg_b, checked=True)
    rel_a, rel_b = reliable(fg_a, bg_a, cfg.gamma, True), reliable(fg_b, bg_b, cfg.gamma, True)
    seg_gamma = cfg.single_date_gamma
    seg_rel_a = rel_a if seg_gamma == cfg.gamma else reliable(fg_a, bg_a, seg_gamma, True)
    seg_rel_b = rel_b if seg_gamma == cfg.gamma else reliable(fg_b, bg_b, seg_gamma, True)
    instance = (instance_change(out_a.instances, out_b.instances, cfg.delta) if with_instances
                else np.zeros_like(seg_a))
    return CEGResult(
        pixel=pixel_change(seg_a, seg_b),
        instance=instance,
        reliable=(rel_a & rel_b).view(np.uint8),  # Eq. 6
        seg_a=single_date_mask(seg_a, seg_rel_a),
        seg_b=single_date_mask(seg_b, seg_rel_b),
    )


# ----------------------------------------------------------------------------- the command
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

if __name__ == "__main__":
    from diffmatch.cli import run_cli

    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.ceg")))
