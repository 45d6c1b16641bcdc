"""``python -m diffmatch.vlm_run``: the VLM outputs that CEG reads (§3.2.1), from a data set's own images,
with open-vocabulary models in plain PyTorch (``diffmatch.vlm_models``; the optional ``transformers``
package: ``pip install -e ".[vlm]"``). APE, the paper's VLM, needs detectron2 and custom CUDA ops; its
JSON is read as before (docs/data.md).

For every id of ``ROOT/A`` and ``ROOT/B`` (or of ``ROOT/list/<split>.txt``), each date on its own:

- ``ROOT/vlm/<date>/<id>.npy``: float16 (C, H, W) per-class probabilities at the image's size, C the
  prompts of ``--classes`` in their order (the semantic backend, CLIPSeg);
- ``ROOT/vlm/<date>/<id>.json``: COCO result records of the ``--foreground`` classes, ``category_id`` their
  index in ``--classes``, with the detector's score and the mask as compressed COCO RLE (the instance
  backend, Grounding DINO and SAM).

Resumable: an image whose files exist is skipped unless ``--overwrite``; files are written atomically.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from diffmatch.atomic import atomic_path, write_json
from diffmatch.cli import InputError, Progress
from diffmatch.config import CEGConfig
from diffmatch.device import pick_device, use_bf16
from diffmatch.evaluate import window_grid
from diffmatch.images import no_pixel_limit, read_rgb
from diffmatch.pairs import images_in, natural_key, read_id_list
from diffmatch.rle import encode_counts, window_counts
from diffmatch.vlm_models import Detection, InstanceModels, Instances, Semantic, transformers_module

Backend = Literal["semantic", "instance", "both"]
DATES = ("A", "B")


@dataclass
class Args:
    """Run open-vocabulary models on both dates of every pair: the ``vlm/{A,B}`` files of
    ``python -m diffmatch.ceg`` (per-class probabilities, and foreground instances)."""

    root: Path
    """Data set root with ``A/`` and ``B/`` (``list/`` for ``--split``); writes ``vlm/{A,B}/<id>.npy|.json``."""
    classes: tuple[str, ...] = CEGConfig.classes
    """The prompt list, in the order of the ``.npy`` channels and the JSON ``category_id``s: pass the same
    to ``python -m diffmatch.ceg``."""
    foreground: tuple[str, ...] = CEGConfig.foreground
    """Classes whose instances go to the JSON (the foreground concept of §3.2.1)."""
    backend: Backend = "both"
    """``semantic`` (CLIPSeg: the ``.npy``), ``instance`` (Grounding DINO and SAM: the ``.json``; CEG then
    takes probabilities from the instance scores, 0 for the background classes) or ``both``."""
    semantic_model: str = "CIDAS/clipseg-rd64-refined"
    """CLIPSeg model id, or a local folder (a downloaded snapshot, for a machine without a network)."""
    detector: str = "IDEA-Research/grounding-dino-tiny"
    """Grounding DINO model id or local folder."""
    segmenter: str = "facebook/sam-vit-base"
    """SAM model id or local folder."""
    scores: Literal["softmax", "sigmoid"] = "softmax"
    """Probabilities from CLIPSeg's logits: ``softmax`` over the prompts (one distribution per pixel) or
    ``sigmoid`` of each prompt on its own (CLIPSeg's binary masks)."""
    box_threshold: float = 0.3
    """Keep boxes whose class score (max over the class's text tokens, sigmoid) is at least this."""
    nms_iou: float = 0.5
    """Of two boxes of one class that overlap by more than this IoU, keep the higher-scoring one."""
    split: str | None = None
    """Only the ids of ``root/list/<split>.txt``; None: every pair of ``A/`` and ``B/``."""
    tile: int | None = None
    """Window side for images larger than it; None: each model's input side (CLIPSeg 352, SAM 1024)."""
    overlap: int | None = None
    """Overlap of neighbouring windows in pixels; None: a quarter of the window."""
    batch_size: int = 8
    """Windows per forward pass (CLIPSeg runs each window once per prompt)."""
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; None: cuda when available."""
    amp: bool = False
    """bf16 autocast on CUDA."""
    overwrite: bool = False
    """Redo images whose outputs exist (default: an interrupted run resumes where it stopped)."""


class Summary(NamedTuple):
    """What a run did."""

    written: int
    """Images (one date of one pair) whose files were written."""
    skipped: int
    """Images whose files were already there."""
    instances: int
    """Instance records written."""


class DateImage(NamedTuple):
    """One date of one pair."""

    image_id: str
    date: str
    path: Path


def pair_images(root: Path, split: str | None) -> list[DateImage]:
    """Both dates of every id (or of the split's ids), in natural id order; errors on a missing date."""
    for date in DATES:
        if not (root / date).is_dir():
            raise InputError(f"{root / date}: folder not found; --root must hold A/ and B/")
    found = {date: images_in(root / date) for date in DATES}
    if split is not None:
        ids = read_id_list(root / "list" / f"{split}.txt")
    else:
        ids = sorted(found["A"].keys() | found["B"].keys(), key=natural_key)
        if not ids:
            raise InputError(f"{root / 'A'}: no images found; run python -m diffmatch.prepare first")
    for date in DATES:
        missing = [i for i in ids if i not in found[date]]
        if missing:
            raise InputError(f"{root / date / missing[0]}.*: no image on this date ({len(missing)} ids lack one); "
                             "add it or remove the id")
    return [DateImage(i, date, found[date][i]) for i in ids for date in DATES]


def output_paths(root: Path, image: DateImage, backend: Backend) -> list[Path]:
    """The files an image gets: ``.npy`` (semantic) and ``.json`` (instance)."""
    folder = root / "vlm" / image.date
    return [folder / f"{image.image_id}{ext}" for ext, on in ((".npy", backend != "instance"),
                                                              (".json", backend != "semantic")) if on]


def probabilities(logits: torch.Tensor, scores: str) -> np.ndarray:
    """float16 (C, H, W) probabilities of (C, H, W) logits: softmax over the classes, or sigmoid."""
    probs = logits.softmax(0) if scores == "softmax" else logits.sigmoid()
    return probs.numpy().astype(np.float16)


def records(image_id: str, detections: list[Detection], size: tuple[int, int]) -> list[dict]:
    """COCO result records (as APE's demo writes them): the mask as compressed RLE at the image's size."""
    out = []
    for det in detections:
        x0, y0, x1, y1 = det.box
        counts = window_counts(det.mask, *det.window, *size)
        out.append({"image_id": image_id, "category_id": det.category, "score": round(det.score, 5),
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "segmentation": {"size": list(size), "counts": encode_counts(counts)}})
    return out


def write_npy(path: Path, array: np.ndarray) -> None:
    """``np.save``, atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, array)


def check(args: Args) -> None:
    """Errors on options before any model is loaded."""
    if len(set(args.classes)) != len(args.classes) or not args.classes:
        raise InputError(f"--classes {list(args.classes)}: give each class once")
    unknown = [n for n in args.foreground if n not in args.classes]
    if unknown or (args.backend != "semantic" and not args.foreground):
        raise InputError(f"--foreground {list(args.foreground)}: need at least one class, each in --classes "
                         f"{list(args.classes)}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.tile is not None and (args.tile < 1 or not 0 <= (args.overlap or 0) < args.tile):
        raise InputError(f"--tile {args.tile} --overlap {args.overlap}: need tile >= 1 and 0 <= overlap < tile")
    if not 0 <= args.box_threshold <= 1 or not 0 < args.nms_iou <= 1:
        raise InputError("--box-threshold must be in [0, 1] and --nms-iou in (0, 1]")


def chunks(todo: list[DateImage], tile: int, overlap: int,
           batch_size: int) -> Iterator[list[tuple[DateImage, np.ndarray]]]:
    """Images with their pixels, a few at a time: enough for ``batch_size`` windows (at least one image)."""
    chunk: list[tuple[DateImage, np.ndarray]] = []
    windows = 0
    for image in todo:
        with no_pixel_limit():  # large scenes are expected; windows bound the model's memory
            array = read_rgb(image.path)
        chunk.append((image, array))
        windows += len(window_grid(*array.shape[:2], tile, overlap))
        if windows >= batch_size:
            yield chunk
            chunk, windows = [], 0
    if chunk:
        yield chunk


def windowing(args: Args, side: int) -> tuple[int, int]:
    """(tile, overlap) for a model whose input side is ``side``."""
    tile = args.tile or side
    overlap = args.overlap if args.overlap is not None else tile // 4
    if not 0 <= overlap < tile:
        raise InputError(f"--overlap {overlap}: must be in [0, tile={tile})")
    return tile, overlap


def out_of_memory(err: BaseException) -> bool:
    """Whether an error is a failed allocation (CUDA, or the CPU allocator)."""
    text = str(err)
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


class Models(NamedTuple):
    """The loaded backends and their windows."""

    device: torch.device
    semantic: Semantic | None
    semantic_windows: tuple[int, int]
    """(tile, overlap) of the semantic model."""
    instances: Instances | None
    instance_windows: tuple[int, int]
    """(tile, overlap) of the instance models."""


def load_models(args: Args) -> Models:
    """The backends of ``--backend`` on ``--device`` (bf16 autocast with ``--amp`` on CUDA)."""
    device = pick_device(args.device)
    autocast = use_bf16(args.amp, device)
    semantic = Semantic(args.semantic_model, args.classes, device, autocast) if args.backend != "instance" else None
    instances = None
    if args.backend != "semantic":
        fg = [args.classes.index(n) for n in args.foreground]
        instances = Instances(InstanceModels(args.detector, args.segmenter, args.box_threshold, args.nms_iou),
                              args.foreground, fg, device, autocast)
    sem, inst = (windowing(args, m.side) if m else (1, 0) for m in (semantic, instances))
    return Models(device, semantic, sem, instances, inst)


def infer(models: Models, arrays: list[np.ndarray], batch_size: int) -> tuple[list | None, list | None]:
    """Each backend's output for the images: logits (semantic) and detections (instance)."""
    try:
        logits = models.semantic.logits(arrays, *models.semantic_windows, batch_size) if models.semantic else None
        found = models.instances.detect(arrays, *models.instance_windows, batch_size) if models.instances else None
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        fix = f"--batch-size {batch_size // 2}" if batch_size > 1 else "a smaller --tile, or --device cpu"
        raise InputError(f"out of memory on {models.device} with --batch-size {batch_size}; try {fix}") from None
    return logits, found


def main(args: Args) -> Summary:
    """Write the VLM files of every image that lacks them; return what was done."""
    transformers_module()  # without the extra: the one-line install hint, whatever else is wrong
    check(args)
    images = pair_images(args.root, args.split)
    todo = [im for im in images
            if args.overwrite or not all(p.is_file() for p in output_paths(args.root, im, args.backend))]
    progress, written, count = Progress("vlm_run", len(todo), "images", file=sys.stderr), 0, 0
    if todo:
        models = load_models(args)
        windows = models.semantic_windows if models.semantic else models.instance_windows
        for chunk in chunks(todo, *windows, args.batch_size):
            logits, found = infer(models, [array for _, array in chunk], args.batch_size)
            for n, (image, array) in enumerate(chunk):
                paths = output_paths(args.root, image, args.backend)
                if logits is not None:
                    write_npy(paths[0], probabilities(logits[n], args.scores))
                if found is not None:
                    write_json(paths[-1], records(image.image_id, found[n], array.shape[:2]))
                    count += len(found[n])
                written += 1
                progress.step()
    summary = Summary(written, len(images) - len(todo), count)
    inst = f", {count} instances" if args.backend != "semantic" else ""
    print(f"wrote {written} images to {args.root / 'vlm'} ({summary.skipped} already there{inst}); "
          f"next: python -m diffmatch.ceg --root {args.root}")
    return summary


if __name__ == "__main__":
    import tyro

    from diffmatch.cli import run_cli

    run_cli(lambda: (transformers_module(), main(tyro.cli(Args, prog="python -m diffmatch.vlm_run"))))
