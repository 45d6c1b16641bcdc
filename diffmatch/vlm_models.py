"""The open-vocabulary models behind ``python -m diffmatch.vlm_run``: plain-PyTorch models of the optional
``transformers`` package (``pip install -e ".[vlm]"``), imported here only, and only when a model is loaded.

- ``Semantic``: CLIPSeg (Lüddecke and Ecker, CVPR 2022), a logit per pixel and text prompt: the per-class
  probabilities of the ``.npy`` files CEG reads (§3.2.1).
- ``Instances``: Grounding DINO (Liu et al., ECCV 2024) boxes for the foreground prompts and a SAM (Kirillov
  et al., ICCV 2023) mask inside each box, the "Grounded-SAM" pipeline: the instances of the ``.json`` files.

Images larger than a model's input are cut into overlapping windows (``evaluate.window_grid``), as
``predict`` does: CLIPSeg's logits are averaged where windows overlap; a box belongs to the window whose
core (its share of the overlap split at the middle) holds the box's centre, so an object is found once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from diffmatch.cli import InputError
from diffmatch.device import autocast
from diffmatch.evaluate import tile_starts, window_grid

INSTALL = 'pip install -e ".[vlm]"'
"""How to get the extra, as the error message says it."""
SAM_BOXES = 32
"""Boxes per SAM mask-decoder call: bounds the memory of the masks at the window's size."""


def transformers_module() -> Any:
    """The ``transformers`` package; a one-line error naming the install command without it."""
    try:
        import transformers
    except ImportError:
        raise InputError(f"python -m diffmatch.vlm_run needs the transformers package: {INSTALL}") from None
    return transformers


def load(flag: str, name: str, model_type: str, model_class: str) -> tuple[Any, Any]:
    """The model (eval mode, on the CPU) and processor of a model id or a local folder (``save_pretrained``
    or a downloaded snapshot); errors name ``--flag`` and the fix."""
    tf = transformers_module()
    try:
        config = tf.AutoConfig.from_pretrained(name)
        if config.model_type != model_type:
            raise InputError(f"--{flag} {name}: a {config.model_type} model, not {model_type}; pass a {model_type} "
                             "model id or folder")
        model = getattr(tf, model_class).from_pretrained(name)
        processor = tf.AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if Path(name).is_dir():
            raise InputError(f"--{flag} {name}: cannot load the model folder ({reason}); it needs config.json, "
                             "the weights and the processor files that save_pretrained writes") from None
        raise InputError(f"--{flag} {name}: cannot load the model ({reason}); check the id, or without a network "
                         f"download it elsewhere (hf download {name} --local-dir DIR) and pass --{flag} DIR") from None
    return model.eval(), processor


def input_side(image_processor: Any) -> int:
    """The side of a processor's model input (CLIPSeg: height and width; SAM: the longest edge)."""
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return max(int(get(key) or 0) for key in ("height", "width", "longest_edge"))


