"""Inference speed on CPU, in one run: PyTorch eager (the baseline) vs onnxruntime float32, INT8 dynamic and
INT8 static QDQ, and OpenVINO when installed; ORT graph optimisation levels and thread counts; the HTTP service.

The same exported classifier of a pretraining run is timed at batch 1 and batch 32. INT8 *dynamic* is
``quantize_dynamic``; INT8 *static* is QDQ with per-channel weights calibrated on training-split images
(``raycxr export int8_mode=static``). Their mean test AUC change is measured on the training sites.

PyTorch eager against onnxruntime float32 (``pytorch_baseline``): each is timed in a process of its own
(multiprocessing spawn), with the same number of intra-op threads (``torch.set_num_threads``, ORT
``intra_op_num_threads``) and one inter-op thread, in alternating blocks (eager, ORT, eager, ORT...) so drift
on a shared machine hits both. In one process the two runtimes' thread pools fought over the cores: PyTorch
eager measured 0.14-2.3 s at batch 1 there, against 36 ms in an earlier run. The onnxruntime variants
(float32, INT8) are timed in interleaved rounds in this process (one call of each per round; medians,
ratios against float32 in the same rounds). OpenVINO runs the same ONNX files, timed in rounds of its own
against onnxruntime float32; its largest difference from onnxruntime float32 is recorded.

    python benchmarks/onnx_inference.py --run runs/demo-unichest [--data data] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch


def interleaved(fns: dict[str, Any], x: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Median latency of each function on ``x``, one call of each per round (after a warm-up call each)."""
    for fn in fns.values():
        fn(x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - t)
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"median_ms": round(med * 1000, 2), "images_per_s": round(x.shape[0] / med, 1)}
    return out


def time_alone(kind: str, target: str, batches: list[int], image_size: int, rounds: int,
               threads: int) -> dict[int, list[float]]:
    """Seconds per call of one runtime, alone in this (spawned) process with ``threads`` intra-op threads.

    ``kind``: ``pytorch_eager`` (``target``: the run) or ``onnxruntime_fp32`` (``target``: the ONNX file,
    opened as the hospital runtime opens it)."""
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    if kind == "pytorch_eager":
        from raycxr.methods import load_pretrained

        model = load_pretrained(target).classifier.eval()

        def fn(a: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(a))
    else:
        from raycxr_runtime import contract

        se = contract.session(target, threads=threads, quiet=True)

        def fn(a: np.ndarray) -> Any:
            return se.run([contract.PROBABILITIES], {contract.INPUT: a})[0]
    rng = np.random.default_rng(0)
    out: dict[int, list[float]] = {}
    for b in batches:
        x = rng.random((b, 1, image_size, image_size), dtype=np.float32)
        for _ in range(2):  # warm-up: first-call allocations, ORT's arena
            fn(x)
        ts = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t)
        out[b] = ts
    return out


