"""A procedural change-detection data set in the layout of docs/data.md, with simulated VLM outputs
(docs/data.md, "VLM file formats").

Pairs come from ``synthetic/scene.py`` (LEVIR-CD-like suburbs, buildings built or demolished, nuisance
differences and a 1-3 px misregistration). For each date a simulated open-vocabulary segmenter gives
per-class probabilities (``vlm/{A,B}/<id>.npy``, float16 (C, H, W)) and APE-style COCO instance records
(``vlm/{A,B}/<id>.json``), with the failure modes the paper's CEG has to cope with (§3.2): missed
buildings, false positives, dilated, eroded or shifted masks, overlapping duplicates, soft boundaries
and regions of low confidence (shadows, bare ground, clutter).

    python -m diffmatch.synthetic --out data/synthetic --num-pairs 200
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from diffmatch.atomic import atomic_path
from diffmatch.cli import InputError, Progress
from diffmatch.config import CEGConfig
from diffmatch.lab.synthetic import scene
from diffmatch.lab.synthetic.raster import grow, smooth_noise
from diffmatch.pairs import write_id_list
from diffmatch.png import write_png
from diffmatch.rle import encode_mask

VLMKind = Literal["npy", "json", "png"]
CLASSES = CEGConfig().classes  # house, building, road, grass, tree, water: the order of scene's codes


@dataclass
class Args:
    """Write a synthetic bi-temporal change-detection data set with simulated VLM outputs."""

    out: Path
    """Data set root to write (``A/``, ``B/``, ``label/``, ``list/``, ``vlm/``)."""
    num_pairs: int = 200
    """Number of image pairs, over all splits."""
    size: int = 256
    """Side of each square crop in pixels (0.5 m/px, like LEVIR-CD256)."""
    val_fraction: float = 0.1
    """Share of the pairs listed in ``list/val.txt`` (the first 70 % go to train by default)."""
    test_fraction: float = 0.2
    """Share of the pairs listed in ``list/test.txt`` (the last ones)."""
    change_density: float = 0.5
    """Share of pairs in which buildings are built or demolished (LEVIR-CD: about half of the crops)."""
    vlm_noise: float = 1.0
    """Failure rate of the simulated VLM: 0 = near-perfect, 1 = APE-like on LEVIR-CD, 2 = poor."""
    vlm_kinds: tuple[VLMKind, ...] = ("npy", "json")
    """VLM files to write per date: ``npy`` probabilities, ``json`` instances, ``png`` class maps."""
    seed: int = 0
    """Seed; pair i is drawn from (seed, i) alone, whatever the number of workers."""
    workers: int = 1
    """Worker processes."""
    overwrite: bool = False
    """Rewrite pairs whose files exist already (default: skip them, so an interrupted run resumes)."""


@dataclass
class SyntheticPair:
    """One generated pair and its simulated VLM outputs."""

    scene: scene.ScenePair
    """Images, label, true cover and instances of both dates, and B's misregistration."""
    probs: tuple[np.ndarray, np.ndarray]
    """Per-class probabilities (C, H, W) float16 of A and of B."""
    records: tuple[list[dict], list[dict]]
    """COCO result records of A and of B."""


def _window(sl: tuple[slice, slice], pad: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(sl, shape, strict=True))


def _record(mask: np.ndarray, win: tuple[slice, slice], category: int, score: float, image_id: str) -> dict:
    """A COCO record of ``mask`` (Fortran order: its RLE needs no copy), which lies within ``win``."""
    local = mask[win]
    rows, cols = np.flatnonzero(local.any(1)) + win[0].start, np.flatnonzero(local.any(0)) + win[1].start
    box = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return {"image_id": image_id, "category_id": category, "category_name": CLASSES[category],
            "score": round(float(score), 4), "segmentation": encode_mask(mask), "bbox": box}


def _detections(rng: np.random.Generator, local: np.ndarray, kind: int, noise: float
                ) -> list[tuple[np.ndarray, int, float]]:
    """The VLM's masks of one building (``local``, in its window), category and score: none if missed, else
    the mask dilated, eroded, shifted or intact, sometimes under the other prompt or with a duplicate."""
    area = int(local.sum())
    if rng.random() < noise * (0.08 + 0.25 * (area < 120)):  # missed
        return []
    pick = rng.random()
    if pick < 0.3 * noise:  # dilated
        local = grow(local, int(rng.integers(1, 3)))
    elif pick < 0.5 * noise and area > 60:  # eroded
        local = ndimage.binary_erosion(local)
    elif pick < 0.65 * noise:  # shifted
        local = np.roll(local, tuple(int(v) for v in rng.integers(-2, 3, 2)), (0, 1))
    if not local.any():
        return []
    category = kind if rng.random() > 0.2 * noise else 1 - kind
    score = rng.uniform(0.5, 0.98) - 0.2 * (area < 120)
    found = [(local, category, score)]
    if rng.random() < 0.2 * noise:  # an overlapping duplicate with the other prompt
        twin = ndimage.binary_dilation(local) if rng.random() < 0.5 else local
        found.append((twin, 1 - category, score * rng.uniform(0.5, 0.9)))
    return found


