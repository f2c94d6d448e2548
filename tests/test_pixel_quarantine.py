"""Images that decode to NaN or to one constant value are quarantined with the reason when a site is
validated, and skipped with the reason by training's dataset (issue 25), instead of a NaN loss later."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from raycxr.dataset import SiteDataset
from raycxr.quarantine import Quarantine
from raycxr.readers import read_image
from raycxr.sites.config import SiteConfig
from raycxr.validate import validate_site


def _float_tiff_reading_as_nan(path: Path) -> None:
    # +inf and -inf in one float TIFF: the reader's min-max scaling divides inf by inf -> NaN
    a = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    a[0, 0], a[1, 1] = np.inf, -np.inf
    Image.fromarray(a, mode="F").save(path)


def _site(tmp_path: Path) -> SiteConfig:
    root = tmp_path / "site"
    root.mkdir()
    for k in range(3):
        Image.fromarray(((np.arange(1024) * (k + 2)) % 251).astype(np.uint8).reshape(32, 32)).save(root / f"ok{k}.png")
    _float_tiff_reading_as_nan(root / "nan.tif")
    Image.new("L", (32, 32), 77).save(root / "blank.png")
    files = ["ok0.png", "ok1.png", "ok2.png", "nan.tif", "blank.png"]
    pd.DataFrame({"path": files, "patient_id": [f"p{k}" for k in range(5)]}).to_csv(root / "t.csv", index=False)
    site = SiteConfig.from_dict({"name": "s", "adapter": "generic_csv", "root": str(root),
                                 "adapter_options": {"csv": "t.csv", "split_fractions": [1.0, 0.0, 0.0]}})
    site.build_manifest()
    return site


def test_validate_quarantines_nan_and_constant_images(tmp_path: Path) -> None:
    site = _site(tmp_path)
    assert np.isnan(read_image(site.root / "nan.tif")).any()  # the reader hands NaN on
    report = validate_site(site, check_images=True, workers=1, progress=False)
    assert report["ok"] and "quarantined 0 missing and 2 unreadable" in report["message"]
    reasons = {e.path: e.reason for e in Quarantine(site.quarantine_path, site="s").entries()}
    assert reasons["nan.tif"].startswith("non-finite pixel values: 1 of 1024 pixels")
    assert reasons["blank.png"].startswith("constant image: every pixel is")
    assert set(reasons) == {"nan.tif", "blank.png"}


def test_training_dataset_skips_a_nan_image_with_the_reason(tmp_path: Path) -> None:
    site = _site(tmp_path)
    q = Quarantine(None, site="s")
    ds = SiteDataset(site.load_manifest(), site.root, quarantine=q)
    items = [ds[i] for i in range(len(ds))]
    got = {ds.df.loc[i, "path"]: it for i, it in enumerate(items)}
    assert got["nan.tif"] is None and all(got[f"ok{k}.png"] is not None for k in range(3))
    assert [e.path for e in q.entries()] == ["nan.tif"] and "non-finite" in q.entries()[0].reason
