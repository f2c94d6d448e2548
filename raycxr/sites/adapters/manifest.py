"""A site whose raycxr manifest already exists (the synthetic demo sites, or one built elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from raycxr.manifest import Manifest

from .base import AdapterResult, SiteAdapter, _drop, register_adapter


@register_adapter("manifest")
class ManifestAdapter(SiteAdapter):
    """A site whose manifest already exists (the synthetic demo sites, or one built elsewhere).

    ``build`` reads and validates it; with ``require_files`` (default) rows whose image is absent
    move to ``dropped``, like every other adapter. The rows and the metadata take the site's own
    name (a copy of another site's folder is renamed, ``renamed_from`` records the old name).
    """

    description = "an existing raycxr manifest.parquet (synthetic sites, or built elsewhere)"
    source = "raycxr manifest"
    options: ClassVar[dict[str, Any]] = {"manifest": "manifest.parquet"}

    def option_defaults(self) -> dict[str, Any]:
        return {"manifest": "manifest.parquet", "require_files": True, "limit": None}

    def build(self, root: str | Path, site: str, **options: Any) -> AdapterResult:
        self.check_options(options)
        root = Path(root)
        path = Path(options.get("manifest", "manifest.parquet"))
        manifest = Manifest.read(path if path.is_absolute() else root / path)
        keep = np.ones(len(manifest), bool)
        dropped: list[dict] = []
        if options.get("require_files", True):
            for i, (iid, rel) in enumerate(zip(manifest.table["image_id"].to_pylist(),
                                               manifest.table["path"].to_pylist())):
                if not (root / rel).is_file():
                    keep[i] = False
                    dropped.append(_drop(iid, rel, "image file not found"))
        limit = options.get("limit")
        if limit is not None:
            keep &= np.cumsum(keep) <= int(limit)
        manifest = manifest.select(keep) if not keep.all() else manifest
        return AdapterResult(_renamed(manifest, site), dropped)


def _renamed(manifest: Manifest, site: str) -> Manifest:
    """The manifest under the site's own (YAML) name: a copied site (data/demo/siim registered as
    ``site5``) keeps ``site='siim'`` in its rows otherwise, and training looks rows up by the YAML name."""
    import pyarrow as pa

    names = sorted(set(manifest.table["site"].to_pylist()))
    if names in ([site], []) and manifest.site_meta.get("name", site) == site:
        return manifest
    i = manifest.table.schema.get_field_index("site")
    table = manifest.table.set_column(i, manifest.table.schema.field(i),
                                      pa.array([site] * len(manifest), pa.string()))
    meta = {**manifest.site_meta, "name": site, "renamed_from": names}
    return Manifest(table, manifest.label_names, meta, manifest.source)
