"""GPU check: every method for a few hundred steps at 224 and 512 px, with the figures a cluster needs.

For each method and size it builds the method exactly as ``raycxr pretrain`` does (registry, config,
``place``: bf16 autocast, channels_last, optional ``torch.compile``), trains one warm-up unit, counts
the FLOPs of one training step (``torch.utils.flop_counter.FlopCounterMode``: forward and backward),
then times ``--steps`` steps and reports

- images/s of the trainer (the batch is a real collated batch of the synthetic corpus, kept on the
  device and repeated, so the figure is the trainer's alone);
- GPU utilisation (``nvidia-smi`` sampled while it runs) and peak memory (``max_memory_allocated``);
- achieved TFLOP/s and MFU against the GPU's dense bf16 peak (a table by device name, or ``--peak-tflops``);
- the data plane beside it: images/s that the site datasets (decode + augment; with the decode
  cache, after a first pass that fills it) deliver with ``--data-workers`` processes, and the number
  of such processes one GPU needs at this trainer's rate.

    bash benchmarks/gpu_check.sh              # on a GPU machine (< 5 min): benchmarks/results/gpu_check.{json,md}
    bash benchmarks/gpu_check.sh --dry-run    # the same code on CPU at tiny size (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
                    "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "A6000": 155.0}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


class GpuSampler:
    """``nvidia-smi`` utilisation of one GPU, sampled every ``period`` s in a thread (None without it)."""

    def __init__(self, index: int, period: float = 0.25) -> None:
        self.index, self.period, self.samples = index, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


class RepeatLoader:
    """One real collated batch, on the device, ``steps`` times: the trainer's rate without the data plane's
    (with ``transforms.augment=device`` the batch's augmentation on the device is the trainer's, and timed)."""

    def __init__(self, loader: Any, steps: int, device: torch.device) -> None:
        from raycxr.engine.device import to_device

        self.batch = to_device(next(b for b in loader if b is not None), device)
        self.steps = steps
        self.augment = getattr(loader, "augment", None)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch

    def __len__(self) -> int:
        return self.steps


def repeat_data(cfg: Any, sites: dict, steps: int, device: torch.device) -> Any:
    """:class:`raycxr.train.local.LocalData` whose loaders repeat their first batch (no validation, no probe)."""
    from raycxr.train.local import LocalData

    class RepeatData(LocalData):
        def union_loader(self, second_view: bool | str = False) -> Any:
            return RepeatLoader(super().union_loader(second_view), steps, device)

        def site_loaders(self, second_view: bool = True) -> dict[str, Any]:
            return {n: RepeatLoader(x, steps, device) for n, x in super().site_loaders(second_view).items()}

        def val_batches(self) -> None:
            return None

        def probe(self) -> None:
            return None

    return RepeatData(cfg, sites)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_method(method: str, size: int, args: argparse.Namespace, site_overrides: list[str], tmp: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from raycxr.config import compose
    from raycxr.methods import get_method
    from raycxr.train.driver import Run
    from raycxr.train.local import select_sites

    cls = get_method(method)
    own = ["site_names=[nih]"] if method == "single" else []  # the single-site baseline trains one site
    base = [*own, f"method={method}", f"image_size={size}", f"batch_size={args.batch}", f"encoder.name={args.encoder}",
            "probe_size=0", "val.enabled=false", "schedule.kind=none", f"device={args.device}",
            f"compile={args.compile}", f"max_steps_per_epoch={args.steps}", f"out={tmp / method}", *site_overrides,
            *args.override]
    cfg = compose("pretrain", base)
    sites = select_sites(cfg)
    cfg = compose("pretrain", [*base, *cls.budget_overrides(cfg, 3, len(sites))])
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    m = cls(cfg, sites, repeat_data(cfg, sites, args.steps, device))
    m.run = Run(tmp / method)
    m.setup(None)
    units = m.units()
    if len(units) < 3:
        raise RuntimeError(f"{method}: expected >= 3 units from budget_overrides, got {len(units)}")
    # unit 0: warm-up (cuDNN autotuning, compilation, allocator); unit 1: one step's FLOPs; unit 2: timed
    m.start_unit(units[0], 0)
    m.run_unit(units[0], 0)
    cfg.max_steps_per_epoch = 1
    m.start_unit(units[1], 1)
    with FlopCounterMode(display=False) as fc:
        m.run_unit(units[1], 1)
    flops_per_step = fc.get_total_flops()
    cfg.max_steps_per_epoch = args.steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    m.start_unit(units[2], 2)
    with GpuSampler(device.index or 0) as gpu:
        sync(device)
        t0 = time.perf_counter()
        means = m.run_unit(units[2], 2)
        sync(device)
        seconds = time.perf_counter() - t0
    steps = int(means["steps"])
    tflops = flops_per_step * steps / seconds / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", args.peak_tflops)
    return {"method": method, "size": size, "stage": units[2].stage, "batch": args.batch, "steps": steps,
            "images_per_s": round(means["images"] / seconds, 1), "step_ms": round(1000 * seconds / steps, 1),
            "gflops_per_image": round(flops_per_step / args.batch / 1e9, 2), "tflops_per_s": round(tflops, 2),
            "mfu_percent": round(100 * tflops / peak, 1) if peak else None,
            "gpu_util_percent": gpu.mean if device.type == "cuda" else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else None}


def data_plane_rate(size: int, args: argparse.Namespace, site_overrides: list[str], cache_dir: Path) -> dict:
    """Images/s the site datasets deliver with ``--data-workers`` processes, without and with the decode
    cache (its second pass): decode (+ augment with ``transforms.augment=host``; with ``device``, the
    default, the trainer augments)."""
    from torch.utils.data import ConcatDataset, DataLoader

    from raycxr.config import compose
    from raycxr.dataset import collate_skip_none
    from raycxr.train.local import LocalData, select_sites

    out = {}
    for cache in (False, True):
        cfg = compose("pretrain", [f"image_size={size}", f"batch_size={args.batch}", *site_overrides,
                                   f"transforms.cache.enabled={str(cache).lower()}",
                                   f"transforms.cache.dir={cache_dir}"])
        data = LocalData(cfg, select_sites(cfg))
        ds = ConcatDataset(list(data.datasets(union=True).values()))
        loader = DataLoader(ds, batch_size=args.batch, num_workers=args.data_workers, collate_fn=collate_skip_none,
                            persistent_workers=args.data_workers > 0)
        passes = 2 if cache else 1
        for _ in range(passes):  # with the cache: the first pass fills it, the second is timed
            t0, n = time.perf_counter(), 0
            for b in loader:
                n += 0 if b is None else len(b["image"])
            rate = n / (time.perf_counter() - t0)
        out["cached" if cache else "decode"] = round(rate, 1)
    return out


def markdown(res: dict) -> str:
    lines = [f"# GPU check ({res['device']}{', dry run on CPU' if res['dry_run'] else ''})", "",
             f"encoder {res['encoder']}, batch {res['batch']}, {res['steps']} timed steps per cell, "
             f"peak {res['peak_tflops']} TFLOP/s, data plane with {res['data_workers']} worker processes", "",
             "| method | px | stage | images/s | step ms | GFLOP/image | TFLOP/s | MFU % | GPU util % | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["cells"]:
        lines.append(f"| {r['method']} | {r['size']} | {r['stage']} | {r['images_per_s']} | {r['step_ms']} | "
                     f"{r['gflops_per_image']} | {r['tflops_per_s']} | {r['mfu_percent']} | {r['gpu_util_percent']} | "
                     f"{r['peak_memory_gb']} |")
    lines += ["", "| px | data plane images/s (decode) | (decode cache) | processes per GPU at the fastest method |",
              "|---|---|---|---|"]
    for size, d in res["data_plane"].items():
        lines.append(f"| {size} | {d['decode']} | {d['cached']} | {d['processes_per_gpu_decode']} / "
                     f"{d['processes_per_gpu_cached']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="CPU, 32 px, 2 steps, tiny corpus: checks the code")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--encoder", default="resnet50")
    ap.add_argument("--compile", default="off")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--data-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--images-per-site", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("override", nargs="*", help="more pretrain overrides, key=value")
    args = ap.parse_args()
    if args.dry_run:
        args.sizes, args.steps, args.batch, args.encoder = [32], 2, 4, "resnet18"
        args.device, args.data_workers, args.images_per_site = "cpu", 0, 8
        torch.set_num_threads(1)
    from raycxr.methods import list_methods
    from raycxr.synth.generator import synthesize

    methods = args.methods or list_methods()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        render = max(args.sizes)  # files at the largest training size: the resize is part of the decode
        synthesize(tmp / "corpus", ["nih", "vindr"], n_per_site=args.images_per_site, seed=0, render_size=render,
                   workers=max(1, min(4, os.cpu_count() or 1)), progress=False, preview=False)
        (tmp / "sites").mkdir()
        for n in ("nih", "vindr"):
            (tmp / "sites" / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
        site_overrides = [f"sites.sites_dir={tmp / 'sites'}", f"sites.data_root={tmp / 'corpus'}"]
        cells = [check_method(m, s, args, site_overrides, tmp) for s in args.sizes for m in methods]
        for c in cells:
            print(json.dumps(c))
        data = {}
        for s in args.sizes:
            d = data_plane_rate(s, args, site_overrides, tmp / "cache")
            best = max(c["images_per_s"] for c in cells if c["size"] == s)
            per = max(args.data_workers, 1)
            d["processes_per_gpu_decode"] = round(best / (d["decode"] / per), 1)
            d["processes_per_gpu_cached"] = round(best / (d["cached"] / per), 1)
            data[str(s)] = d
        dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
        res = {"device": name, "dry_run": args.dry_run, "encoder": args.encoder, "batch": args.batch,
               "steps": args.steps, "compile": args.compile, "data_workers": args.data_workers,
               "peak_tflops": peak_tflops(name, args.peak_tflops), "cells": cells, "data_plane": data,
               "torch": torch.__version__}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "gpu_check_dryrun" if args.dry_run else "gpu_check"
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
        (out / f"{stem}.md").write_text(markdown(res))
        print(markdown(res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
