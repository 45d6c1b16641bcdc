"""PNG encoding of masks: the filters of hand-made rows, and the same bytes as Pillow's writer."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmatch.atomic import _UMASK, write_bytes
from diffmatch.png import GrayEncoder, encode_gray, filter_rows, write_png


def pillow_png(image: np.ndarray, level: int = 1) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=level)
    return out.getvalue()


def test_filters_by_hand() -> None:
    # Row 0: none costs 35, up the same (the row above is 0), sub 15 + 5 = 20, Paeth (predicting from the
    # left) 20 too: sub, the first of least cost. Row 1: none 25, up |-5| + |-5| = 10, sub 10 + 5 = 15;
    # Paeth predicts b = 15 at column 0 (10 - 15 = -5 = 251) and c = 15 at column 1 (p = 10 + 20 - 15 =
    # 15), cost 5: Paeth.
    image = np.array([[15, 20], [10, 15]], np.uint8)
    assert filter_rows(image).tolist() == [[1, 15, 5], [4, 251, 0]]
    # A constant row: none (cost 0) whatever follows; a repeated row: up.
    image = np.array([[0, 0, 0], [7, 7, 7], [7, 7, 7]], np.uint8)
    assert filter_rows(image)[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("level", [1, 6, 9])
def test_same_bytes_as_pillow(level: int) -> None:
    rng = np.random.default_rng(level)
    shapes = [(1, 1), (1, 17), (23, 1), (2, 2), (64, 48), (96, 96), (256, 256)]
    for shape in shapes:
        images = [((rng.random(shape) < 0.3) * 255).astype(np.uint8),
                  rng.choice(np.array([0, 1, 255], np.uint8), shape, p=[0.6, 0.2, 0.2]),
                  np.full(shape, 7, np.uint8)]
        if shape[0] * shape[1] < 60000:  # noise: every value and difference (at 256x256, over 64 KiB)
            images.append(rng.integers(0, 256, shape, dtype=np.uint8))
        for image in images:
            data = encode_gray(image, level)
            assert data is not None and data == pillow_png(image, level), (shape, level)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), image)


def test_chunks_and_large_images() -> None:
    data = encode_gray(np.zeros((3, 5), np.uint8))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">4sII", data[12:24]) == (b"IHDR", 5, 3)
    assert data[-12:] == struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    noise = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    assert encode_gray(noise) is None  # over 64 KiB of image data: Pillow writes several IDAT chunks


def test_write_png_writes_pillows_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, image in (("mask", (rng.random((40, 30)) < 0.5).astype(np.uint8)),
                        ("noise", rng.integers(0, 256, (300, 300), dtype=np.uint8)),
                        ("rgb", rng.integers(0, 256, (20, 10, 3), dtype=np.uint8))):
        write_png(tmp_path / f"{name}.png", image)
        assert (tmp_path / f"{name}.png").read_bytes() == pillow_png(image), name


def test_one_encoder_for_many_images_of_several_sizes() -> None:
    # The encoder keeps its work arrays between images: each image's bytes stay Pillow's, whatever
    # came before it (another size, another content), and filter_rows of a fresh encoder agrees.
    rng = np.random.default_rng(1)
    encoder = GrayEncoder()
    for shape in [(5, 7), (5, 7), (1, 1), (64, 48), (5, 7), (40, 600), (256, 256), (256, 256)]:
        for image in (rng.choice(np.array([0, 1, 255], np.uint8), shape), np.full(shape, 255, np.uint8)):
            assert encoder.encode(image) == pillow_png(image), shape
            assert np.array_equal(encoder.filter_rows(image), filter_rows(image.copy()))
    assert GrayEncoder(9).encode(np.eye(9, dtype=np.uint8)) == pillow_png(np.eye(9, dtype=np.uint8), 9)


def test_write_bytes_is_atomic_and_makes_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "new" / "x.png"
    write_bytes(path, b"one")
    assert path.read_bytes() == b"one"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_UMASK
    # A temporary file left by a killed writer of this process id: another temporary name is used.
    (path.parent / f".x.png.{os.getpid()}.tmp").write_bytes(b"stale")
    write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == [f".x.png.{os.getpid()}.tmp", "x.png"]