def _false_positives(rng: np.random.Generator, cover: np.ndarray, noise: float
                     ) -> list[tuple[np.ndarray, tuple[slice, slice], int, float]]:
    """Boxes (in their window) the VLM takes for buildings, mostly on bare ground and paving; category, score."""
    h, w = cover.shape
    candidates = np.flatnonzero((cover == scene.SOIL).ravel())
    boxes = []
    for _ in range(rng.poisson(1.0 * noise)):
        centre = rng.choice(candidates) if len(candidates) and rng.random() < 0.8 else rng.integers(h * w)
        cy, cx = divmod(int(centre), w)
        hy, hx = (int(v) for v in rng.integers(4, 12, 2))
        win = (slice(max(0, cy - hy), min(h, cy + hy)), slice(max(0, cx - hx), min(w, cx + hx)))
        box = np.ones((win[0].stop - win[0].start, win[1].stop - win[1].start), bool)
        boxes.append((box, win, int(rng.integers(2)), rng.uniform(0.3, 0.7)))
    return boxes


def _instances(rng: np.random.Generator, view: scene.DateView, kinds: list[int], noise: float
               ) -> list[tuple[np.ndarray, tuple[slice, slice], int, float]]:
    """Detected building masks (full size, with their window), category and score: the VLM's failures."""
    shape = view.instances.shape
    found = []

    def add(local: np.ndarray, win: tuple[slice, slice], category: int, score: float) -> None:
        mask = np.zeros(shape, bool, order="F")
        mask[win] = local
        found.append((mask, win, category, score))

    for index, sl in enumerate(ndimage.find_objects(view.instances)):
        if sl is None:
            continue
        win = _window(sl, 4, shape)
        for local, category, score in _detections(rng, view.instances[win] == index + 1, kinds[index], noise):
            add(local, win, category, score)
    for box, win, category, score in _false_positives(rng, view.cover, noise):
        add(box, win, category, score)
    return found


def simulate_vlm(rng: np.random.Generator, view: scene.DateView, kinds: list[int], noise: float,
                 image_id: str) -> tuple[np.ndarray, list[dict]]:
    """Per-class probabilities (C, H, W) float16 and COCO records of one date, mutually consistent."""
    h, w = view.cover.shape
    found = _instances(rng, view, kinds, noise)
    strength = 6.0 * np.clip(1 + 0.3 * smooth_noise(rng, h, 3), 0.35, None)
    detected = np.zeros((h, w), bool)
    for mask, win, *_ in found:
        detected[win] |= mask[win]
    missed = (view.instances > 0) & ~detected
    cover = np.minimum(view.cover, scene.WATER)
    cover[missed] = scene.ROAD if rng.random() < 0.5 else scene.GRASS  # a missed roof looks like ground
    logits = np.zeros((len(CLASSES), h, w), np.float32)
    logits.reshape(len(CLASSES), -1)[cover.ravel(), np.arange(h * w)] = strength.ravel()
    bare = view.cover == scene.SOIL  # bare ground and paving: torn between road and grass
    for code in (scene.ROAD, scene.GRASS):
        np.copyto(logits[code], 0.55 * strength, where=bare)
    np.multiply(logits, 0.4, out=logits, where=missed)
    for mask, win, category, score in sorted(found, key=lambda f: f[3]):
        block, local = logits[(slice(None), *win)], mask[win]
        value = strength[win][local] * (0.6 + 0.5 * score)
        block[:, local] = 0
        block[category][local], block[1 - category][local] = value, value - 2.5
    damp = np.ones((h, w), np.float32)
    damp[view.shadow] = 1 - 0.6 * min(noise, 1)
    damp[smooth_noise(rng, h, 5) > 2.2 - min(noise, 1.5)] *= 0.35  # clutter of low confidence
    logits *= damp
    logits += rng.standard_normal((len(CLASSES), 1, 1), dtype=np.float32) * 0.3 * noise
    logits = ndimage.gaussian_filter(logits, (0, 0.8 + 0.7 * noise, 0.8 + 0.7 * noise), truncate=2)
    logits -= logits.max(0)  # a softmax over the classes, in place
    np.exp(logits, out=logits)
    logits /= logits.sum(0)
    probs = logits.astype(np.float16)
    records = [_record(m, win, c, s, image_id) for m, win, c, s in found]
    for code in (scene.WATER, scene.ROAD):  # APE also returns background things
        regions, count = ndimage.label(view.cover == code)
        sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
        windows = ndimage.find_objects(regions)
        for region in np.flatnonzero(sizes > 0.01 * h * w)[:2]:
            region_mask = np.equal(regions, region + 1, order="F")
            records.append(_record(region_mask, windows[region], code, rng.uniform(0.5, 0.95), image_id))
    return probs, sorted(records, key=lambda r: -r["score"])


