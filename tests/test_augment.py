from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffmatch import augment
from diffmatch.config import AugmentConfig


def coordinate_pair(h: int = 40, w: int = 60) -> tuple[Image.Image, Image.Image, list[Image.Image]]:
    """Images and masks whose pixels encode their own position, so alignment can be checked."""
    yy, xx = np.mgrid[0:h, 0:w]
    code = (yy * w + xx) % 250  # < 255: never the mask padding value
    image = np.stack([code, code, code], axis=2).astype(np.uint8)
    return (Image.fromarray(image), Image.fromarray(image.copy()),
            [Image.fromarray(code.astype(np.uint8)) for _ in range(3)])


@pytest.mark.parametrize("seed", range(20))
def test_weak_view_moves_pair_and_masks_alike(seed: int) -> None:
    a, b, masks = coordinate_pair()
    cfg = AugmentConfig(scale=(1.0, 1.0))  # no resampling, so values are exact
    (a2, b2), masks2 = augment.weak_view([a, b], masks, cfg, 64, np.random.default_rng(seed))
    a_arr, b_arr = np.asarray(a2)[..., 0], np.asarray(b2)[..., 0]
    assert a2.size == b2.size == (64, 64)
    np.testing.assert_array_equal(a_arr, b_arr)
    for mask in masks2:
        m = np.asarray(mask)
        inside = m != 255
        np.testing.assert_array_equal(m[inside], a_arr[inside])  # aligned with the images
        assert (a_arr[~inside] == 0).all()  # image padding is 0 where masks are padded with 255
        assert inside.sum() == 40 * 60


def test_rescale_keeps_aspect_and_range() -> None:
    a, b, masks = coordinate_pair(40, 80)
    for seed in range(30):
        images, ms = augment.rescale([a, b], masks, (0.8, 1.2), np.random.default_rng(seed))
        w, h = images[0].size
        assert 64 <= w <= 96 and abs(h - w / 2) <= 1
        assert all(m.size == (w, h) for m in ms)
        assert set(np.unique(np.asarray(ms[0]))) <= set(np.unique(np.asarray(masks[0])))  # nearest: no new values


def test_strong_view_is_drawn_per_date() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cfg = AugmentConfig(jitter_prob=1.0, blur_prob=0.0)
    rng = np.random.default_rng(0)
    first, second = augment.strong_view(image, cfg, rng), augment.strong_view(image, cfg, rng)
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    off = AugmentConfig(jitter_prob=0.0, blur_prob=0.0)
    assert np.array_equal(np.asarray(augment.strong_view(image, off, rng)), np.asarray(image))


def test_cutmix_box_area_and_aspect() -> None:
    cfg = AugmentConfig(cutmix_prob=1.0)
    size = 256
    rng = np.random.default_rng(0)
    for _ in range(300):
        box = augment.cutmix_box(size, cfg, rng)
        ys, xs = np.nonzero(box)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert box.sum() == h * w  # one rectangle
        assert 0.02 * 0.9 <= h * w / size**2 <= 0.4
        assert 0.3 * 0.8 <= h / w <= 3.3 / 0.8
    never = AugmentConfig(cutmix_prob=0.0)
    assert augment.cutmix_box(size, never, rng).sum() == 0


def test_reproducible_from_seed() -> None:
    a, b, masks = coordinate_pair()
    cfg = AugmentConfig()
    runs = [augment.weak_view([a, b], masks, cfg, 32, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(np.asarray(runs[0][0][0]), np.asarray(runs[1][0][0]))
    assert np.array_equal(np.asarray(runs[0][1][1]), np.asarray(runs[1][1][1]))


def test_tensors() -> None:
    image = Image.fromarray(np.zeros((4, 6, 3), np.uint8))
    tensor = augment.image_to_tensor(image)
    assert tensor.shape == (3, 4, 6)
    assert np.allclose(tensor[:, 0, 0].numpy(), [-m / s for m, s in zip(augment.MEAN, augment.STD, strict=True)])
    mask = augment.mask_to_tensor(np.array([[0, 1, 255]], np.uint8))
    assert mask.dtype.is_floating_point is False and mask.tolist() == [[0, 1, 255]]
