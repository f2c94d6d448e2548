"""The embedded default data set: a synthetic multi-site CXR corpus as real as the packages allow.

For each site, rows (labels, demographics, view, report, lesion boxes) are sampled from the real
metadata table of a public data set that torchxrayvision ships, through that data set's site
adapter, so prevalence, co-occurrence and label heterogeneity are real. Each row is rendered as a
chest radiograph around a real lung mask, with its findings drawn where they occur, acquired with
the site's signature and written as a de-identified DICOM file. Everything is deterministic in
``seed``: the same call gives byte-identical images.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import multiprocessing as mp
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from ..labels import canonical_name
from ..manifest import Manifest, assign_splits
from ..sites.tables import source_table
from ..stats import site_statistics
from .acquisition import DEFAULT_PROFILE, PROFILES, SiteProfile, acquire, to_stored, write_dicom
from .anatomy import load_lung_atlas, render_frontal, render_lateral
from .findings import render_finding, resize_mask

# Data sets whose real tables torchxrayvision ships, so the generator can sample from them.
SOURCES = ("nih", "chexpert", "vindr", "openi", "siim", "padchest", "rsna")
DEFAULT_SITES = ("nih", "chexpert", "vindr", "openi", "siim")


@dataclass
class SiteSpec:
    """One synthetic site: its name, the public table it samples from, how many images, its profile."""

    name: str
    source: str
    n: int
    profile: SiteProfile

    @classmethod
    def parse(cls, item: str | dict, n_default: int) -> SiteSpec:
        if isinstance(item, str):
            item = {"name": item}
        item = dict(item)
        name = item.pop("name")
        source = item.pop("source", name)
        if source not in SOURCES:
            raise ValueError(f"synthetic site '{name}': unknown source '{source}'; expected one of {SOURCES}")
        n = int(item.pop("n", n_default))
        profile = PROFILES.get(source, DEFAULT_PROFILE).with_overrides(**item.pop("profile", {}))
        if item:
            raise ValueError(f"synthetic site '{name}': unknown keys {sorted(item)}")
        return cls(name, source, n, profile)


# -- real tables ------------------------------------------------------------------------------
def siim_masks(image_ids: Sequence[str], size: int) -> dict[str, np.ndarray]:
    """Real SIIM pneumothorax masks (decoded from the shipped RLE table) for the given images."""
    from ..sites.adapters import decode_siim_rle, xrv_table

    csv = pd.read_csv(xrv_table("siim-pneumothorax-train-rle.csv.gz"))
    csv.columns = [c.strip() for c in csv.columns]
    out = {}
    for iid, group in csv[csv["ImageId"].isin(set(image_ids))].groupby("ImageId"):
        m = np.zeros((1024, 1024), bool)
        for rle in group["EncodedPixels"]:  # one row per connected region
            m |= decode_siim_rle(str(rle), 1024, 1024).astype(bool)
        if m.any():
            out[iid] = resize_mask(m, size)
    return out


# -- rendering one image ----------------------------------------------------------------------
def _pseudonym(site: str, real_id: str) -> str:
    return f"{site}-{hashlib.sha1(f'{site}/{real_id}'.encode()).hexdigest()[:10]}"


def render_one(task: dict[str, Any]) -> dict[str, Any]:
    """Render, acquire and write one image; returns its manifest record (without split)."""
    row, spec, seed, idx = task["row"], task["spec"], task["seed"], task["idx"]
    size, out = task["render_size"], Path(task["out"])
    rng = np.random.default_rng([seed, task["site_index"], idx])
    atlas = load_lung_atlas(size)
    names = task["label_names"]
    canon = [canonical_name(n) for n in names]
    labels = row["labels"]
    # uncertain labels are drawn half of the time: the reader's uncertainty was real too
    positives = [j for j, v in enumerate(labels) if v == 1 or (v == -1 and rng.random() < 0.5)]
    pos_names = {canon[j] for j in positives}
    view = row.get("view") or "PA"
    ctr = rng.uniform(0.53, 0.64) if "Cardiomegaly" in pos_names else float(np.clip(rng.normal(0.44, 0.03),
                                                                                     0.36, 0.5))
    emph = bool(pos_names & {"Emphysema", "COPD"})
    if view == "LATERAL":
        dens, geom = render_lateral(atlas, size, rng, ctr=ctr)
    else:
        dens, geom = render_frontal(atlas, size, rng, sex=row.get("sex"), age=row.get("age"), view=view,
                                    ctr=ctr, emphysema=emph)
    real_boxes = {canonical_name(b["label"]): (b["x0"], b["y0"], b["x1"], b["y1"])
                  for b in (row.get("boxes") or [])}
    boxes = []
    for j in positives:
        name = canon[j]
        if name == "Cardiomegaly":
            (hx, hy), (hw, hh) = geom.heart_center, geom.heart_axes
            box = tuple(float(np.clip(c / size, 0, 1)) for c in (hx - hw, hy - hh, hx + hw, hy + hh))
        else:
            box = render_finding(name, dens, geom, rng, real_boxes.get(name),
                                 task.get("ptx_mask") if name == "Pneumothorax" else None)
        if box is not None:
            boxes.append({"label": names[j], "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3]})
    masks = [geom.lungs]
    ptx = geom.extra.get("pneumothorax_mask")
    if ptx is not None:
        masks.append(ptx)
    v, masks, info = acquire(dens, spec.profile, rng, masks)
    stored, hdr = to_stored(v, spec.profile, rng)
    if info["markers"]:
        hdr["BurnedInAnnotation"] = "YES"
    image_id = f"{spec.name}-{idx:06d}"
    patient = _pseudonym(spec.name, str(row["patient_id"]))
    study_date = _dt.date(2008, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 12 * 365)))
    rel = f"images/{image_id}.dcm"
    write_dicom(out / rel, stored, spec.profile, uid_seed=[seed, spec.name, idx], patient_id=patient,
                sex=row.get("sex"), age=row.get("age"), view=view, study_date=study_date, header=hdr)
    lung_rel = f"masks/lungs/{image_id}.png"
    (out / lung_rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(masks[0].astype(np.uint8) * 255).save(out / lung_rel)
    mask_rel = None
    if len(masks) > 1 and masks[1].any():
        mask_rel = f"masks/pneumothorax/{image_id}.png"
        (out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(masks[1].astype(np.uint8) * 255).save(out / mask_rel)
    return {
        "site": spec.name, "image_id": image_id, "path": rel, "patient_id": patient,
        "study_id": _pseudonym(spec.name, f"{row['patient_id']}/{row.get('study_id') or row['image_id']}"),
        "sex": row.get("sex"), "age": row.get("age"), "view": view, "report": row.get("report"),
        "labels": list(labels), "boxes": boxes or None, "mask_path": mask_rel, "lung_mask_path": lung_rel,
    }


def sample_rows(table: Manifest, n: int, rng: np.random.Generator, enrich: dict | None = None) -> np.ndarray:
    """Sorted row indices of ``n`` rows of a source table: at random, or first enough positives of each
    class in ``enrich["classes"]`` (canonical names) to reach ``enrich["min_rate"]`` of ``n``, then the
    rest at random."""
    n = min(int(n), len(table))
    if not enrich or not enrich.get("classes"):
        return np.sort(rng.choice(len(table), size=n, replace=False))
    labels = table.label_matrix()
    canon = [canonical_name(c) for c in table.label_names]
    need = int(np.ceil(float(enrich.get("min_rate", 0.1)) * n))
    chosen: set[int] = set()
    for name in enrich["classes"]:
        c = canonical_name(name)
        if c not in canon:
            continue  # this site's table does not label the class
        col = labels[:, canon.index(c)]
        pos = np.flatnonzero(col == 1)
        have = sum(1 for i in chosen if col[i] == 1)
        extra = [i for i in rng.permutation(pos) if i not in chosen][:max(0, need - have)]
        chosen.update(int(i) for i in extra)
    chosen_list = sorted(chosen)[:n]
    rest = np.setdiff1d(np.arange(len(table)), chosen_list)
    fill = rng.choice(rest, size=n - len(chosen_list), replace=False)
    return np.sort(np.concatenate([np.asarray(chosen_list, dtype=np.int64), fill]))


# -- a whole corpus -----------------------------------------------------------------------------
def _default_sigterm() -> None:
    """A forked worker must die on the SIGTERM that ``Pool`` ends it with: a handler inherited from the parent
    (Ray installs one in a process that runs a node, which waits for the node to drain) would hang the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def synthesize(out: str | Path, sites: Sequence[str | dict] = DEFAULT_SITES, *, n_per_site: int = 400,
               seed: int = 0, render_size: int = 256, workers: int = 2, overwrite: bool = False,
               preview: bool = True, progress: bool = True, enrich: dict | None = None,
               split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, Any]:
    """Write one folder per site (DICOM images, masks, ``manifest.parquet``, preview) under ``out``.

    ``enrich`` (``{"classes": [...], "min_rate": 0.12}``) samples rows so that each named class, where
    the site's table has it, is positive in at least that share of the site's images (the rest are
    drawn at random; co-occurrence within the drawn rows stays real). It changes prevalence on
    purpose: a study needs enough test positives per disease to estimate an AUC. ``split_fractions``
    are the train / val / test shares (patient-disjoint). Returns the corpus statistics (also written
    to ``out/stats.json``).
    """
    out = Path(out)
    specs = [SiteSpec.parse(s, n_per_site) for s in sites]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"synthetic site names must be unique: {[s.name for s in specs]}")
    load_lung_atlas(render_size)  # build the cache once, before workers fork
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"seed": seed, "n_per_site": n_per_site, "render_size": render_size,
                             "enrich": enrich, "split_fractions": list(split_fractions), "sites": {}}
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    for si, spec in enumerate(specs):
        site_dir = out / spec.name
        if site_dir.exists():
            if not overwrite and (site_dir / "manifest.parquet").exists():
                raise FileExistsError(f"{site_dir} already holds a site; pass overwrite=true to replace it")
            shutil.rmtree(site_dir)
        table = source_table(spec.source)
        rng = np.random.default_rng([seed, si, 7919])
        pick = sample_rows(table, spec.n, rng, enrich)
        rows = table.table.take(pick).to_pandas().to_dict("records")
        for r in rows:
            r["labels"] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)
                           for v in r["labels"]]
            r["boxes"] = list(r["boxes"]) if r.get("boxes") is not None else None
            for k in ("sex", "view", "report", "study_id", "age"):  # pandas gives NaN for nulls
                r[k] = None if r.get(k) is None or (not isinstance(r[k], str) and pd.isna(r[k])) else r[k]
            r["age"] = None if r["age"] is None else float(r["age"])
        ptx = siim_masks([r["image_id"] for r in rows], render_size) if spec.source == "siim" else {}
        tasks = [{"row": r, "spec": spec, "seed": seed, "idx": i, "site_index": si, "render_size": render_size,
                  "out": str(site_dir), "label_names": table.label_names, "ptx_mask": ptx.get(r["image_id"])}
                 for i, r in enumerate(rows)]
        desc = f"synth {spec.name:<10}"
        if workers > 1:
            with ctx.Pool(workers, initializer=_default_sigterm) as pool:
                records = list(tqdm(pool.imap(render_one, tasks, chunksize=8), total=len(tasks), desc=desc,
                                    disable=not progress))
        else:
            records = [render_one(t) for t in tqdm(tasks, desc=desc, disable=not progress)]
        splits = assign_splits([r["patient_id"] for r in records], salt=spec.name, fractions=tuple(split_fractions))
        for r, s in zip(records, splits):
            r["split"] = s
        meta = {"name": spec.name, "adapter": "synthetic", "source": spec.source, "seed": seed,
                "profile": {k: v for k, v in spec.profile.__dict__.items() if k != "extra_header"},
                "description": f"raycxr synthetic site sampled from the real {spec.source} table"}
        manifest = Manifest.from_records(records, table.label_names, meta)
        manifest.write(site_dir / "manifest.parquet")
        stats["sites"][spec.name] = site_statistics(manifest)
        if preview:
            preview_grid(manifest, site_dir, site_dir / "preview.png")
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def preview_grid(manifest: Manifest, root: Path, path: Path, n: int = 12) -> Path:
    """A grid of the site's first images as the reader sees them, titled with their findings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..readers import read_image

    df = manifest.to_pandas().head(n)
    cols = 4
    rows = int(np.ceil(len(df) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.7))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (_, r) in zip(np.ravel(axes), df.iterrows()):
        ax.imshow(read_image(root / r["path"]), cmap="gray", vmin=0, vmax=1)
        pos = [manifest.label_names[j] for j, v in enumerate(r["labels"]) if v == 1]
        title = ", ".join(pos[:2]) + ("…" if len(pos) > 2 else "") if pos else "no finding"
        ax.set_title(f"{r['view']} · {title}", fontsize=7)
        for b in r["boxes"] if r["boxes"] is not None else []:
            h, w = ax.get_images()[0].get_array().shape
            ax.add_patch(plt.Rectangle((b["x0"] * w, b["y0"] * h), (b["x1"] - b["x0"]) * w,
                                       (b["y1"] - b["y0"]) * h, fill=False, ec="tab:red", lw=0.7))
    fig.suptitle(f"site '{manifest.site}' ({manifest.site_meta.get('source', '')} table)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

