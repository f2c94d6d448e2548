"""Scale-out figures on this machine (one run; ratios are what carry over to a cluster).

1. **Replicas**: images/s one site serves through :class:`~raycxr.ray.runner.ActorStream` from 1
   and from 2 replicas (train transforms, no decode cache, ``PASSES`` passes timed), beside the images/s a
   trainer consumes (ResNet-18 + union head, one step = forward + backward + AdamW, same size and batch);
   and an autoscaled pool (``ray.site_replicas=auto`` from 1, default windows, timed once its steps have
   been judged) beside 2 fixed replicas measured just before it.
1b. **Ray Data**, the alternative the issue names: ``read_parquet`` of the site's manifest (train split)
   -> ``map_batches`` of the same decode + train transforms (``site_dataset`` in a callable class) with
   ``concurrency`` 1 and 2 -> ``iter_torch_batches``, as many passes in one execution, timed from its
   first decode to its last batch (the map actors started once); so the two data planes are compared
   on the same images, transforms, batch size and cores. Both also give their serving process's own
   rate (images per second of decode time), which tells a difference in the plane from one in the work.
   Actor replicas and Ray Data are measured in ``ROUNDS`` alternating rounds (medians, and each round's
   ratio), as the load of a shared machine drifts between runs.
2. **Decode cache**: epoch times of one site's train split (``site_dataset`` in one process, train
   transforms) without and with the cache, epochs 1..3: the first fills the cache, later ones read it.
3. **Gradient sync**: step time of ResNet-18 on 2 gloo processes (one thread each) with today's
   per-tensor all-reduce after the backward pass, :class:`~raycxr.ray.grad_sync.BucketedGradSync`
   and torch's ``DistributedDataParallel`` (reference).
4. **Per-core decode rate** of full-size radiographs (2048 x 2500 12-bit DICOMs made from the synthetic
   corpus) through read + VOI + resize + augmentation at 224 and 512 px, and through the decode cache
   + augmentation: how many site replicas (one core each) one GPU needs.
5. **Device data plane** (``transforms.augment``): host images/s per core through a site's training
   dataset + collation at 224 px with the decode cache filled (uint16), today's path (``host``: per-sample
   MONAI augmentation in the site's process) against the new one (``device``: read the stored pixels +
   collate; the trainer augments the batch on its device), in ``ROUNDS`` alternating rounds (medians and
   each round's ratio); the implied host cores per GPU; and the batched device augmentation's own cost
   measured on this CPU (one thread, :class:`~raycxr.transforms.BatchAugment`, batch ``AUG_BATCH``).

    python benchmarks/scaleout.py [--out benchmarks/results]
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

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

SIZE, BATCH = 128, 16
# On paper (issue 14's compass figure): UniChest ~137 GFLOPs per training image at 512 px, a modern GPU
# at 40 % MFU trains ~2,800 images/s; at 224 px the FLOPs per image scale by (224/512)^2.
GPU_DEMAND = {512: 2800.0, 224: round(2800.0 * (512 / 224) ** 2)}


def corpus(tmp: Path, n: int) -> list[str]:
    from raycxr.synth.generator import synthesize

    synthesize(tmp / "corpus", ["nih"], n_per_site=n, seed=0, render_size=256, workers=2, progress=False,
               preview=False)
    (tmp / "sites").mkdir(exist_ok=True)
    (tmp / "sites" / "nih.yaml").write_text(yaml.safe_dump({"name": "nih", "adapter": "manifest", "root": "nih"}))
    # sections 1-4 measure the host augmentation path (the data planes' work as it was); 5 compares the two
    return [f"sites.sites_dir={tmp / 'sites'}", f"sites.data_root={tmp / 'corpus'}", f"image_size={SIZE}",
            f"batch_size={BATCH}", "threads=1", "transforms.augment=host"]


def trainer_rate(steps: int = 6) -> float:
    """Images/s of a ResNet-18 + union head training step on one thread (what one trainer consumes here)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=14)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(BATCH, 1, SIZE, SIZE), torch.randint(0, 2, (BATCH, 14)).float()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return BATCH / statistics.median(times[1:])


PASSES = 10  # timed passes over the site's train split, after the warm-up


