"""Chest anatomy for the synthetic corpus, built around real lung masks.

The lung fields come from the 500-odd real lung segmentations that torchxrayvision ships
(``semantic_masks_v7labs_lungs.zip``). Around them we draw the rest of a chest radiograph as a
*density* map in [0, 1] (bright = attenuating, MONOCHROME2 convention): soft-tissue body, heart and
mediastinum, spine, posterior ribs, clavicles, diaphragm, lung vessel markings, breast shadows.
Findings (``findings.py``) then edit the density map, and the site's acquisition chain
(``acquisition.py``) turns it into stored pixel values.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..config import cache_dir

LUNG_MASKS_ZIP = "semantic_masks_v7labs_lungs.zip"


def _xrv_data_dir() -> str:
    import torchxrayvision  # imported lazily: heavy, and only the data folder is needed

    return os.path.join(os.path.dirname(torchxrayvision.__file__), "data")


@lru_cache(maxsize=4)
def load_lung_atlas(size: int = 256) -> np.ndarray:
    """Real lung masks (see :func:`build_lung_atlas`), cached on disk as packed bits."""
    cache = os.path.join(cache_dir(), f"lung_atlas_{size}.npz")
    if os.path.exists(cache):
        with np.load(cache) as z:
            return np.unpackbits(z["bits"], count=int(np.prod(z["shape"]))).reshape(z["shape"]).astype(bool)
    atlas = build_lung_atlas(size)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp.npz"
    np.savez_compressed(tmp, bits=np.packbits(atlas), shape=np.array(atlas.shape))
    os.replace(tmp, cache)
    return atlas


def build_lung_atlas(size: int = 256) -> np.ndarray:
    """Real lung masks, cleaned and framed: ``(M, size, size)`` bool.

    Each mask keeps its two largest connected components (left and right lung; this drops the
    stray annotation marks some files carry) and is cropped to the lungs' bounding box, then
    resized so the lungs fill the frame; :func:`place_lungs` positions them in the chest.
    Masks that are not two plausible, side-by-side lungs are skipped.
    """
    path = os.path.join(_xrv_data_dir(), LUNG_MASKS_ZIP)
    out = []
    with zipfile.ZipFile(path) as z:
        for name in sorted(n for n in z.namelist() if not n.endswith("/")):
            try:
                img = Image.open(io.BytesIO(z.read(name))).convert("L")
            except Exception:  # noqa: BLE001 - a broken mask file is skipped; the atlas is large
                continue
            a = np.asarray(img.resize((192, 192), Image.BILINEAR)) > 127
            lab, k = ndimage.label(a)
            if k < 2:
                continue
            areas = ndimage.sum(a, lab, range(1, k + 1))
            o = np.argsort(areas)[::-1][:2]
            if areas[o[1]] / a.size < 0.04 or areas[o[0]] / areas[o[1]] > 2.2:
                continue
            (y1, x1), (y2, x2) = (ndimage.center_of_mass(a, lab, i + 1) for i in o)
            if abs(x1 - x2) < 45 or abs(y1 - y2) > 30:
                continue
            m = np.isin(lab, o + 1)
            ys, xs = np.nonzero(m)
            crop = m[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
            crop_img = Image.fromarray(crop.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
            out.append(np.asarray(crop_img) > 127)
    if not out:
        raise RuntimeError(f"no usable lung masks in {path}")
    return np.stack(out)


@dataclass
class ChestGeometry:
    """Where things are in one synthetic radiograph (pixel units, image ``size`` × ``size``)."""

    size: int
    lungs: np.ndarray  # bool (S, S)
    right_lung: np.ndarray  # patient's right = image left
    left_lung: np.ndarray
    thorax: tuple[int, int, int, int]  # x0, y0, x1, y1 of the lungs' box
    heart_center: tuple[float, float]
    heart_axes: tuple[float, float]
    view: str
    extra: dict = field(default_factory=dict)

def place_lungs(atlas_mask: np.ndarray, size: int, rng: np.random.Generator, *,
                lung_height: float = 1.0) -> np.ndarray:
    """Position one atlas mask in a chest frame with a random scale, shift and small rotation."""
    w = rng.uniform(0.62, 0.74) * size
    h = rng.uniform(0.56, 0.66) * size * lung_height
    x0 = (size - w) / 2 + rng.normal(0, 0.015 * size)
    y0 = rng.uniform(0.10, 0.15) * size
    img = Image.fromarray(atlas_mask.astype(np.uint8) * 255).resize((max(int(w), 8), max(int(h), 8)),
                                                                    Image.BILINEAR)
    img = img.rotate(rng.normal(0, 2.0), resample=Image.BILINEAR, expand=False)
    canvas = Image.new("L", (size, size))
    canvas.paste(img, (int(x0), int(y0)))
    return np.asarray(canvas) > 127


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide kernels run at half resolution (4x fewer pixels, the same look)."""
    a = a.astype(np.float32)
    if sigma <= 0:
        return a
    if sigma < 2 or a.shape[0] % 2 or a.shape[1] % 2:
        return ndimage.gaussian_filter(a, sigma, truncate=3.0)
    h, w = a.shape
    small = a.reshape(h // 2, 2, w // 2, 2).mean((1, 3))
    small = ndimage.gaussian_filter(small, sigma / 2, truncate=3.0)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR))


