"""Change event generation (CEG, §3.2): pseudo change labels from two single-date VLM outputs.

Pure numpy functions, one per equation, exactly as fixed by METHOD §4:

- concept probabilities ``fg``/``bg`` = max over the foreground/background classes (Eq. 4);
- segmentation ``I_t = fg >= bg`` (Eq. 5; ties go to foreground), reliability ``max(fg, bg) >= γ``
  (Eq. 6);
- pixel-level change ``|I_A - I_B|`` (Eq. 7);
- instance-level change: IoU matrix of the foreground instances (Eq. 8–9); an instance is a change
  event when its row (A) or column (B) sum is ``<= δ`` (Eq. 10); the mask is their union;
- mixed change ``pixel * instance`` where both dates are reliable, else 255 (Eq. 11, with the cases
  as the text and the authors' scripts mean them);
- single-date masks ``I_t`` where reliable at ``seg_gamma``, else 255 (§3.5).

The command ``python -m diffmatch.ceg --root DIR`` writes them for a whole data set and, where
``DIR/label`` exists, scores CEG as an unsupervised change detector; see ``diffmatch.ceg_cli``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import sparse

from diffmatch.config import CEGConfig
from diffmatch.vlm import Concepts, VLMOutput

IGNORE = 255


def concept_probs(probs: np.ndarray, concepts: Concepts) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background concept probabilities (H, W) of (C, H, W) class probabilities (Eq. 4)."""

    def concept(indices: np.ndarray) -> np.ndarray:
        out = probs[indices[0]].copy()
        for k in indices[1:]:
            np.maximum(out, probs[k], out=out)
        return out

    return concept(concepts.foreground), concept(concepts.background)


def segment(fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Single-date mask ``I_t``: 1 where the foreground concept wins, ties included (Eq. 5)."""
    return (fg >= bg).astype(np.uint8)


def reliable(fg: np.ndarray, bg: np.ndarray, gamma: float) -> np.ndarray:
    """Pixels whose winning concept probability reaches ``gamma`` (one date's factor of Eq. 6)."""
    return np.maximum(fg, bg) >= np.float32(gamma)


def pixel_change(seg_a: np.ndarray, seg_b: np.ndarray) -> np.ndarray:
    """Pixel-level change ``|I_A - I_B|`` as uint8 0/1 (Eq. 7)."""
    return (seg_a != seg_b).astype(np.uint8)


def _sparse_masks(masks: np.ndarray) -> sparse.csr_array:
    """(K, H*W) float32 CSR matrix of (K, H, W) bool masks, 1 on their pixels in column-major order
    (a copy-free flattening of masks stored column-major per instance, as ``diffmatch.vlm`` reads them)."""
    pixels = int(np.prod(masks.shape[1:]))
    on = np.flatnonzero(masks.transpose(0, 2, 1).reshape(len(masks), pixels))
    row_starts = np.searchsorted(on, np.arange(len(masks) + 1) * pixels)
    return sparse.csr_array((np.ones(on.size, np.float32), on % pixels, row_starts), shape=(len(masks), pixels))


def instance_iou(inst_a: np.ndarray, inst_b: np.ndarray) -> np.ndarray:
    """(M, N) IoU matrix T between (M, H, W) and (N, H, W) bool instance masks (Eq. 8–9); 0 for an
    empty union."""
    sparse_a, sparse_b = _sparse_masks(inst_a), _sparse_masks(inst_b)
    inter = (sparse_a @ sparse_b.T).toarray()  # exact: counts stay far below 2**24
    area_a = np.diff(sparse_a.indptr).astype(np.float32)
    area_b = np.diff(sparse_b.indptr).astype(np.float32)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def instance_change(inst_a: np.ndarray, inst_b: np.ndarray, delta: float = 0.0) -> np.ndarray:
    """Instance-level change as uint8 0/1: the union of the instances whose IoU row (A) or column (B)
    sum is ``<= delta`` (Eq. 10). With no instance on one date, every instance of the other is a
    change; with none on either, nothing is."""
    iou = instance_iou(inst_a, inst_b)
    events_a = inst_a[iou.sum(1) <= delta].any(0)  # (H, W) all False when there is no event
    events_b = inst_b[iou.sum(0) <= delta].any(0)
    return (events_a | events_b).astype(np.uint8, order="C")


def mixed_change(pixel: np.ndarray, instance: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mixed change ``pixel * instance`` where ``valid`` (= R_A and R_B), else 255 (Eq. 11)."""
    return np.where(valid, pixel * instance, IGNORE).astype(np.uint8)


def single_date_mask(seg: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Single-date label ``I_t`` where ``valid``, else 255 (§3.5)."""
    return np.where(valid, seg, IGNORE).astype(np.uint8)


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
            return np.where(self.reliable, self.pixel, IGNORE).astype(np.uint8)
        return mixed_change(self.pixel, self.instance, self.reliable)


def generate(out_a: VLMOutput, out_b: VLMOutput, concepts: Concepts, cfg: CEGConfig,
             with_instances: bool = True) -> CEGResult:
    """All CEG masks of one pair (§3.2). ``with_instances=False`` skips Eq. 8–10 (instance all 0)."""
    fg_a, bg_a = concept_probs(out_a.probs, concepts)
    fg_b, bg_b = concept_probs(out_b.probs, concepts)
    seg_a, seg_b = segment(fg_a, bg_a), segment(fg_b, bg_b)
    both = reliable(fg_a, bg_a, cfg.gamma) & reliable(fg_b, bg_b, cfg.gamma)  # Eq. 6
    seg_gamma = cfg.single_date_gamma
    instance = (instance_change(out_a.instances, out_b.instances, cfg.delta) if with_instances
                else np.zeros_like(seg_a))
    return CEGResult(
        pixel=pixel_change(seg_a, seg_b),
        instance=instance,
        reliable=both.astype(np.uint8),
        seg_a=single_date_mask(seg_a, reliable(fg_a, bg_a, seg_gamma)),
        seg_b=single_date_mask(seg_b, reliable(fg_b, bg_b, seg_gamma)),
    )


if __name__ == "__main__":
    import tyro

    from diffmatch.ceg_cli import Args, main
    from diffmatch.files import run_cli

    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.ceg")))