class _DecodeBatch:
    """Ray Data's stage: the site's own dataset (decode, preprocessing, train transforms) in each worker.
    Each batch carries when its decode started and ended (``t0``, ``t1``), so the stage's own rate can be
    read off the batches, independent of how Ray Data groups them into blocks."""

    def __init__(self, site: object, transforms: dict) -> None:
        from raycxr.dataset import site_dataset

        self.ds = site_dataset(site, transforms, split="train", train=True, use_labels=True)
        self.row = {iid: i for i, iid in enumerate(self.ds.df["image_id"])}

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        items = [self.ds[self.row[iid]] for iid in batch["image_id"]]
        n = len(items)
        return {"image": np.stack([it["image"].numpy() for it in items]),
                "labels": np.stack([it["labels"].numpy() for it in items]),
                "t0": np.full(n, t0), "t1": np.full(n, time.perf_counter())}


def ray_data_rates(overrides: list[str]) -> dict:
    """Images/s of a Ray Data pipeline over the same site, transforms and batch size (``concurrency`` 1, 2).

    Timed like the actor stream, from the first decode to the last batch received, so every image counts
    and start-up does not. (Timing from the first batch *received* overstates Ray Data: its map stage
    fills whole output blocks, so by the first batch it has decoded many more.) ``busy``: images per
    second of decode time inside the stage, the per-process cost."""
    import ray
    from omegaconf import OmegaConf

    from raycxr.config import compose
    from raycxr.train.local import select_sites

    cfg = compose("pretrain", overrides)
    site = select_sites(cfg)["nih"]
    transforms = OmegaConf.to_container(cfg.transforms, resolve=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {}
    try:
        # the manifest read once (on 2 CPUs a read task waiting beside two map actors would deadlock) and
        # cut into one block per batch, so that batches stream one at a time as they would to a trainer;
        # PASSES copies in one execution (the map actors start once, as for one long epoch)
        rows = (ray.data.read_parquet(str(site.manifest_file), columns=["image_id", "split"])
                .filter(lambda r: r["split"] == "train").materialize())
        rows = rows.repartition(-(-rows.count() // BATCH)).materialize()
        for c in (1, 2):
            ds = rows.union(*[rows] * (PASSES - 1)).map_batches(
                _DecodeBatch, fn_constructor_args=(site.resolved(), transforms), batch_size=BATCH, concurrency=c,
                num_cpus=1)
            k, spans = 0, {}  # (t0, t1) of every decode call: the stage's own timing (one host, one clock)
            for b in ds.iter_torch_batches(batch_size=BATCH):
                k += len(b["image"])
                spans.update(zip(b["t0"].tolist(), b["t1"].tolist()))
            out[f"concurrency_{c}_images_per_s"] = round(k / (time.perf_counter() - min(spans)), 1)
            if c == 1:
                out["busy_images_per_s"] = round(k / sum(t1 - t0 for t0, t1 in spans.items()), 1)
    finally:
        ray.shutdown()
    out["speed_up_2_vs_1"] = round(out["concurrency_2_images_per_s"] / out["concurrency_1_images_per_s"], 2)
    return out


def judged(log: list[dict]) -> bool:
    """Whether an autoscaled pool has stepped up and judged the step (kept it or undone it), or has had
    ten windows without wanting one."""
    reasons = [h["reason"] for h in log]
    if "up" not in reasons:
        return len(reasons) >= 10
    after = reasons[len(reasons) - reasons[::-1].index("up"):]
    return "no gain" in after or ("settling" in after and after[-1] not in ("starting", "settling"))


def decisions(log: list[dict]) -> str:
    """The pool's decisions in order, repeats counted: ``1->2 up, starting x14, settling, kept``."""
    out: list[list] = []
    for h in log:
        if h["reason"] == "hold":
            continue
        key = f"{h['was']}->{h['replicas']} {h['reason']}" if h["reason"] in ("up", "down", "no gain") else h["reason"]
        if out and out[-1][0] == key:
            out[-1][1] += 1
        else:
            out.append([key, 1])
    text = [k if c == 1 else f"{k} x{c}" for k, c in out]
    if out and out[-1][0] == "settling":
        text.append("kept")
    return ", ".join(text) or "no change"


def replica_rates(overrides: list[str], counts: tuple = (1, 2, "auto"), every: int = 2) -> dict:
    import ray

    from raycxr.config import compose
    from raycxr.ray.launch import start_site_pools, start_site_replicas
    from raycxr.ray.runner import ActorData
    from raycxr.train.local import select_sites

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    out = {}
    try:
        for n in counts:
            cfg = compose("pretrain", [*overrides, f"ray.site_replicas={n}", f"ray.autoscale.every={every}"])
            sites = select_sites(cfg)
            pools = start_site_replicas(cfg, sites, f"bench-r{n}")
            scalers = start_site_pools(cfg, sites, f"bench-r{n}", pools)
            data = ActorData(cfg, {k: p[0] for k, p in pools.items()}, 0, 1, replicas=pools, scalers=scalers)
            stream = data.union_loader()
            t_warm = time.perf_counter()
            while True:  # warm-up passes: build the datasets in the actors; an autoscaled pool also needs
                for _ in stream:  # its step up started, served and judged before it is timed
                    pass
                log = ray.get(scalers["nih"].log.remote()) if n == "auto" else []
                if n != "auto" or judged(log) or time.perf_counter() - t_warm > 120:
                    break
            before = ray.get([a.stats.remote() for a in pools["nih"]])
            t0, k = time.perf_counter(), 0
            for _ in range(PASSES):
                for b in stream:
                    k += len(b["image"])
            out[f"replicas_{n}_images_per_s"] = round(k / (time.perf_counter() - t0), 1)
            if n == 1:  # the replica's own decode time, as for Ray Data's stage
                after = ray.get(pools["nih"][0].stats.remote())
                out["busy_images_per_s"] = round((after["served"] - before[0]["served"])
                                                 / (after["busy_s"] - before[0]["busy_s"]), 1)
            if n == "auto":
                log = ray.get(scalers["nih"].log.remote())
                out["auto_replicas_at_end"] = stream.active[0]
                out["auto_decisions"] = decisions(log)
                out["auto_warm_up_s"] = round(t0 - t_warm, 1)
            for pool in [*pools.values(), *scalers.values()]:
                for a in pool if isinstance(pool, list) else [pool]:
                    ray.kill(a)
    finally:
        ray.shutdown()
    if "replicas_1_images_per_s" in out and "replicas_2_images_per_s" in out:
        out["speed_up_2_vs_1"] = round(out["replicas_2_images_per_s"] / out["replicas_1_images_per_s"], 2)
    return out


# The autoscaled pool's window: the default (ray.autoscale.every). With 2-batch windows (~0.1 s here) the
# step-up judgement was noise: on 2 cores it kept steps up to 4 replicas.
AUTOSCALE_EVERY = 20
ROUNDS = 3  # alternating rounds of the two data planes: on a shared machine the load drifts between runs


def data_planes(overrides: list[str], rounds: int = ROUNDS) -> dict:
    """The actor replicas (1, 2) and Ray Data (concurrency 1, 2) in ``rounds`` alternating rounds, so that
    both see the same drift in the machine's load; medians over the rounds, and each round's ratio."""
    from tqdm import tqdm

    runs = []
    for _ in tqdm(range(rounds), desc="data planes"):
        run = replica_rates(overrides, counts=(1, 2))
        run.update({f"ray_data_{k}": v for k, v in ray_data_rates(overrides).items()})
        runs.append(run)
    out: dict = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    for name, a, b in (("ray_data_vs_actor_1", "ray_data_concurrency_1_images_per_s", "replicas_1_images_per_s"),
                       ("ray_data_vs_actor_2", "ray_data_concurrency_2_images_per_s", "replicas_2_images_per_s"),
                       ("ray_data_vs_actor_busy", "ray_data_busy_images_per_s", "busy_images_per_s")):
        ratios = [r[a] / r[b] for r in runs]
        out[name] = {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
                     "max": round(max(ratios), 2)}
    out["rounds"] = runs
    return out


def cache_epochs(overrides: list[str], tmp: Path, epochs: int = 3) -> dict:
    from raycxr import cache as cache_mod
    from raycxr.config import compose
    from raycxr.dataset import site_dataset
    from raycxr.train.local import select_sites

    out = {}
    for cache in (False, True):
        cache_mod._OPEN.clear()
        cfg = compose("pretrain", [*overrides, f"transforms.cache.enabled={str(cache).lower()}",
                                   f"transforms.cache.dir={tmp / 'cache'}"])
        site = select_sites(cfg)["nih"]
        from omegaconf import OmegaConf

        ds = site_dataset(site, OmegaConf.to_container(cfg.transforms, resolve=True), train=True)
        secs = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            secs.append(round(time.perf_counter() - t0, 2))
        out["with_cache" if cache else "without_cache"] = {"epoch_seconds": secs, "images": len(ds)}
    w, c = out["without_cache"]["epoch_seconds"], out["with_cache"]["epoch_seconds"]
    out["later_epoch_speed_up"] = round(statistics.mean(w[1:]) / statistics.mean(c[1:]), 2)
    out["first_epoch_cost"] = round(c[0] / w[0], 2)
    return out


def _sync_worker(rank: int, store: str, out: str, steps: int) -> None:
    # torch._dynamo before the group: the first optimiser imports it, and imported once a group exists it keeps
    # the group alive past destroy_process_group(), gloo's threads into interpreter shutdown (see test_grad_sync)
    import timm
    import torch._dynamo  # noqa: F401

    from raycxr.ray.grad_sync import BucketedGradSync, GradAllReduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    res = {}
    for kind in ("per_tensor", "bucketed", "ddp"):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", in_chans=1, num_classes=14)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fwd = model
        if kind == "per_tensor":
            opt = GradAllReduce(opt)
        elif kind == "bucketed":
            opt = BucketedGradSync(opt)
        else:
            fwd = torch.nn.parallel.DistributedDataParallel(model)
        x, y = torch.rand(8, 1, 64, 64), torch.randint(0, 2, (8, 14)).float()
        times = []
        for _ in range(steps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.binary_cross_entropy_with_logits(fwd(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        res[kind] = round(1000 * statistics.median(times[2:]), 1)
        if kind == "bucketed":
            opt.close()
    res = {f"{k}_step_ms": v for k, v in res.items()}
    res["param_tensors"] = len(list(model.parameters()))  # one all-reduce each in the per-tensor scheme
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def grad_sync_times(tmp: Path, steps: int = 8) -> dict:
    out = tmp / "sync.json"
    mp.start_processes(_sync_worker, args=(str(tmp / "store"), str(out), steps), nprocs=2, join=True,
                       start_method="spawn")
    return json.loads(out.read_text())


def full_size_dicoms(tmp: Path, n: int = 6) -> list[Path]:
    """Radiograph-sized files (2048 x 2500, 12 bits stored, a window) from the synthetic corpus's DICOMs."""
    import pydicom
    from PIL import Image

    src = sorted((tmp / "corpus" / "nih").rglob("*.dcm"))[:n]
    out = []
    for i, p in enumerate(src):
        ds = pydicom.dcmread(p)
        a = ds.pixel_array.astype(np.float32)
        a = (a - a.min()) / max(float(np.ptp(a)), 1.0)
        big = np.asarray(Image.fromarray(a, mode="F").resize((2048, 2500), Image.Resampling.BILINEAR))
        ds.Rows, ds.Columns = big.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.clip(big * 4095, 0, 4095).astype(np.uint16).tobytes()
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        for tag in ("VOILUTSequence", "ModalityLUTSequence"):
            if tag in ds:
                del ds[tag]
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        q = tmp / "full" / f"{i}.dcm"
        q.parent.mkdir(exist_ok=True)
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out


def per_core_rates(tmp: Path) -> dict:
    from raycxr.cache import DecodeCache
    from raycxr.transforms import transforms_from_config

    torch.set_num_threads(1)
    files = full_size_dicoms(tmp)
    res: dict = {"file": "2048 x 2500 px, 12 bits stored, uncompressed DICOM (compressed files decode slower)"}
    for size in (224, 512):
        tf = transforms_from_config({"size": size, "train": {}}, train=True)
        cache = DecodeCache(tmp / "full", [p.name for p in files], size, tmp / f"cache{size}")
        for p in files:  # fill the cache (and warm the page cache for both paths)
            cache.image(p.name)
        from raycxr.readers import read_image

        t0 = time.perf_counter()
        for _ in range(2):
            for p in files:
                tf({"image": read_image(p)[None]})
        decode = 2 * len(files) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(4):
            for p in files:
                tf({"image": cache.image(p.name)[None]})
        cached = 4 * len(files) / (time.perf_counter() - t0)
        demand = GPU_DEMAND[size]
        res[str(size)] = {"decode_images_per_s_per_core": round(decode, 1),
                          "cached_images_per_s_per_core": round(cached, 1),
                          "gpu_demand_images_per_s": demand,
                          "replicas_per_gpu_decode": int(np.ceil(demand / decode)),
                          "replicas_per_gpu_cached": int(np.ceil(demand / cached))}
    return res


AUG_BATCH = 64  # the device augmentation's batch in the CPU measurement


def _dataset_rate(ds: object, seconds: float = 3.0, batch: int = 32) -> float:
    """Host images/s (this process, one thread) of ``ds[i]`` for every index + collation in batches,
    repeated passes for at least ``seconds``."""
    from raycxr.dataset import collate_skip_none

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for k in range(0, len(ds), batch):
            b = collate_skip_none([ds[i] for i in range(k, min(k + batch, len(ds)))])
            n += len(b["image"])
    return n / (time.perf_counter() - t0)


def device_data_plane(overrides: list[str], tmp: Path, size: int = 224, rounds: int = ROUNDS) -> dict:
    """Host images/s per core of a site's training data at ``size`` px with the decode cache (uint16),
    ``transforms.augment`` host vs device in alternating rounds; BatchAugment's cost on this CPU."""
    from omegaconf import OmegaConf

    from raycxr import cache as cache_mod
    from raycxr.config import compose
    from raycxr.dataset import site_dataset
    from raycxr.train.local import select_sites
    from raycxr.transforms import augment_batch, batch_augment_from_config

    torch.set_num_threads(1)
    cache_mod._OPEN.clear()
    sets, tf = {}, None
    for place in ("host", "device"):
        cfg = compose("pretrain", [*overrides, f"image_size={size}", "transforms.cache.enabled=true",
                                   f"transforms.cache.dir={tmp / 'cache_plane'}", f"transforms.augment={place}"])
        tf = OmegaConf.to_container(cfg.transforms, resolve=True)
        sets[place] = site_dataset(select_sites(cfg)["nih"], tf, split="train", train=True)
    _dataset_rate(sets["device"], seconds=0.0)  # one pass fills the cache (both read the same one)
    runs = []
    for _ in range(rounds):
        runs.append({place: _dataset_rate(ds) for place, ds in sets.items()})
    host = statistics.median(r["host"] for r in runs)
    device = statistics.median(r["device"] for r in runs)
    ratios = [r["device"] / r["host"] for r in runs]
    # the trainer's side on this CPU: int16-packed uint16 -> float + augmentation, batched
    from raycxr.dataset import collate_skip_none

    ds = sets["device"]
    batch = collate_skip_none([ds[i % len(ds)] for i in range(AUG_BATCH)])
    augment = batch_augment_from_config(tf, seed=0)
    augment_batch(batch, augment)  # warm-up
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        augment_batch(batch, augment)
        k += AUG_BATCH
    aug_rate = k / (time.perf_counter() - t0)
    demand = GPU_DEMAND[size]
    return {"size": size, "images": len(ds), "cache_dtype": "uint16",
            "host_augment_images_per_s_per_core": round(host, 1),
            "device_plane_images_per_s_per_core": round(device, 1),
            "device_vs_host": {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
                               "max": round(max(ratios), 2)},
            "gpu_demand_images_per_s": demand,
            "host_cores_per_gpu_host_augment": int(np.ceil(demand / host)),
            "host_cores_per_gpu_device_plane": int(np.ceil(demand / device)),
            "batch_augment_cpu_images_per_s_1_thread": round(aug_rate, 1),
            "rounds": [{k: round(v, 1) for k, v in r.items()} for r in runs]}


def markdown(res: dict) -> str:
    r, c, g, p = res["data_planes"], res["decode_cache"], res["grad_sync"], res["per_core"]
    a = res["autoscaled"]

    def ratio(q: dict) -> str:
        return f"{q['median']}x (rounds {q['min']}-{q['max']})"

    w, k = c["without_cache"]["epoch_seconds"], c["with_cache"]["epoch_seconds"]
    notes = [res[k] for k in res if k.startswith("note_")]  # sections rerun alone (--only)
    lines = ["# Scale-out benchmark (`benchmarks/scaleout.py`)", "", res["note"], "", *[f"{n}\n" for n in notes],
             "| measure | figure |", "|---|---|",
             f"| site serving, 1 replica | {r['replicas_1_images_per_s']} images/s |",
             f"| site serving, 2 replicas | {r['replicas_2_images_per_s']} images/s ({r['speed_up_2_vs_1']}x) |",
             f"| Ray Data, `map_batches` concurrency 1 | {r['ray_data_concurrency_1_images_per_s']} images/s; "
             f"{ratio(r['ray_data_vs_actor_1'])} the replica's |",
             f"| Ray Data, `map_batches` concurrency 2 | {r['ray_data_concurrency_2_images_per_s']} images/s; "
             f"{ratio(r['ray_data_vs_actor_2'])} the 2 replicas' |",
             f"| decode time per image in the serving process: site replica / Ray Data stage | "
             f"{r['busy_images_per_s']} / {r['ray_data_busy_images_per_s']} images/s of busy time; "
             f"{ratio(r['ray_data_vs_actor_busy'])} |",
             f"| site serving, autoscaled (`auto` from 1, windows of {AUTOSCALE_EVERY} batches) beside 2 fixed "
             f"replicas just before | {a['replicas_auto_images_per_s']} vs {a['replicas_2_images_per_s']} images/s, "
             f"{a['auto_replicas_at_end']} replicas at the end ({a['auto_decisions']}; timed after "
             f"{a['auto_warm_up_s']} s of warm-up) |",
             f"| trainer consumption (ResNet-18, {SIZE} px, batch {BATCH}, 1 thread) | "
             f"{res['trainer_images_per_s']} images/s |",
             f"| epoch s without cache (epochs 1-3, {c['without_cache']['images']} images) | {w} |",
             f"| epoch s with cache (epochs 1-3) | {k} (later epochs {c['later_epoch_speed_up']}x faster) |",
             f"| step ms, 2 gloo workers: per-tensor / bucketed / torch DDP | {g['per_tensor_step_ms']} / "
             f"{g['bucketed_step_ms']} / {g['ddp_step_ms']} |"]
    for size in ("224", "512"):
        q = p[size]
        lines.append(f"| {size} px per core: decode / cache (images/s); replicas per GPU at "
                     f"{q['gpu_demand_images_per_s']:.0f} images/s | {q['decode_images_per_s_per_core']} / "
                     f"{q['cached_images_per_s_per_core']}; {q['replicas_per_gpu_decode']} / "
                     f"{q['replicas_per_gpu_cached']} |")
    d = res.get("device_plane")
    if d:
        q = d["device_vs_host"]
        lines += [f"| {d['size']} px site training data per host core, decode cache ({d['cache_dtype']}): "
                  f"`transforms.augment=host` / `device` (images/s) | {d['host_augment_images_per_s_per_core']} / "
                  f"{d['device_plane_images_per_s_per_core']}; {q['median']}x (rounds {q['min']}-{q['max']}) |",
                  f"| host cores per GPU at {d['gpu_demand_images_per_s']:.0f} images/s ({d['size']} px): host / "
                  f"device augmentation | {d['host_cores_per_gpu_host_augment']} / "
                  f"{d['host_cores_per_gpu_device_plane']} |",
                  f"| the device augmentation's own cost on this CPU (`BatchAugment`, batch {AUG_BATCH}, "
                  f"{d['size']} px, 1 thread) | {d['batch_augment_cpu_images_per_s_1_thread']} images/s |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", choices=["device_plane"], default=None,
                    help="run one section and merge it into the existing results (the others keep their run)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="scaleout_"))
    try:
        overrides = corpus(tmp, args.images)
        load0 = os.getloadavg()[0]
        out = Path(args.out)
        if args.only:  # one section, merged into the last full run's results
            res = json.loads((out / "scaleout.json").read_text())
            res[args.only] = device_data_plane(overrides, tmp)
            res["note_" + args.only] = (f"The `transforms.augment` rows were measured by a later run of that section "
                                        f"alone (`--only {args.only}`, 1-minute load average {load0:.1f} at its "
                                        "start); host and device paths alternate within it, so their ratio holds.")
            (out / "scaleout.json").write_text(json.dumps(res, indent=2))
            (out / "scaleout.md").write_text(markdown(res))
            print(markdown(res))
            return
        res = {"image_size": SIZE, "batch_size": BATCH}
        res["trainer_images_per_s"] = round(trainer_rate(), 1)
        res["decode_cache"] = cache_epochs(overrides, tmp)
        res["grad_sync"] = grad_sync_times(tmp)
        res["per_core"] = per_core_rates(tmp)
        res["device_plane"] = device_data_plane(overrides, tmp)
        res["data_planes"] = data_planes(overrides)
        # the autoscaled pool beside 2 fixed replicas measured just before it
        res["autoscaled"] = replica_rates(overrides, counts=(2, "auto"), every=AUTOSCALE_EVERY)
        res["note"] = (f"One run on {os.cpu_count()} cores, 1-minute load average {load0:.1f} at the start and "
                       f"{os.getloadavg()[0]:.1f} at the end: absolute figures are noisy, the ratios within the run "
                       "are what carries over.")
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaleout.json").write_text(json.dumps(res, indent=2))
        (out / "scaleout.md").write_text(markdown(res))
        print(markdown(res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
