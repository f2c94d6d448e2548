"""Inference speed on CPU, in one run: PyTorch eager vs onnxruntime (float32 and INT8), and the HTTP service.

The same exported classifier of a pretraining run is timed at batch 1 and batch 32 with PyTorch
eager (the baseline) and with onnxruntime; INT8 is ``quantize_dynamic`` of the same ONNX file, and
its mean test AUC change is measured on the training sites. The service is the runtime's
``ThreadingHTTPServer`` on localhost, hit with real DICOM files by a bounded number of client threads.

    python benchmarks/onnx_inference.py --run runs/demo-unichest [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


def timed(fn, x, repeats: int) -> dict:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"median_ms": round(med * 1000, 2), "images_per_s": round(x.shape[0] / med, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo-unichest")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    from raycxr.config import compose
    from raycxr.export import compare_auc, export_onnx, ort_session, quantize_int8
    from raycxr.methods import load_pretrained
    from raycxr.sites.config import discover_sites
    from raycxr_runtime.model import Model
    from raycxr_runtime.server import make_server

    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp())
    exp = export_onnx(compose("export", [f"run={args.run}", f"out={tmp}"]))
    fp32, int8 = tmp / "classifier.onnx", tmp / "classifier.int8.onnx"
    quantize_int8(fp32, int8)
    pre = load_pretrained(args.run)
    s = pre.image_size
    sess = {"fp32": ort_session(fp32, threads), "int8": ort_session(int8, threads)}
    res: dict = {"run": args.run, "method": pre.method, "encoder": pre.encoder_name, "image_size": s,
                 "threads": threads, "repeats": args.repeats, "latency": {}}

    def torch_fn(x):
        with torch.inference_mode():
            return pre.classifier(torch.from_numpy(x)).numpy()

    for batch in (1, 32):
        x = np.random.default_rng(0).random((batch, 1, s, s), dtype=np.float32)
        row = {"pytorch_eager": timed(torch_fn, x, args.repeats)}
        for k, se in sess.items():
            row[f"onnxruntime_{k}"] = timed(lambda a, se=se: se.run(["probabilities"], {"image": a}), x, args.repeats)
        base = row["pytorch_eager"]["median_ms"]
        for k in ("onnxruntime_fp32", "onnxruntime_int8"):
            row[k]["speedup_vs_pytorch"] = round(base / row[k]["median_ms"], 2)
        res["latency"][f"batch_{batch}"] = row
        print(f"batch {batch}: {json.dumps(row)}")

    sites = discover_sites("sites", data_root="data")
    train_sites = {n: sites[n] for n in pre.sites if n in sites}

    def ort_fn(se):
        return lambda x: torch.from_numpy(se.run(["probabilities"], {"image": x.numpy()})[0])

    auc = compare_auc({"fp32": ort_fn(sess["fp32"]), "int8": ort_fn(sess["int8"])}, train_sites, pre.class_names,
                      image_size=s, batch_size=32)
    res["int8_auc"] = auc
    print(f"INT8 AUC: {json.dumps(auc)}")

    # the HTTP service under a bounded local load: real DICOM files of the demo corpus
    files = sorted(Path(sites[pre.sites[0]].root, "images").glob("*.dcm"))[:20]
    bodies = [f.read_bytes() for f in files]
    server = make_server(Model(fp32), host="127.0.0.1", port=0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def post(i: int) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=bodies[i % len(bodies)],
                                     headers={"Content-Type": "application/dicom"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status

    post(0)
    t = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        statuses = list(pool.map(post, range(args.requests)))
    wall = time.perf_counter() - t
    server.shutdown()
    res["service"] = {"requests": args.requests, "clients": args.clients, "seconds": round(wall, 2),
                      "requests_per_s": round(args.requests / wall, 1),
                      "ok": sum(st == 200 for st in statuses),
                      "file_bytes_mean": int(np.mean([len(b) for b in bodies]))}
    print(f"service: {json.dumps(res['service'])}")
    res["export_parity_max_abs_diff"] = max(p["max_abs_diff"] for p in exp["parity"].values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_inference.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out / 'onnx_inference.json'}")


if __name__ == "__main__":
    main()
