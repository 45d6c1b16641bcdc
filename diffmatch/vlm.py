"""Reading single-date VLM outputs, the inputs of change event generation (§3.2.1; the formats:
docs/data.md); their masks are COCO RLE (``rle.py``).

Per image and date, ``ROOT/vlm/<date>/`` may hold any mix of:

- ``<id>.npy``: float (C, H, W) per-class probabilities in prompt order (any float dtype);
- ``<id>.json`` or ``<id>.png.json`` (APE's demo): COCO result records whose ``category_id`` indexes
  the prompt list and whose ``segmentation`` is COCO RLE (compressed string or list counts);
- ``<id>.png``: a class-index map (values index the prompt list, 255 = unknown).

Probabilities come from the ``.npy``, else the ``.png`` (one-hot, 0 where unknown), else the JSON
(per class, the max score of that class's instances covering the pixel). Foreground instances come
from the JSON (only foreground-class records), or are the connected components of the foreground
mask ``fg >= bg`` (Eq. 4–5) when there is no JSON or when components are asked for.
"""

from __future__ import annotations

import functools
import io
import json
import math
import mmap
import os
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

from diffmatch.cli import InputError
from diffmatch.config import CEGConfig
from diffmatch.rle import RLEError, Runs, decode_counts_many, runs_of_counts

# ----------------------------------------------------------------------------- VLM outputs
InstanceSource = Literal["auto", "json", "components"]
VLM_SUFFIXES = (".npy", ".png.json", ".json", ".png")


class Concepts(NamedTuple):
    """Channel indices of the foreground and background classes in the prompt list (§3.2.1)."""

    foreground: np.ndarray
    background: np.ndarray


class VLMOutput(NamedTuple):
    """One date's VLM output: what change event generation needs."""

    probs: np.ndarray
    """(C, H, W) per-class probabilities in prompt order: float16 as a float16 ``.npy`` stores them,
    else float32."""
    instances: Runs
    """The K foreground instance masks, as runs (``.masks()`` decodes them)."""
    instance_classes: np.ndarray
    """(K,) int64 prompt index of each instance (-1 for connected components)."""


class VLMFiles(NamedTuple):
    """The VLM files found for one id and date; None where absent."""

    npy: Path | None
    json: Path | None
    png: Path | None


def concepts(cfg: CEGConfig) -> Concepts:
    """Prompt indices of ``cfg.foreground`` and ``cfg.background``; errors on unknown names."""
    index = {name: i for i, name in enumerate(cfg.classes)}
    for name in (*cfg.foreground, *cfg.background):
        if name not in index:
            raise InputError(f"class {name!r} is not in --classes {list(cfg.classes)}; add it or fix the name")
    if not cfg.foreground or not cfg.background:
        raise InputError("--foreground and --background each need at least one class")
    return Concepts(np.array([index[n] for n in cfg.foreground]), np.array([index[n] for n in cfg.background]))


def vlm_id(name: str) -> str | None:
    """The image id of a VLM file name, or None if the name is not a VLM output."""
    for suffix in VLM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def list_ids(folder: Path) -> set[str]:
    """Ids with at least one VLM file in ``folder`` (an empty set if it does not exist)."""
    if not folder.is_dir():
        return set()
    return {i for i in (vlm_id(p.name) for p in folder.iterdir() if not p.name.startswith(".")) if i}


def find_files(folder: Path, image_id: str) -> VLMFiles:
    """The VLM files of ``image_id`` in ``folder``; ``<id>.png.json`` is preferred over ``<id>.json``."""

    def existing(*names: str) -> Path | None:
        return next((folder / n for n in names if os.path.isfile(os.path.join(folder, n))), None)

    return VLMFiles(existing(f"{image_id}.npy"), existing(f"{image_id}.png.json", f"{image_id}.json"),
                    existing(f"{image_id}.png"))


def read_probs(path: Path, num_classes: int) -> np.ndarray:
    """(C, H, W) probabilities from a ``.npy``, float16 kept as stored (read-only), other floats as
    float32; errors on a wrong shape or non-finite values."""
    try:
        probs = _map_npy(path)
    except Exception as err:  # numpy raises several types for broken files
        raise InputError(f"{path}: cannot read .npy ({err}); re-save it with numpy.save") from None
    if probs.ndim != 3 or probs.shape[0] != num_classes or not np.issubdtype(probs.dtype, np.floating):
        raise InputError(f"{path}: expected float (C={num_classes}, H, W) probabilities in --classes order, "
                         f"got {probs.dtype} {probs.shape}; fix --classes or re-export the VLM output")
    if probs.dtype != np.float16:
        probs = probs.astype(np.float32, copy=False)
    if not _all_finite(probs):
        raise InputError(f"{path}: probabilities contain NaN or inf; re-export the VLM output")
    return probs