def _draw(size: int, fn) -> np.ndarray:
    """Rasterise with PIL (fast, anti-aliased enough after a small blur) into a float mask."""
    img = Image.new("L", (size, size))
    fn(ImageDraw.Draw(img))
    return np.asarray(img, dtype=np.float32) / 255.0


def smooth_noise(size: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit std: texture for vessels and parenchyma."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def render_frontal(atlas: np.ndarray, size: int, rng: np.random.Generator, *, sex: str | None,
                   age: float | None, view: str, ctr: float, emphysema: bool = False) -> tuple[
                       np.ndarray, ChestGeometry]:
    """Density map of a normal frontal chest (PA or AP) and its geometry.

    ``ctr`` is the cardiothoracic ratio (heart width / thorax width): about 0.45 normal,
    above 0.5 is cardiomegaly. AP views magnify the heart (it is far from the detector).
    Emphysema lengthens the lungs and flattens the diaphragm.
    """
    s = size
    lungs = place_lungs(atlas[rng.integers(len(atlas))], s, rng, lung_height=1.12 if emphysema else 1.0)
    lab, _ = ndimage.label(lungs)
    cols = np.nonzero(lungs.any(0))[0]
    rows = np.nonzero(lungs.any(1))[0]
    x0, x1, y0, y1 = cols.min(), cols.max(), rows.min(), rows.max()
    mid = (x0 + x1) / 2
    xs = np.arange(s)[None, :]
    right_lung, left_lung = lungs & (xs < mid), lungs & (xs >= mid)
    tw = x1 - x0
    age = 50.0 if age is None or np.isnan(age) else float(age)

    # Body: soft tissue from the neck down, widest at the lower chest; shoulder girdle and upper
    # arms at the top corners.
    body = _draw(s, lambda d: (
        d.ellipse([x0 - 0.10 * s, y0 - 0.02 * s, x1 + 0.10 * s, s * 1.45], fill=255),
        d.rectangle([mid - 0.10 * s, 0, mid + 0.10 * s, y0 + 0.05 * s], fill=255),
        d.polygon([(mid - 0.12 * s, y0 - 0.09 * s), (x0 - 0.16 * s, y0 - 0.02 * s), (x0 - 0.20 * s, s),
                   (x1 + 0.20 * s, s), (x1 + 0.16 * s, y0 - 0.02 * s), (mid + 0.12 * s, y0 - 0.09 * s)],
                  fill=255),
    ))
    body = _blur(body, 0.012 * s)
    arms = _draw(s, lambda d: (
        d.ellipse([x0 - 0.17 * s, y0 - 0.06 * s, x0 - 0.03 * s, y0 + 0.08 * s], fill=255),
        d.ellipse([x1 + 0.03 * s, y0 - 0.06 * s, x1 + 0.17 * s, y0 + 0.08 * s], fill=255),
    ))
    dens = 0.04 + 0.46 * body + 0.12 * _blur(arms, 0.01 * s)
    if sex == "F":
        breasts = _draw(s, lambda d: (
            d.ellipse([x0 - 0.02 * s, y1 - 0.28 * s, mid - 0.04 * s, y1 + 0.02 * s], fill=255),
            d.ellipse([mid + 0.04 * s, y1 - 0.28 * s, x1 + 0.02 * s, y1 + 0.02 * s], fill=255),
        ))
        dens += 0.06 * _blur(breasts, 0.03 * s)

    # Lungs: air lowers density, most in the middle of each field (the lung is thickest there);
    # vessel markings branch out from the hila and fade towards the periphery.
    lung_soft = _blur(lungs, 0.006 * s)
    depth = np.clip(_blur(lungs, 0.04 * s) * 2.0 - 0.6, 0, 1) * lungs
    dens -= (0.24 * lung_soft + 0.10 * depth) * (1.15 if emphysema else 1.0)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    hila = [(mid - 0.14 * tw, y0 + 0.42 * (y1 - y0)), (mid + 0.14 * tw, y0 + 0.40 * (y1 - y0))]
    r = np.minimum(*[np.hypot(xx - hx, yy - hy) for hx, hy in hila]) / s
    vessels = np.clip(smooth_noise(s, rng, 0.9), 0, None) * 0.4 + np.clip(smooth_noise(s, rng, 2.2), 0, None)
    marking = np.exp(-r / (0.13 if not emphysema else 0.07))
    dens += lung_soft * (0.035 * vessels * marking + 0.06 * np.exp(-r / 0.05)) * (0.5 if emphysema else 1.0)

    # Heart: soft-tissue dense (it hides the lung behind it), low and to the patient's left
    # (image right), resting on the diaphragm; AP projection magnifies it.
    mag = 1.12 if view == "AP" else 1.0
    hw = ctr * tw * mag / 2
    hh = (0.11 + 0.05 * ctr) * s * mag
    hc = (mid + 0.22 * hw, y1 - 0.85 * hh)
    heart = _draw(s, lambda d: d.ellipse([hc[0] - hw, hc[1] - hh, hc[0] + hw, hc[1] + hh * 1.3], fill=255))
    heart = _blur(heart, 0.008 * s)
    # Mediastinum (trachea darker in its middle) and the aortic knob.
    medi = _draw(s, lambda d: (
        d.rectangle([mid - 0.055 * s, 0, mid + 0.05 * s, hc[1]], fill=255),
        d.ellipse([mid + 0.015 * s, y0 + 0.08 * s, mid + 0.10 * s, y0 + 0.16 * s], fill=255),
    ))
    medi = _blur(medi, 0.010 * s)
    soft = 0.04 + 0.46 * body
    dens = np.maximum(dens, soft * np.maximum(heart, medi) + 0.05 * heart)
    trachea = np.exp(-((xx - mid) / (0.012 * s)) ** 2) * (yy < y0 + 0.2 * s) * (yy > 0.02 * s)
    dens -= 0.12 * _blur(trachea, 0.004 * s)

    # Diaphragm and abdomen below the lungs: uniformly dense; right dome higher (liver).
    below = np.zeros((s, s), np.float32)
    for lung, lift in ((right_lung, 0.02 * s), (left_lung, 0.0)):
        c = np.nonzero(lung.any(0))[0]
        if len(c) == 0:
            continue
        # lowest lung row in each column (y1 where the column has no lung)
        bottom = np.where(lung.any(0), s - 1 - np.argmax(lung[::-1], axis=0), y1)
        mask = (yy > bottom[None, :] - lift) & (xx >= c.min()) & (xx <= c.max())
        below = np.maximum(below, mask.astype(np.float32))
    dens += 0.06 * _blur(below, 0.01 * s) * body

    # Spine: a central band with vertebral bodies every ~4 % of the height.
    spine = np.exp(-((xx - mid) / (0.035 * s)) ** 2) * (0.75 + 0.25 * np.cos(yy / (0.04 * s) * 2 * np.pi))
    dens += 0.07 * spine * body * (1 - 0.5 * heart)

    # Posterior ribs: arcs across each lung, bright thin bands; clavicles at the top.
    n_ribs = 10
    rib_w = max(1, int(0.018 * s))
    ribs = _draw(s, lambda d: [
        d.line(_rib_points(side, k, n_ribs, x0, x1, mid, y0, y1, s), fill=255, width=rib_w, joint="curve")
        for side in (-1, 1) for k in range(n_ribs)
    ])
    clav = _draw(s, lambda d: [
        d.line([(mid + side * 0.04 * s, y0 + 0.05 * s), (mid + side * 0.30 * s, y0 - 0.01 * s)],
               fill=255, width=max(2, int(0.025 * s)))
        for side in (-1, 1)
    ])
    bones = _blur(ribs, 0.004 * s) * (0.06 + 0.002 * max(0.0, 70 - age) / 10) + 0.11 * _blur(clav, 0.005 * s)
    dens += bones * body

    geom = ChestGeometry(s, lungs, right_lung, left_lung, (int(x0), int(y0), int(x1), int(y1)),
                         hc, (hw, hh), view)
    geom.extra.update(ribs=ribs, n_ribs=n_ribs, mid=mid)
    return np.clip(dens, 0, 1).astype(np.float32), geom


