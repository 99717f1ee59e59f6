"""Built-in synthetic CT: procedural chest phantoms in HU, written as real DICOM series.

Without access to LIDC-IDRI, the demo and the tests still go through the real reading path:
``make_synthetic_ct`` writes a patient/study/series DICOM tree for pre-training and a labeled
set (class 1 = a lung nodule is present) for fine-tuning. Everything is deterministic from the
seed and vectorised with numpy (a few thousand 128 x 128 slices take seconds).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

FIELD_OF_VIEW_MM = 360.0
BODY_LENGTH_MM = 300.0
RESCALE_INTERCEPT = -1024.0
PADDING_INT16 = -2000
"""Stored value written outside the field of view (GE-style), declared as PixelPaddingValue."""
HU_MIN, HU_MAX = -1024.0, 3071.0


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


def _gauss_kernel(sigma_px: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma_px)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / max(sigma_px, 1e-3)) ** 2)
    return k / k.sum()


def _smooth_noise(rng: np.random.Generator, s: int, n: int, cell: int) -> np.ndarray:
    """Unit-variance-ish smooth random field (s, n, n): coarse noise interpolated bilinearly."""
    m = n // cell + 2
    coarse = rng.standard_normal((s, m, m)).astype(np.float32)
    pos = (np.arange(n, dtype=np.float32) + 0.5) / cell
    i0 = np.floor(pos).astype(np.int64)
    w = (pos - i0).astype(np.float32)
    w0, w1 = (1 - w)[:, None], w[:, None]
    rows = coarse[:, i0, :] * w0[None] + coarse[:, i0 + 1, :] * w1[None]  # (s, n, m)
    field = rows[:, :, i0] * w0.T[None] + rows[:, :, i0 + 1] * w1.T[None]  # (s, n, n)
    return field * np.float32(1.5)


def _blur(images: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of (s, h, w) images, edge-padded, as a few shifted adds per axis."""
    k = _gauss_kernel(sigma_px)
    radius = (len(k) - 1) // 2
    out = np.asarray(images, dtype=np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        length = out.shape[axis]
        acc = np.zeros_like(out)
        for j, weight in enumerate(k):
            acc += weight * (padded[:, j:j + length] if axis == 1 else padded[:, :, j:j + length])
        out = acc
    return out


def _col(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)


def _ellipse(u, v, cx, cy, a, b) -> np.ndarray:
    a = np.maximum(a, 1e-6)
    b = np.maximum(b, 1e-6)
    return ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2 <= 1.0


def _paint(hu: np.ndarray, mask: np.ndarray, value: float) -> None:
    hu[np.broadcast_to(mask, hu.shape)] = value


def _bump(z: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """1 at ``centre``, falling to 0 at +-``half_width`` (a round organ's cross-section profile)."""
    return np.sqrt(np.clip(1.0 - ((z - centre) / half_width) ** 2, 0.0, 1.0)).astype(np.float32)


def patient_params(seed: int, patient: int) -> dict:
    """Random anatomy of one phantom patient (sizes in normalised image units, values in HU)."""
    r = _rng(seed, patient, 0)
    p = {
        "body_a": r.uniform(0.70, 0.86), "body_b": r.uniform(0.50, 0.62), "body_cy": r.uniform(-0.06, 0.02),
        "skin": 0.012, "fat": r.uniform(0.03, 0.10), "wall": r.uniform(0.04, 0.07),
        "lung_a": r.uniform(0.20, 0.27), "lung_b": r.uniform(0.30, 0.40), "lung_sep": r.uniform(0.30, 0.37),
        "lung_cy": r.uniform(-0.06, 0.02), "heart_r": r.uniform(0.16, 0.22), "heart_cx": r.uniform(0.04, 0.12),
        "liver_a": r.uniform(0.30, 0.42), "liver_b": r.uniform(0.26, 0.36), "spine_r": r.uniform(0.065, 0.09),
        "n_ribs": int(r.integers(5, 8)), "rib_twist": r.uniform(-0.4, 0.4),
        "hu_fat": r.uniform(-120, -80), "hu_muscle": r.uniform(35, 60), "hu_lung": r.uniform(-880, -820),
        "hu_liver": r.uniform(50, 70), "hu_blood": r.uniform(30, 50), "hu_bone": r.uniform(550, 900),
        "hu_marrow": r.uniform(180, 320), "hu_skin": r.uniform(10, 40), "hu_table": r.uniform(-200, 150),
        "noise_hu": r.uniform(8, 30), "psf_px": r.uniform(0.45, 0.85), "texture_hu": r.uniform(8, 20),
        "z0": r.uniform(0.05, 0.25), "extent": r.uniform(0.55, 0.8),
        "vessel_twist": r.uniform(-0.6, 0.6, size=2),
    }
    p["trees"] = [_vessel_tree(r, side) for side in (-1.0, 1.0)]
    return p


def _vessel_tree(r: np.random.Generator, side: float) -> np.ndarray:
    """Branching vessel segments in lung coordinates (lung ellipse = unit disc).

    Rows: x0, y0, x1, y1, level, z_centre, z_half_width. The tree starts at the hilum on the
    medial side and branches three times towards the periphery.
    """
    hilum = np.array([-side * 0.55, 0.0])
    outward = 0.0 if side > 0 else np.pi
    rows = []
    frontier = []
    for _ in range(3):
        angle = outward + r.uniform(-1.2, 1.2)
        frontier.append((hilum, angle, r.uniform(0.45, 0.7), r.uniform(0.35, 0.75), 0.35))
    for level in range(4):
        nxt = []
        for start, angle, length, zc, zw in frontier:
            end = start + length * np.array([np.cos(angle), np.sin(angle)])
            rows.append([start[0], start[1], end[0], end[1], level, zc, zw])
            if level < 3:
                for sign in (-1.0, 1.0):
                    nxt.append((end, angle + sign * r.uniform(0.3, 0.7), length * r.uniform(0.55, 0.75),
                                zc + r.uniform(-0.12, 0.12), zw * 0.75))
        frontier = nxt
    return np.asarray(rows, dtype=np.float32)


@dataclass(frozen=True)
class Nodule:
    """A round lesion in one slice: centre (normalised image units), radius in pixels, HU."""

    u: float
    v: float
    radius_px: float
    hu: float


def _lung_geometry(p: dict, z: np.ndarray):
    scale = _bump(z, 0.58, 0.55)
    a = p["lung_a"] * scale
    b = p["lung_b"] * (0.4 + 0.6 * scale)
    return scale, a, b


def render_slices(
    p: dict, z: np.ndarray, size: int, rng: np.random.Generator,
    nodules: Sequence[Nodule | Sequence[Nodule] | None] | None = None,
) -> np.ndarray:
    """HU images (len(z), size, size) of patient ``p`` at normalised heights ``z`` (0 = abdomen, 1 = apex).

    ``nodules`` has one entry per slice: None, a ``Nodule`` or a sequence of them.
    """
    z = np.asarray(z, dtype=np.float32)
    s, n = len(z), int(size)
    px = 2.0 / n  # one pixel in normalised units
    res = n / 128.0
    c = (np.arange(n, dtype=np.float32) + 0.5) * px - 1.0
    u, v = c.reshape(1, 1, n), c.reshape(1, n, 1)
    zc = _col(z)

    hu = np.full((s, n, n), -1000.0, dtype=np.float32)
    cy = p["body_cy"]
    a = _col(p["body_a"] * (1.0 + 0.04 * np.sin(np.pi * z)))
    b = _col(np.full(s, p["body_b"], np.float32))
    table_y = cy + p["body_b"] + 0.04
    hu[np.broadcast_to((np.abs(v - table_y) < 0.015) & (np.abs(u) < 0.85), hu.shape)] = p["hu_table"]
    _paint(hu, _ellipse(u, v, 0.0, cy, a, b), p["hu_skin"])
    _paint(hu, _ellipse(u, v, 0.0, cy, a - p["skin"], b - p["skin"]), p["hu_fat"])
    inner_a, inner_b = a - p["skin"] - p["fat"], b - p["skin"] - p["fat"]
    _paint(hu, _ellipse(u, v, 0.0, cy, inner_a, inner_b), p["hu_muscle"])

    # ribs along the chest wall (thorax only), cortical ring around marrow
    thorax = zc > 0.28
    k = np.arange(2 * p["n_ribs"], dtype=np.float32)
    theta = (k + 0.5) / len(k) * 2 * np.pi + p["rib_twist"] * (zc - 0.5)  # (s, 1, nr)
    away_from_midline = np.abs(np.sin(theta)) < 0.93
    ring_a, ring_b = inner_a - 0.5 * p["wall"], inner_b - 0.5 * p["wall"]
    rib_u = (ring_a * np.cos(theta)).reshape(s, -1)
    rib_v = (cy + ring_b * np.sin(theta)).reshape(s, -1)
    valid = (away_from_midline & thorax).reshape(s, -1)
    for j in range(rib_u.shape[1]):
        ru, rv, ok = _col(rib_u[:, j]), _col(rib_v[:, j]), valid[:, j].reshape(-1, 1, 1)
        d2 = (u - ru) ** 2 + (v - rv) ** 2
        _paint(hu, (d2 < 0.026 ** 2) & ok, p["hu_bone"])
        _paint(hu, (d2 < 0.014 ** 2) & ok, p["hu_marrow"])

    # lungs with parenchyma texture and branching vessels
    lscale, la, lb = _lung_geometry(p, z)
    lung_mask = np.zeros((s, n, n), dtype=bool)
    lung_cx = []
    for side in (-1.0, 1.0):
        cx = _col(side * p["lung_sep"] * (0.9 + 0.1 * lscale))
        lung_cx.append(cx)
        lung_mask |= _ellipse(u, v, cx, p["lung_cy"], _col(la), _col(lb))
    texture = _smooth_noise(rng, s, n, cell=max(2, int(round(6 * res))))
    vessels = _vessel_fraction(p, z, n, la, lb, lung_cx, rng)
    lung_hu = p["hu_lung"] + p["texture_hu"] * texture
    lung_hu = lung_hu + vessels * (p["hu_blood"] - lung_hu)
    hu = np.where(lung_mask, lung_hu, hu)

    # heart with a pericardial fat rim, ascending and descending aorta
    heart = _bump(z, 0.42, 0.2)
    hr = _col(p["heart_r"] * heart)
    hx = p["heart_cx"]
    hy = p["lung_cy"] + 0.08
    _paint(hu, _ellipse(u, v, hx, hy, hr * 1.25 + 0.012 * (hr > 0), hr + 0.012 * (hr > 0)), p["hu_fat"])
    _paint(hu, _ellipse(u, v, hx, hy, hr * 1.25, hr), p["hu_blood"] + 10)
    asc = _col(0.045 * (_bump(z, 0.62, 0.12) > 0))
    _paint(hu, _ellipse(u, v, 0.02, p["lung_cy"] - 0.02, asc, asc), p["hu_blood"])

    # liver (patient right = image left), below the diaphragm dome
    liver = _bump(z, 0.0, 0.38)
    _paint(hu, _ellipse(u, v, -0.18, cy + 0.02, _col(p["liver_a"] * liver), _col(p["liver_b"] * liver)), p["hu_liver"])

    # spine: vertebral body, canal, spinous process; descending aorta in front-left of it
    sr = p["spine_r"]
    sy = cy + p["body_b"] * 0.58
    _paint(hu, _ellipse(u, v, 0.0, sy, sr, sr), p["hu_bone"])
    _paint(hu, _ellipse(u, v, 0.0, sy, sr * 0.75, sr * 0.75), p["hu_marrow"])
    _paint(hu, _ellipse(u, v, 0.0, sy + sr * 1.7, sr * 0.25, sr * 0.8), p["hu_bone"])
    _paint(hu, _ellipse(u, v, 0.0, sy + sr * 1.3, sr * 0.45, sr * 0.45), 15.0)
    _paint(hu, _ellipse(u, v, 0.09, sy - sr - 0.04, 0.04, 0.04), p["hu_blood"])

    # trachea near the apex
    tr = _col(0.045 * (zc.reshape(-1) > 0.72))
    _paint(hu, _ellipse(u, v, 0.0, p["lung_cy"] - 0.06, tr + 0.01 * (tr > 0), tr + 0.01 * (tr > 0)), p["hu_muscle"])
    _paint(hu, _ellipse(u, v, 0.0, p["lung_cy"] - 0.06, tr, tr), -1000.0)

    if nodules is not None:
        for i, entry in enumerate(nodules):
            for nod in _as_nodule_list(entry):
                hu[i] += nodule_profile(nod, size) * (nod.hu - hu[i])

    # scanner noise is correlated: add white noise before the point-spread blur, scaled so that
    # its standard deviation after the blur is noise_hu
    sigma = p["psf_px"] * res
    kernel = _gauss_kernel(sigma)
    hu += rng.standard_normal((s, n, n)).astype(np.float32) * np.float32(p["noise_hu"] / float(np.sum(kernel ** 2)))
    hu = _blur(hu, sigma)
    hu[np.broadcast_to(u ** 2 + v ** 2 > 1.0, hu.shape)] = -1000.0  # outside the scanner's field of view
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.float32)


VESSEL_DENSITY = 0.75
"""Partial-volume factor of the rasterised vessels: thin branches read below blood HU, as in real CT."""


def _vessel_fraction(p, z, n, la, lb, lung_cx, rng) -> np.ndarray:
    """Vessel volume fraction (s, n, n) in [0, 1]: rasterised branches plus end-on dots, blurred."""
    s = len(z)
    res = n / 128.0
    sigma = 0.8 * res
    vessel_map = np.zeros(s * n * n, np.float64)
    steps = max(8, int(0.35 * n))
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    slice_ids = np.arange(s)[:, None, None]
    for side_index, tree in enumerate(p["trees"]):
        cx = lung_cx[side_index].reshape(s, 1, 1)
        hilum_x = tree[0, 0]
        rot = (p["vessel_twist"][side_index] * (z - 0.55)).reshape(s, 1, 1)
        x = tree[None, :, 0:1] + t * (tree[None, :, 2:3] - tree[None, :, 0:1])  # (1, nseg, steps)
        y = tree[None, :, 1:2] + t * (tree[None, :, 3:4] - tree[None, :, 1:2])
        xr = hilum_x + (x - hilum_x) * np.cos(rot) - y * np.sin(rot)
        yr = (x - hilum_x) * np.sin(rot) + y * np.cos(rot)
        uu = cx + xr * la.reshape(s, 1, 1)
        vv = p["lung_cy"] + yr * lb.reshape(s, 1, 1)
        visible = np.exp(-(((z[:, None] - tree[None, :, 5]) / tree[None, :, 6]) ** 2))  # (s, nseg)
        seg_len_px = np.hypot((tree[:, 2] - tree[:, 0]) * la[:, None], (tree[:, 3] - tree[:, 1]) * lb[:, None]) * n / 2
        weight = (visible * seg_len_px / steps)[:, :, None] * (la > 0)[:, None, None]
        col = np.clip(np.rint((uu + 1) * n / 2 - 0.5), 0, n - 1).astype(np.int64)
        row = np.clip(np.rint((vv + 1) * n / 2 - 0.5), 0, n - 1).astype(np.int64)
        flat = (slice_ids * n + row) * n + col
        # trunks and first branches get twice the weight: after clipping they are wider
        weight = weight * np.where(tree[:, 4] <= 1, 1.8, 1.0).astype(np.float32)[None, :, None]
        vessel_map += np.bincount(flat.ravel(), np.broadcast_to(weight, flat.shape).ravel(), s * n * n)
    # vessels seen end-on: small round dots scattered in the lungs
    n_dots = 14
    ang = rng.uniform(0, 2 * np.pi, (s, n_dots))
    rad = np.sqrt(rng.uniform(0, 0.85, (s, n_dots)))
    side = rng.integers(0, 2, (s, n_dots))
    cxs = np.where(side == 0, lung_cx[0].reshape(s, 1), lung_cx[1].reshape(s, 1))
    du = cxs + rad * np.cos(ang) * la[:, None]
    dv = p["lung_cy"] + rad * np.sin(ang) * lb[:, None]
    col = np.clip(np.rint((du + 1) * n / 2 - 0.5), 0, n - 1).astype(np.int64)
    row = np.clip(np.rint((dv + 1) * n / 2 - 0.5), 0, n - 1).astype(np.int64)
    flat = (np.arange(s)[:, None] * n + row) * n + col
    dot_w = 2 * np.pi * sigma ** 2 * rng.uniform(0.6, 2.0, (s, n_dots)) * (la[:, None] > 0)
    vessel_map += np.bincount(flat.ravel(), dot_w.ravel(), s * n * n)
    # a unit-density line blurred with sigma peaks at 1 / (sqrt(2 pi) sigma)
    blurred = _blur(vessel_map.reshape(s, n, n).astype(np.float32), sigma) * np.float32(np.sqrt(2 * np.pi) * sigma)
    return np.clip(VESSEL_DENSITY * blurred, 0.0, 1.0)


NODULE_RADIUS_FRACTION = (0.04, 0.06)
"""Nodule radius as a fraction of the image side: 14-22 mm at the 360 mm field of view, i.e. large
nodules and small masses, 2.6-3.8 px at 64 px and 5-7.7 px at 128 px. A fraction rather than
pixels so a lesion keeps its anatomical size at every ``size`` and is still several pixels wide
after the fine-tuning resize to 64 px (the toy study's scale)."""
SOLID_NODULE_HU = (-20.0, 80.0)
SUBSOLID_NODULE_HU = (-350.0, -150.0)
SUBSOLID_FRACTION = 0.1
NODULE_COUNT_PROBS = (0.6, 0.3, 0.1)
"""Probability of 1, 2 or 3 nodules on a positive labeled slice."""


def _as_nodule_list(entry) -> list[Nodule]:
    if entry is None:
        return []
    if isinstance(entry, Nodule):
        return [entry]
    return [n for n in entry if n is not None]


def nodule_profile(nod: Nodule, size: int) -> np.ndarray:
    """Soft disc (size, size) in [0, 1]: 1 inside ``nod``, a sub-pixel edge, 0 outside."""
    n = int(size)
    px = 2.0 / n
    c = (np.arange(n, dtype=np.float32) + 0.5) * px - 1.0
    d = np.sqrt((c[None, :] - nod.u) ** 2 + (c[:, None] - nod.v) ** 2) / px
    return (1.0 / (1.0 + np.exp(np.clip((d - nod.radius_px) / 0.6, -30, 30)))).astype(np.float32)


def random_nodule(p: dict, z: float, size: int, rng: np.random.Generator) -> Nodule:
    """A nodule wholly inside one lung at height ``z``: mostly solid (soft tissue HU), some subsolid."""
    _, la, lb = _lung_geometry(p, np.array([z], dtype=np.float32))
    side = -1.0 if rng.random() < 0.5 else 1.0
    lscale = _bump(np.array([z], np.float32), 0.58, 0.55)[0]
    cx = side * p["lung_sep"] * (0.9 + 0.1 * lscale)
    radius_px = rng.uniform(*NODULE_RADIUS_FRACTION) * size
    # keep the whole lesion (plus a pixel of lung) inside the lung ellipse
    radius_norm = (radius_px + 1.0) * 2.0 / size
    max_rad = float(np.clip(0.95 - radius_norm / max(min(la[0], lb[0]), 1e-6), 0.0, 0.75))
    ang, rad = rng.uniform(0, 2 * np.pi), max_rad * np.sqrt(rng.uniform(0.0, 1.0))
    hu = rng.uniform(*SUBSOLID_NODULE_HU) if rng.random() < SUBSOLID_FRACTION else rng.uniform(*SOLID_NODULE_HU)
    # lateral half of the lung, where the heart and the hilum do not hide it
    u = cx + side * abs(rad * np.cos(ang)) * la[0]
    return Nodule(float(u), float(p["lung_cy"] + rad * np.sin(ang) * lb[0]), float(radius_px), float(hu))


def random_nodules(p: dict, z: float, size: int, rng: np.random.Generator) -> tuple[Nodule, ...]:
    """One to three nodules on one slice (``NODULE_COUNT_PROBS``), not overlapping where avoidable."""
    count = 1 + int(rng.choice(len(NODULE_COUNT_PROBS), p=NODULE_COUNT_PROBS))
    chosen: list[Nodule] = []
    for _ in range(count):
        for _attempt in range(8):
            nod = random_nodule(p, z, size, rng)
            gap = [np.hypot(nod.u - o.u, nod.v - o.v) * size / 2 - nod.radius_px - o.radius_px for o in chosen]
            if all(g > 1.0 for g in gap):
                chosen.append(nod)
                break
    return tuple(chosen)


def phantom_series(seed: int, patient: int, n_slices: int, size: int = 128) -> tuple[np.ndarray, np.ndarray, dict]:
    """One patient's contiguous series: HU (n_slices, size, size), slice z in mm (ascending), params.

    About a third of the series carry a nodule spanning a few adjacent slices, as in real scans.
    """
    p = patient_params(seed, patient)
    rng = _rng(seed, patient, 1)
    if n_slices > 1:
        z = p["z0"] + p["extent"] * np.linspace(0.0, 1.0, n_slices, dtype=np.float32)
    else:
        z = np.array([0.5], np.float32)
    nodules: list[Nodule | None] = [None] * n_slices
    if rng.random() < 0.35:
        centre_z = float(rng.uniform(0.45, 0.75))
        nod = random_nodule(p, centre_z, size, rng)
        half_mm = nod.radius_px * FIELD_OF_VIEW_MM / size
        for i, zi in enumerate(z):
            dz = (zi - centre_z) * BODY_LENGTH_MM
            if abs(dz) < half_mm:
                nodules[i] = Nodule(nod.u, nod.v, nod.radius_px * float(np.sqrt(1 - (dz / half_mm) ** 2)), nod.hu)
    hu = np.concatenate([render_slices(p, z[i:i + 16], size, rng, nodules[i:i + 16]) for i in range(0, n_slices, 16)])
    return hu, (z * BODY_LENGTH_MM - BODY_LENGTH_MM / 2).astype(np.float64), p


def labeled_slices(seed: int, patient: int, n_slices: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Independent chest slices of one patient, half with 1-3 nodules: HU (n, size, size), labels (n,)."""
    p = patient_params(seed, patient)
    rng = _rng(seed, patient, 2)
    labels = np.zeros(n_slices, dtype=np.int64)
    labels[: n_slices // 2 + (rng.random() < 0.5 if n_slices % 2 else 0)] = 1
    labels = rng.permutation(labels)
    z = rng.uniform(0.42, 0.8, n_slices).astype(np.float32)
    nodules = [random_nodules(p, float(zi), size, rng) if y else None for zi, y in zip(z, labels)]
    if n_slices:
        hu = np.concatenate([render_slices(p, z[i:i + 16], size, rng, nodules[i:i + 16])
                             for i in range(0, n_slices, 16)])
    else:
        hu = np.zeros((0, size, size), np.float32)
    return hu, labels


VOLUME_NODULE_SCALE = 2.5
"""Nodules in labeled volumes are this much larger than on labeled slices, so that they stay visible
(and learnable) in the small volumes (16-64 voxels a side) a CPU fine-tunes on."""
VOLUME_Z_RANGE = (0.45, 0.75)
"""Normalised heights a labeled volume spans: the middle of the lungs, where nodules are placed."""


def labeled_volume(seed: int, patient: int, size: int, nodule: bool) -> np.ndarray:
    """One chest volume in HU, (size, size, size) slices of ``VOLUME_Z_RANGE``; with ``nodule`` a ball-shaped
    lesion inside one lung (one sphere of voxels, a disc of the right radius on each slice it crosses)."""
    p = patient_params(seed, patient)
    rng = _rng(seed, patient, 3)  # the anatomy's noise: the same with and without the nodule
    z = np.linspace(*VOLUME_Z_RANGE, size, dtype=np.float32)
    nodules: list[Nodule | None] = [None] * size
    if nodule:
        where = _rng(seed, patient, 4)
        centre = int(where.integers(size // 4, size - size // 4))
        nod = random_nodule(p, float(z[centre]), size, where)
        radius = nod.radius_px * VOLUME_NODULE_SCALE
        for i in range(size):
            d = abs(i - centre)
            if d < radius:
                nodules[i] = Nodule(nod.u, nod.v, float(np.sqrt(radius ** 2 - d ** 2)), nod.hu)
    return np.concatenate([render_slices(p, z[i:i + 16], size, rng, nodules[i:i + 16]) for i in range(0, size, 16)])


def labeled_volumes(seed: int, n_volumes: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n_volumes`` volumes of distinct patients, half with a nodule: uint8 (n, size, size, size) (lung window,
    as MedMNIST stores them) and labels (n,) (1 = nodule present)."""
    rng = _rng(seed, 0x3D)
    labels = rng.permutation(np.arange(n_volumes) % 2).astype(np.int64)
    volumes = np.zeros((n_volumes, size, size, size), np.uint8)
    for j, y in enumerate(labels):
        volumes[j] = window_to_uint8(labeled_volume(seed, 200000 + j, size, bool(y)))
    return volumes, labels


def write_labeled_volumes(path: str | os.PathLike, n_volumes: int, size: int = 32, seed: int = 0,
                          fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> Path:
    """A nodule/no-nodule set of volumes in MedMNIST's 3-D ``.npz`` layout (``{split}_images`` (N, D, H, W)
    uint8, ``{split}_labels`` (N, 1)), split stratified by class; ``ctssl.data.load_medmnist`` reads it."""
    from ..atomic import replace_atomically
    from .splits import stratified_split

    if n_volumes < 6:
        raise ValueError(f"need at least 6 labeled volumes (two classes in three splits), got {n_volumes}")
    volumes, labels = labeled_volumes(seed, n_volumes, size)
    arrays = {}
    for name, idx in zip(("train", "val", "test"), stratified_split(labels, fractions, seed)):
        arrays[f"{name}_images"] = volumes[idx]
        arrays[f"{name}_labels"] = labels[idx].reshape(-1, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temp name
            np.savez_compressed(f, **arrays)
    return path


def _generate_uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(x) for x in parts])


def _pydicom_major() -> int:
    import pydicom

    return int(pydicom.__version__.split(".")[0])


def write_ct_slice(
    path: str | os.PathLike,
    hu: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance: int,
    position_mm: Sequence[float],
    spacing_mm: float,
    thickness_mm: float,
    pixel_representation: str = "int16",
    series_number: int = 1,
    description: str = "ctssl phantom",
) -> None:
    """Write one HU slice as a CT Image Storage file (explicit VR little endian, with file meta).

    ``int16``: stored = HU + 1024, -2000 outside the field of view (PixelPaddingValue).
    ``uint16``: stored = HU + 1024 (12 bits used), 0 outside the field of view (PixelPaddingValue).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    n_rows, n_cols = hu.shape
    outside = _outside_fov(n_rows, n_cols)
    if pixel_representation == "int16":
        stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), -32768, 32767).astype(np.int16)
        stored[outside] = PADDING_INT16
        pad, pad_vr, signed, bits_stored = PADDING_INT16, "SS", 1, 16
    elif pixel_representation == "uint16":
        stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), 1, 4095).astype(np.uint16)
        stored[outside] = 0
        pad, pad_vr, signed, bits_stored = 0, "US", 0, 12
    else:
        raise ValueError("pixel_representation must be 'int16' or 'uint16'")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(os.fspath(path), {}, file_meta=meta, preamble=b"\0" * 128)
    if _pydicom_major() < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = series_uid + ".1" if len(series_uid) < 62 else study_uid
    ds.PatientID = patient_id
    ds.PatientName = f"Phantom^{patient_id}"
    ds.StudyDate = ds.SeriesDate = "20230101"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ctssl"
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [f"{float(x):.4f}" for x in position_mm]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{float(position_mm[2]):.4f}"
    ds.PixelSpacing = [f"{spacing_mm:.6f}", f"{spacing_mm:.6f}"]
    ds.SliceThickness = f"{thickness_mm:.4f}"
    ds.KVP = "120"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = n_rows, n_cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = signed
    ds.add_new(0x00280120, pad_vr, pad)  # PixelPaddingValue
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:.0f}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    ds.PixelData = stored.tobytes()
    if _pydicom_major() >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


def _outside_fov(n_rows: int, n_cols: int) -> np.ndarray:
    r = (np.arange(n_rows) + 0.5) * 2 / n_rows - 1
    c = (np.arange(n_cols) + 0.5) * 2 / n_cols - 1
    return r[:, None] ** 2 + c[None, :] ** 2 > 1.0


def write_dicom_series(
    series_dir: str | os.PathLike,
    hu: np.ndarray,
    positions_mm: Sequence[float],
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    size_mm: float = FIELD_OF_VIEW_MM,
    pixel_representation: str = "int16",
) -> list[str]:
    """Write HU slices as one DICOM series; InstanceNumber 1 is the top slice (as scanners do).

    Returns the file paths in the order of ``hu``.
    """
    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    n, rows, cols = hu.shape
    spacing = size_mm / cols
    thickness = float(abs(positions_mm[1] - positions_mm[0])) if n > 1 else 2.5
    order = np.argsort(-np.asarray(positions_mm))  # head first: instance 1 = highest z
    instance_of = np.empty(n, dtype=np.int64)
    instance_of[order] = np.arange(1, n + 1)
    x0 = -size_mm / 2 + spacing / 2
    paths = []
    for i in range(n):
        path = series_dir / f"IM{instance_of[i]:05d}.dcm"
        write_ct_slice(
            path, hu[i], patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
            sop_uid=_generate_uid(series_uid, i), instance=int(instance_of[i]),
            position_mm=(x0, x0, float(positions_mm[i])), spacing_mm=spacing, thickness_mm=thickness,
            pixel_representation=pixel_representation,
        )
        paths.append(str(path))
    return paths


def window_to_uint8(hu: np.ndarray, level: float = -600.0, width: float = 1500.0) -> np.ndarray:
    """Lung-windowed 8-bit grey image, like the PNGs of public CT classification sets."""
    return np.clip(np.rint((hu - (level - width / 2)) / width * 255.0), 0, 255).astype(np.uint8)


@dataclass
class SyntheticCT:
    """Where ``make_synthetic_ct`` wrote things."""

    root: str
    dicom_dir: str
    labels_csv: str | None
    n_series: int
    n_slices: int
    n_labeled: int


def make_synthetic_ct(
    out_dir: str | os.PathLike,
    n_patients: int = 8,
    slices_per_series: int = 24,
    size: int = 128,
    seed: int = 0,
    labeled: bool = True,
    labeled_patients: int | None = None,
    labeled_slices_per_patient: int = 16,
    labeled_format: str = "png",
    pixel_representation: str = "int16",
) -> SyntheticCT:
    """Write a synthetic CT set: ``dicom/`` (patient/study/series tree) and ``labeled/labels.csv``.

    The labeled set uses other patients than the pre-training tree; its CSV has columns
    ``path,label,patient`` (label 1 = nodule present) over PNG or DICOM files.
    """
    if labeled_format not in ("png", "dicom"):
        raise ValueError("labeled_format must be 'png' or 'dicom'")
    root = Path(out_dir)
    dicom_dir = root / "dicom"
    n_slices = 0
    for k in range(n_patients):
        pid = f"PHANTOM-{seed}-{k:04d}"
        hu, z_mm, _ = phantom_series(seed, k, slices_per_series, size)
        study = _generate_uid("study", seed, k)
        series = _generate_uid("series", seed, k)
        write_dicom_series(dicom_dir / pid / study / series, hu, z_mm, patient_id=pid, study_uid=study,
                           series_uid=series, pixel_representation=pixel_representation)
        n_slices += len(hu)

    labels_csv, n_labeled = None, 0
    if labeled:
        labeled_dir = root / "labeled"
        rows = []
        for j in range(labeled_patients if labeled_patients is not None else n_patients):
            index = 100000 + j  # separate patients from the pre-training tree
            pid = f"LABELED-{seed}-{j:04d}"
            hu, labels = labeled_slices(seed, index, labeled_slices_per_patient, size)
            if labeled_format == "png":
                from PIL import Image

                folder = labeled_dir / "images" / pid
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(len(hu)):
                    path = folder / f"{i:04d}.png"
                    Image.fromarray(window_to_uint8(hu[i])).save(path, compress_level=1)
                    rows.append((path.relative_to(labeled_dir).as_posix(), int(labels[i]), pid))
            else:
                study = _generate_uid("lstudy", seed, j)
                series = _generate_uid("lseries", seed, j)
                z_mm = np.arange(len(hu), dtype=np.float64) * 5.0  # independent slices, distinct positions
                paths = write_dicom_series(labeled_dir / "dicom" / pid, hu, z_mm, patient_id=pid, study_uid=study,
                                           series_uid=series, pixel_representation=pixel_representation)
                rows.extend((Path(p).relative_to(labeled_dir).as_posix(), int(y), pid) for p, y in zip(paths, labels))
            n_labeled += len(hu)
        labeled_dir.mkdir(parents=True, exist_ok=True)
        labels_csv = labeled_dir / "labels.csv"
        with open(labels_csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("path", "label", "patient"))
            writer.writerows(rows)
        labels_csv = str(labels_csv)

    info = {"seed": seed, "n_patients": n_patients, "slices_per_series": slices_per_series, "size": size,
            "labeled_format": labeled_format if labeled else None, "n_slices": n_slices, "n_labeled": n_labeled}
    root.mkdir(parents=True, exist_ok=True)
    (root / "phantom.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return SyntheticCT(str(root), str(dicom_dir), labels_csv, n_patients, n_slices, n_labeled)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctssl-phantoms",
        description="Write a synthetic chest CT set: a DICOM tree for pre-training and a labeled "
        "nodule/no-nodule set (labeled/labels.csv) for fine-tuning.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--patients", type=int, default=8, help="patients (one series each)")
    parser.add_argument("--slices", type=int, default=24, help="slices per series")
    parser.add_argument("--size", type=int, default=128, help="slice size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labeled-slices", type=int, default=16, help="labeled slices per labeled patient")
    parser.add_argument("--labeled-format", choices=("png", "dicom"), default="png")
    parser.add_argument("--no-labeled", action="store_true", help="only the pre-training DICOM tree")
    parser.add_argument("--volumes", type=int, default=0, metavar="N",
                        help="also write N labeled volumes (nodule or not) as OUT_DIR/labeled/volumes.npz, in "
                             "MedMNIST's 3-D layout, for fine-tuning 3-D encoders")
    parser.add_argument("--volume-size", type=int, default=32, help="side of the labeled volumes in voxels")
    args = parser.parse_args(argv)
    if args.volumes and (args.volumes < 6 or args.volume_size < 16):
        print("ctssl-phantoms: error: --volumes must be at least 6 and --volume-size at least 16", file=sys.stderr)
        return 2
    for name in ("patients", "slices", "size"):
        if getattr(args, name) < 1:
            print(f"ctssl-phantoms: error: --{name} must be at least 1", file=sys.stderr)
            return 2
    if args.size < 16:
        print("ctssl-phantoms: error: --size must be at least 16", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = make_synthetic_ct(
        args.out_dir, n_patients=args.patients, slices_per_series=args.slices, size=args.size, seed=args.seed,
        labeled=not args.no_labeled, labeled_slices_per_patient=args.labeled_slices, labeled_format=args.labeled_format,
    )
    volumes = None
    if args.volumes:
        volumes = write_labeled_volumes(Path(args.out_dir) / "labeled" / "volumes.npz", args.volumes,
                                        args.volume_size, args.seed)
    print(f"ctssl-phantoms: {result.n_series} series ({result.n_slices} slices) in {result.dicom_dir}"
          + (f", {result.n_labeled} labeled slices in {result.labels_csv}" if result.labels_csv else "")
          + (f", {args.volumes} labeled volumes in {volumes}" if volumes else "")
          + f" in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
