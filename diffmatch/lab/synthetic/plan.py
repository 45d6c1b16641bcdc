"""The plan of a synthetic scene: its kind of neighbourhood, streets, building lots and which lots change.

``plan_scene`` lays a scene out on the canvas once, for both dates: a style (dense or sparse suburb, large
flat-roofed buildings, open land), streets in a rotated frame, lots with their building's parts, drive, roof
colours and height, the buildings built (mostly) or demolished between the dates, and ponds. ``scene.py``
paints the plan on each date.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from diffmatch.lab.synthetic.raster import grow, smooth_noise


@dataclass
class Lot:
    """A building on the canvas, in its local frame: u along the street, v across it."""

    cy: float
    cx: float
    angle: float
    parts: list[tuple[float, float, float, float, bool]]  # (cu, cv, half_u, half_v, ridge along u)
    drive: tuple[float, float, float, float] | None  # paved rect (cu, cv, half_u, half_v), local frame
    roof: tuple[np.ndarray, np.ndarray]  # colour in A, in B
    large: bool
    hip: bool
    height: float  # shadow length in px
    in_a: bool
    in_b: bool


@dataclass
class Style:
    """A kind of neighbourhood: the ranges its streets and buildings are drawn from."""

    prob: float  # share of scenes of this style
    road: tuple[float, float]  # street width
    setback: tuple[float, float]  # street edge to facade
    length: tuple[float, float]  # building side along the street
    depth: tuple[float, float]  # building side across the street
    gap: tuple[float, float]  # between neighbours
    occupied: float  # share of lots with a building
    large: bool  # flat-roofed large buildings instead of houses
    soil: float  # share of bare ground (quantile threshold of a noise field)
    trees: tuple[int, int]  # number of tree seeds


class _Site(NamedTuple):
    """Where and how large a building stands; its local u runs along the street, v across it."""

    cy: float
    """Row of its centre on the canvas."""
    cx: float
    """Column of its centre on the canvas."""
    angle: float
    """Direction of u on the canvas (radians)."""
    length: float
    """Side along the street (u)."""
    depth: float
    """Side across the street (v)."""
    side: int
    """The street lies at -side * v."""
    setback: float
    """Street edge to facade."""


class Plan(NamedTuple):
    """The layout of a scene on the canvas and what changes in it between the dates."""

    style: Style
    """Kind of neighbourhood."""
    theta: float
    """Direction of the streets (radians)."""
    roads: np.ndarray
    """(n, n) bool streets in B."""
    roads_a: np.ndarray
    """(n, n) bool streets in A: those of B, or those outside the construction zone (a new street is not a
    labelled change)."""
    lots: list[Lot]
    """Buildings, each marked built in A and/or in B."""
    zone: np.ndarray
    """(n, n) bool construction zone: cleared ground in A."""
    water: np.ndarray
    """(n, n) bool ponds."""


_STYLES = (
    Style(0.55, (9, 14), (7, 13), (17, 36), (15, 30), (5, 12), 0.9, False, 0.1, (40, 320)),
    Style(0.17, (7, 11), (10, 26), (15, 32), (13, 26), (14, 50), 0.45, False, 0.35, (80, 260)),
    Style(0.1, (12, 18), (10, 22), (40, 95), (28, 55), (10, 30), 0.8, True, 0.3, (10, 60)),
    Style(0.18, (7, 10), (12, 30), (14, 30), (12, 24), (60, 160), 0.15, False, 0.5, (0, 400)),
)
_ROOFS = np.array([[112, 112, 114], [92, 94, 98], [132, 132, 130], [118, 110, 102], [100, 102, 106],
                   [146, 142, 136], [80, 80, 84], [124, 116, 108]], np.float32)
_FLAT_ROOFS = np.array([[215, 215, 212], [190, 192, 196], [160, 164, 168], [130, 134, 140]], np.float32)


def _uni(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _layout(rng: np.random.Generator, n: int, style: Style, theta: float) -> tuple[np.ndarray, list[Lot]]:
    """Streets (canvas mask) and building lots along both sides of them, in a frame rotated by theta."""
    yy, xx = (grid.astype(np.float32) - n / 2 for grid in np.ogrid[0:n, 0:n])
    cos, sin = math.cos(theta), math.sin(theta)
    uu, vv = xx * cos + yy * sin, -xx * sin + yy * cos
    width, setback = _uni(rng, style.road), _uni(rng, style.setback)
    depth_max = style.depth[1]
    spacing = width + 2 * (setback + depth_max + rng.uniform(3, 14))
    if style.gap[0] > 40:  # open land: at most one country road
        spacing = 4.0 * n
    amp = rng.uniform(4, 22) if rng.random() < 0.3 else 0.0
    wave, phase = rng.uniform(160, 320), rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(-spacing / 2, spacing / 2)
    bend = amp * np.sin(uu * (2 * math.pi / wave) + phase) if amp else 0.0
    roads = np.zeros((n, n), bool)
    lots: list[Lot] = []
    cross = rng.uniform(-n / 3, n / 3) if rng.random() < 0.35 else None
    for k in range(-4, 5):
        base = offset + k * spacing
        if abs(base) > 0.75 * n or (spacing > n and rng.random() < 0.4):
            continue
        roads |= np.abs(vv - base - bend) < width / 2
        for side in (-1, 1):
            u = -0.75 * n + rng.uniform(0, 20)
            while u < 0.75 * n:
                length, depth = _uni(rng, style.length), _uni(rng, style.depth)
                uc = u + length / 2
                u += length + _uni(rng, style.gap)
                if rng.random() > style.occupied or (cross is not None and abs(uc - cross) < width + length):
                    continue
                slope = amp * 2 * math.pi / wave * math.cos(uc / wave * 2 * math.pi + phase)
                vc = (base + amp * math.sin(uc / wave * 2 * math.pi + phase)
                      + side * (width / 2 + setback + depth / 2))
                cx, cy = n / 2 + uc * cos - vc * sin, n / 2 + uc * sin + vc * cos
                if -depth_max < cx < n + depth_max and -depth_max < cy < n + depth_max:
                    lots.append(_new_lot(rng, style, _Site(cy, cx, theta + math.atan(slope), length, depth,
                                                           side, setback)))
    if cross is not None:
        roads |= np.abs(uu - cross) < width / 2
    return roads, lots


def _new_lot(rng: np.random.Generator, style: Style, site: _Site) -> Lot:
    """A building of ``style`` at ``site``: its parts, drive, roof colours and height."""
    cy, cx, angle, length, depth, side, setback = site
    parts = [(0.0, 0.0, length / 2, depth / 2, True)]
    if rng.random() < (0.2 if style.large else 0.35):  # L-shape: a wing at one end, across the ridge
        wing_u, wing_v = length * rng.uniform(0.3, 0.5), depth * rng.uniform(0.3, 0.6)
        end = rng.choice((-1, 1))
        parts.append((end * (length - wing_u) / 2, side * (depth + wing_v) / 2 - side, wing_u / 2,
                      wing_v / 2 + 1, False))
    drive = None
    if not style.large and setback > 4:
        dw = rng.uniform(2.5, 4)
        drive = (rng.choice((-1, 1)) * (length / 2 - dw), -side * (depth + setback) / 2, dw, setback / 2 + 1)
    palette = _FLAT_ROOFS if style.large else _ROOFS
    roof = palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.12) + rng.normal(0, 5, 3).astype(np.float32)
    roof_b = roof * rng.uniform(0.8, 1.2, 3) if rng.random() < 0.05 else roof  # re-roofed: not a change
    height = rng.uniform(6, 12) if style.large else rng.uniform(3, 7)
    return Lot(cy, cx, angle, parts, drive, (roof, roof_b), style.large, rng.random() < 0.6, height, True, True)


def lot_frame(lot: Lot, n: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Window of the canvas around a lot (roof, drive, shadow) and the local (u, v) of its pixels."""
    reach = max(max(abs(p[0]) + p[2], abs(p[1]) + p[3]) for p in lot.parts) * 1.45 + lot.height + 1
    if lot.drive is not None:
        reach = max(reach, abs(lot.drive[1]) + lot.drive[3] + abs(lot.drive[0]) + 2)
    y0, x0 = min(n, max(0, int(lot.cy - reach))), min(n, max(0, int(lot.cx - reach)))
    y1, x1 = max(y0, min(n, int(lot.cy + reach) + 2)), max(x0, min(n, int(lot.cx + reach) + 2))
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - lot.cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - lot.cx
    cos, sin = math.cos(lot.angle), math.sin(lot.angle)
    return (slice(y0, y1), slice(x0, x1)), dx * cos + dy * sin, -dx * sin + dy * cos


