"""Centralised pretraining vs FedAvg, FedProx and FedPer at the same number of images seen.

On a small synthetic corpus (three sites: two train, the third is held out), ``method=mixed``
(one head over the union classes, so every strategy's global model is one classifier):

- centralised: ``raycxr pretrain`` for ``R`` epochs of ``S × n_sites`` steps of batch ``B``;
- federated: ``raycxr federate`` for ``R`` rounds, each site one unit of ``S`` steps of batch ``B`` per
  round, so a round sees as many images as a centralised epoch.

After every round the global checkpoint (read with ``load_pretrained``, as ``raycxr eval`` reads it)
is scored on each site's val split (mean AUC); at the end on each site's test split. Rounds run one
``rounds=r`` resume at a time, so the benchmark exercises resume too. Results:
``benchmarks/results/federate.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/federate.py [--rounds 4] [--n-per-site 40]

The figures are from tiny images on a loaded 2-core machine: they show that the modes run and what they
cost (bytes per round), not which strategy is better on real data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRAIN_SITES = ["nih", "vindr"]
HELD_OUT = "siim"
MIN_POSITIVES = 10  # a class with fewer val/test positives (or negatives) at a site is not estimable


IMAGE_SIZE = [32]  # --image-size


def small(work: Path, batch: int, steps: int) -> list[str]:
    return [f"image_size={IMAGE_SIZE[0]}", f"batch_size={batch}", "encoder.embed_dim=32",
            f"max_steps_per_epoch={steps}", "threads=1", "probe_size=0", "val.limit=null", "method=mixed",
            "baseline.lr=3e-3",
            f"sites.sites_dir={work / 'sites'}", f"sites.data_root={work / 'corpus'}"]


def build_corpus(work: Path, n: int) -> None:
    import yaml

    from raycxr.synth.generator import synthesize

    if not (work / "corpus" / HELD_OUT / "manifest.parquet").is_file():
        # 20 % val and test splits, the large findings enriched: means over classes with >= MIN_POSITIVES
        synthesize(work / "corpus", [*TRAIN_SITES, HELD_OUT], n_per_site=n, seed=11, render_size=64, workers=1,
                   progress=False, split_fractions=[0.6, 0.2, 0.2],
                   enrich={"classes": ["Cardiomegaly", "Pleural Effusion", "Edema", "Pneumothorax"], "min_rate": 0.15})
    (work / "sites").mkdir(parents=True, exist_ok=True)
    for s in [*TRAIN_SITES, HELD_OUT]:
        (work / "sites" / f"{s}.yaml").write_text(yaml.safe_dump({"name": s, "adapter": "manifest", "root": s}))


def score(run: Path, cfg, split: str) -> dict[str, float | None]:
    """Mean AUC of the run's classifier on each site's ``split`` (union classes the site annotates)."""
    import torch

    from raycxr.engine.validation import validation_auc
    from raycxr.methods import load_pretrained
    from raycxr.train.local import EpochLoader, LocalData, select_sites

    pre = load_pretrained(run)
    out = {}
    with torch.no_grad():
        for name, site in select_sites(cfg).items():
            data = LocalData(cfg, {name: site})
            ds = data.datasets(split=split, train=False, union=True)[name]
            r = validation_auc(pre.classifier, pre.class_names, EpochLoader(ds, cfg, shuffle=False), data.union.names,
                         min_positives=MIN_POSITIVES)
            out[name] = r["val_auc"]
    return out


def mean(d: dict, sites: list[str]) -> float | None:
    v = [d[s] for s in sites if d.get(s) is not None]
    return round(sum(v) / len(v), 4) if v else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench-federate")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--n-per-site", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per site per round (centralised: x sites per epoch)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--note", default="synthetic images on a shared 2-core CPU machine; seconds are not comparable")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "federate"))
    a = p.parse_args()
    IMAGE_SIZE[0] = a.image_size
    import torch

    torch.set_num_threads(1)
    from raycxr.config import compose
    from raycxr.federated import run_federate
    from raycxr.train.local import run_pretrain

    work = Path(a.work).resolve()
    build_corpus(work, a.n_per_site)
    everyone = [*TRAIN_SITES, HELD_OUT]
    score_cfg = compose("pretrain", [*small(work, a.batch, a.steps), f"site_names={everyone}"])
    rows = {}

    t0 = time.perf_counter()
    cen = work / "centralised"
    steps_c = a.steps * len(TRAIN_SITES)
    res = run_pretrain(compose("pretrain", [*small(work, a.batch, steps_c), f"site_names={TRAIN_SITES}",
                                            f"baseline.epochs={a.rounds}", f"out={cen}"]))
    val = score(cen, score_cfg, "val")
    rows["centralised"] = {"images_seen": int(sum(h["images"] for h in res["history"])),
                           "val_auc": val, "test_auc": score(cen, score_cfg, "test"),
                           "seconds": round(time.perf_counter() - t0, 1), "bytes_per_round": 0}
    target = mean(val, TRAIN_SITES)

    strategies = {"fedavg": [], "fedprox": ["federate.mu=0.01"],
                  "fedper": ["federate.local=[model/encoder.backbone.layer4.*]"]}
    for name, extra in strategies.items():
        out = work / name
        t0 = time.perf_counter()
        curve, hist = [], []
        for r in range(1, a.rounds + 1):  # one more round per call: the federation resumes from out
            cfg = compose("federate", [*small(work, a.batch, a.steps), f"site_names={TRAIN_SITES}", f"rounds={r}",
                                       f"out={out}", f"federate.strategy={name}", *extra])
            hist = run_federate(cfg)["history"]
            curve.append(mean(score(out, score_cfg, "val"), TRAIN_SITES))
        reached = next((i + 1 for i, v in enumerate(curve) if v is not None and target is not None and v >= target),
                       None)
        rows[name] = {"images_seen": int(sum(m["images"] for h in hist for m in h["site_metrics"].values())),
                      "val_auc": score(out, score_cfg, "val"), "test_auc": score(out, score_cfg, "test"),
                      "val_auc_by_round": curve, "rounds_to_centralised_val_auc": reached,
                      "bytes_per_round": int(sum(h["bytes_sent"] for h in hist) / len(hist)),
                      "bytes_up_shared_per_round": int(sum(h["bytes_up_shared"] for h in hist) / len(hist)),
                      "seconds": round(time.perf_counter() - t0, 1)}

    result = {"setup": {"train_sites": TRAIN_SITES, "held_out": HELD_OUT, "rounds": a.rounds, "batch": a.batch,
                        "steps_per_site_per_round": a.steps, "n_per_site": a.n_per_site, "image_size": a.image_size,
                        "method": "mixed", "encoder": "resnet18",
                        "min_positives": MIN_POSITIVES, "note": a.note},
              "centralised_val_auc": target, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["| run | images seen | mean val AUC (train sites) | test AUC " + " | ".join(everyone)
             + " | bytes / round | rounds to centralised val AUC | seconds |",
             "|---|---|---|---" + "|---" * (len(everyone) - 1) + "|---|---|---|"]
    for k, r in rows.items():
        test = " | ".join("not estimable" if r["test_auc"].get(s) is None else f"{r['test_auc'][s]:.3f}"
                          for s in everyone)
        lines.append(f"| {k} | {r['images_seen']} | {mean(r['val_auc'], TRAIN_SITES)} | {test} | "
                     f"{r['bytes_per_round'] / 1e6:.1f} MB | {r.get('rounds_to_centralised_val_auc', '-')} | "
                     f"{r['seconds']} |")
    lines.append(f"\n{HELD_OUT} is held out (out-of-distribution). Means over the classes with at least "
                 f"{MIN_POSITIVES} positives and negatives at the site. {result['setup']['note']}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
