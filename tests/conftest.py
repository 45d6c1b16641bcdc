from __future__ import annotations

import os

# Small tensors run fastest on one thread, and CI's two cores stay free for DataLoader workers and the
# two-process run; subprocesses inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin, TiffTags

DATA = Path(__file__).resolve().parent / "data"
"""The test data of the repository (tests/data/README.md)."""


def write_pair(root: Path, sample_id: str, size: tuple[int, int] = (32, 32), label: np.ndarray | None = None,
               seed: int = 0) -> None:
    """A random RGB pair and a 0/255 label in the data set layout of docs/data.md."""
    rng = np.random.default_rng(seed)
    h, w = size
    for folder in ("A", "B"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / folder / f"{sample_id}.png")
    (root / "label").mkdir(parents=True, exist_ok=True)
    if label is None:
        label = np.zeros((h, w), np.uint8)
        label[h // 4 : h // 2, w // 4 : w // 2] = 255
    Image.fromarray(label).save(root / "label" / f"{sample_id}.png")


GEO_KEYS = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 1026, 34737, 22, 0, 3072, 0, 1, 32632)
"""GeoKey directory: version 1.1.0, 4 keys: projected model, pixel is area, citation in the ASCII
params (22 characters at 0), EPSG:32632 (WGS 84 / UTM zone 32N)."""


def geotiff_tags(transformation: bool = False) -> dict[int, tuple[int, object]]:
    """GeoTIFF tags (number -> (TIFF type, value)) of a 0.5 m grid in UTM 32N: pixel scale and tie point,
    or with ``transformation`` the same grid as a ModelTransformation matrix."""
    tags: dict[int, tuple[int, object]] = {
        34735: (TiffTags.SHORT, GEO_KEYS),
        34736: (TiffTags.DOUBLE, (6378137.0, 298.257223563)),
        34737: (TiffTags.ASCII, "WGS 84 / UTM zone 32N|"),
    }
    if transformation:
        matrix = (0.5, 0.0, 0.0, 500000.0, 0.0, -0.5, 0.0, 4100000.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        tags[34264] = (TiffTags.DOUBLE, matrix)
    else:
        tags[33550] = (TiffTags.DOUBLE, (0.5, 0.5, 0.0))
        tags[33922] = (TiffTags.DOUBLE, (0.0, 0.0, 0.0, 500000.0, 4100000.0, 0.0))
    return tags


def write_geotiff(path: Path, array: np.ndarray, tags: dict[int, tuple[int, object]]) -> Path:
    """An image as an uncompressed TIFF carrying ``tags``, as a GIS would export it."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    for number, (kind, value) in tags.items():
        info[number] = value
        info.tagtype[number] = kind
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="TIFF", tiffinfo=info)
    return path


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """Ten 32x32 pairs with list files (train 6, val 2, test 2)."""
    root = tmp_path / "data"
    ids = [f"p{i}" for i in range(10)]
    for i, sample_id in enumerate(ids):
        write_pair(root, sample_id, seed=i)
    (root / "list").mkdir()
    (root / "list" / "train.txt").write_text("\n".join(ids[:6]) + "\n")
    (root / "list" / "val.txt").write_text("\n".join(f"{i}.png" for i in ids[6:8]) + "\n")
    (root / "list" / "test.txt").write_text("\n".join(ids[8:]) + "\n")
    return root


def write_training_set(root: Path, splits: dict[str, int]) -> Path:
    """Pairs of 40x40 with CEG pseudo labels (change, A, B) and ``list/<split>.txt`` with the given number
    of ids per split, in order."""
    ids = [f"p{i:02d}" for i in range(sum(splits.values()))]
    for i, sample_id in enumerate(ids):
        write_pair(root, sample_id, size=(40, 40), seed=i)
        for folder, value in (("change", 1), ("A", 0), ("B", 1)):
            mask = np.full((40, 40), 255, np.uint8)
            mask[:20, :20], mask[20:, :] = value, 0
            (root / "pseudo" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "pseudo" / folder / f"{sample_id}.png")
    (root / "list").mkdir()
    start = 0
    for name, count in splits.items():
        (root / "list" / f"{name}.txt").write_text("\n".join(ids[start:start + count]) + "\n")
        start += count
    return root
