"""GeoTIFF geo-referencing, read from an input image and written to outputs on the same pixel grid,
with Pillow alone (it reads and writes these tags as they are).

A GeoTIFF places its pixels on the earth with a few TIFF tags (the GeoTIFF 1.0 specification): the
pixel size and one tie point, or a full affine transformation, plus the GeoKey directory that names the
coordinate reference system, with its double and ASCII parameters. An output of the input's size that
carries the same tags opens in place in QGIS or any GDAL-based tool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, TiffImagePlugin

from diffmatch.atomic import atomic_path
from diffmatch.images import no_pixel_limit

GEO_TAGS = {
    33550: "ModelPixelScale",
    33922: "ModelTiepoint",
    34264: "ModelTransformation",
    34735: "GeoKeyDirectory",
    34736: "GeoDoubleParams",
    34737: "GeoAsciiParams",
}
"""TIFF tag number -> name of the tags that geo-reference an image."""
TIFF_EXTS = (".tif", ".tiff")

GeoTags = dict[int, tuple[int, Any]]
"""TIFF tag number -> (TIFF field type, value), as stored in the input."""


def geo_tags(path: Path) -> GeoTags | None:
    """The geo-referencing tags of a TIFF (read from its header), or None when it has none or is no TIFF."""
    try:
        with no_pixel_limit(), Image.open(path) as image:  # the header only: a scene of any size
            tags = getattr(image, "tag_v2", None)
            found = {n: (tags.tagtype[n], tags[n]) for n in GEO_TAGS if n in tags} if tags is not None else {}
    except Exception:  # not an image: the readers report that, with the file's name
        return None
    return found if 34735 in found or 33922 in found or 34264 in found else None


def write_tiff(path: Path, array: np.ndarray, geo: GeoTags | None = None) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as a Deflate-compressed TIFF carrying the tags ``geo``,
    atomically."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    for number, (kind, value) in (geo or {}).items():
        info[number] = value
        info.tagtype[number] = kind
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
            tmp, format="TIFF", compression="tiff_adobe_deflate", tiffinfo=info)
