"""Check a registered site end to end: YAML, manifest schema, files present, optionally every image readable.

Files that are missing or unreadable go to the site's quarantine with the reason; validation
reports them and the site stays usable (training skips them), so nothing is lost silently.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .manifest import ManifestError
from .quarantine import Quarantine
from .readers import ImageReadError, read_image
from .sites.config import SiteConfig


def _try_read(args: tuple[str, str, str]) -> tuple[str, str, str | None]:
    image_id, rel, full = args
    try:
        read_image(full)
        return image_id, rel, None
    except ImageReadError as e:
        return image_id, rel, e.reason


def validate_site(site: SiteConfig, *, check_images: bool = False, workers: int = 2,
                  progress: bool = True) -> dict[str, Any]:
    """Return ``{"ok", "message", "images", "quarantined"}``; quarantine what cannot be read."""
    try:
        manifest = site.load_manifest()
    except (ManifestError, FileNotFoundError) as e:
        return {"ok": False, "message": str(e), "images": 0, "quarantined": 0}
    q = Quarantine(site.quarantine_path, site=site.name)
    df = manifest.to_pandas()
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
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(max(1, workers)) as pool:
            for image_id, rel, reason in tqdm(pool.imap_unordered(_try_read, jobs, chunksize=16), total=len(jobs),
                                              desc=f"read {site.name}", disable=not progress):
                if reason is not None:
                    q.record(image_id, rel, reason)
                    unreadable += 1
    msg = f"{len(df)} images, {len(manifest.label_names)} classes"
    if missing or unreadable:
        msg += f"; quarantined {missing} missing and {unreadable} unreadable files (see {site.quarantine_path})"
    elif check_images:
        msg += "; every image reads"
    return {"ok": True, "message": msg, "images": len(df), "quarantined": len(q)}