def _map_npy(path: Path) -> np.ndarray:
    """The read-only array of a ``.npy`` (format 1.0 or 2.0; others by ``np.load``), mapped from the
    file instead of copied into fresh memory: a third of ``np.load``'s time on CEG's inputs."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return np.load(path, allow_pickle=False)
        header = f.read(2 if version == (1, 0) else 4)  # the header's length, then the header
        header += f.read(int.from_bytes(header, "little"))
        shape, fortran_order, dtype = _npy_header(header, version)
        if dtype.hasobject:
            raise ValueError("object arrays cannot be read without pickle")
        offset = f.tell()
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # kept open by the array that uses it
    array = np.frombuffer(data, dtype, count=math.prod(shape), offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a ``.npy`` header, parsed once per distinct header: numpy
    parses it with ``ast`` (0.1 ms), and the files of a data set share theirs."""
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(io.BytesIO(header))


def _all_finite(probs: np.ndarray) -> bool:
    """No NaN or inf; for float16 on the bit patterns (numpy's float16 loops are slow)."""
    if probs.dtype != np.float16:
        return bool(np.isfinite(probs).all())
    bits = probs.view(np.uint16)  # exponent bits all 1: inf or NaN
    return bool(bits.max() < 0x7C00 or not ((bits & 0x7C00) == 0x7C00).any())


def read_class_map(path: Path, num_classes: int) -> np.ndarray:
    """(C, H, W) float32 one-hot probabilities of a class-index ``.png`` (255 = unknown: all 0)."""
    try:
        labels = np.asarray(Image.open(path))
    except Exception as err:  # PIL raises many types for broken files
        raise InputError(f"{path}: cannot read class map ({err}); re-export it as PNG") from None
    if labels.ndim != 2:
        raise InputError(f"{path}: a class map must be single-channel; save class indices as a grey PNG")
    bad = (labels >= num_classes) & (labels != 255)
    if bad.any():
        raise InputError(f"{path}: class index {int(labels[bad][0])} is outside --classes "
                         f"(0..{num_classes - 1}, 255 = unknown); fix --classes or the map")
    return (labels[None] == np.arange(num_classes)[:, None, None]).astype(np.float32)


class JSONInstances(NamedTuple):
    runs: Runs  # K masks
    classes: np.ndarray  # (K,) int64
    scores: np.ndarray  # (K,) float32


def read_instances(path: Path, num_classes: int, size: tuple[int, int] | None,
                   keep: np.ndarray | None = None) -> JSONInstances:
    """The instances of a COCO result list (only those of the classes ``keep``, when given; every
    record is checked); ``size`` (H, W), when given, must match every record. Masks stay as runs."""
    try:
        records = json.loads(path.read_bytes())  # bytes: no decoding pass, json detects UTF-8
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read JSON ({err}); re-export the VLM output") from None
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a list of COCO result records; re-export the VLM output")
    wanted = None if keep is None else set(keep.tolist())
    counts, indices, classes, scores = [], [], [], []
    for i, rec in enumerate(records):
        try:
            k, seg = int(rec["category_id"]), rec["segmentation"]
            height, width = seg["size"]
            height, width = int(height), int(width)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: record {i} lacks category_id or segmentation.size; re-export with "
                             "COCO results") from None
        if not 0 <= k < num_classes:
            raise InputError(f"{path}: record {i}: category_id {k} is outside --classes "
                             f"(0..{num_classes - 1}); fix --classes to the prompt list the VLM was given")
        if size is not None and (height, width) != size:
            raise InputError(f"{path}: record {i}: mask size {height}x{width} differs from the image's "
                             f"{size[0]}x{size[1]}; run the VLM on the original image")
        size = (height, width)
        if wanted is not None and k not in wanted:
            continue
        counts.append(seg.get("counts"))
        indices.append(i)
        classes.append(k)
        scores.append(float(rec.get("score", 1.0)))
    height, width = size if size is not None else (0, 0)
    try:
        runs = _decode_runs(counts, height, width)
    except RLEError as err:
        raise InputError(f"{path}: record {indices[err.index]}: bad RLE ({err}); re-export the VLM "
                         "output") from None
    return JSONInstances(runs, np.array(classes, dtype=np.int64), np.array(scores, dtype=np.float32))


