"""UmiF ablations as config, and CPU pretraining throughput beside UniChest and Ark, in one run.

Rows (each `raycxr pretrain method=umif` with the overrides shown, then `raycxr eval`'s pieces):

- p ∈ {0, 0.2, 0.5, 1} (`umif.p`; p = 1 is CLIP-like, r always 1);
- without image-segment pairs (`umif.segment_pairs=false`);
- without the teacher (`umif.teacher=false`: the alignment loss alone).

Each row reports the alignment loss on the fixed probe before and after training, the linear-probe mean
AUC on a site's test split (frozen CLS embeddings, train → test), image-report recall@1/5/10 on Open-I's
test reports, and the training throughput (images/s, validation excluded). The default row's ViT is
then segmented (lungs, every site) with the backbone frozen at 1 / 10 / 100 % of the training images
and fine-tuned at 100 %, each beside the same ViT from random initialisation. UniChest and Ark are trained
on the same sites with the same image size, batch and steps, for their throughput only.

The corpus is synthesised here (`raycxr synth`'s generator: nih, vindr, openi, siim), tiny, so the
figures are a smoke-level comparison, not a replication of the paper's tables. Measured on a shared,
loaded 2-core CPU: the throughput is a relative figure between methods of one run.

    python benchmarks/umif_ablation.py [--n-per-site 60] [--steps 5] [--epochs 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from raycxr.config import compose  # noqa: E402
from raycxr.eval.evaluate import linear_probe  # noqa: E402
from raycxr.eval.retrieval import image_report_retrieval  # noqa: E402
from raycxr.eval.segmentation import run_segmentation  # noqa: E402
from raycxr.methods import load_pretrained  # noqa: E402
from raycxr.sites.config import discover_sites  # noqa: E402
from raycxr.synth.generator import synthesize  # noqa: E402
from raycxr.train.local import run_pretrain  # noqa: E402

SITES = ["nih", "vindr", "openi", "siim"]
ROWS = {  # name -> overrides
    "p=0": ["umif.p=0.0"],
    "p=0.2 (default)": ["umif.p=0.2"],
    "p=0.5": ["umif.p=0.5"],
    "p=1 (CLIP-like)": ["umif.p=1.0"],
    "no image-segment pairs": ["umif.segment_pairs=false"],
    "no teacher": ["umif.teacher=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-site", type=int, default=60)
    ap.add_argument("--steps", type=int, default=5, help="optimiser steps per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--probe-site", default="nih")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="umif_ablation_"))
    t0 = time.perf_counter()
    synthesize(work / "data", SITES, n_per_site=args.n_per_site, seed=0, render_size=128, workers=1,
               preview=False, progress=False, split_fractions=(0.55, 0.05, 0.4),
               enrich={"classes": ["Pleural Effusion", "Cardiomegaly"],
                                                      "min_rate": 0.3})
    d = work / "sites"
    d.mkdir()
    for n in SITES:
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
    site_ov = [f"sites.sites_dir={d}", f"sites.data_root={work / 'data'}"]
    base = [*site_ov, f"image_size={args.image_size}", f"batch_size={args.batch_size}",
            f"max_steps_per_epoch={args.steps}", "threads=1", "probe_size=16", "val.enabled=false",
            "text.max_length=32", "encoder.embed_dim=64"]
    sites = discover_sites(d, data_root=work / "data")
    ev = compose("eval", [*site_ov, "bootstrap=0", "min_positives=2", "linear_probe.random_baseline=false",
                          "threads=1", "batch_size=16"])
    rows: dict[str, dict] = {}
    for name, ov in ROWS.items():
        out = work / "runs" / name.split(" ")[0].replace("=", "")
        if out.exists():
            out = out.with_name(out.name + "_" + str(len(rows)))
        res = run_pretrain(compose("pretrain", [*base, "method=umif", f"umif.epochs={args.epochs}", f"out={out}",
                                                *ov]))
        curve = [json.loads(x)["probe_align"] for x in open(out / "metrics.jsonl") if "probe_align" in x]
        pre = load_pretrained(out)
        lp, _ = linear_probe(pre, sites[args.probe_site], ev)
        rt = image_report_retrieval(pre, sites["openi"], ev)
        h = res["history"]
        rows[name] = {"overrides": ov, "probe_align_start": curve[0], "probe_align_end": curve[-1],
                      "train_loss_last": h[-1]["loss"],
                      "linear_probe_auc": lp["mean"].get("auc"), "linear_probe_site": args.probe_site,
                      "retrieval": {k: v for k, v in rt.items() if "_r@" in k or k in ("n_pairs", "chance")},
                      "images_per_s": float(np.mean([r["images_per_s"] for r in h])),
                      "pairs": {k: sum(r.get(k, 0) for r in h) for k in h[0] if k.startswith("pairs_")}}
        print(name, json.dumps(rows[name]))
    # segmentation of the default row: frozen ViT (pyramid + decoder trained) at 1 / 10 / 100 % of the train
    # images, beside the existing fine-tuned segmentation at 100 % (UmiF Table 3 protocol, lungs on every site)
    default_run = work / "runs" / "p0.2"
    seg = {}
    for label, ov in (("frozen 1%", ["freeze_encoder=true", "train_fraction=0.01"]),
                      ("frozen 10%", ["freeze_encoder=true", "train_fraction=0.1"]),
                      ("frozen 100%", ["freeze_encoder=true", "train_fraction=1.0"]),
                      ("fine-tuned 100%", ["freeze_encoder=false", "train_fraction=1.0"])):
        r = run_segmentation(compose("segment", [f"run={default_run}", *site_ov, f"tasks.lungs=[{','.join(SITES)}]",
                                                 "tasks.pneumothorax=null", "inits=[pretrained,random]",
                                                 f"image_size={args.image_size}", "epochs=2",
                                                 f"max_steps_per_epoch={args.steps * 2}", "batch_size=8",
                                                 "threads=1", "n_figure=1", f"out={work / 'seg' / label}", *ov]))
        seg[label] = {row["init"]: {"dice_mean": row["dice_mean"], "n_train": row["n_train"], "n_test": row["n_test"]}
                      for row in r["rows"]}
        print(label, json.dumps(seg[label]))
    throughput = {"umif (vit_tiny)": rows["p=0.2 (default)"]["images_per_s"]}
    for method, ov in (("unichest", ["unichest.conquer_epochs=2", "unichest.divide_epochs=0", "unichest.n_experts=2",
                                     "unichest.query={n_layers: 1, n_heads: 2, ffn: 128, dropout: 0.0, "
                                     "lambda_local: 1.0, lambda_global: 0.4}"]),
                       ("ark", ["ark.rounds=1", "ark.proj_dim=64"])):
        out = work / "runs" / method
        res = run_pretrain(compose("pretrain", [*base, f"method={method}", f"out={out}", *ov]))
        throughput[f"{method} (resnet18)"] = float(np.mean([r["images_per_s"] for r in res["history"]]))
    result = {"note": "measured on a shared, loaded 2-core CPU (one thread) on a tiny synthetic corpus: smoke-level "
                      "figures; throughput is relative between the methods of this one run",
              "settings": vars(args) | {"sites": SITES}, "rows": rows, "segmentation_lungs_dice": seg,
              "throughput_images_per_s": throughput,
              "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "umif_ablation.json").write_text(json.dumps(result, indent=2))
    (out / "umif_ablation.md").write_text(markdown(result))
    print(markdown(result))


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# UmiF ablations (tiny synthetic corpus, CPU)", "",
             f"{r['note']}. Sites {', '.join(s['sites'])}, {s['n_per_site']} images each, {s['image_size']} px, "
             f"batch {s['batch_size']}, {s['epochs']} epochs x {s['steps']} steps; linear probe on "
             f"{s['probe_site']} (train → test), retrieval on openi's test reports.", "",
             "| row | probe align start → end | LP mean AUC | i→t R@1/5/10 | t→i R@1/5/10 | images/s |",
             "|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        rt = row["retrieval"]
        i2t = "/".join(_f(rt.get(f"image_to_text_r@{k}")) for k in (1, 5, 10))
        t2i = "/".join(_f(rt.get(f"text_to_image_r@{k}")) for k in (1, 5, 10))
        lines.append(f"| {name} | {_f(row['probe_align_start'])} → {_f(row['probe_align_end'])} | "
                     f"{_f(row['linear_probe_auc'])} | {i2t} | {t2i} | {row['images_per_s']:.1f} |")
    chance = next(iter(r["rows"].values()))["retrieval"]
    lines += ["", f"Retrieval over {chance.get('n_pairs')} pairs; chance {chance.get('chance')}.", "",
              "Pretraining throughput, same sites / size / batch / steps (images/s, validation excluded):", "",
              "| method | images/s |", "|---|---|"]
    lines += [f"| {m} | {v:.1f} |" for m, v in r["throughput_images_per_s"].items()]
    lines += ["", "Lung segmentation (all sites), default row's ViT vs the same ViT from random init, test Dice:", "",
              "| setting | n train | UmiF ViT | random init |", "|---|---|---|---|"]
    for label, by in r["segmentation_lungs_dice"].items():
        lines.append(f"| {label} | {by['pretrained']['n_train']} | {_f(by['pretrained']['dice_mean'])} | "
                     f"{_f(by.get('random', {}).get('dice_mean'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
