"""Synthetic chest-radiograph phantoms with exact per-finding masks.

The phantoms exist so that the demo model, the tests and the benchmarks have
realistic-looking inputs whose ground truth is known to the pixel, without any
patient data. They are cartoons of a PA chest radiograph, not simulations:
everything is drawn as a 2-D "attenuation" map (soft tissue, lung air, bone)
that is pushed through an exponential detector response, then jittered in
geometry, exposure and noise so a network cannot key on a fixed template.

Only NumPy and OpenCV are used (no torch) so the generator can be imported by
tests and benchmarks that must not depend on the training stack. Shapes are
drawn with cv2 rasterisers rather than full-image NumPy expressions because
the generator has to produce hundreds of images per second on one core.

Conventions: the image is displayed MONOCHROME2 (air dark, bone bright) and in
radiological orientation (the patient's left is on the image's right, so the
cardiac apex bulges to the image's right).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

LABELS = ("Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax")

# cv2 drawing works on integer coordinates; a fractional shift keeps thin lines
# and small shapes smooth instead of snapping them to the pixel grid.
_SHIFT = 4
_ONE = 1 << _SHIFT

# Attenuation weights (arbitrary units, soft tissue ~1). Lung air is the
# dominant contrast; the other weights were tuned against it so that every
# finding is learnable by a tiny CNN while the image stays plausible.
_LUNG_AIR = 0.62
_MARKING_MAIN = 0.22
_MARKING_SUB = 0.16
_HILUM = 0.08
_RIB = 0.075
_RIB_ANTERIOR = 0.04
_CLAVICLE = 0.16
_SPINE = 0.14
# Small on purpose: the cardiac shadow is seen mostly because it displaces
# lung, so it must blend into the equally dense abdomen below the diaphragm.
_HEART = 0.06
_PLEURAL_LINE = 0.30
_PTX_EXTRA_AIR = 0.16


@dataclass
class Phantom:
    """One synthetic radiograph and the exact region of each present finding."""

    image: np.ndarray  # float32, (H, W), 0..1, MONOCHROME2
    masks: dict[str, np.ndarray]  # label -> bool (H, W), only present findings


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates: a (1, W) row of x and a (H, 1) column of y."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :], c[:, None]


def _fx(points: np.ndarray | float, size: int) -> np.ndarray:
    """Normalised coordinates/lengths -> int32 fixed-point pixels for cv2 calls with _SHIFT."""
    return np.round(np.asarray(points) * (size * _ONE)).astype(np.int32)


def _pt(point: np.ndarray, size: int) -> tuple[int, int]:
    # Pixel centres sit at +0.5, cv2 draws centre-addressed: undo that offset.
    x, y = _fx(np.asarray(point) - 0.5 / size, size)
    return int(x), int(y)


def _polys(paths: np.ndarray | Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    if isinstance(paths, np.ndarray):  # (n, k, 2): convert in one go
        return list(_fx(paths - 0.5 / size, size))
    return [_fx(p - 0.5 / size, size) for p in paths]


def _fill(polys: Sequence[np.ndarray], size: int) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, _polys(polys, size), 1, cv2.LINE_8, _SHIFT)
    return canvas.view(bool)


def _lines(
    canvas: np.ndarray,
    paths: np.ndarray | Sequence[np.ndarray],
    value: float,
    thickness: int,
    size: int,
) -> None:
    cv2.polylines(canvas, _polys(paths, size), False, value, max(1, thickness), cv2.LINE_8, _SHIFT)


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    return cv2.GaussianBlur(a, (0, 0), sigma_px) if sigma_px > 0.05 else a


def _lung_outline(
    side: int, cx: float, half_width: float, apex_y: float, base_y: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, float]]:
    """Closed polygon (normalised xy) of one lung; side -1 = image left (patient right).

    Built from two elliptic quarter-arcs (lateral wall and medial border, both
    rounded at the apex) joined by a domed diaphragm, which gives a sharp
    costophrenic angle at the lateral base, as on a real film.
    """
    xl = cx + side * half_width * (1.0 + rng.normal(0.0, 0.02))
    xm = cx + side * rng.uniform(0.05, 0.07)
    ax = cx + side * rng.uniform(0.15, 0.19)
    ay = apex_y + rng.normal(0.0, 0.008)
    # The left hemidiaphragm usually sits a little lower than the right.
    ycp = base_y + (0.02 if side > 0 else 0.0) + rng.normal(0.0, 0.008)
    ym = ycp - rng.uniform(0.06, 0.10)
    dome = rng.uniform(0.03, 0.06)

    t = np.linspace(0.0, np.pi / 2, 24)
    lateral = np.stack([ax + (xl - ax) * np.sin(t), ycp - (ycp - ay) * np.cos(t)], axis=1)
    s = np.linspace(0.0, 1.0, 20)[1:]
    dia_y = ycp + (ym - ycp) * s - dome * np.sin(np.pi * s)
    diaphragm = np.stack([xl + (xm - xl) * s, dia_y], axis=1)
    t2 = t[::-1][1:-1]
    medial = np.stack([ax + (xm - ax) * np.sin(t2), ym - (ym - ay) * np.cos(t2)], axis=1)
    geometry = {"xl": xl, "xm": xm, "ax": ax, "ay": ay, "ycp": ycp, "ym": ym}
    return np.concatenate([lateral, diaphragm, medial]), geometry


def _branches(
    rng: np.random.Generator, start: np.ndarray, angles: np.ndarray, lengths: np.ndarray, n_pts: int
) -> np.ndarray:
    """Vessel-like random-walk polylines, (n, n_pts, 2), generated without a Python loop."""
    n = angles.shape[0]
    heading = rng.normal(0.0, 0.14, (n, n_pts - 1)).cumsum(axis=1) + angles[:, None]
    seg = (lengths / (n_pts - 1))[:, None]
    d = np.stack([np.cos(heading) * seg, np.sin(heading) * seg], axis=2)
    pts = np.concatenate([np.zeros((n, 1, 2)), d.cumsum(axis=1)], axis=1)
    return pts + start.reshape(-1, 1, 2)


def _lung_markings(
    rng: np.random.Generator,
    layer: np.ndarray,
    side: int,
    hilum: np.ndarray,
    size: int,
    scale: float,
) -> None:
    """Draw faint branching vascular markings fanning out from one hilum into layer."""
    n_main = int(rng.integers(11, 16))
    lateral = 0.0 if side > 0 else np.pi
    # Fan over the lateral half-plane, a bit more up and down than straight out,
    # so the apex and the bases get vessels too.
    angles = lateral + side * rng.uniform(-1.45, 1.45, n_main)
    main = _branches(rng, hilum, angles, rng.uniform(0.16, 0.34, n_main), 9)
    # Vessels taper: thick near the hilum, thin in the periphery.
    _lines(layer, main[:, :6], _MARKING_MAIN, round(2 * scale), size)
    _lines(layer, main[:, 5:], _MARKING_MAIN, round(1 * scale), size)

    # Two side branches per main vessel, leaving from its middle third.
    idx = rng.integers(2, 6, (n_main, 2))
    starts = main[np.arange(n_main)[:, None], idx].reshape(-1, 2)
    turn = rng.choice([-1.0, 1.0], 2 * n_main) * rng.uniform(0.35, 0.8, 2 * n_main)
    sub_angles = np.repeat(angles, 2) + turn
    sub = _branches(rng, starts, sub_angles, rng.uniform(0.06, 0.14, 2 * n_main), 6)
    _lines(layer, sub, _MARKING_SUB, round(1 * scale), size)
    cv2.circle(layer, _pt(hilum, size), int(_fx(7 / 256, size)), _HILUM, -1, cv2.LINE_8, _SHIFT)


def _collapse(
    outline: np.ndarray, anchor: np.ndarray, factor: float, y_top: float, y_bottom: float
) -> np.ndarray:
    """Shrink a lung outline towards a medial-basal anchor: strongly at the apex, not at the base.

    This is how a pneumothorax looks on an upright film: the lung falls away
    from the apical and lateral chest wall while the base stays put.
    """
    w = np.clip((y_bottom - outline[:, 1]) / max(y_bottom - y_top, 1e-6), 0.0, 1.0)
    w = w * w * (3.0 - 2.0 * w)  # smoothstep: no kink in the pleural line
    k = 1.0 - (1.0 - factor) * w
    return anchor + (outline - anchor) * k[:, None]


def _bones(
    rng: np.random.Generator,
    bones: np.ndarray,
    s: int,
    scale: float,
    cx: float,
    half_width: float,
    apex_y: float,
    base_y: float,
) -> None:
    """Draw posterior and anterior ribs plus clavicles into the attenuation layer bones."""
    n_ribs = 10
    spacing = (base_y - apex_y) / (n_ribs - 0.5)
    k = np.arange(n_ribs)
    u = np.linspace(0.0, 1.0, 16)
    ant_th = np.linspace(0.0, np.pi / 2, 12)
    posterior, anterior = [], []
    for side in (-1, 1):
        y0 = apex_y - 0.03 + k * spacing + rng.normal(0.0, 0.004, n_ribs)
        rx = half_width * rng.uniform(0.95, 1.05, n_ribs) + 0.01
        # A posterior rib leaves the spine almost level and curves down towards
        # the lateral chest wall; lower ribs drop more steeply.
        drop = 0.07 + 0.006 * k + rng.uniform(0.0, 0.03, n_ribs)
        px = cx + side * (0.03 + rx[:, None] * u[None, :])
        py = y0[:, None] + drop[:, None] * u[None, :] ** 1.7
        posterior.append(np.stack([px, py], axis=2))
        # Anterior ribs run the other way (down and towards the midline) and are fainter.
        a_ang = ant_th if side < 0 else np.pi - ant_th
        a_rx = 0.6 * rx[:5, None]
        ax = cx + side * 0.4 * rx[:5, None] + a_rx * np.cos(a_ang)[None, :]
        ay = (y0[:5] - 0.02)[:, None] + 0.08 * np.sin(a_ang)[None, :]
        anterior.append(np.stack([ax, ay], axis=2))
    _lines(bones, np.concatenate(posterior), _RIB, round(5 * scale), s)
    _lines(bones, np.concatenate(anterior), _RIB_ANTERIOR, round(4 * scale), s)
    u = np.linspace(0.0, 1.0, 8)
    clavicle_y = apex_y + 0.01 - 0.04 * u + 0.012 * np.sin(np.pi * u)
    clavicles = [np.stack([cx + side * (0.05 + 0.28 * u), clavicle_y], axis=1) for side in (-1, 1)]
    _lines(bones, clavicles, _CLAVICLE, round(7 * scale), s)


def generate(
    rng: np.random.Generator,
    size: int = 256,
    findings: Collection[str] | None = None,
    p: float = 0.35,
    nodule_radius: tuple[float, float] = (5.0, 12.0),
) -> Phantom:
    """Draw one size x size phantom.

    findings=None draws each label independently with probability p; otherwise
    exactly the given labels are present. nodule_radius is the range (in pixels
    at 256, scaled with size) a nodule radius is drawn from. All randomness
    comes from rng, so a seeded Generator reproduces the same phantom.
    """
    if findings is None:
        present = {label for label in LABELS if rng.random() < p}
    else:
        present = set(findings)
        unknown = present - set(LABELS)
        if unknown:
            raise ValueError(f"unknown findings {sorted(unknown)}; expected a subset of {LABELS}")

    s = size
    scale = s / 256.0  # pixel-sized parameters were tuned at 256
    xx, yy = _grid(s)
    # Full-size float temporaries are the main cost here: every fresh 256 KiB
    # array page-faults. So the image is composed in place in two buffers
    # (`atten`: large hard-edged densities, `fine`: thin lines), masked updates
    # use ufunc `where=`, and each buffer is blurred once.
    fine = np.zeros((s, s), np.float32)
    scratch = np.empty((s, s), np.float32)

    # --- global anatomy -----------------------------------------------------------
    cx = 0.5 + rng.normal(0.0, 0.012)
    half_width = rng.uniform(0.34, 0.39)
    apex_y = rng.uniform(0.13, 0.18)
    base_y = rng.uniform(0.70, 0.77)

    # Body: trunk + shoulders + neck; thickness grows towards the midline like a cylinder.
    body = np.zeros((s, s), np.uint8)
    for centre, half_axes in (((cx, 0.64), (0.47, 0.60)), ((cx, 0.22), (0.52, 0.14))):
        axes_px = (int(_fx(half_axes[0], s)), int(_fx(half_axes[1], s)))
        cv2.ellipse(body, _pt(centre, s), axes_px, 0, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)
    neck = (_pt((cx - 0.11, -0.1), s), _pt((cx + 0.11, 0.2), s))
    cv2.rectangle(body, *neck, 1, -1, cv2.LINE_8, _SHIFT)
    thickness = np.sqrt(np.maximum(1.0 - ((xx - cx) / 0.55) ** 2, 0.0))
    atten = np.multiply(body, 0.55 + 0.45 * thickness, dtype=np.float32)

    lungs: list[np.ndarray] = []
    geo: list[dict[str, float]] = []
    for side in (-1, 1):
        outline, g = _lung_outline(side, cx, half_width, apex_y, base_y, rng)
        lungs.append(outline)
        geo.append(g)
    lung_masks = [_fill([o], s) for o in lungs]

    # Heart: a tilted ellipse sitting on the diaphragm, about two thirds of it to
    # the image's right. Its horizontal extent follows the cardiothoracic ratio
    # (normal < 0.5; cardiomegaly drawn clearly above it so the label is unambiguous).
    thorax_w = abs(geo[1]["xl"] - geo[0]["xl"])
    ctr = rng.uniform(0.56, 0.66) if "Cardiomegaly" in present else rng.uniform(0.37, 0.46)
    tilt = rng.uniform(20.0, 35.0)
    aspect = rng.uniform(0.68, 0.82)
    half_extent = 0.5 * ctr * thorax_w
    t = np.deg2rad(tilt)
    hw = half_extent / np.sqrt(np.cos(t) ** 2 + (aspect * np.sin(t)) ** 2)
    hx = cx + (0.5 - rng.uniform(0.26, 0.34)) * 2 * half_extent
    dia_y = 0.5 * (geo[0]["ym"] + geo[1]["ym"]) + 0.03
    hy = dia_y - 0.55 * hw * aspect
    heart_u8 = np.zeros((s, s), np.uint8)
    axes = (int(_fx(hw, s)), int(_fx(hw * aspect, s)))
    # cv2's angle turns the long axis clockwise on screen: down towards the cardiac apex.
    cv2.ellipse(heart_u8, _pt((hx, hy), s), axes, tilt, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)
    heart_u8[max(0, int(np.ceil(dia_y * s - 0.5))) :] = 0  # the rest hides in the abdomen
    heart = heart_u8.view(bool)

    lung_eff = [m & ~heart for m in lung_masks]
    lung_any = lung_eff[0] | lung_eff[1]
    # Lung air is deeper at the bases (more lung in the beam) than at the apices.
    air_depth = _LUNG_AIR * (0.82 + 0.18 * np.clip((yy - apex_y) / (base_y - apex_y), 0.0, 1.0))
    np.subtract(atten, air_depth, out=atten, where=lung_any)
    # A little lung still projects behind the heart (the retrocardiac space).
    np.subtract(atten, 0.3 * air_depth, out=atten, where=heart & (lung_masks[0] | lung_masks[1]))
    np.add(atten, _HEART, out=atten, where=heart)

    # --- findings that change the lung ----------------------------------------------
    masks: dict[str, np.ndarray] = {}
    effusion = np.zeros((s, s), bool)
    if "Pleural Effusion" in present:
        r = rng.random()
        sides = (0, 1) if r < 0.25 else ((0,) if r < 0.625 else (1,))
        for i in sides:
            g = geo[i]
            lung_h = g["ycp"] - g["ay"]
            # Fluid level at the medial end; it climbs towards the lateral wall
            # (concave-upward meniscus) and hides the costophrenic angle.
            level = g["ycp"] - rng.uniform(0.20, 0.38) * lung_h
            rise = rng.uniform(0.06, 0.14) * lung_h
            tt = np.clip((xx - g["xm"]) / (g["xl"] - g["xm"]), 0.0, 1.0)
            edge = (level - rise * tt**2).astype(np.float32)
            region = lung_eff[i] & (yy > edge)
            effusion |= region
            # Fluid replaces most of the lung air; it thins out towards the meniscus
            # (lung still in the beam in front of it), so the top edge is hazy.
            top, ramp = rng.uniform(0.55, 0.72), 0.15 * lung_h
            np.subtract(yy, edge, out=scratch)
            np.minimum(scratch, ramp, out=scratch)
            scratch *= np.float32(_LUNG_AIR * (0.92 - top) / ramp)
            scratch += np.float32(_LUNG_AIR * top)
            np.add(atten, scratch, out=atten, where=region)
        masks["Pleural Effusion"] = effusion

    ptx = np.zeros((s, s), bool)
    ptx_side = int(rng.integers(0, 2))
    if "Pneumothorax" in present:
        g = geo[ptx_side]
        anchor = np.array([g["xm"], g["ym"]])
        collapsed = _collapse(lungs[ptx_side], anchor, rng.uniform(0.58, 0.8), g["ay"], g["ycp"])
        ptx = lung_eff[ptx_side] & ~_fill([collapsed], s) & ~effusion
        masks["Pneumothorax"] = ptx
        np.subtract(atten, _PTX_EXTRA_AIR, out=atten, where=ptx)
        scratch.fill(0.0)
        _lines(scratch, [np.vstack([collapsed, collapsed[:1]])], _PLEURAL_LINE, round(scale), s)
        # Only the stretch of the outline that borders the air gap is a visible pleural line.
        near_gap = cv2.dilate(ptx.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
        np.add(fine, scratch, out=fine, where=near_gap & lung_eff[ptx_side])

    # --- lungs, markings, bones --------------------------------------------------
    cv2.GaussianBlur(atten, (0, 0), 1.5 * scale, dst=scratch)
    atten, scratch = scratch, atten

    scratch.fill(0.0)
    for i, side in enumerate((-1, 1)):
        g = geo[i]
        hilum = np.array([g["xm"] + side * 0.02, 0.5 * (g["ay"] + g["ycp"]) + 0.03])
        _lung_markings(rng, scratch, side, hilum, s, scale)
    # Vessels stop at the visceral pleura (pneumothorax) and vanish under fluid.
    visible = lung_any & ~ptx & ~effusion
    np.add(fine, scratch, out=fine, where=visible)
    _bones(rng, fine, s, scale, cx, half_width, apex_y, base_y)
    atten += cv2.GaussianBlur(fine, (0, 0), 0.8 * scale, dst=scratch)
    # Spine: a column with a vertebral rhythm, seen mostly through the mediastinum.
    x0, x1 = max(int((cx - 0.05) * s), 0), min(int((cx + 0.05) * s) + 1, s)
    spine_x = np.maximum(1.0 - ((xx[:, x0:x1] - cx) / 0.04) ** 4, 0.0)
    spine_y = (0.85 + 0.15 * np.cos(2.0 * np.pi * yy / rng.uniform(0.05, 0.06))) * (yy > 0.08)
    atten[:, x0:x1] += (_SPINE * spine_y) * spine_x

    # --- a nodule, placed last so it lands in visible lung ---------------------------
    if "Nodule" in present:
        radius = rng.uniform(*nodule_radius) * scale
        room = visible.view(np.uint8)
        dist = cv2.distanceTransform(room, cv2.DIST_L2, 5)
        candidates = np.flatnonzero(dist > radius + 2.0 * scale)
        if candidates.size == 0:  # implausibly small lungs: settle for any visible lung pixel
            candidates = np.flatnonzero(room)
            radius = 5.0 * scale
        ny, nx = divmod(int(candidates[rng.integers(0, candidates.size)]), s)
        # Work on a local window: the disc is tiny compared with the image.
        pad = int(np.ceil(radius + 4 * scale))
        y0, y1 = max(ny - pad, 0), min(ny + pad + 1, s)
        x0, x1 = max(nx - pad, 0), min(nx + pad + 1, s)
        r2 = (np.arange(y0, y1, dtype=np.float32)[:, None] - ny) ** 2 + (
            np.arange(x0, x1, dtype=np.float32)[None, :] - nx
        ) ** 2
        disc = np.zeros((s, s), bool)
        disc[y0:y1, x0:x1] = r2 <= radius * radius
        # Projected sphere: thickest in the middle, so the edge fades naturally.
        profile = np.sqrt(np.maximum(1.0 - r2 / (radius * radius), 0.0))
        atten[y0:y1, x0:x1] += rng.uniform(0.42, 0.56) * _blur(profile, 0.8 * scale)
        masks["Nodule"] = disc

    if "Cardiomegaly" in present:
        masks["Cardiomegaly"] = heart

    # --- acquisition: geometry jitter, detector response, exposure, noise ------------
    m = cv2.getRotationMatrix2D((s / 2.0, s / 2.0), rng.uniform(-4.0, 4.0), rng.uniform(0.95, 1.05))
    m[:, 2] += rng.normal(0.0, 0.02 * s, 2)
    img = cv2.warpAffine(
        atten, m, (s, s), dst=scratch, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    for label, mask in masks.items():
        warped = cv2.warpAffine(mask.view(np.uint8), m, (s, s), flags=cv2.INTER_NEAREST)
        masks[label] = warped.view(bool)

    # Exponential detector response, normalised so soft tissue of the thickest
    # part of the body lands near white; then window and gamma like a display LUT.
    k = rng.uniform(1.6, 2.4)
    norm = 1.0 / (1.0 - np.exp(-k * 1.25))
    lo, hi = rng.uniform(-0.06, 0.06), rng.uniform(0.9, 1.08)
    np.maximum(img, 0.0, out=img)
    img *= np.float32(-k)
    np.exp(img, out=img)
    # (norm * (1 - e) - lo) / (hi - lo), folded into one multiply-add.
    img *= np.float32(-norm / (hi - lo))
    img += np.float32((norm - lo) / (hi - lo))
    np.clip(img, 0.0, 1.0, out=img)
    cv2.pow(img, float(rng.uniform(0.8, 1.25)), dst=img)
    # Low-frequency non-uniformity (heel effect, scatter): a sum of three
    # separable cosines is smooth by construction and is a single matmul.
    fy, fx = rng.uniform(0.3, 1.5, 3), rng.uniform(0.3, 1.5, 3)
    py, px = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0, 2 * np.pi, 3)
    cols = (rng.uniform(0.005, 0.02, 3) * np.cos(2 * np.pi * fy * yy + py)).astype(np.float32)
    rows = np.cos(2 * np.pi * fx[:, None] * xx + px[:, None]).astype(np.float32)
    img += np.matmul(cols, rows, out=atten)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 0.9) * scale, dst=atten)
    # Quantum noise. cv2.randn is several times faster than NumPy's normal
    # sampler; seeding it from rng keeps the phantom reproducible.
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    img += cv2.randn(scratch, 0.0, float(rng.uniform(0.005, 0.02)))
    return Phantom(image=np.clip(img, 0.0, 1.0, out=img), masks=masks)