def _rib_points(side: int, k: int, n: int, x0: float, x1: float, mid: float, y0: float, y1: float,
                s: int) -> list[tuple[float, float]]:
    """A posterior rib: from the spine, curving up and out, then down along the chest wall."""
    yk = y0 + (k + 0.3) / n * (y1 - y0) * 0.95
    lateral = x0 - 0.02 * s if side < 0 else x1 + 0.02 * s
    pts = []
    for t in np.linspace(0, 1, 12):
        x = mid + side * 0.03 * s + t * (lateral - (mid + side * 0.03 * s))
        y = yk - 0.06 * s * np.sin(np.pi * t * 0.8) + 0.05 * s * t**2
        pts.append((float(x), float(y)))
    return pts


def render_lateral(atlas: np.ndarray, size: int, rng: np.random.Generator, *, ctr: float) -> tuple[
        np.ndarray, ChestGeometry]:
    """Density map of a lateral chest: one superimposed lung field, spine posterior (image right),
    heart anterior-inferior (image left). Lung shape from one real lung, mirrored and widened."""
    s = size
    m = atlas[rng.integers(len(atlas))]
    half = m[:, : m.shape[1] // 2]
    field_img = Image.fromarray(half.astype(np.uint8) * 255).resize(
        (int(rng.uniform(0.55, 0.65) * s), int(rng.uniform(0.6, 0.68) * s)), Image.BILINEAR)
    canvas = Image.new("L", (s, s))
    x0 = int(0.17 * s + rng.normal(0, 0.01 * s))
    y0 = int(0.12 * s)
    canvas.paste(field_img, (x0, y0))
    lungs = np.asarray(canvas) > 127
    rows, cols = np.nonzero(lungs.any(1))[0], np.nonzero(lungs.any(0))[0]
    lx0, lx1, ly0, ly1 = cols.min(), cols.max(), rows.min(), rows.max()
    body = _blur(_draw(s, lambda d: d.ellipse([lx0 - 0.08 * s, ly0 - 0.1 * s, lx1 + 0.12 * s, s * 1.3],
                                               fill=255)), 0.012 * s)
    dens = 0.04 + 0.58 * body
    dens -= 0.30 * _blur(lungs, 0.006 * s)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    hw, hh = ctr * (lx1 - lx0) * 0.55, 0.16 * s
    hc = (lx0 + 0.35 * (lx1 - lx0), ly1 - 0.6 * hh)
    heart = _blur(_draw(s, lambda d: d.ellipse([hc[0] - hw, hc[1] - hh, hc[0] + hw, hc[1] + hh], fill=255)),
                  0.012 * s)
    dens += 0.16 * heart
    spine_x = lx1 + 0.05 * s
    spine = np.exp(-((xx - spine_x) / (0.05 * s)) ** 2) * (0.7 + 0.3 * np.cos(yy / (0.045 * s) * 2 * np.pi))
    dens += 0.16 * spine * body
    dens += 0.012 * smooth_noise(s, rng, 2.0) * _blur(lungs, 0.01 * s)
    geom = ChestGeometry(s, lungs, lungs, lungs, (int(lx0), int(ly0), int(lx1), int(ly1)), hc, (hw, hh),
                         "LATERAL")
    geom.extra.update(mid=(lx0 + lx1) / 2)
    return np.clip(dens, 0, 1).astype(np.float32), geom
