"""Change maps for new image pairs of any size with a trained checkpoint.

    python -m diffmatch.predict --checkpoint best.pt --a pre.png --b post.png --out change.png
    python -m diffmatch.predict --checkpoint best.pt --src scenes --out maps

One pair (``--a``, ``--b``) writes the mask to ``--out`` (``.png``, or ``.tif``); ``--probability`` adds
``<stem>_prob`` beside it, the change probability as 8-bit grey (round(255 p)), and ``--overlay`` adds
``<stem>_overlay``, the post-event image with changed pixels tinted red. A folder (``--src`` with ``A/``
and ``B/``, files paired by name without extension, any of ``images.IMAGE_EXTS``) writes ``OUT/<id>``,
``OUT/prob/<id>`` and ``OUT/overlay/<id>`` per pair (so no pair's name meets another's outputs) and
skips pairs whose outputs exist unless ``--overwrite``. Masks are 0/255.

GeoTIFF in, GeoTIFF out: outputs named ``.tif`` (in folder mode: those of a geo-referenced pre-event
TIFF) are TIFFs carrying the pre-event image's geo-referencing tags (``geotiff.GEO_TAGS``), so they open
in place in a GIS. Pairs larger than the tile are predicted with overlapping windows whose logits are
averaged (``evaluate.change_margin``): the model only ever sees a batch of windows, and a pair costs
about 14 bytes a pixel on the CPU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffmatch.checkpoint import model_from_checkpoint
from diffmatch.cli import InputError, Progress
from diffmatch.device import pick_device
from diffmatch.evaluate import Windows, change_margin, window_grid
from diffmatch.geotiff import TIFF_EXTS, GeoTags, geo_tags, write_tiff
from diffmatch.images import no_pixel_limit, pair_size, read_rgb
from diffmatch.pairs import find_pairs
from diffmatch.png import write_png

WINDOW_PROGRESS = 64
"""Pairs of more windows than this also show a progress line over their windows."""
TINT = 0.5
"""Share of red in the overlay's changed pixels."""


@dataclass
class Args:
    """Predict change masks for one image pair or a folder of pairs with a trained checkpoint."""

    checkpoint: Path
    """``best.pt`` or ``last.pt`` of a training run."""
    out: Path
    """The mask file (``.png``, or ``.tif`` to keep a GeoTIFF's geo-referencing) for ``--a``/``--b``, or the
    output folder for ``--src``."""
    a: Path | None = None
    """Pre-event image of one pair (with ``--b``)."""
    b: Path | None = None
    """Post-event image of one pair (with ``--a``)."""
    src: Path | None = None
    """Folder with ``A/`` and ``B/`` images paired by name without extension (instead of ``--a``/``--b``)."""
    tile: int | None = None
    """Sliding-window size; default the checkpoint's training crop size."""
    overlap: int | None = None
    """Overlap of neighbouring windows in pixels; default a quarter of the window."""
    batch_size: int = 8
    """Windows per forward pass: this, not the image size, bounds the memory in the model."""
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; None: cuda when available."""
    amp: bool = False
    """bf16 autocast on CUDA."""
    threshold: float = 0.5
    """A pixel is changed where its change probability exceeds this; 0.5 is the argmax."""
    probability: bool = False
    """Also write the change probability as 8-bit grey, round(255 p): ``<stem>_prob`` beside ``--out``,
    or ``OUT/prob/<id>`` in folder mode."""
    overlay: bool = False
    """Also write the post-event image with changed pixels tinted red: ``<stem>_overlay`` beside
    ``--out``, or ``OUT/overlay/<id>`` in folder mode."""
    overwrite: bool = False
    """Folder mode: predict pairs whose outputs already exist (default: skip them)."""


def output_paths(mask: Path, probability: bool, overlay: bool, folder: bool = False) -> list[Path]:
    """The mask path, then those of the probability and the overlay when asked for: ``<stem>_prob`` and
    ``<stem>_overlay`` beside the mask, or with ``folder`` ``prob/<name>`` and ``overlay/<name>`` in its
    folder (where a pair named ``x_prob`` would meet the probability of ``x``)."""
    extra = [name for name, wanted in (("prob", probability), ("overlay", overlay)) if wanted]
    if folder:
        return [mask, *(mask.parent / name / mask.name for name in extra)]
    return [mask, *(mask.with_name(f"{mask.stem}_{name}{mask.suffix}") for name in extra)]


def write_output(path: Path, array: np.ndarray, geo: GeoTags | None) -> None:
    """A uint8 output as a TIFF carrying ``geo`` when ``path`` ends in ``.tif``/``.tiff``, else as PNG."""
    if path.suffix.lower() in TIFF_EXTS:
        write_tiff(path, array, geo)
    else:
        write_png(path, array)


def margin_threshold(threshold: float) -> float:
    """The change-minus-no-change logit above which the change probability exceeds ``threshold``."""
    if not 0 < threshold < 1:
        raise InputError(f"--threshold {threshold}: must be between 0 and 1 (exclusive)")
    return math.log(threshold / (1 - threshold))


def change_mask(margin: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 0/255 mask of the pixels whose change probability exceeds ``threshold``."""
    return np.where(margin > margin_threshold(threshold), np.uint8(255), np.uint8(0))


