"""Epoch time vs number of sites and vs images per site: the Ray path and the plain local loop, in one run.

Trains the naive-mixing baseline (method=mixed: encoder + one union head) on the demo corpus over a
full epoch (no step cap), with `runner=ray` (site actors serving batches, one Ray Train worker) and
with `runner=local` (plain PyTorch DataLoader, one process), same model, batch and image size:

- sites 1, 2, 3, 5 at a fixed number of training images per site;
- images per site 50, 100, 200 at a fixed number of sites.

Each site is cut to its first N training images through a temporary manifest, so sites differ only
in count. The epoch time is the last epoch's (the first one includes warm-up); the Ray run's wall
time with start-up (cluster already up: site actors, Train controller and worker group) is kept too.

    python benchmarks/scaling.py [--sites 1,2,3,5] [--images 50,100,200] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from raycxr.config import compose
from raycxr.manifest import Manifest
from raycxr.train.local import run_pretrain, select_sites

REPO_ROOT = Path(__file__).resolve().parents[1]

ORDER = ["nih", "chexpert", "vindr", "openi", "siim"]


def cut_sites(tmp: Path, names: list[str], n_images: int) -> Path:
    """A sites folder whose sites keep only their first ``n_images`` training images (same image files)."""
    sites = select_sites(compose("pretrain"))
    d = tmp / f"sites_{len(names)}x{n_images}"
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        s = sites[n]
        m = Manifest.read(s.manifest_path).split("train")
        if len(m) < n_images:
            raise ValueError(f"site {n} has only {len(m)} training images, {n_images} asked")
        m.select(np.arange(len(m)) < n_images).write(d / n / "manifest.parquet")
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": s.adapter, "root": str(s.root.resolve()),
                                                     "manifest": str(d / n / "manifest.parquet")}))
    return d


def measure(runner: str, names: list[str], n_images: int, tmp: Path, common: list[str]) -> dict:
    sites_dir = cut_sites(tmp, names, n_images)
    tag = f"{runner}_{len(names)}x{n_images}"
    over = [*common, f"sites.sites_dir={sites_dir}", f"site_names=[{','.join(names)}]", f"out={tmp / tag}"]
    t0 = time.perf_counter()
    if runner == "local":
        hist = run_pretrain(compose("pretrain", over))["history"]
    else:
        import ray

        from raycxr.ray.runner import run_pretrain_ray

        res = run_pretrain_ray(compose("pretrain", [*over, "runner=ray", f"ray.storage_path={tmp / 'store'}",
                                                    f"ray.run_name=scaling-{tag}"]))
        hist = res["history"]
        for a in res["actors"].values():  # free the site actors' processes before the next size
            ray.kill(a)
    wall = time.perf_counter() - t0
    last = hist[-1]
    row = {"runner": runner, "sites": len(names), "images_per_site": n_images, "epoch_images": last["images"],
           "epoch_s": last["seconds"], "images_per_s": last["images_per_s"], "run_wall_s": round(wall, 1)}
    print(json.dumps(row), flush=True)
    return row


def plot(rows: list[dict], res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("sites", df["images_per_site"] == res["fixed_images_per_site"],
               f"number of sites ({res['fixed_images_per_site']} images each)"),
              ("images_per_site", df["sites"] == res["fixed_sites"],
               f"training images per site ({res['fixed_sites']} sites)")]
    for ax, (x, sel, xlabel) in zip(axes, panels):
        for runner, style in (("ray", "o-"), ("local", "s--")):
            d = df[sel & (df["runner"] == runner)].drop_duplicates(x).sort_values(x)
            if d.empty:
                continue
            label = "Ray path (site actors + 1 Train worker)" if runner == "ray" else "plain local loop"
            ax.plot(d[x], d["epoch_s"], style, label=label)
            # linear in the number of images: the reference through the smallest point
            ax.plot(d[x], d["epoch_s"].iloc[0] * d["epoch_images"] / d["epoch_images"].iloc[0], ":", color="grey",
                    linewidth=1, label="linear in images" if runner == "ray" else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("epoch time (s)")
        ax.set_xticks(sorted(df[sel][x].unique()))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Epoch time, method=mixed ({res['model']}, {res['image_size']} px, batch {res['batch_size']}, "
                 f"{res['cpus']} CPU cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", default="1,2,3,5")
    ap.add_argument("--images", default="50,100,200")
    ap.add_argument("--fixed-images", type=int, default=100)
    ap.add_argument("--fixed-sites", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-local", action="store_true", help="skip the plain local loop")
    ap.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    counts = [int(x) for x in args.sites.split(",")]
    images = [int(x) for x in args.images.split(",")]
    tmp = Path(tempfile.mkdtemp())
    common = ["method=mixed", f"baseline.epochs={args.epochs}", f"batch_size={args.batch_size}",
              f"image_size={args.image_size}", "threads=1", "probe_size=0", "val.enabled=false",
              f"sites.data_root={REPO_ROOT / 'data'}"]
    res: dict = {"method": "mixed", "model": "resnet18 + union head", "image_size": args.image_size,
                 "batch_size": args.batch_size, "epochs": args.epochs, "measured_epoch": "last",
                 "fixed_images_per_site": args.fixed_images, "fixed_sites": args.fixed_sites,
                 "cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    # (sites, images per site) points, the shared one measured once
    points = [(k, args.fixed_images) for k in counts] + [(args.fixed_sites, n) for n in images]
    points = list(dict.fromkeys(points))
    print(f"{len(points)} points x {'1' if args.no_local else '2'} runners, {args.epochs} epochs each", flush=True)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    rows = []
    for k, n in points:
        names = ORDER[:k]
        rows.append(measure("ray", names, n, tmp, common))
        if not args.no_local:
            rows.append(measure("local", names, n, tmp, common))
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["rows"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(res, indent=2))
    plot(rows, res, out / "scaling.png")
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")


if __name__ == "__main__":
    main()
