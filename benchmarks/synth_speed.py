"""How fast is `raycxr synth`? Default demo corpus (5 sites x 400 images, 2 workers), timed in one run
against a plain baseline: writing the same number of same-size uncompressed DICOMs of noise with
pydicom alone (the I/O floor, no rendering). The real-table parse is timed separately: it happens
once per machine and is cached.

    python benchmarks/synth_speed.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from raycxr.config import cache_dir
from raycxr.sites.tables import source_table
from raycxr.synth.acquisition import SiteProfile, write_dicom
from raycxr.synth.generator import DEFAULT_SITES, synthesize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--n-per-site", type=int, default=400)
    args = ap.parse_args()
    res: dict = {"sites": list(DEFAULT_SITES), "n_per_site": args.n_per_site, "workers": 2}
    tables = cache_dir() / "tables"
    cached = {s: (tables / f"{s}.parquet").exists() for s in DEFAULT_SITES}
    t = time.perf_counter()
    for s in DEFAULT_SITES:
        source_table(s)
    res["table_parse_seconds"] = round(time.perf_counter() - t, 1) if not any(cached.values()) else None
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        synthesize(Path(tmp) / "c", DEFAULT_SITES, n_per_site=args.n_per_site, seed=0, workers=2, progress=False)
        res["synth_seconds"] = round(time.perf_counter() - t, 2)
        n = args.n_per_site * len(DEFAULT_SITES)
        rng = np.random.default_rng(0)
        prof = SiteProfile(bits_stored=12, window=False, size=256)
        t = time.perf_counter()
        for i in range(n):
            write_dicom(Path(tmp) / "b" / f"{i}.dcm", rng.integers(0, 4096, (256, 256), dtype=np.uint16), prof,
                        uid_seed=[i], patient_id="p", sex="F", age=50.0, view="PA",
                        study_date=datetime.date(2020, 1, 1))
        res["baseline_plain_dicom_write_seconds"] = round(time.perf_counter() - t, 2)
        shutil.rmtree(tmp, ignore_errors=True)
    res["images"] = n
    res["images_per_second"] = round(n / res["synth_seconds"], 1)
    res["ratio_to_baseline"] = round(res["synth_seconds"] / res["baseline_plain_dicom_write_seconds"], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synth_speed.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
