"""The real metadata tables of public CXR data sets (as torchxrayvision ships them), as manifests.

Synthesis samples its rows from these, and the small text model trains on Open-I's reports.
"""

from __future__ import annotations

import tempfile

from ..config import cache_dir
from ..manifest import Manifest


def source_table(source: str) -> Manifest:
    """All rows of a public data set's real table as a manifest (no images), cached on disk.

    Built once through the site adapter with ``require_files=False``: the first call parses the
    table torchxrayvision ships (a few seconds to a minute for PadChest); later calls read Parquet.
    """
    from ..sites.adapters import get_adapter

    cache = cache_dir() / "tables" / f"{source}.parquet"
    if cache.exists():
        try:
            return Manifest.read(cache)
        except Exception:  # noqa: BLE001 - a stale or broken cache is rebuilt
            cache.unlink()
    with tempfile.TemporaryDirectory() as root:
        opts = {"write_masks": False} if source == "siim" else {}  # masks are decoded per sampled image
        result = get_adapter(source).build(root, source, require_files=False, **opts)
    result.manifest.write(cache)
    return result.manifest
