"""Ray Train path vs a plain single-process loop, same model, data and batch size, in one run.

Trains the naive-mixing baseline (method=mixed: encoder + one union head) on the demo corpus for
the same number of steps with `runner=local` and with `runner=ray`, on the same total cores, and
compares images/s measured inside the epoch (start-up excluded):

- the plain loop is the one a PyTorch user writes: a `DataLoader` with `--loader-workers` worker
  processes (default 1) decoding beside the training process (one thread);
- the Ray path: one Ray Train worker (one thread) and one site actor per site serving batches.

With one site, both use two processes. The two paths run in ``--rounds`` alternating rounds (the order
swapped every round: plain, Ray, Ray, plain, ...) on one Ray cluster, so that both see the same drift in
a shared machine's load; the overhead is the median of the rounds' ratios, with their range. Each path's
share of time spent waiting for batches comes from the driver's per-epoch ``data_wait_s``. Also
measures the site actors' serving rate alone (batches pulled as fast as possible, no training), which
must exceed what the trainer consumes.

    python benchmarks/ray_overhead.py [--steps 40] [--rounds 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from raycxr.config import compose
from raycxr.train.local import run_pretrain


def epoch_rate(history: list[dict]) -> float:
    # skip the first epoch (warm-up: model build, first reads, actor start)
    h = history[1:] or history
    return sum(r["images"] for r in h) / sum(r["seconds"] for r in h)


def wait_share(history: list[dict]) -> float:
    """The share of those epochs the trainer spent waiting for batches (``data_wait_s``, the driver's log)."""
    h = history[1:] or history
    return round(sum(r["data_wait_s"] for r in h) / sum(r["seconds"] for r in h), 3)


def stop_run_actors(run_name: str, sites: list[str], replicas: dict) -> None:
    """Kill a finished run's site replicas and pools, so the next round starts on idle cores."""
    import ray

    from raycxr.ray.actor import NAMESPACE
    from raycxr.ray.autoscale import pool_name

    for site in sites:
        try:
            ray.kill(ray.get_actor(pool_name(run_name, site), namespace=NAMESPACE))
        except ValueError:  # a site with a fixed count has no pool
            pass
    for handles in replicas.values():
        for h in handles:
            ray.kill(h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--images", type=int, default=None, help="synthesize one site of this many images (default: "
                    "the registered demo sites)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1 (got {args.rounds})")
    tmp = Path(tempfile.mkdtemp())
    common = ["method=mixed", f"baseline.epochs={args.epochs}", f"max_steps_per_epoch={args.steps}", "batch_size=16",
              "image_size=128", "threads=1", "probe_size=0", "val.enabled=false"]
    if args.images:
        import yaml

        from raycxr.synth.generator import synthesize

        synthesize(tmp / "corpus", ["nih"], n_per_site=args.images, seed=0, render_size=256, workers=2,
                   progress=False, preview=False)
        (tmp / "sites").mkdir()
        (tmp / "sites" / "nih.yaml").write_text(yaml.safe_dump({"name": "nih", "adapter": "manifest", "root": "nih"}))
        common += [f"sites.sites_dir={tmp / 'sites'}", f"sites.data_root={tmp / 'corpus'}"]
    res: dict = {"steps_per_epoch": args.steps, "batch_size": 16, "image_size": 128, "model": "resnet18 + union head",
                 "plain_loop": f"DataLoader with {args.loader_workers} worker process(es) + the training process "
                               "(1 thread)",
                 "ray_path": "1 Ray Train worker (1 thread) + the site's actors (ray.site_replicas: auto, from 1)",
                 "load_average_start": round(os.getloadavg()[0], 2)}
    import ray
    from tqdm import tqdm

    from raycxr.ray.runner import ActorData, run_pretrain_ray

    # one cluster for every round: the plain loop runs beside the same idle Ray processes as the Ray path
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rounds: list[dict] = []
    for k in tqdm(range(args.rounds), desc="rounds"):
        row: dict = {}
        for path in (("plain", "ray") if k % 2 == 0 else ("ray", "plain")):
            if path == "plain":
                local = run_pretrain(compose("pretrain", [*common, f"num_workers={args.loader_workers}",
                                                          f"out={tmp / f'local{k}'}"]))
                row["plain_loop_images_per_s"] = round(epoch_rate(local["history"]), 2)
                row["plain_loop_data_wait_share"] = wait_share(local["history"])
                continue
            rcfg = compose("pretrain", [*common, "runner=ray", f"out={tmp / f'ray{k}'}",
                                        f"ray.storage_path={tmp / 'store'}", f"ray.run_name=bench{k}"])
            out = run_pretrain_ray(rcfg)
            row["ray_train_images_per_s"] = round(epoch_rate(out["history"]), 2)
            row["ray_train_data_wait_share"] = wait_share(out["history"])
            scale_log = tmp / f"ray{k}" / "autoscale.json"
            if scale_log.is_file():  # what the default autoscaling did beside the trainer, every site
                row["autoscale_decisions"] = {site: [f"{h['was']}->{h['replicas']} ({h['reason']})" for h in log
                                                     if h.get("reason") != "hold"]
                                              for site, log in json.loads(scale_log.read_text()).items()}
            if k == args.rounds - 1:  # the sites' serving rate alone, once
                stream = ActorData(rcfg, out["actors"], 0, 1).union_loader()
                t, n = time.perf_counter(), 0
                for i, b in enumerate(stream):
                    n += len(b["image"])
                    if i + 1 >= args.steps:
                        break
                res["site_actor_serving_images_per_s"] = round(n / (time.perf_counter() - t), 1)
            stop_run_actors(f"bench{k}", out["sites"], out["replicas"])
        ratio = row["ray_train_images_per_s"] / row["plain_loop_images_per_s"]
        row["ray_overhead_percent"] = round(100 * (1 - ratio), 1)
        row["order"] = "plain, ray" if k % 2 == 0 else "ray, plain"
        rounds.append(row)
        tqdm.write(json.dumps(row))
    ray.shutdown()
    overheads = [r["ray_overhead_percent"] for r in rounds]
    res.update({"rounds": rounds,
                "plain_loop_images_per_s": round(statistics.median(r["plain_loop_images_per_s"] for r in rounds), 1),
                "ray_train_images_per_s": round(statistics.median(r["ray_train_images_per_s"] for r in rounds), 1),
                "ray_overhead_percent": round(statistics.median(overheads), 1),
                "ray_overhead_percent_range": [min(overheads), max(overheads)],
                **{f"{k}_data_wait_share": statistics.median(r[f"{k}_data_wait_share"] for r in rounds)
                   for k in ("plain_loop", "ray_train")},
                "load_average_end": round(os.getloadavg()[0], 2)})
    shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ray_overhead.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