def pytorch_baseline(run: str, onnx_file: Path, batches: list[int], image_size: int, repeats: int, threads: int,
                     blocks: int) -> dict[str, Any]:
    """PyTorch eager vs onnxruntime float32, each in its own spawned process, ``blocks`` alternating blocks."""
    ctx = multiprocessing.get_context("spawn")
    kinds = {"pytorch_eager": run, "onnxruntime_fp32": str(onnx_file)}
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in kinds}
    rounds = max(1, -(-repeats // blocks))
    for _ in range(blocks):
        for kind, target in kinds.items():
            with ctx.Pool(1) as pool:
                got = pool.apply(time_alone, (kind, target, batches, image_size, rounds, threads))
            for b, ts in got.items():
                times[kind][b] += ts
    res: dict[str, Any] = {"method": f"each runtime alone in a spawned process, {threads} intra-op thread(s) and "
                                     f"1 inter-op thread each, {blocks} alternating blocks of {rounds} calls",
                           "threads": threads}
    for b in batches:
        row = {}
        for kind in kinds:
            med = statistics.median(times[kind][b])
            row[kind] = {"median_ms": round(med * 1000, 2), "images_per_s": round(b / med, 1),
                         "min_ms": round(min(times[kind][b]) * 1000, 2), "max_ms": round(max(times[kind][b]) * 1000, 2)}
        row["onnxruntime_fp32"]["speedup_vs_pytorch"] = round(row["pytorch_eager"]["median_ms"]
                                                              / row["onnxruntime_fp32"]["median_ms"], 2)
        res[f"batch_{b}"] = row
    return res


def cpu_info() -> dict[str, Any]:
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        model = platform.processor()
    return {"model": model, "cores": os.cpu_count(),
            "int8_instructions": sorted({f for f in flags.split() if f in ("avx512_vnni", "avx_vnni", "amx_int8",
                                                                             "avx512f", "avx2")})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo-unichest")
    ap.add_argument("--data", default="data", help="the data root the run's sites (sites/*.yaml) resolve against")
    ap.add_argument("--blocks", type=int, default=3, help="alternating process blocks of the PyTorch baseline")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--calibration-images", type=int, default=64)
    args = ap.parse_args()
    import onnxruntime as ort

    from raycxr.config import compose
    from raycxr.export import compare_auc, export_onnx, quantize_int8, real_batch
    from raycxr.methods import load_pretrained
    from raycxr.sites.config import discover_sites
    from raycxr_runtime.model import Model
    from raycxr_runtime.server import make_server

    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp())
    exp = export_onnx(compose("export", [f"run={args.run}", f"out={tmp}", f"sites.data_root={args.data}"]))
    pre = load_pretrained(args.run)
    s = pre.image_size
    sites = discover_sites("sites", data_root=args.data)
    train_sites = {n: sites[n] for n in pre.sites if n in sites}
    fp32 = tmp / "classifier.onnx"
    files = {"fp32": fp32, "int8_dynamic": tmp / "classifier.int8-dynamic.onnx",
             "int8_static": tmp / "classifier.int8-static.onnx"}
    quantize_int8(fp32, files["int8_dynamic"], mode="dynamic")
    calib = real_batch(train_sites, pre.class_names, s, args.calibration_images, split="train")
    quantize_int8(fp32, files["int8_static"], mode="static", calibration=calib)

    def session(path: Path, level: Any = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, n: int = threads) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.intra_op_num_threads = n
        opts.log_severity_level = 3
        # no busy-waiting after a run: spinning ORT threads would steal the cores from the next variant
        # of the interleaved round (PyTorch measured 30x slower at batch 1 with spinning on)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def ort_fn(se: Any) -> Any:
        return lambda a: se.run(["probabilities"], {"image": a})[0]

    def torch_fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return pre.classifier(torch.from_numpy(x)).numpy()

    variants: dict[str, Any] = {}  # PyTorch eager is timed in processes of its own (pytorch_baseline)
    for k, path in files.items():
        variants[f"onnxruntime_{k}"] = ort_fn(session(path))
    not_run: dict[str, str] = {}
    try:
        import openvino  # noqa: F401

        for k in ("fp32", "int8_static"):
            try:
                variants[f"openvino_{k}"] = Model(files[k], threads=threads, backend="openvino").predict
            except Exception as exc:  # recorded, not fatal: OpenVINO may not compile every QDQ graph
                not_run[f"openvino_{k}"] = " ".join(str(exc).split())[:300]
    except ImportError:
        not_run["openvino"] = "openvino is not installed"
    gol = ort.GraphOptimizationLevel
    levels = {"disable": gol.ORT_DISABLE_ALL, "basic": gol.ORT_ENABLE_BASIC, "extended": gol.ORT_ENABLE_EXTENDED,
              "all": gol.ORT_ENABLE_ALL}
    tuning = {f"fp32_level_{n}": ort_fn(session(fp32, lv)) for n, lv in levels.items()}
    tuning |= {f"fp32_threads_{n}": ort_fn(session(fp32, n=n)) for n in sorted({1, threads})}
    tuning |= {f"int8_static_threads_{n}": ort_fn(session(files["int8_static"], n=n)) for n in sorted({1, threads})}

    res: dict[str, Any] = {"run": args.run, "method": pre.method, "encoder": pre.encoder_name,
                           "image_size": s, "threads": threads, "repeats": args.repeats, "cpu": cpu_info(),
                           "onnxruntime": ort.__version__, "latency": {}, "ort_settings": {}, "not_run": not_run}
    res["pytorch_baseline"] = pytorch_baseline(args.run, fp32, [1, 32], s, args.repeats, threads, args.blocks)
    print(f"PyTorch baseline: {json.dumps(res['pytorch_baseline'])}", flush=True)
    rng = np.random.default_rng(0)
    for batch in (1, 32):
        x = rng.random((batch, 1, s, s), dtype=np.float32)
        # OpenVINO's worker threads keep the cores busy after a call: it is timed in rounds of its own
        ort_group = {k: v for k, v in variants.items() if not k.startswith("openvino")}
        row = interleaved(ort_group, x, args.repeats)
        base = row["onnxruntime_fp32"]["median_ms"]
        for k in row:
            row[k]["speedup_vs_onnxruntime_fp32"] = round(base / row[k]["median_ms"], 2)
        ov_group = {k: v for k, v in variants.items() if k.startswith("openvino")}
        if ov_group:
            ov_rows = interleaved({"onnxruntime_fp32": variants["onnxruntime_fp32"], **ov_group}, x, args.repeats)
            ref = ov_rows["onnxruntime_fp32"]["median_ms"]
            for k in ov_group:
                row[k] = {**ov_rows[k], "speedup_vs_onnxruntime_fp32": round(ref / ov_rows[k]["median_ms"], 2),
                          "onnxruntime_fp32_same_rounds_ms": ref}
        res["latency"][f"batch_{batch}"] = row
        print(f"batch {batch}: {json.dumps(row)}", flush=True)
        tune = interleaved(tuning, x, args.repeats)
        ref = tune["fp32_level_all"]["median_ms"]
        for k in tune:
            tune[k]["ratio_vs_level_all"] = round(ref / tune[k]["median_ms"], 2)
        res["ort_settings"][f"batch_{batch}"] = tune
        print(f"ORT settings, batch {batch}: {json.dumps(tune)}", flush=True)

    # outputs: INT8 / OpenVINO against ORT float32 on real test images
    real = real_batch(train_sites, pre.class_names, s, 32, split="test")
    ref_out = variants["onnxruntime_fp32"](real)
    res["max_abs_diff_vs_ort_fp32"] = {k: float(np.max(np.abs(fn(real) - ref_out)))
                                       for k, fn in {"pytorch_eager": torch_fn, **variants}.items()
                                       if k != "onnxruntime_fp32"}
    print(f"max |diff| vs ORT fp32: {json.dumps(res['max_abs_diff_vs_ort_fp32'])}", flush=True)

    def auc_fn(fn: Any) -> Any:
        return lambda t: torch.from_numpy(np.asarray(fn(np.ascontiguousarray(t.numpy(), np.float32))))

    auc = compare_auc({k: auc_fn(variants[f"onnxruntime_{k}"]) for k in files}, train_sites, pre.class_names,
                      image_size=s, batch_size=32, progress=False)
    for row in auc.values():
        for k in ("int8_dynamic", "int8_static"):
            row[f"{k}_delta"] = None if row["fp32"] is None or row[k] is None else round(row[k] - row["fp32"], 4)
    res["int8_auc"] = auc
    print(f"AUC: {json.dumps(auc)}", flush=True)

    # the HTTP service under a bounded local load: real DICOM files of the demo corpus
    dicoms = sorted(Path(sites[pre.sites[0]].root, "images").glob("*.dcm"))[:20]
    bodies = [f.read_bytes() for f in dicoms]
    server = make_server(Model(fp32), host="127.0.0.1", port=0, decode_workers=2)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def post(i: int) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=bodies[i % len(bodies)],
                                     headers={"Content-Type": "application/dicom"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status

    for i in range(4):
        post(i)
    t = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        statuses = list(pool.map(post, range(args.requests)))
    wall = time.perf_counter() - t
    server.shutdown()
    thread.join(10)
    server.server_close()
    res["service"] = {"stack": "starlette + uvicorn (h11), 2 isolated decode workers", "requests": args.requests,
                      "clients": args.clients, "seconds": round(wall, 2),
                      "requests_per_s": round(args.requests / wall, 1), "ok": sum(st == 200 for st in statuses),
                      "file_bytes_mean": int(np.mean([len(b) for b in bodies]))}
    print(f"service: {json.dumps(res['service'])}", flush=True)
    res["export_parity_max_abs_diff"] = max(p["max_abs_diff"] for p in exp["parity"].values())
    res["sizes_mb"] = {k: round(p.stat().st_size / 1e6, 2) for k, p in files.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_inference.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out / 'onnx_inference.json'}")


if __name__ == "__main__":
    main()
