"""Check a registered site end to end: YAML, manifest schema, files present, optionally every image readable.

Files that are missing or unreadable go to the site's quarantine with the reason; validation
reports them and the site stays usable (training skips them), so nothing is lost silently.

Images are read in worker processes (:class:`raycxr_runtime.isolate.IsolatedPool`): a decoder
that kills its worker (a Rust ``PanicException``, a segfault, the OOM killer) or runs past
``image_timeout`` quarantines that one file with the reason, and the run goes on. The
``multiprocessing.Pool`` used before waited forever for a dead worker's result.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import Any

from tqdm import tqdm

from raycxr_runtime.isolate import IsolatedPool

from .manifest import ManifestError
from .quarantine import Quarantine, pixel_problem
from .readers import ImageReadError, read_image
from .sites.config import SiteConfig

IMAGE_TIMEOUT = 120.0  # seconds one image may take to decode before it is given up as failed


def _try_read(image_id: str, rel: str, full: str) -> tuple[str, str, str | None]:
    try:
        return image_id, rel, pixel_problem(read_image(full))  # NaN / constant pixels: quarantined here,
    except ImageReadError as e:                                 # not met as a NaN loss in training
        return image_id, rel, e.reason


def validate_site(site: SiteConfig, *, check_images: bool = False, workers: int = 2, progress: bool = True,
                  image_timeout: float | None = IMAGE_TIMEOUT) -> dict[str, Any]:
    """Return ``{"ok", "message", "images", "quarantined"}``; quarantine what cannot be read."""
    try:
        manifest = site.load_manifest()
    except (ManifestError, FileNotFoundError) as e:
        return {"ok": False, "message": str(e), "images": 0, "quarantined": 0}
    df = manifest.to_pandas()
    wrong = sorted(set(df["site"]) - {site.name})
    if wrong:  # a copied site: training looks rows up by the YAML's name and would fail with a KeyError
        return {"ok": False, "images": len(df), "quarantined": 0,
                "message": f"manifest {site.manifest_file} names site(s) {wrong}, but this site is '{site.name}': "
                           f"run `raycxr sites build {site.name}` to rewrite it under its own name"}
    if site.pair_types is not None:  # a declared UmiF pair type the manifest cannot supply
        from .dataset import site_pair_types
        from .sites.config import SiteConfigError

        try:
            site_pair_types(manifest, site.pair_types, source=str(site.yaml_path or site.name))
        except SiteConfigError as e:
            return {"ok": False, "message": str(e), "images": len(df), "quarantined": 0}
    q = Quarantine(site.quarantine_path, site=site.name)
    jobs = []
    missing = 0
    for image_id, rel in zip(df["image_id"], df["path"]):
        full = Path(site.root) / rel
        if not full.is_file():
            q.record(image_id, rel, "file not found")
            missing += 1
        elif check_images:
            jobs.append((image_id, rel, str(full)))
    unreadable = 0
    if jobs:
        # fork: starts fast and the workers share the parent's imports; spawn where fork is absent
        ctx = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with IsolatedPool(f"{__name__}:_try_read", workers=max(1, workers), timeout=image_timeout,
                          context=ctx) as pool:
            for (image_id, rel, _), out in tqdm(zip(jobs, pool.imap(jobs)), total=len(jobs),
                                                desc=f"read {site.name}", disable=not progress):
                reason = out.value[2] if out.ok else f"reading failed: {out.error}"
                if reason is not None:
                    q.record(image_id, rel, reason)
                    unreadable += 1
    msg = f"{len(df)} images, {len(manifest.label_names)} classes"
    if missing or unreadable:
        msg += f"; quarantined {missing} missing and {unreadable} unreadable files (see {site.quarantine_path})"
    elif check_images:
        msg += "; every image reads"
    return {"ok": True, "message": msg, "images": len(df), "quarantined": len(q)}


def shared_patients(sites: Mapping[str, SiteConfig]) -> list[dict[str, Any]]:
    """Patients registered at two sites, per pair: ``{"sites", "shared", "different_split"}``.

    Patient ids are compared between sites of one data set (the same split salt, e.g. a copy of NIH
    under another name) and, across any sites, for pseudonymous DICOM ids (``pt-...``, the hashed
    PatientID), which name one person wherever they appear. A shared patient in different splits
    (train at one site, test at the other) leaks into evaluation.
    """
    tables = {}
    for name, site in sites.items():
        if not site.has_manifest():
            continue
        try:
            m = site.load_manifest()
        except (ManifestError, FileNotFoundError):
            continue
        df = m.to_pandas()
        tables[name] = (m.site_meta.get("split_salt"), dict(zip(df["patient_id"], df["split"])))
    out = []
    for a, b in combinations(sorted(tables), 2):
        (salt_a, pa), (salt_b, pb) = tables[a], tables[b]
        same_set = salt_a is not None and salt_a == salt_b
        common = [p for p in pa.keys() & pb.keys() if same_set or p.startswith("pt-")]
        if common:
            out.append({"sites": (a, b), "shared": len(common),
                        "different_split": sum(pa[p] != pb[p] for p in common)})
    return out