def _changes(rng: np.random.Generator, n: int, style: Style, lots: list[Lot], theta: float) -> np.ndarray:
    """Mark lots built (mostly) or demolished between the dates; return the construction zone mask."""
    zone = np.zeros((n, n), bool)
    if not lots or rng.random() < 0.1:  # a lone new building on open land
        for _ in range(rng.integers(1, 4)):
            length, depth = _uni(rng, style.length), _uni(rng, style.depth)
            cy, cx = rng.uniform(0, n, 2)
            lot = _new_lot(rng, style, _Site(cy, cx, theta + rng.normal(0, 0.3), length, depth, 1, 0.0))
            lot.in_a = False
            lots.append(lot)
    elif rng.random() < 0.55:  # a development: the zone is cleared ground in A, new houses in B
        psi = rng.uniform(0, 2 * math.pi)
        yy, xx = np.ogrid[0:n, 0:n]
        proj = xx * math.cos(psi) + yy * math.sin(psi)
        zone = proj > np.quantile(proj, rng.uniform(0.0, 0.7))
        for lot in lots:
            if zone[int(np.clip(lot.cy, 0, n - 1)), int(np.clip(lot.cx, 0, n - 1))]:
                lot.in_a = False
    else:  # a few single buildings
        for index in rng.choice(len(lots), size=min(len(lots), rng.integers(1, 5)), replace=False):
            setattr(lots[index], "in_b" if rng.random() < 0.25 else "in_a", False)  # demolished or built
    return zone


def plan_scene(rng: np.random.Generator, n: int, change_density: float) -> Plan:
    """Lay out a scene of ``n`` x ``n``: style, streets, lots, the changes (in a share ``change_density`` of
    the scenes) and ponds."""
    style = _STYLES[rng.choice(len(_STYLES), p=[s.prob for s in _STYLES])]
    if rng.random() < 0.45:
        theta = rng.choice((0.0, math.pi / 2)) + rng.normal(0, 0.02)
    else:
        theta = rng.uniform(-math.pi / 4, math.pi / 4)
    roads, lots = _layout(rng, n, style, theta)
    lots = [lot for lot in lots if lot_frame(lot, n)[1].size]
    zone = _changes(rng, n, style, lots, theta) if rng.random() < change_density else np.zeros((n, n), bool)
    roads_a = roads & ~zone if rng.random() < 0.5 else roads  # a new street is not a labelled change
    water = np.zeros((n, n), bool)
    if rng.random() < 0.12:
        water = (smooth_noise(rng, n, 2.5) > 1.3) & ~grow(roads, 3)
        lots = [lot for lot in lots if not water[int(np.clip(lot.cy, 0, n - 1)), int(np.clip(lot.cx, 0, n - 1))]]
    return Plan(style, theta, roads, roads_a, lots, zone, water)
