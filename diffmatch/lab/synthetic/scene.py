"""Procedural bi-temporal suburb scenes: a stand-in for LEVIR-CD's 0.5 m/px crops.

A scene (streets, lots with houses or large buildings, lawns, bare ground, trees, ponds) is laid out
once on a canvas a few pixels larger than the crop (``plan.py``: streets, lots, which of them change) and
painted here twice: pre-event (A) and post-event (B), with roofs, shadows, ground, trees and the camera.
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

from diffmatch.lab.synthetic.plan import Lot, Plan, Style, lot_frame, plan_scene
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


def _inside(u: np.ndarray, v: np.ndarray, rect: tuple[float, ...]) -> np.ndarray:
    return (np.abs(u - rect[0]) <= rect[2]) & (np.abs(v - rect[1]) <= rect[3])


def _footprints(lots: list[Lot], frames: list, n: int, suns: list[tuple[float, float]], tex: np.ndarray
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


def _rgb(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


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

    plan: Plan
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


def _look(rng: np.random.Generator, n: int, style: Style) -> _Look:
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
    plan = plan_scene(rng, n, change_density)
    look = _look(rng, n, plan.style)
    lots, roads, water = plan.lots, plan.roads, plan.water
    frames = [lot_frame(lot, n) for lot in lots]
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
