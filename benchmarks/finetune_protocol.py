"""How long, and how fast, must the study fine-tune? Random init vs the ``mixed`` encoder on the study corpus.

The study's first fine-tuning recipe (2 epochs, encoder lr 1e-4, head lr 1e-3, constant) left fine-tuned
AUCs below the linear probe's and random init below chance out of distribution: nothing had converged.
This benchmark fine-tunes the same two encoders on the target's whole training split (CheXpert, 100 %,
seed 0) over a grid of (epochs, head lr, encoder lr, schedule) and scores the five CheXpert diseases
(mean AUC over those with >= 10 test positives and negatives) in distribution (chexpert) and on two
other sites (nih, vindr). The two encoders come from a small study (``name=ftprobe``: rows random and
mixed, the default study's pretraining recipe and budget), made first if absent.

A second table (``--small``) fine-tunes 1 % and 10 % of the split (seeds 0-2) three ways: the head's bias
starting at 0 over 3 epochs (the old recipe), starting at the classes' priors (``prior_bias``), and the
priors plus at least 30 optimiser steps (``min_steps``).

    python benchmarks/finetune_protocol.py [--grid 3:1e-2:1e-3:cosine,...] [--rows random,mixed] [--small]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

DISEASES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
STUDY = ["name=ftprobe", "downstream.seeds=[0]", "downstream.fractions=[1.0]", "downstream.lp_ft=false",
         "include_registered=false", "rows=[{name: random, method: null}, {name: mixed, method: mixed}]"]
GRID = ("2:1e-3:1e-4:constant,2:1e-2:1e-4:constant,6:1e-2:1e-4:constant,6:1e-3:3e-4:constant,"
        "3:1e-2:3e-4:cosine,3:1e-2:1e-3:cosine,3:1e-3:1e-3:cosine,4:1e-2:1e-3:cosine,5:1e-2:1e-3:cosine,"
        "4:1e-3:3e-4:cosine")


def disease_auc(p) -> float:
    from raycxr.engine.metrics import _rank_auc

    aucs = []
    for j, c in enumerate(p.class_names):
        if c in DISEASES:
            m = p.mask[:, j] > 0
            y = p.targets[m, j] > 0.5
            if y.sum() >= 10 and (~y).sum() >= 10:
                aucs.append(_rank_auc(y, p.probs[m, j]))
    return round(float(np.mean(aucs)), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default=GRID, help="epochs:head_lr:lr:schedule, comma separated")
    ap.add_argument("--rows", default="random,mixed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="only the 1 %% / 10 %% table")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from raycxr.config import compose
    from raycxr.eval.predict import predict_site
    from raycxr.eval.transfer import fine_tune_model
    from raycxr.study.cells import _sites, load_encoder
    from raycxr.study.run import _row_overrides, build_rows, run_study

    cfg = compose("study", STUDY)
    if not (Path(cfg.out) / "cells" / "pretrain" / "mixed" / "cell.json").is_file():
        run_study(cfg)  # the two encoders (and the corpus, if absent)
    rows = {r.name: r for r in build_rows(cfg)}
    spec0 = {"sites_dir": str(cfg.sites.sites_dir), "data_root": str(cfg.sites.data_root)}
    sites = _sites(spec0)
    classes = list(sites["chexpert"].load_manifest().label_names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.small:
        small = small_fractions(cfg, rows, spec0, sites, classes, args.rows.split(","))
        path = out / "finetune_protocol.json"
        res = json.loads(path.read_text()) if path.is_file() else {}
        res["small_fractions"] = small
        path.write_text(json.dumps(res, indent=1))
        return
    results = []
    for name in args.rows.split(","):
        row = rows[name]
        spec = {**spec0, "overrides": _row_overrides(cfg, row),
                "checkpoint": str(Path(cfg.out) / "cells" / "pretrain" / name / "run") if row.method else None}
        for g in args.grid.split(","):
            ep, hlr, lr, sched = g.split(":")
            enc, size, _ = load_encoder(spec)
            t0 = time.perf_counter()
            model, steps = fine_tune_model(enc, sites["chexpert"], image_size=size, seed=0, batch_size=32,
                                           epochs=int(ep), lr=float(lr), head_lr=float(hlr), cache=True,
                                           schedule=sched)
            r = {"row": name, "epochs": int(ep), "head_lr": float(hlr), "lr": float(lr), "schedule": sched,
                 "steps": steps}
            for s in ("chexpert", "nih", "vindr"):
                r[s] = disease_auc(predict_site(model, sites[s], classes, split="test", image_size=size,
                                                progress=False, cache=True))
            r["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(r), flush=True)
            results.append(r)
    (out / "finetune_protocol.json").write_text(json.dumps({"full_split": results}, indent=1))
    (out / "finetune_protocol.md").write_text(markdown(results))


def small_fractions(cfg, rows: dict, spec0: dict, sites: dict, classes: list[str], names: list[str]) -> list[dict]:
    """1 % and 10 %, seeds 0-2: zero head bias (3 epochs) vs prior bias vs prior bias + 30 steps."""
    from raycxr.eval import transfer
    from raycxr.eval.predict import predict_site
    from raycxr.study.cells import load_encoder
    from raycxr.study.run import _row_overrides

    n = int((sites["chexpert"].load_manifest().to_pandas()["split"] == "train").sum())
    prior = transfer.prior_bias
    out = []
    try:
        for name in names:
            ckpt = Path(cfg.out) / "cells" / "pretrain" / name / "run"
            spec = {**spec0, "overrides": _row_overrides(cfg, rows[name]),
                    "checkpoint": str(ckpt) if rows[name].method else None}
            for fr in (0.01, 0.1):
                for variant, min_steps, use_prior in (("old", 0, False), ("prior", 0, True), ("prior+min30", 30, True)):
                    transfer.prior_bias = prior if use_prior else (
                        lambda y, m, eps=1e-3: np.zeros(y.shape[1], np.float32))
                    scores = []
                    for seed in (0, 1, 2):
                        enc, size, _ = load_encoder(spec)
                        model, steps = transfer.fine_tune_model(
                            enc, sites["chexpert"], image_size=size, indices=transfer.train_subset(n, fr, seed, 8),
                            seed=seed, epochs=3, lr=1e-3, head_lr=1e-2, cache=True, min_steps=min_steps)
                        scores.append([disease_auc(predict_site(model, sites[s], classes, split="test", image_size=size,
                                                                progress=False, cache=True))
                                       for s in ("chexpert", "nih", "vindr")])
                    m = np.mean(scores, 0).round(3).tolist()
                    r = {"row": name, "fraction": fr, "variant": variant, "steps": steps,
                         "chexpert": m[0], "nih": m[1], "vindr": m[2]}
                    print(json.dumps(r), flush=True)
                    out.append(r)
    finally:
        transfer.prior_bias = prior
    return out


def markdown(results: list[dict]) -> str:
    lines = ["# Fine-tuning protocol (`benchmarks/finetune_protocol.py`)", "",
             "CheXpert 100 % (seed 0), ResNet-18 at 64 px, batch 32; mean AUC over the five CheXpert diseases "
             "with >= 10 test positives and negatives; nih and vindr are out of distribution.", "",
             "| init | epochs | steps | encoder lr | head lr | schedule | chexpert (ID) | nih | vindr |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["row"], r["epochs"], r["schedule"], r["lr"], r["head_lr"])):
        lines.append(f"| {r['row']} | {r['epochs']} | {r['steps']} | {r['lr']:g} | {r['head_lr']:g} | "
                     f"{r['schedule']} | {r['chexpert']} | {r['nih']} | {r['vindr']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