def probability_image(margin: np.ndarray) -> np.ndarray:
    """The change probability sigmoid(margin) as uint8, round(255 p)."""
    return np.rint(torch.sigmoid(torch.from_numpy(margin)).mul_(255).numpy()).astype(np.uint8)


def overlay_image(image: np.ndarray, mask: np.ndarray, tint: float = TINT) -> np.ndarray:
    """(H, W, 3) uint8 ``image`` with the pixels where ``mask`` is set blended towards red by ``tint``."""
    out = image.copy()
    changed = mask > 0
    red = np.array([255, 0, 0], np.float32)
    out[changed] = np.rint(image[changed] * (1 - tint) + red * tint).astype(np.uint8)
    return out


def as_batch(image: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W, 3) array as a (1, 3, H, W) uint8 tensor sharing its memory (read, never written,
    so a read-only array is used as is rather than copied)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)


def predict_margin(model: nn.Module, a: np.ndarray, b: np.ndarray, *, windows: Windows,
                   name: str = "pair") -> np.ndarray:
    """(H, W) float32 change-minus-no-change logits of a uint8 (H, W, 3) pair, averaged over the sliding
    ``windows`` (their overlap given).

    The pair stays on the CPU as uint8; only window batches go to the model's device. A pair of more
    than ``WINDOW_PROGRESS`` windows prints a progress line named ``name`` over its windows.
    """
    count = len(window_grid(a.shape[0], a.shape[1], windows.tile, windows.shared))
    progress = Progress(name, count, "windows") if count > WINDOW_PROGRESS else None
    margin = change_margin(model, as_batch(a), as_batch(b), windows=windows,
                           on_batch=progress.step if progress else None)
    return margin[0].numpy()


def pairs_of(args: Args) -> dict[str, tuple[Path, Path, Path]]:
    """``id -> (A file, B file, mask path)`` of the pair or of every pair in the folder."""
    if args.src is not None:
        if args.a is not None or args.b is not None:
            raise InputError("--src: give either --src or --a and --b, not both")
        if not args.src.is_dir():
            raise InputError(f"{args.src}: folder not found; pass a folder holding A/ and B/ as --src")
        found = find_pairs(args.src, need_label=False)
        suffix = {s["A"].stem: ".tif" if geo_tags(s["A"]) else ".png" for s in found}  # GeoTIFF in, GeoTIFF out
        return {s["A"].stem: (s["A"], s["B"], args.out / f"{s['A'].stem}{suffix[s['A'].stem]}") for s in found}
    if args.a is None or args.b is None:
        raise InputError("--a/--b: give both images of the pair (or a folder of pairs as --src)")
    for path in (args.a, args.b):
        if not path.is_file():
            raise InputError(f"{path}: file not found")
    if args.out.suffix.lower() not in (".png", *TIFF_EXTS):
        raise InputError(f"--out {args.out}: the mask of one pair is a .png or .tif file; name it e.g. change.png")
    if args.out.suffix.lower() == ".png" and geo_tags(args.a):
        print(f"note: {args.a} is a GeoTIFF; name --out with .tif (e.g. {args.out.with_suffix('.tif')}) to keep "
              "its geo-referencing", flush=True)
    return {args.out.stem: (args.a, args.b, args.out)}