def make_pair(index: int, *, seed: int = 0, size: int = 256, change_density: float = 0.5,
              vlm_noise: float = 1.0) -> SyntheticPair:
    """Pair ``index`` of the data set of ``seed``; the VLM's randomness is separate from the scene's."""
    drawn = scene.draw_pair(np.random.default_rng([seed, index, 0]), size, change_density)
    image_id = f"{pair_id(index)}.png"
    outputs = [
        simulate_vlm(np.random.default_rng([seed, index, 1 + d]), view, drawn.kinds, vlm_noise, image_id)
        for d, view in enumerate((drawn.a, drawn.b))
    ]
    return SyntheticPair(drawn, (outputs[0][0], outputs[1][0]), (outputs[0][1], outputs[1][1]))


def pair_id(index: int) -> str:
    """File stem of pair ``index``."""
    return f"syn_{index:05d}"


def _paths(out: Path, index: int, kinds: tuple[str, ...]) -> list[Path]:
    stem = pair_id(index)
    vlm = [out / "vlm" / d / f"{stem}.{k}" for k in kinds for d in ("A", "B")]
    return [*vlm, out / "A" / f"{stem}.png", out / "B" / f"{stem}.png", out / "label" / f"{stem}.png"]


def _write_pair(job: tuple[Path, int, dict, tuple[str, ...]]) -> int:
    """Generate pair ``index`` and write its files (VLM outputs first, the label last)."""
    out, index, options, kinds = job
    pair = make_pair(index, **options)
    for date, probs, records in zip("AB", pair.probs, pair.records, strict=True):
        folder = out / "vlm" / date
        if "npy" in kinds:
            with atomic_path(folder / f"{pair_id(index)}.npy") as tmp, tmp.open("wb") as f:
                np.save(f, probs)
        if "json" in kinds:
            with atomic_path(folder / f"{pair_id(index)}.json") as tmp:
                tmp.write_text(json.dumps(records, separators=(",", ":")))
        if "png" in kinds:
            classes = np.argmax(probs, 0).astype(np.uint8)
            write_png(folder / f"{pair_id(index)}.png", np.where(probs.max(0) < 0.5, 255, classes))
    write_png(out / "A" / f"{pair_id(index)}.png", pair.scene.a.image)
    write_png(out / "B" / f"{pair_id(index)}.png", pair.scene.b.image)
    write_png(out / "label" / f"{pair_id(index)}.png", pair.scene.label)
    return index


def check_args(args: Args) -> None:
    """Reject values that cannot make a data set, naming them."""
    if args.num_pairs < 1 or args.size < 32 or args.seed < 0 or args.workers < 1:
        raise InputError(f"num_pairs={args.num_pairs}, size={args.size}, seed={args.seed}, workers={args.workers}: "
                         "need num_pairs >= 1, size >= 32, seed >= 0 and workers >= 1")
    if min(args.val_fraction, args.test_fraction) < 0 or args.val_fraction + args.test_fraction >= 1:
        raise InputError(f"val_fraction={args.val_fraction}, test_fraction={args.test_fraction}: need shares >= 0 "
                         "that sum to less than 1")
    bad = [k for k in args.vlm_kinds if k not in ("npy", "json", "png")]
    if bad:
        raise InputError(f"vlm_kinds {bad}: choose among npy, json, png")


def _write_lists(args: Args) -> None:
    """``list/{train,val,test}.txt``: the first pairs train, then val, the last ones test."""
    n_val, n_test = round(args.num_pairs * args.val_fraction), round(args.num_pairs * args.test_fraction)
    n_train = args.num_pairs - n_val - n_test
    ids = [pair_id(i) for i in range(args.num_pairs)]
    splits = {"train": ids[:n_train], "val": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]}
    for name, split in splits.items():
        write_id_list(args.out / "list" / f"{name}.txt", split)


def generate(args: Args, *, verbose: bool = True) -> None:
    """Write the data set of ``args``; pairs already complete are kept unless ``args.overwrite``."""
    check_args(args)
    out, num_pairs = args.out, args.num_pairs
    kinds = tuple(dict.fromkeys(args.vlm_kinds))
    options = {"seed": args.seed, "size": args.size, "change_density": args.change_density,
               "vlm_noise": args.vlm_noise}
    todo = [i for i in range(num_pairs) if args.overwrite or not all(p.is_file() for p in _paths(out, i, kinds))]
    if verbose:
        print(f"{out}: {len(todo)} pairs to write, {num_pairs - len(todo)} complete already", flush=True)
    jobs = [(out, i, options, kinds) for i in todo]
    progress = Progress("synthetic", len(jobs), "pairs", enabled=verbose)
    pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap_unordered(_write_pair, jobs, chunksize=4) if pool else map(_write_pair, jobs)
        for _index in results:
            progress.step()
    finally:
        if pool:
            pool.terminate()
    _write_lists(args)


def main(args: Args) -> None:
    generate(args)
