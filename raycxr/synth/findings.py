"""Findings drawn into a synthetic chest density map where they occur.

Each renderer edits the density map in place for one canonical finding (names from
:mod:`raycxr.labels`) and returns the box it drew (normalised x0, y0, x1, y1) or None. A real box
from the source table (NIH, VinDr, RSNA) or a real mask (SIIM pneumothorax) places the finding;
otherwise it goes where that finding usually appears. Classes with no visible sign here (for
instance many of PadChest's 190) keep their real label but draw nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from .anatomy import ChestGeometry, _blur, _draw, smooth_noise

Box = tuple[float, float, float, float]
Renderer = Callable[[np.ndarray, ChestGeometry, np.random.Generator, "Box | None", "np.ndarray | None"],
                    "Box | None"]
RENDERERS: dict[str, Renderer] = {}


def register(*names: str) -> Callable[[Renderer], Renderer]:
    def deco(fn: Renderer) -> Renderer:
        for n in names:
            RENDERERS[n] = fn
        return fn
    return deco


def render_finding(name: str, dens: np.ndarray, geom: ChestGeometry, rng: np.random.Generator,
                   box: Box | None = None, mask: np.ndarray | None = None) -> Box | None:
    """Draw one finding (canonical name); returns the drawn box, or None if nothing was drawn."""
    fn = RENDERERS.get(name)
    return fn(dens, geom, rng, box, mask) if fn else None


def _lung_point(geom: ChestGeometry, rng: np.random.Generator, *, lower: bool | None = None,
                side: int | None = None) -> tuple[float, float]:
    lung = geom.lungs if side is None else (geom.right_lung if side < 0 else geom.left_lung)
    ys, xs = np.nonzero(lung)
    if lower is not None:
        med = np.median(ys)
        keep = ys > med if lower else ys <= med
        ys, xs = ys[keep], xs[keep]
    i = rng.integers(len(ys))
    return float(xs[i]), float(ys[i])


def _box_px(box: Box, s: int) -> tuple[float, float, float, float]:
    return box[0] * s, box[1] * s, box[2] * s, box[3] * s


def _norm_box(x0: float, y0: float, x1: float, y1: float, s: int) -> Box:
    c = np.clip([x0 / s, y0 / s, x1 / s, y1 / s], 0, 1)
    return float(c[0]), float(c[1]), float(max(c[2], c[0])), float(max(c[3], c[1]))


def _blob(geom: ChestGeometry, cx: float, cy: float, rx: float, ry: float, rng: np.random.Generator,
          patchy: float) -> np.ndarray:
    """A soft irregular opacity: an ellipse roughened by smooth noise."""
    s = geom.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    d = ((xx - cx) / max(rx, 1)) ** 2 + ((yy - cy) / max(ry, 1)) ** 2
    base = np.exp(-d * 1.5)
    if patchy > 0:
        base *= np.clip(1 + patchy * smooth_noise(s, rng, max(1.0, 0.02 * s)), 0, None)
    return base


def _airspace(dens: np.ndarray, geom: ChestGeometry, rng: np.random.Generator, box: Box | None,
              strength: float, patchy: float, lower: bool | None = True) -> Box:
    s = geom.size
    if box is not None:
        x0, y0, x1, y1 = _box_px(box, s)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 3), max((y1 - y0) / 2, 3)
    else:
        cx, cy = _lung_point(geom, rng, lower=lower)
        rx, ry = rng.uniform(0.05, 0.10) * s, rng.uniform(0.05, 0.09) * s
    op = _blob(geom, cx, cy, rx, ry, rng, patchy) * _blur(geom.lungs, 0.01 * s)
    dens += strength * op
    return _norm_box(cx - rx, cy - ry, cx + rx, cy + ry, s)


@register("Lung Opacity", "Pneumonia")
def _opacity(dens, geom, rng, box, mask):
    return _airspace(dens, geom, rng, box, rng.uniform(0.16, 0.24), 0.6)


@register("Consolidation")
def _consolidation(dens, geom, rng, box, mask):
    return _airspace(dens, geom, rng, box, rng.uniform(0.22, 0.30), 0.3)


@register("Infiltration")
def _infiltration(dens, geom, rng, box, mask):
    return _airspace(dens, geom, rng, box, rng.uniform(0.10, 0.16), 1.0, lower=None)


@register("Tuberculosis")
def _tb(dens, geom, rng, box, mask):
    b = _airspace(dens, geom, rng, box, rng.uniform(0.14, 0.2), 0.9, lower=False)
    # a small cavity inside the upper-lobe opacity
    s = geom.size
    cx, cy = (b[0] + b[2]) / 2 * s, (b[1] + b[3]) / 2 * s
    r = 0.018 * s
    dens -= 0.12 * _blur(_draw(s, lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)), 1)
    return b


@register("Nodule", "Lung Lesion", "Other Lesion", "Granuloma")
def _nodule(dens, geom, rng, box, mask):
    s = geom.size
    if box is not None:
        x0, y0, x1, y1 = _box_px(box, s)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    else:
        cx, cy = _lung_point(geom, rng)
    r = rng.uniform(0.012, 0.022) * s
    dens += rng.uniform(0.18, 0.26) * _blur(_draw(s, lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r],
                                                                        fill=255)), 0.25 * r)
    return _norm_box(cx - r, cy - r, cx + r, cy + r, s)


@register("Mass", "Nodule/Mass")
def _mass(dens, geom, rng, box, mask):
    s = geom.size
    if box is not None:
        x0, y0, x1, y1 = _box_px(box, s)
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, float(np.clip(max(x1 - x0, y1 - y0) / 2, 0.03 * s, 0.09 * s))
    else:
        cx, cy = _lung_point(geom, rng)
        r = rng.uniform(0.035, 0.07) * s
    lobes = _draw(s, lambda d: [d.ellipse([cx + ox - r * k, cy + oy - r * k, cx + ox + r * k, cy + oy + r * k],
                                          fill=255)
                                for ox, oy, k in [(0, 0, 1.0)] + [(rng.normal(0, 0.3 * r), rng.normal(0, 0.3 * r),
                                                                   rng.uniform(0.5, 0.8)) for _ in range(3)]])
    dens += rng.uniform(0.2, 0.28) * _blur(lobes, 0.15 * r)
    return _norm_box(cx - r, cy - r, cx + r, cy + r, s)


@register("Pleural Effusion")
def _effusion(dens, geom, rng, box, mask):
    """Fluid layering at the lung base: a meniscus that blunts the costophrenic angle."""
    s = geom.size
    sides = [-1, 1] if rng.random() < 0.35 else [int(rng.choice([-1, 1]))]
    boxes = []
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    for side in sides:
        lung = geom.right_lung if side < 0 else geom.left_lung
        ys, xs = np.nonzero(lung)
        if len(ys) == 0:
            continue
        top, bottom = ys.min(), ys.max()
        level = bottom - rng.uniform(0.18, 0.40) * (bottom - top)
        lateral = xs.min() if side < 0 else xs.max()
        # meniscus: fluid climbs higher along the lateral chest wall
        climb = 0.10 * s * np.exp(-np.abs(xx - lateral) / (0.08 * s))
        fluid = _blur((yy > level - climb) & lung, 0.012 * s)
        # fluid is as dense as soft tissue: it replaces the air rather than adding to what is there
        dens[:] = np.maximum(dens, fluid * rng.uniform(0.46, 0.54))
        boxes.append((xs.min(), level - 0.1 * s, xs.max(), bottom))
    if not boxes:
        return None
    b = np.array(boxes)
    return _norm_box(b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max(), s)


@register("Pneumothorax")
def _pneumothorax(dens, geom, rng, box, mask):
    """Air outside the lung: no vessel markings, darker, with a thin visible pleural line.

    ``mask`` is a real SIIM pneumothorax mask resized to the image; without one, an apical-lateral
    crescent of the lung is used.
    """
    s = geom.size
    if mask is not None and mask.any():
        ptx = mask.astype(bool) & _blur(geom.lungs, 0.02 * s).__gt__(0.2)
        if ptx.sum() < 0.002 * s * s:
            ptx = mask.astype(bool)
    else:
        side = int(rng.choice([-1, 1]))
        lung = geom.right_lung if side < 0 else geom.left_lung
        shrunk = ndimage.binary_erosion(lung, iterations=max(1, int(rng.uniform(0.03, 0.07) * s)))
        # the collapsed lung drops away from the apex and the lateral wall
        ys = np.nonzero(lung.any(1))[0]
        upper = np.zeros_like(lung)
        upper[: int(ys.min() + rng.uniform(0.4, 0.7) * (ys.max() - ys.min()))] = True
        ptx = lung & ~shrunk & upper
    if not ptx.any():
        return None
    inner = ndimage.binary_erosion(ptx, iterations=1)
    # remove markings: flatten towards a dark air value
    air = float(np.percentile(dens[geom.lungs], 10)) - 0.05
    soft = _blur(ptx, 0.004 * s)
    dens[:] = dens * (1 - 0.8 * soft) + air * 0.8 * soft
    edge = ptx & ~inner
    dens += 0.10 * _blur(edge, 0.6)
    geom.extra["pneumothorax_mask"] = ptx
    ys, xs = np.nonzero(ptx)
    return _norm_box(xs.min(), ys.min(), xs.max(), ys.max(), s)


@register("Edema")
def _edema(dens, geom, rng, box, mask):
    """Bilateral perihilar (bat-wing) haze with interstitial lines."""
    s = geom.size
    x0, y0, x1, y1 = geom.thorax
    mid = geom.extra.get("mid", s / 2)
    haze = np.zeros((s, s), np.float32)
    for side in (-1, 1):
        haze += _blob(geom, mid + side * 0.22 * (x1 - x0), y0 + 0.5 * (y1 - y0), 0.14 * s, 0.16 * s, rng, 0.5)
    dens += rng.uniform(0.12, 0.18) * haze * _blur(geom.lungs, 0.01 * s)
    return _norm_box(x0, y0 + 0.25 * (y1 - y0), x1, y1, s)


@register("Atelectasis")
def _atelectasis(dens, geom, rng, box, mask):
    """Plate-like linear density at a lung base (or in the given box)."""
    s = geom.size
    if box is not None:
        x0, y0, x1, y1 = _box_px(box, s)
        cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, 0.06 * s)
    else:
        cx, cy = _lung_point(geom, rng, lower=True)
        w = rng.uniform(0.08, 0.14) * s
    ang = rng.uniform(-0.3, 0.3)
    dx, dy = np.cos(ang) * w / 2, np.sin(ang) * w / 2
    band = _draw(s, lambda d: d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255,
                                     width=max(2, int(0.02 * s))))
    dens += rng.uniform(0.18, 0.26) * _blur(band, 0.008 * s) * _blur(geom.lungs, 0.01 * s)
    return _norm_box(cx - w / 2, cy - 0.03 * s, cx + w / 2, cy + 0.03 * s, s)


@register("Fibrosis", "ILD")
def _fibrosis(dens, geom, rng, box, mask):
    """Reticular texture in the lower, peripheral lungs."""
    s = geom.size
    dist = ndimage.distance_transform_edt(geom.lungs)
    periph = geom.lungs & (dist < 0.06 * s)
    ys = np.nonzero(geom.lungs.any(1))[0]
    periph[: int(ys.min() + 0.45 * (ys.max() - ys.min()))] = False
    net = np.abs(smooth_noise(s, rng, 0.8)) > 1.0
    dens += rng.uniform(0.10, 0.15) * _blur(periph & net, 0.5) + 0.04 * _blur(periph, 0.02 * s)
    yy, xx = np.nonzero(periph)
    return _norm_box(xx.min(), yy.min(), xx.max(), yy.max(), s) if len(xx) else None


@register("Pleural Thickening", "Pleural Other")
def _pleural_thickening(dens, geom, rng, box, mask):
    s = geom.size
    side = int(rng.choice([-1, 1]))
    lung = geom.right_lung if side < 0 else geom.left_lung
    rim = lung & ~ndimage.binary_erosion(lung, iterations=max(1, int(0.012 * s)))
    ys = np.nonzero(lung.any(1))[0]
    cut = int(ys.min() + rng.uniform(0.3, 0.6) * (ys.max() - ys.min()))
    rim[cut:] = False
    dens += 0.2 * _blur(rim, 0.7)
    yy, xx = np.nonzero(rim)
    return _norm_box(xx.min(), yy.min(), xx.max(), yy.max(), s) if len(xx) else None


@register("Calcification")
def _calcification(dens, geom, rng, box, mask):
    s = geom.size
    pts = [_lung_point(geom, rng) for _ in range(rng.integers(1, 4))]
    r = 0.006 * s
    dots = _draw(s, lambda d: [d.ellipse([x - r, y - r, x + r, y + r], fill=255) for x, y in pts])
    dens += 0.35 * _blur(dots, 0.4)
    p = np.array(pts)
    return _norm_box(p[:, 0].min() - r, p[:, 1].min() - r, p[:, 0].max() + r, p[:, 1].max() + r, s)


@register("Aortic Enlargement", "Enlarged Cardiomediastinum")
def _mediastinum(dens, geom, rng, box, mask):
    s = geom.size
    mid = geom.extra.get("mid", s / 2)
    y0 = geom.thorax[1]
    w = rng.uniform(0.07, 0.10) * s
    knob = _draw(s, lambda d: d.ellipse([mid - w, y0 + 0.04 * s, mid + w * 1.3, y0 + 0.22 * s], fill=255))
    dens[:] = np.maximum(dens, 0.5 * _blur(knob, 0.01 * s))
    return _norm_box(mid - w, y0 + 0.04 * s, mid + 1.3 * w, y0 + 0.22 * s, s)


@register("Hernia")
def _hernia(dens, geom, rng, box, mask):
    """Hiatal hernia: a round retrocardiac density with an air-fluid level."""
    s = geom.size
    cx, cy = geom.heart_center
    r = 0.045 * s
    cy = cy + 0.3 * geom.heart_axes[1]
    blob = _draw(s, lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255))
    air = _draw(s, lambda d: d.chord([cx - r, cy - r, cx + r, cy + r], 180, 360, fill=255))
    dens += 0.12 * _blur(blob, 1) - 0.16 * _blur(air, 1)
    return _norm_box(cx - r, cy - r, cx + r, cy + r, s)


@register("Emphysema", "COPD")
def _emphysema(dens, geom, rng, box, mask):
    # Mostly drawn by the anatomy (long hyperlucent lungs, flat diaphragm); add bullae.
    s = geom.size
    cx, cy = _lung_point(geom, rng, lower=False)
    r = rng.uniform(0.02, 0.04) * s
    dens -= 0.08 * _blur(_draw(s, lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)), 1)
    x0, y0, x1, y1 = geom.thorax
    return _norm_box(x0, y0, x1, y1, s)


@register("Fracture")
def _fracture(dens, geom, rng, box, mask):
    """A rib broken across: a dark gap and a step in the rib band."""
    s = geom.size
    ribs = geom.extra.get("ribs")
    if ribs is None:
        return None
    ys, xs = np.nonzero((ribs > 0.5) & geom.lungs)
    if len(ys) == 0:
        return None
    i = rng.integers(len(ys))
    cx, cy = float(xs[i]), float(ys[i])
    w = 0.008 * s
    gap = _draw(s, lambda d: d.rectangle([cx - w, cy - 0.02 * s, cx + w, cy + 0.02 * s], fill=255))
    dens -= 0.08 * _blur(gap * (ribs > 0.2), 0.5)
    dens += 0.06 * _blur(np.roll(gap * (ribs > 0.2), int(0.01 * s), axis=0), 0.5)
    return _norm_box(cx - 3 * w, cy - 0.03 * s, cx + 3 * w, cy + 0.03 * s, s)


@register("Support Devices")
def _devices(dens, geom, rng, box, mask):
    """Tubes, lines, ECG electrodes and sometimes a pacemaker: thin, very dense objects."""
    s = geom.size
    mid = geom.extra.get("mid", s / 2)
    x0, y0, x1, y1 = geom.thorax
    kind = rng.choice(["et_ng", "line", "pacer", "ecg"], p=[0.35, 0.25, 0.15, 0.25])
    dev = _draw(s, lambda d: None)
    lw = max(1, int(0.008 * s))
    if kind == "et_ng":
        def draw(d):
            d.line([(mid, 0), (mid + 0.005 * s, y0 + 0.12 * s)], fill=255, width=lw)
            d.line([(mid - 0.01 * s, 0), (mid - 0.005 * s, y1), (mid + 0.1 * s, y1 + 0.08 * s)], fill=255,
                   width=lw)
        dev = _draw(s, draw)
        bbox = (mid - 0.02 * s, 0, mid + 0.1 * s, y1 + 0.08 * s)
    elif kind == "line":
        sx = x0 + 0.05 * s if rng.random() < 0.5 else x1 - 0.05 * s
        dev = _draw(s, lambda d: d.line([(sx, y0 - 0.03 * s), (mid + 0.2 * (sx - mid), y0 + 0.05 * s),
                                         (mid + 0.01 * s, y0 + 0.22 * s)], fill=255, width=lw))
        bbox = (min(sx, mid), y0 - 0.03 * s, max(sx, mid), y0 + 0.22 * s)
    elif kind == "pacer":
        px, py = x1 - 0.06 * s, y0 + 0.02 * s
        dev = _draw(s, lambda d: (d.rounded_rectangle([px - 0.04 * s, py - 0.025 * s, px + 0.04 * s, py + 0.025 * s],
                                                      radius=int(0.01 * s), fill=255),
                                  d.line([(px, py), (mid + 0.04 * s, y0 + 0.12 * s), geom.heart_center],
                                         fill=255, width=lw)))
        bbox = (geom.heart_center[0] - 0.02 * s, py - 0.03 * s, px + 0.04 * s, geom.heart_center[1])
    else:
        pts = [(x0 + rng.uniform(0, 1) * (x1 - x0), y0 + rng.uniform(0, 1) * (y1 - y0)) for _ in range(4)]
        r = 0.014 * s
        dev = _draw(s, lambda d: [d.ellipse([x - r, y - r, x + r, y + r], outline=255, width=lw) for x, y in pts])
        p = np.array(pts)
        bbox = (p[:, 0].min() - r, p[:, 1].min() - r, p[:, 0].max() + r, p[:, 1].max() + r)
    dens[:] = np.maximum(dens, 0.92 * _blur(dev, 0.5))
    return _norm_box(*bbox, s)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a binary mask to ``size`` × ``size``."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return np.asarray(img) > 127
