"""Weak and strong views of an image pair and its masks (§3.1; UniMatch's transforms).

Every function takes the pair and its masks together, so that one geometric draw moves the pre-event
image, the post-event image and every mask of the pair alike. Randomness comes from an explicit
``numpy.random.Generator``: a sample seeded from (seed, epoch, index) is the same in any DataLoader
worker.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from diffmatch.config import IGNORE, AugmentConfig

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def rescale(images: list[Image.Image], masks: list[Image.Image], scale: tuple[float, float],
            rng: np.random.Generator) -> tuple[list[Image.Image], list[Image.Image]]:
    """Resize everything so that the long side is scaled by a factor drawn from ``scale``."""
    w, h = images[0].size
    long_side = round(max(w, h) * rng.uniform(*scale))
    size = (long_side, max(1, round(h * long_side / w))) if w >= h else (max(1, round(w * long_side / h)), long_side)
    return ([im.resize(size, Image.BILINEAR) for im in images],
            [m.resize(size, Image.NEAREST) for m in masks])


def crop(images: list[Image.Image], masks: list[Image.Image], size: int,
         rng: np.random.Generator) -> tuple[list[Image.Image], list[Image.Image]]:
    """A random ``size`` x ``size`` crop; smaller inputs are padded (images 0, masks 255)."""
    w, h = images[0].size
    pad_w, pad_h = max(size - w, 0), max(size - h, 0)
    if pad_w or pad_h:
        images = [ImageOps.expand(im, border=(0, 0, pad_w, pad_h), fill=0) for im in images]
        masks = [ImageOps.expand(m, border=(0, 0, pad_w, pad_h), fill=IGNORE) for m in masks]
        w, h = images[0].size
    x = int(rng.integers(0, w - size + 1))
    y = int(rng.integers(0, h - size + 1))
    box = (x, y, x + size, y + size)
    return [im.crop(box) for im in images], [m.crop(box) for m in masks]


def hflip(images: list[Image.Image], masks: list[Image.Image], p: float,
          rng: np.random.Generator) -> tuple[list[Image.Image], list[Image.Image]]:
    """Flip everything left-right with probability ``p``."""
    if rng.random() < p:
        flip = Image.Transpose.FLIP_LEFT_RIGHT
        return [im.transpose(flip) for im in images], [m.transpose(flip) for m in masks]
    return images, masks


def weak_view(images: list[Image.Image], masks: list[Image.Image], cfg: AugmentConfig, crop_size: int,
              rng: np.random.Generator) -> tuple[list[Image.Image], list[Image.Image]]:
    """Rescale, crop and flip the pair (``images``: pre- and post-event) and its masks with one shared draw."""
    images, masks = rescale(images, masks, cfg.scale, rng)
    images, masks = crop(images, masks, crop_size, rng)
    return hflip(images, masks, cfg.hflip_prob, rng)


def color_jitter(image: Image.Image, strength: tuple[float, float, float, float], p: float,
                 rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter (brightness, contrast, saturation, hue in random order), applied
    with probability ``p``, drawing from ``rng``."""
    if rng.random() >= p:
        return image
    brightness, contrast, saturation, hue = strength
    ops = [
        lambda im: TF.adjust_brightness(im, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)),
        lambda im: TF.adjust_contrast(im, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)),
        lambda im: TF.adjust_saturation(im, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)),
        lambda im: TF.adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    for i in rng.permutation(len(ops)):
        image = ops[i](image)
    return image


def blur(image: Image.Image, sigma: tuple[float, float], p: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur with a sigma drawn from ``sigma``, with probability ``p``."""
    if rng.random() >= p:
        return image
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*sigma)))


def strong_view(image: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Photometric strong view of one date (colour jitter, blur); call it once per date."""
    image = color_jitter(image, cfg.jitter, cfg.jitter_prob, rng)
    return blur(image, cfg.blur_sigma, cfg.blur_prob, rng)


def cutmix_box(size: int, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) uint8 mask, 1 inside the CutMix box (shared by both dates), all 0 with
    probability 1 - ``cutmix_prob``. Area share and aspect (height / width) are drawn from the
    config's ranges; a draw that does not fit the crop is redrawn."""
    box = np.zeros((size, size), dtype=np.uint8)
    if rng.random() >= cfg.cutmix_prob:
        return box
    while True:
        area = rng.uniform(*cfg.cutmix_area) * size * size
        aspect = rng.uniform(*cfg.cutmix_aspect)
        h, w = int(math.sqrt(area * aspect)), int(math.sqrt(area / aspect))
        if 0 < h <= size and 0 < w <= size:
            break
    y = int(rng.integers(0, size - h + 1))
    x = int(rng.integers(0, size - w + 1))
    box[y:y + h, x:x + w] = 1
    return box


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A float (3, H, W) tensor normalised with the ImageNet mean and std."""
    return TF.normalize(TF.to_tensor(image), MEAN, STD)


def mask_to_tensor(mask: Image.Image | np.ndarray) -> torch.Tensor:
    """An int64 (H, W) tensor of the mask's values (0, 1, 255)."""
    return torch.from_numpy(np.array(mask, dtype=np.int64))