def _decode_runs(counts: list, height: int, width: int) -> Runs:
    """The runs of masks given as COCO counts (compressed strings or lists of run lengths); raises
    RLEError naming the first bad one."""
    if all(isinstance(c, str) for c in counts):  # what APE writes: all strings decoded at once
        values, lengths = decode_counts_many(counts)
    else:
        parts = []
        for i, text in enumerate(counts):
            try:
                parts.append(decode_counts_many([text])[0] if isinstance(text, str) else
                             np.array([int(v) for v in text], dtype=np.int64))
            except RLEError as err:
                raise RLEError(i, str(err)) from None
            except (TypeError, ValueError, OverflowError) as err:
                raise RLEError(i, f"counts: {err}") from None
        values = np.concatenate([np.zeros(0, np.int64), *parts])
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
    return runs_of_counts(values, lengths, height, width)


def probs_from_instances(inst: JSONInstances, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) probabilities: per class, the max score of its instances covering the pixel (docs/data.md)."""
    probs = np.zeros((num_classes, *size), dtype=np.float32)
    for mask, k, score in zip(inst.runs.masks(), inst.classes, inst.scores, strict=True):
        np.maximum(probs[k], mask * score, out=probs[k])
    return probs


def components(mask: np.ndarray, connectivity: int) -> Runs:
    """The connected components of a bool (H, W) mask (4- or 8-connectivity), as runs."""
    from scipy import ndimage  # imported here: the CEG command starts faster without it

    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels, count = ndimage.label(mask, structure=structure)
    flat = labels.T.ravel()  # column-major, the order of runs
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    ends = np.append(starts[1:], flat.size)
    owner = flat[starts].astype(np.int64) - 1
    fg = owner >= 0
    return Runs(starts[fg], ends[fg], owner[fg], int(count), *mask.shape)


def read_vlm(folder: Path, image_id: str, cfg: CEGConfig, instances: InstanceSource = "auto",
             size: tuple[int, int] | None = None) -> VLMOutput:
    """One date's VLM output for ``image_id``; ``size`` (H, W), when given, is checked against it."""
    files = find_files(folder, image_id)
    if files == VLMFiles(None, None, None):
        raise InputError(f"{folder / image_id}.npy|.json|.png: no VLM output for {image_id!r} on this "
                         "date; run the VLM on this image or remove the id")
    if instances == "json" and files.json is None:
        raise InputError(f"{folder / image_id}.json: not found and --instances json asks for it; run an "
                         "instance VLM (APE) or use --instances components")
    num_classes = len(cfg.classes)
    if files.npy is not None:
        probs, source = read_probs(files.npy, num_classes), files.npy
    elif files.png is not None:
        probs, source = read_class_map(files.png, num_classes), files.png
    else:
        probs, source = None, files.json
    if probs is not None and size is not None and probs.shape[1:] != size:
        raise InputError(f"{source}: size {probs.shape[1]}x{probs.shape[2]} differs from the expected "
                         f"{size[0]}x{size[1]}; run the VLM on the original image")
    size = size if probs is None else probs.shape[1:]
    use_json = files.json is not None and instances != "components"
    fg_idx, bg_idx = concepts(cfg)
    inst = None
    if probs is None:
        inst = read_instances(files.json, num_classes, size)
        if size is None and inst.runs.count == 0:
            raise InputError(f"{files.json}: no records and no image size; add the .npy or the image")
        probs = probs_from_instances(inst, num_classes, size or (inst.runs.height, inst.runs.width))
    elif use_json:  # only foreground instances take part (§3.2.3)
        inst = read_instances(files.json, num_classes, size, keep=fg_idx)
        return VLMOutput(probs, inst.runs, inst.classes)
    if use_json:
        keep = np.isin(inst.classes, fg_idx)
        return VLMOutput(probs, inst.runs.subset(keep), inst.classes[keep])
    as_float32 = probs.astype(np.float32, copy=False)
    fg_mask = as_float32[fg_idx].max(0) >= as_float32[bg_idx].max(0)  # I_t, Eq. 4-5
    runs = components(fg_mask, cfg.connectivity)
    return VLMOutput(probs, runs, np.full(runs.count, -1, dtype=np.int64))