def outputs_of(args: Args, mask_path: Path) -> list[Path]:
    """The files ``args`` asks for of the pair whose mask is ``mask_path`` (``output_paths``)."""
    return output_paths(mask_path, args.probability, args.overlay, folder=args.src is not None)


def windows_of(args: Args, crop_size: int) -> Windows:
    """The sliding windows of ``--tile`` (default the training crop ``crop_size``), ``--overlap`` (default a
    quarter of the tile), ``--batch-size`` and ``--amp``."""
    tile = crop_size if args.tile is None else args.tile
    overlap = tile // 4 if args.overlap is None else args.overlap
    if tile < 1 or not 0 <= overlap < tile:
        raise InputError(f"--tile {tile} --overlap {overlap}: need tile >= 1 and 0 <= overlap < tile")
    return Windows(tile, overlap, args.batch_size, args.amp)


def refuse_overwriting_inputs(args: Args, pairs: dict[str, tuple[Path, Path, Path]]) -> None:
    """An ``InputError`` when an output of a pair would replace an input image of any pair."""
    inputs = {path.resolve() for path_a, path_b, _ in pairs.values() for path in (path_a, path_b)}
    for _, _, mask_path in pairs.values():
        for path in outputs_of(args, mask_path):
            if path.resolve() in inputs:
                raise InputError(f"--out {args.out}: would overwrite the input image {path}; choose another --out")


def predict_pair(model: nn.Module, pair_id: str, paths: tuple[Path, Path, Path], args: Args,
                 windows: Windows) -> None:
    """Predict one pair (A file, B file, mask path) and write the mask and the extra outputs ``args`` asks for,
    geo-referenced like the pre-event image when the mask is a TIFF."""
    path_a, path_b, mask_path = paths
    with no_pixel_limit():  # large scenes are expected here; the window batch bounds the model's memory
        pair_size({"A": path_a, "B": path_b})
        a, b = read_rgb(path_a), read_rgb(path_b)
    geo = geo_tags(path_a) if mask_path.suffix.lower() in TIFF_EXTS else None
    if geo is not None and geo_tags(path_b) not in (None, geo):
        print(f"note: {path_b} is geo-referenced differently from {path_a}; the outputs carry the latter's",
              flush=True)
    margin = predict_margin(model, a, b, windows=windows, name=pair_id)
    mask = change_mask(margin, args.threshold)
    outputs = outputs_of(args, mask_path)
    write_output(outputs[0], mask, geo)
    if args.probability:
        write_output(outputs[1], probability_image(margin), geo)
    if args.overlay:
        write_output(outputs[-1], overlay_image(b, mask), geo)


def main(args: Args) -> list[Path]:
    """Predict every pair whose outputs are missing (or all, with ``--overwrite`` or one pair); return
    the masks written."""
    margin_threshold(args.threshold)
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    pairs = pairs_of(args)
    device = pick_device(args.device)
    model, train_args = model_from_checkpoint(args.checkpoint, device)
    windows = windows_of(args, train_args.data.crop_size)
    refuse_overwriting_inputs(args, pairs)
    resume = args.src is not None and not args.overwrite
    progress, written = Progress("predict", len(pairs), "pairs"), []
    for pair_id, paths in pairs.items():
        if not (resume and all(p.is_file() for p in outputs_of(args, paths[2]))):
            predict_pair(model, pair_id, paths, args, windows)
            written.append(paths[2])
        progress.step()
    kept = len(pairs) - len(written)
    where = f"{len(written)} mask(s)" + (f" in {written[0].parent}" if written else "")
    extra = " (with probability maps)" if args.probability else ""
    extra += " (with overlays)" if args.overlay else ""
    print(f"predict: wrote {where}{extra}" + (f"; {kept} pair(s) already done, kept" if kept else ""), flush=True)
    return written


if __name__ == "__main__":
    import tyro

    from diffmatch.cli import run_cli

    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.predict")))
