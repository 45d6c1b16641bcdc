"""Procedural bi-temporal suburb scenes: a stand-in for LEVIR-CD's 0.5 m/px crops.

A scene (streets, lots with houses or large buildings, lawns, bare ground, trees, ponds) is laid out
once on a canvas a few pixels larger than the crop and drawn twice: pre-event (A) and post-event (B).
Between the dates buildings are built (mostly) or demolished; those are the only labelled changes.
Nuisance differences are left unlabelled: sun direction, season, colour, blur, noise, new roads, and a
1-3 px misregistration of B (B is cut from the canvas at a shifted offset; the label is the changed
footprint in B's frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage, special

from diffmatch.lab.synthetic.raster import camera, grow, paint_cars, smooth_noise, tree_crowns

HOUSE, BUILDING, ROAD, GRASS, TREE, WATER = range(6)  # VLM prompt order (CEGConfig.classes)
SOIL = 6  # cover code of bare ground and paving: no VLM class of its own
PAD = 4  # canvas margin around the crop; the misregistration stays within it


@dataclass
class DateView:
    """One date of a pair, in that date's own frame."""

    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    cover: np.ndarray
    """(H, W) uint8 true cover: HOUSE/BUILDING on roofs, else ROAD, GRASS, TREE, WATER or SOIL."""
    instances: np.ndarray
    """(H, W) int32 building index + 1 (0: no building)."""
    shadow: np.ndarray
    """(H, W) bool cast shadow."""


@dataclass
class ScenePair:
    """A drawn pair: both dates, the change label and what the VLM simulation needs."""

    a: DateView
    b: DateView
    label: np.ndarray
    """(H, W) uint8 0/255: footprints of buildings built or demolished, in B's frame."""
    shift: tuple[int, int]
    """(dy, dx) of B's crop on the canvas relative to A's: B's pixel (i, j) shows A's (i+dy, j+dx)."""
    kinds: list[int]
    """HOUSE or BUILDING per building index."""


@dataclass
class _Lot:
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
class _Style:
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


_STYLES = (
    _Style(0.55, (9, 14), (7, 13), (17, 36), (15, 30), (5, 12), 0.9, False, 0.1, (40, 320)),
    _Style(0.17, (7, 11), (10, 26), (15, 32), (13, 26), (14, 50), 0.45, False, 0.35, (80, 260)),
    _Style(0.1, (12, 18), (10, 22), (40, 95), (28, 55), (10, 30), 0.8, True, 0.3, (10, 60)),
    _Style(0.18, (7, 10), (12, 30), (14, 30), (12, 24), (60, 160), 0.15, False, 0.5, (0, 400)),
)
_ROOFS = np.array([[112, 112, 114], [92, 94, 98], [132, 132, 130], [118, 110, 102], [100, 102, 106],
                   [146, 142, 136], [80, 80, 84], [124, 116, 108]], np.float32)
_FLAT_ROOFS = np.array([[215, 215, 212], [190, 192, 196], [160, 164, 168], [130, 134, 140]], np.float32)


