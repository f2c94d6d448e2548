"""Where the default study's time goes on a small CPU machine, and what the two speed settings buy.

On the study corpus (``raycxr study`` makes it; 64 px, CheXpert's training split, batch 32):

1. **Decode cache**: images/s of the fine-tuning data path alone (read, window, resize, augment, collate)
   with and without ``transforms.cache`` (the cache filled first), one thread.
2. **Cells side by side vs threads**: images/s of ResNet-18 fine-tuning steps (forward, backward, AdamW)
   in one process on ``--cores`` threads against ``--cores`` processes on one thread each, all together
   (what ``cpus_per_cell: 1`` does with Ray tasks).

    python benchmarks/study_speed.py [--cores 2] [--sites-dir runs/study/default/sites] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

STUDY_SITES = {"sites_dir": "runs/study/default/sites", "data_root": "data"}


def data_rate(cache: bool, passes: int = 2) -> float:
    import torch
    from torch.utils.data import DataLoader

    from raycxr.dataset import collate_skip_none, site_dataset
    from raycxr.study.cells import _sites

    torch.set_num_threads(1)
    site = _sites(STUDY_SITES)["chexpert"]
    ds = site_dataset(site, {"size": 64, "cache": cache}, split="train", train=True, seed=0, use_labels=True)
    dl = DataLoader(ds, batch_size=32, shuffle=True, collate_fn=collate_skip_none)
    for _ in dl:  # fills the cache (and warms the file system) for both variants
        pass
    t0, n = time.perf_counter(), 0
    for _ in range(passes):
        n += sum(len(b["image"]) for b in dl)
    return n / (time.perf_counter() - t0)


def _train(threads: int, steps: int, queue) -> None:
    import timm
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=14)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.rand(32, 1, 64, 64), torch.randint(0, 2, (32, 14)).float()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    queue.put(32 * steps / (time.perf_counter() - t0))


def train_rates(cores: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_train, args=(cores, steps, q))
    p.start()
    one = q.get()
    p.join()
    procs = [ctx.Process(target=_train, args=(1, steps, q)) for _ in range(cores)]
    for p in procs:
        p.start()
    side = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return {f"one_process_{cores}_threads_images_per_s": round(one, 1),
            f"{cores}_processes_1_thread_images_per_s": round(sum(side), 1),
            "ratio": round(sum(side) / one, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sites-dir", default=STUDY_SITES["sites_dir"], help="a study's registered sites")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    STUDY_SITES["sites_dir"] = args.sites_dir
    if not Path(STUDY_SITES["sites_dir"]).is_dir():
        raise SystemExit(f"no study sites in {STUDY_SITES['sites_dir']}: run `raycxr study` first")
    res = {"load_average_start": round(os.getloadavg()[0], 2)}
    res["data_without_cache_images_per_s"] = round(data_rate(False), 1)
    res["data_with_cache_images_per_s"] = round(data_rate(True), 1)
    res["cache_ratio"] = round(res["data_with_cache_images_per_s"] / res["data_without_cache_images_per_s"], 2)
    res["training"] = train_rates(args.cores, args.steps)
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "study_speed.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
