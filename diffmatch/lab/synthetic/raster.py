"""Raster helpers of the synthetic scenes: smooth noise, dilation, tree crowns, cars and the camera."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage

_CARS = np.array([[230, 230, 230], [30, 30, 34], [150, 30, 30], [120, 124, 130], [40, 50, 90], [200, 200, 190]],
                 np.float32)


def smooth_noise(rng: np.random.Generator, n: int, cells: float) -> np.ndarray:
    """(n, n) float32 noise with features about n / cells pixels wide, zero mean, unit std."""
    k = max(2, round(cells)) + 1
    grid = rng.standard_normal((k, k)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((n, n), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a bool mask by a square of side 2 * radius + 1."""
    return ndimage.maximum_filter(mask, size=2 * radius + 1)


def tree_crowns(rng: np.random.Generator, n: int, count: int, free: np.ndarray, keepout: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Tree crowns (bool) and their shading (0..1) from clustered seeds on the free ground."""
    density = smooth_noise(rng, n, 4) + 1.2
    ys, xs = rng.integers(0, n, (2, count * 3))
    keep = (rng.random(count * 3) * 3.5 < density[ys, xs]) & free[ys, xs]
    seeds = np.zeros((n, n), np.float32)
    seeds[ys[keep][:count], xs[keep][:count]] = rng.uniform(0.5, 1.6, min(count, int(keep.sum())))
    blob = ndimage.gaussian_filter(seeds, 2.2) / (0.0329 * 1.6)
    crowns = (blob > 0.25) & ~keepout
    return crowns, np.clip(blob, 0, 1)


def camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Acquisition of one date: colour gain, gamma and haze (one lookup per channel), blur, sensor noise."""
    gain = rng.uniform(0.82, 1.15) * rng.uniform(0.97, 1.03, 3)
    gamma, haze = rng.uniform(0.85, 1.2), rng.uniform(0, 0.15)
    levels = np.linspace(0, 1, 256)[:, None]
    curve = 255 * np.clip(levels * gain, 0, 1) ** gamma * (1 - haze) + haze * np.array([175, 178, 185])
    codes, curve = np.clip(image, 0, 255).astype(np.uint8), curve.astype(np.float32)
    out = np.empty(codes.shape, np.float32)
    for channel in range(3):  # np.take is faster than fancy indexing; codes are within 0..255
        np.take(curve[:, channel], codes[..., channel], out=out[..., channel], mode="clip")
    sigma = rng.uniform(0, 0.8)
    if sigma > 0.3:
        out = ndimage.gaussian_filter(out, (sigma, sigma, 0))
    noise = rng.standard_normal(out.shape, dtype=np.float32)
    noise *= rng.uniform(1.5, 4)
    out += noise
    out += 0.5
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def paint_cars(rng: np.random.Generator, image: np.ndarray, where: np.ndarray, theta: float) -> None:
    """Paint parked and driving cars (clutter that differs between the dates) on roads and paving."""
    spots = np.flatnonzero(where.ravel())
    codes = np.zeros(where.shape, np.uint8)
    count = rng.poisson(len(spots) / 700) if len(spots) else 0
    codes.ravel()[rng.choice(spots, count)] = rng.integers(1, len(_CARS) + 1, count)
    along = abs(math.cos(theta)) > 0.85, abs(math.sin(theta)) > 0.85
    codes = ndimage.maximum_filter(codes, size=(3, 5) if along[0] else (5, 3) if along[1] else (3, 3))
    paint = (codes > 0) & where
    image[paint] = _CARS[codes[paint] - 1]