def _uni(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _layout(rng: np.random.Generator, n: int, style: _Style, theta: float) -> tuple[np.ndarray, list[_Lot]]:
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
    lots: list[_Lot] = []
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


def _new_lot(rng: np.random.Generator, style: _Style, site: _Site) -> _Lot:
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
    return _Lot(cy, cx, angle, parts, drive, (roof, roof_b), style.large, rng.random() < 0.6, height, True, True)


def _lot_frame(lot: _Lot, n: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
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


def _inside(u: np.ndarray, v: np.ndarray, rect: tuple[float, ...]) -> np.ndarray:
    return (np.abs(u - rect[0]) <= rect[2]) & (np.abs(v - rect[1]) <= rect[3])


def _footprints(lots: list[_Lot], frames: list, n: int, suns: list[tuple[float, float]], tex: np.ndarray
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Instance map, roof colours, cast-shadow mask and paved-drive mask of each date on the canvas."""
    ids, roofs = np.zeros((2, n, n), np.int32), np.zeros((2, n, n, 3), np.float32)
    shadow, paved = np.zeros((2, n, n), bool), np.zeros((2, n, n), bool)
    for index, (lot, (window, u, v)) in enumerate(zip(lots, frames, strict=True)):
        if lot.drive is not None and (lot.in_a or lot.in_b):  # a demolished lot keeps its drive
            paved[0 if lot.in_a else 1 :, window[0], window[1]] |= _inside(u, v, lot.drive)
        mask, facets = np.zeros(u.shape, bool), []  # the footprint is the same on both dates
        for part in lot.parts:
            inside = _inside(u, v, part) & ~mask
            if lot.large:  # flat roof with a darker parapet
                facets.append((part, inside, inside & ~ndimage.binary_erosion(inside)))
            else:  # pitched: each facet lit by its slope to the sun (hip roof: four facets, gable: two)
                along, across = (u - part[0], v - part[1]) if part[4] else (v - part[1], u - part[0])
                half_along, half_across = (part[2], part[3]) if part[4] else (part[3], part[2])
                end = lot.hip & (half_along - np.abs(along) < half_across - np.abs(across))
                ridge = ~end & (np.abs(across) < 0.7)
                facets.append((part, inside, end, np.sign(along), np.sign(across), ridge))
            mask |= inside
        cos, sin = math.cos(lot.angle), math.sin(lot.angle)
        tint = 1 + 0.05 * tex[window][mask, None]
        for date in [d for d, built in enumerate((lot.in_a, lot.in_b)) if built]:
            sy, sx = suns[date]
            su, sv = lot.height * (sx * cos + sy * sin), lot.height * (-sx * sin + sy * cos)
            cast, shade = np.zeros(u.shape, bool), np.ones(u.shape, np.float32)
            for part, inside, *look in facets:
                cast |= _inside(u - su, v - sv, part)
                if lot.large:
                    shade[look[0]] = 0.8
                    continue
                end, sign_along, sign_across, ridge = look
                sun_along, sun_across = (-su, -sv) if part[4] else (-sv, -su)
                light = np.where(end, sign_along * sun_along, sign_across * sun_across)
                lit = np.where(ridge, 1.04, 0.86 + 0.14 * light / max(lot.height, 1e-3))
                np.copyto(shade, lit, where=inside)
            ids[date][window][mask] = index + 1
            roofs[date][window][mask] = (lot.roof[date][None, :] * shade[mask, None]) * tint
            shadow[date][window] |= cast & ~mask
    return [(ids[d], roofs[d], shadow[d] & (ids[d] == 0), paved[d]) for d in (0, 1)]


def _changes(rng: np.random.Generator, n: int, style: _Style, lots: list[_Lot], theta: float) -> np.ndarray:
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


def _rgb(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


class _Plan(NamedTuple):
    """The layout of a scene on the canvas and what changes in it between the dates."""

    style: _Style
    """Kind of neighbourhood."""
    theta: float
    """Direction of the streets (radians)."""
    roads: np.ndarray
    """(n, n) bool streets in B."""
    roads_a: np.ndarray
    """(n, n) bool streets in A: those of B, or those outside the construction zone (a new street is not a
    labelled change)."""
    lots: list[_Lot]
    """Buildings, each marked built in A and/or in B."""
    zone: np.ndarray
    """(n, n) bool construction zone: cleared ground in A."""
    water: np.ndarray
    """(n, n) bool ponds."""


class _Look(NamedTuple):
    """Ground textures and colours shared by both dates, and each date's sun and season."""

    soil: np.ndarray
    """(n, n) bool bare ground."""
    mid: np.ndarray
    """(n, n, 1) mid-scale noise."""
    fine: np.ndarray
    """(n, n) fine-grained noise."""
    texture: np.ndarray
    """(n, n, 1) brightness texture of the ground."""
    lift: np.ndarray
    """(n, n, 1) large-scale brightness of the grass."""
    tint: np.ndarray
    """(n, n, 3) large-scale colour shift of the grass."""
    bare_ground: np.ndarray
    """(n, n, 3) colour of bare ground, with ploughed stripes."""
    grass_tint: np.ndarray
    """(3,) colour shift of the grass."""
    suns: list[float]
    """Sun azimuth of A and of B (radians)."""
    seasons: list[float]
    """Season of A and of B: 0 green, 1 dry and bare."""


class _Scene(NamedTuple):
    """A scene laid out on the canvas, ready to be painted on either date."""

    plan: _Plan
    """Streets, buildings, construction zone and ponds."""
    look: _Look
    """Textures, colours, suns and seasons."""
    drawn: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    """Per date: instance map, roof colours, cast shadows and paved drives (``_footprints``)."""
    crowns: np.ndarray
    """(n, n) bool tree crowns."""
    blob: np.ndarray
    """(n, n) shading of the crowns, 0..1."""
    demolished: np.ndarray
    """(n, n) bool bare ground in B where buildings stood in A."""


def _plan(rng: np.random.Generator, n: int, change_density: float) -> _Plan:
    """Lay out a scene of ``n`` x ``n``: style, streets, lots, the changes (in a share ``change_density`` of
    the scenes) and ponds."""
    style = _STYLES[rng.choice(len(_STYLES), p=[s.prob for s in _STYLES])]
    if rng.random() < 0.45:
        theta = rng.choice((0.0, math.pi / 2)) + rng.normal(0, 0.02)
    else:
        theta = rng.uniform(-math.pi / 4, math.pi / 4)
    roads, lots = _layout(rng, n, style, theta)
    lots = [lot for lot in lots if _lot_frame(lot, n)[1].size]
    zone = _changes(rng, n, style, lots, theta) if rng.random() < change_density else np.zeros((n, n), bool)
    roads_a = roads & ~zone if rng.random() < 0.5 else roads  # a new street is not a labelled change
    water = np.zeros((n, n), bool)
    if rng.random() < 0.12:
        water = (smooth_noise(rng, n, 2.5) > 1.3) & ~grow(roads, 3)
        lots = [lot for lot in lots if not water[int(np.clip(lot.cy, 0, n - 1)), int(np.clip(lot.cx, 0, n - 1))]]
    return _Plan(style, theta, roads, roads_a, lots, zone, water)


def _look(rng: np.random.Generator, n: int, style: _Style) -> _Look:
    """Draw the ground's textures and colours, and the sun and season of each date."""
    soil = smooth_noise(rng, n, 3) > float(special.ndtri(1 - style.soil))
    tone, mid = np.clip(smooth_noise(rng, n, 6), -2, 2)[..., None], smooth_noise(rng, n, 18)[..., None]
    fine = ndimage.gaussian_filter(rng.standard_normal((n, n), dtype=np.float32), 0.7) * 2.4
    psi, period = rng.uniform(0, math.pi), rng.uniform(3, 7)
    yy, xx = (grid.astype(np.float32) for grid in np.ogrid[0:n, 0:n])
    stripes = np.sin((xx * math.cos(psi) + yy * math.sin(psi)) * (2 * math.pi / period))
    stripes = 1 + (stripes * ((smooth_noise(rng, n, 2) > 0) * 0.08 if rng.random() < 0.5 else 0.03))[..., None]
    azimuth = rng.uniform(0, 2 * math.pi)
    suns = [azimuth, azimuth + rng.normal(0, 0.3)]
    seasons = [rng.uniform(0, 1)]
    seasons.append(float(np.clip(seasons[0] + rng.normal(0, 0.4), 0, 1)))
    grass_tint = rng.normal(0, 5, 3).astype(np.float32)
    soil_col = _rgb(160, 152, 136) * rng.uniform(0.85, 1.1) + rng.normal(0, 5, 3).astype(np.float32)
    texture = 1 + 0.07 * mid + 0.06 * fine[..., None]
    lift, tint = 1 + 0.08 * tone, _rgb(-6, 4, -2) * tone  # the same on both dates
    return _Look(soil, mid, fine, texture, lift, tint, soil_col * stripes * texture, grass_tint, suns, seasons)


def _paint(rng: np.random.Generator, scene: _Scene, date: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Date ``date`` (0: A, 1: B) on the canvas, before the camera: RGB (float), true cover and shadows."""
    plan, look, crowns = scene.plan, scene.look, scene.crowns
    water, mid, fine = plan.water, look.mid, look.fine
    ids, roofs, shadow, paved = scene.drawn[date]
    season, road_mask = look.seasons[date], plan.roads if date else plan.roads_a
    bare = look.soil | (scene.demolished if date else plan.zone)
    grass = _rgb(72, 90, 56) * (1 - season) + _rgb(146, 136, 98) * season + look.grass_tint
    image = (grass * look.lift + look.tint) * look.texture
    np.copyto(image, look.bare_ground, where=bare[..., None])
    image[water] = _rgb(42, 64, 72) * (1 + 0.05 * mid[water])
    concrete = paved & ~road_mask
    if not plan.style.large:  # sidewalks
        concrete |= grow(road_mask, 2) & ~road_mask
    image[concrete] = _rgb(186, 184, 178) * (1 + 0.03 * fine[concrete, None])
    image[road_mask] = rng.uniform(85, 140) * (1 + 0.04 * fine[road_mask, None] + 0.04 * mid[road_mask])
    leaf = _rgb(40, 62, 36) * (1 - season**2) + _rgb(92, 86, 66) * season**2
    image[crowns] = leaf * (0.65 + 0.55 * scene.blob[crowns, None]) * (1 + 0.12 * fine[crowns, None])
    drop = (round(3 * math.sin(look.suns[date])), round(3 * math.cos(look.suns[date])))
    dark = (shadow | np.roll(crowns, drop, (0, 1)) & ~crowns) & (ids == 0)
    np.multiply(image, _rgb(0.46, 0.48, 0.56), out=image, where=dark[..., None])
    np.copyto(image, roofs, where=(ids > 0)[..., None])
    paint_cars(rng, image, road_mask | concrete, plan.theta)
    cover = np.full(ids.shape, GRASS, np.uint8)
    cover[bare | concrete] = SOIL
    cover[road_mask], cover[water], cover[crowns & (ids == 0)] = ROAD, WATER, TREE
    cover[ids > 0] = BUILDING if plan.style.large else HOUSE
    return image, cover, dark


def draw_pair(rng: np.random.Generator, size: int, change_density: float) -> ScenePair:
    """Draw one bi-temporal pair of ``size`` x ``size``; ``change_density`` is the share of pairs with change."""
    n = size + 2 * PAD
    plan = _plan(rng, n, change_density)
    look = _look(rng, n, plan.style)
    lots, roads, water = plan.lots, plan.roads, plan.water
    frames = [_lot_frame(lot, n) for lot in lots]
    drawn = _footprints(lots, frames, n, [(math.sin(sun), math.cos(sun)) for sun in look.suns], look.fine)
    built = (drawn[0][0] > 0) | drawn[0][3] | (drawn[1][0] > 0) | drawn[1][3]
    free = ~(grow(built, 3) | roads | water | plan.zone)
    crowns, blob = tree_crowns(rng, n, int(rng.integers(*plan.style.trees)), free, grow(built, 1) | water)
    changed = [i + 1 for i, lot in enumerate(lots) if lot.in_a != lot.in_b]
    demolished = grow(np.isin(drawn[0][0], changed), 2) & ~roads
    dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
    offsets = [(PAD, PAD), (PAD + dy, PAD + dx + (1 if dy == dx == 0 else 0))]
    scene = _Scene(plan, look, drawn, crowns, blob, demolished)
    views = []
    for date in (0, 1):
        image, cover, dark = _paint(rng, scene, date)
        y0, x0 = offsets[date]
        crop = (slice(y0, y0 + size), slice(x0, x0 + size))
        views.append(DateView(camera(rng, image[crop]), cover[crop], drawn[date][0][crop], dark[crop]))
    label = np.isin(drawn[1][0], changed) | np.isin(drawn[0][0], changed)
    y0, x0 = offsets[1]
    label = label[y0 : y0 + size, x0 : x0 + size].astype(np.uint8) * 255
    kinds = [BUILDING if lot.large else HOUSE for lot in lots]
    return ScenePair(views[0], views[1], label, (y0 - PAD, x0 - PAD), kinds)