def coverage(height: int, width: int, tile: int, overlap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows covering each row and each column: their product is the count at a pixel (a grid)."""
    rows, cols, stride = torch.zeros(height), torch.zeros(width), tile - overlap
    for y in tile_starts(height, min(tile, height), stride):
        rows[y : y + min(tile, height)] += 1
    for x in tile_starts(width, min(tile, width), stride):
        cols[x : x + min(tile, width)] += 1
    return rows, cols


def cores(length: int, tile: int, overlap: int) -> dict[int, tuple[float, float]]:
    """Window start -> [lo, hi) of its core along one axis: the overlap of neighbours split at its middle,
    so the cores partition [0, length)."""
    starts, side = tile_starts(length, min(tile, length), tile - overlap), min(tile, length)
    bounds = [0.0, *((a + side + b) / 2 for a, b in itertools.pairwise(starts)), float(length)]
    return {s: (bounds[i], bounds[i + 1]) for i, s in enumerate(starts)}


class Semantic:
    """CLIPSeg: for each image, (C, H, W) float32 logits of the C prompts at the image's size."""

    def __init__(self, name: str, prompts: Sequence[str], device: torch.device, autocast: bool) -> None:
        self.model, self.processor = load("semantic-model", name, "clipseg", "CLIPSegForImageSegmentation")
        self.model.to(device)
        self.device, self.autocast, self.side = device, autocast, input_side(self.processor.image_processor)
        text = self.processor.tokenizer(list(prompts), padding=True, return_tensors="pt").to(device)
        with torch.no_grad():  # the prompts' embeddings once, not once per window
            self.embeddings = self.model.get_conditional_embeddings(
                batch_size=len(prompts), input_ids=text["input_ids"], attention_mask=text["attention_mask"])

    def logits(self, images: Sequence[np.ndarray], tile: int, overlap: int, batch_size: int) -> list[torch.Tensor]:
        """Per uint8 (H, W, 3) image, its (C, H, W) logits: ``batch_size`` windows (of all the images)
        per forward pass, each resized to the model's input and its logits back to the window's size."""
        num = len(self.embeddings)
        out = [torch.zeros((num, *image.shape[:2])) for image in images]
        items = [(i, y, x) for i, image in enumerate(images) for y, x in window_grid(*image.shape[:2], tile, overlap)]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            crops = [np.array(images[i][y : y + tile, x : x + tile]) for i, y, x in chunk]
            pixels = self.processor.image_processor(images=crops, return_tensors="pt")["pixel_values"]
            with torch.no_grad(), autocast(self.device, self.autocast):
                logits = self.model(pixel_values=pixels.to(self.device).repeat_interleave(num, 0),
                                    conditional_embeddings=self.embeddings.repeat(len(chunk), 1)).logits
            logits = logits.float().view(len(chunk), num, *logits.shape[-2:])
            for (i, y, x), crop, window in zip(chunk, crops, logits, strict=True):
                h, w = crop.shape[:2]
                resized = F.interpolate(window[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                out[i][:, y : y + h, x : x + w] += resized.cpu()
        for image, logits in zip(images, out, strict=True):
            rows, cols = coverage(*image.shape[:2], tile, overlap)
            logits /= rows.view(-1, 1)
            logits /= cols.view(1, -1)
        return out


class Detection(NamedTuple):
    """One instance: a detector box, its class and score, and the SAM mask of the window it was found in."""

    box: tuple[float, float, float, float]
    """x0, y0, x1, y1 in the image's pixels."""
    category: int
    """Index of its class in the prompt list (``--classes``)."""
    score: float
    """The detector's score of that class (max over the class's text tokens)."""
    window: tuple[int, int]
    """(top, left) of the window the mask covers."""
    mask: np.ndarray
    """(h, w) bool mask of the window."""


class InstanceModels(NamedTuple):
    """The models of Grounded-SAM and which of their boxes are kept."""

    detector: str
    """Grounding DINO model id or local folder (``--detector``)."""
    segmenter: str
    """SAM model id or local folder (``--segmenter``)."""
    threshold: float
    """Least class score of a kept box (``--box-threshold``)."""
    nms_iou: float
    """Of two boxes of one class overlapping by more than this IoU, the lower-scoring one goes (``--nms-iou``)."""


class Instances:
    """Grounded-SAM: Grounding DINO boxes for the foreground prompts, then a SAM mask inside each box."""

    def __init__(self, models: InstanceModels, prompts: Sequence[str], categories: Sequence[int],
                 device: torch.device, autocast: bool) -> None:
        self.detector, self.det_processor = load("detector", models.detector, "grounding-dino",
                                                 "GroundingDinoForObjectDetection")
        self.segmenter, self.seg_processor = load("segmenter", models.segmenter, "sam", "SamModel")
        self.detector.to(device)
        self.segmenter.to(device)
        self.device, self.autocast, self.threshold, self.nms_iou = device, autocast, models.threshold, models.nms_iou
        self.categories, self.side = list(categories), input_side(self.seg_processor.image_processor)
        names = [p.strip().lower() for p in prompts]
        self.text = " ".join(f"{n}." for n in names)  # Grounding DINO's prompt form: "house. building."
        spans, pos = [], 0
        for n in names:
            spans.append((pos, pos + len(n)))
            pos += len(n) + 2
        offsets = self.det_processor.tokenizer(self.text, return_offsets_mapping=True)["offset_mapping"]
        self.tokens = [[j for j, (s, e) in enumerate(offsets) if e > s and lo <= s and e <= hi] for lo, hi in spans]

    def detect(self, images: Sequence[np.ndarray], tile: int, overlap: int, batch_size: int) -> list[list[Detection]]:
        """Per uint8 (H, W, 3) image, its instances by falling score; ``batch_size`` windows per detector pass."""
        found: list[list[tuple[list[float], int, float, tuple[int, int]]]] = [[] for _ in images]
        items = [(i, y, x) for i, image in enumerate(images) for y, x in window_grid(*image.shape[:2], tile, overlap)]
        axes = [(cores(im.shape[0], tile, overlap), cores(im.shape[1], tile, overlap)) for im in images]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            crops = [np.array(images[i][y : y + tile, x : x + tile]) for i, y, x in chunk]
            inputs = self.det_processor(images=crops, text=[self.text] * len(crops), return_tensors="pt")
            with torch.no_grad(), autocast(self.device, self.autocast):
                out = self.detector(**inputs.to(self.device))
            probs = out.logits.float().sigmoid()  # (n, queries, text tokens)
            per_class = torch.stack([probs[..., idx].amax(-1) for idx in self.tokens], -1).cpu()
            scores, classes = per_class.max(-1)
            cx, cy, bw, bh = out.pred_boxes.float().cpu().unbind(-1)  # relative centre and size
            corners = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            for n, ((i, y, x), crop) in enumerate(zip(chunk, crops, strict=True)):
                size = torch.tensor([crop.shape[1], crop.shape[0]] * 2, dtype=torch.float32)
                box = torch.minimum((corners[n] * size).clamp_min(0), size) + torch.tensor([x, y, x, y])
                mid_y, mid_x = (box[:, 1] + box[:, 3]) / 2, (box[:, 0] + box[:, 2]) / 2
                (ylo, yhi), (xlo, xhi) = axes[i][0][y], axes[i][1][x]
                ok = ((scores[n] >= self.threshold) & (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
                      & (mid_y >= ylo) & (mid_y < yhi) & (mid_x >= xlo) & (mid_x < xhi))  # found once: in its core
                for q in torch.nonzero(ok)[:, 0].tolist():
                    found[i].append((box[q].tolist(), int(classes[n, q]), float(scores[n, q]), (y, x)))
        return [self._segment(image, boxes, tile) for image, boxes in zip(images, found, strict=True)]

    def _segment(self, image: np.ndarray, found: list, tile: int) -> list[Detection]:
        """Class-wise NMS of the boxes (image coordinates), then SAM masks, one image embedding per window."""
        if not found:
            return []
        boxes = torch.tensor([b for b, *_ in found], dtype=torch.float32)
        scores = torch.tensor([s for _, _, s, _ in found], dtype=torch.float32)
        keep = batched_nms(boxes, scores, torch.tensor([c for _, c, _, _ in found]), self.nms_iou).tolist()  # by score
        kept = [found[k] for k in keep]
        masks: dict[int, np.ndarray] = {}
        for y, x in sorted({win for *_, win in kept}):
            which = [k for k, (*_, win) in enumerate(kept) if win == (y, x)]
            crop = np.array(image[y : y + tile, x : x + tile])
            local = [[v - o for v, o in zip(kept[k][0], (x, y, x, y), strict=True)] for k in which]
            inputs = self.seg_processor(images=crop, input_boxes=[local], return_tensors="pt")
            with torch.no_grad(), autocast(self.device, self.autocast):
                embeddings = self.segmenter.get_image_embeddings(inputs["pixel_values"].to(self.device))
                for a in range(0, len(which), SAM_BOXES):
                    boxes = inputs["input_boxes"][:, a : a + SAM_BOXES].float().to(self.device)
                    out = self.segmenter(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False)
                    window = self.seg_processor.post_process_masks(
                        out.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0][:, 0]
                    masks.update(zip(which[a : a + SAM_BOXES], window.numpy().astype(bool), strict=True))
        return [Detection(tuple(box), self.categories[c], score, win, masks[k])
                for k, (box, c, score, win) in enumerate(kept) if masks[k].any()]
