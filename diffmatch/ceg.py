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

The command ``python -m diffmatch.ceg`` runs them over a data set: ``diffmatch.pseudo``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from diffmatch.config import CEGConfig
from diffmatch.rle import Runs, runs_intersections
from diffmatch.vlm import Concepts, VLMOutput


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


if __name__ == "__main__":  # the command lives in diffmatch.pseudo; run as a script, this file is __main__
    import tyro

    from diffmatch.cli import run_cli
    from diffmatch.pseudo import Args, main

    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.ceg")))
