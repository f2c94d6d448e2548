"""``raycxr eval``: how good is a pretrained encoder, on the sites it saw and on sites it did not.

For a run folder it scores, on each site's test split:

- the model's own classifier (per-class and mean AUC, AP, and F1/accuracy at each class's max-F1
  threshold, as UniChest reports them, with bootstrap CIs), with reliability figures (false-negative
  rate by sex and age band, subset accuracy, FNR/accuracy across thresholds, oracle AUC when the
  most uncertain cases are referred);
- zero-shot (a method that scores class names, e.g. UniChest): the site's own class names as text
  queries, including classes no training site had;
- a linear probe on frozen embeddings, and fine-tuning with 1 %, 10 % and 100 % of a target
  site's training images (plus linear-probe-then-fine-tune);
- attention heat-maps (a method that has them, e.g. UniChest's query networks) for positive test images;
- image-report retrieval, recall@1/5/10 both ways on the test reports (a method with a text side, e.g.
  UmiF: :mod:`raycxr.eval.retrieval`).

Sites the run did not train on are reported as out-of-distribution (``ood: true``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from ..dataset import site_dataset
from ..methods import Pretrained, get_method, load_pretrained
from ..models.classifiers import EmbeddingModel
from ..sites.config import SiteConfig, select_sites
from .predict import SitePredictions, predict_site
from .report import jsonable as _jsonable
from .report import summary_lines
from .transfer import fine_tune_model, fit_linear_probe, linear_probe_probs, train_subset


def reliability(pred: SitePredictions, thresholds: np.ndarray) -> dict[str, Any]:
    """FNR by sex and age band, subset accuracy, the threshold sweep, oracle AUC and ROC points."""
    from ..engine import metrics as M

    cols = pred.annotated_classes()
    p, t, m = pred.probs[:, cols], pred.targets[:, cols], pred.mask[:, cols]
    names = [pred.class_names[j] for j in cols]
    th = thresholds[cols]
    sex = pred.meta["sex"].fillna("unknown").astype(str).to_numpy()
    ages = pred.meta["age"].to_numpy(dtype=float)
    roc = M.roc_points(p, t, m, names)
    return {
        "fnr_by_sex": M.fnr_by_group(p, t, m, sex, th),
        "fnr_by_age": M.fnr_by_group(p, t, m, M.age_bands(ages), th),
        "subset_accuracy": M.subset_accuracy(p, t, m, th),
        "threshold_sweep": _jsonable(M.threshold_sweep(p, t, m)),
        "oracle_auc": _jsonable(M.oracle_auc(p, t, m)),
        "roc": {k: [np.asarray(v[0]).tolist(), np.asarray(v[1]).tolist()] for k, v in roc.items()},
    }


def score_site(model: nn.Module, site: SiteConfig, class_names: list[str], *, image_size: int, cfg: DictConfig,
               ood: bool, keep: dict[str, SitePredictions] | None = None) -> dict[str, Any]:
    """The classifier on one site's test split: metrics, CIs and reliability over the classes it annotates
    (the predictions also go into ``keep``, for the pooled figures)."""
    from ..engine.metrics import classification_metrics

    pred = predict_site(model, site, class_names, split=cfg.split, image_size=image_size,
                        batch_size=cfg.batch_size, limit=cfg.get("limit"))
    if keep is not None:
        keep[site.name] = pred
    cols = pred.annotated_classes()
    if not cols or not len(pred.probs):
        return {"split": cfg.split, "ood": ood, "skipped": "no annotated classes in common with the model"}
    names = [class_names[j] for j in cols]
    res = classification_metrics(pred.probs[:, cols], pred.targets[:, cols], pred.mask[:, cols], names,
                                 n_boot=int(cfg.bootstrap), min_positives=int(cfg.min_positives))
    th = np.full(len(class_names), 0.5)
    th[cols] = [res["per_class"][n]["threshold"] for n in names]
    return {"split": cfg.split, "ood": ood, "n_images": len(pred.probs), "unreadable": pred.skipped,
            "metrics": res, **reliability(pred, th)}


def pooled(preds: dict[str, SitePredictions], names: list[str], class_names: list[str],
           cfg: DictConfig) -> dict[str, Any]:
    """The classifier on the training sites' test splits pooled into one set: per class AUC with its
    positives (what a single decision threshold across the sites faces; note that pooling rewards
    telling the sites apart when their prevalence differs)."""
    from ..engine.metrics import classification_metrics

    p = np.concatenate([preds[n].probs for n in names])
    t = np.concatenate([preds[n].targets for n in names])
    m = np.concatenate([preds[n].mask for n in names])
    cols = [j for j in range(len(class_names)) if m[:, j].any()]
    res = classification_metrics(p[:, cols], t[:, cols], m[:, cols], [class_names[j] for j in cols],
                                 n_boot=int(cfg.bootstrap), min_positives=int(cfg.min_positives))
    return {"sites": names, "n_images": int(len(p)), "metrics": res}


def zero_shot(pre: Pretrained, site: SiteConfig, cfg: DictConfig) -> dict[str, Any]:
    """The run queried with the site's own class names (prompt template from the config)."""
    from ..engine.metrics import classification_metrics

    own = site.load_manifest().label_names
    prompts = [cfg.zero_shot.template.format(n) for n in own]
    model = pre.zero_shot_classifier(prompts)
    pred = predict_site(model, site, own, split=cfg.split, image_size=pre.image_size, batch_size=cfg.batch_size,
                        limit=cfg.get("limit"))
    cols = pred.annotated_classes()
    names = [own[j] for j in cols]
    res = classification_metrics(pred.probs[:, cols], pred.targets[:, cols], pred.mask[:, cols], names,
                                 min_positives=int(cfg.min_positives))
    known = {n.lower() for n in pre.class_names}
    from ..labels import canonical_name

    unseen = [n for n in names if canonical_name(n).lower() not in known]
    res["unseen_classes"] = unseen
    aucs = [res["per_class"][n]["auc"] for n in unseen if res["per_class"][n]["auc"] is not None]
    res["unseen_mean_auc"] = float(np.mean(aucs)) if aucs else None
    return res


def _embeddings(pre: Pretrained, site: SiteConfig, split: str, cfg: DictConfig,
                encoder: nn.Module | None = None) -> SitePredictions:
    own = site.load_manifest().label_names
    model = pre.embedding_model if encoder is None else EmbeddingModel(encoder).eval()
    return predict_site(model, site, own, split=split, image_size=pre.image_size,
                        batch_size=cfg.batch_size, limit=cfg.get("limit"))


def random_encoder(pre: Pretrained, seed: int) -> nn.Module:
    """The run's encoder architecture with random weights: the "random init" baseline of a probe."""
    from omegaconf import OmegaConf

    from ..models.factory import build_encoder

    torch.manual_seed(int(seed))
    return build_encoder(OmegaConf.create(pre.config), checkpoint=False).eval()


def linear_probe(pre: Pretrained, site: SiteConfig, cfg: DictConfig) -> tuple[dict[str, Any], dict]:
    """Logistic regression per class on frozen, standardised embeddings (train split → test split).

    Returns the test metrics and the fitted weights in embedding space (for linear-probe-then-fine-tune)."""
    from ..engine.metrics import classification_metrics

    lp = cfg.linear_probe

    def probe(encoder: nn.Module | None) -> tuple[np.ndarray, SitePredictions, np.ndarray, np.ndarray, int]:
        tr, te = _embeddings(pre, site, "train", cfg, encoder), _embeddings(pre, site, cfg.split, cfg, encoder)
        w, b = fit_linear_probe(tr.probs, tr.targets, tr.mask, C=float(lp.C), max_iter=int(lp.max_iter))
        return linear_probe_probs(te.probs, w, b), te, w, b, len(tr.probs)

    probs, te, w, b, n_train = probe(None)
    cols = te.annotated_classes()
    names = [te.class_names[j] for j in cols]
    res = classification_metrics(probs[:, cols], te.targets[:, cols], te.mask[:, cols], names,
                                 min_positives=int(cfg.min_positives))
    res["n_train"] = n_train
    if lp.get("random_baseline"):
        res["vs_random"] = _against_random(probs, probe(random_encoder(pre, int(cfg.seed)))[0], te, cols, names, cfg)
    return res, {"weight": torch.from_numpy(w), "bias": torch.from_numpy(b)}


def _against_random(probs: np.ndarray, random_probs: np.ndarray, te: SitePredictions, cols: list[int],
                    names: list[str], cfg: DictConfig) -> dict[str, Any]:
    """The probe on the pretrained encoder against the same probe on a random-init encoder: both mean AUCs
    over the estimable classes and their paired-bootstrap difference."""
    from ..engine.metrics import classification_metrics, contrast_bootstrap, estimable_classes

    t, m = te.targets[:, cols], te.mask[:, cols]
    est = np.flatnonzero(estimable_classes(t, m, int(cfg.min_positives)))
    rand = classification_metrics(random_probs[:, cols], t, m, names, min_positives=int(cfg.min_positives))
    out: dict[str, Any] = {"random_mean_auc": rand["mean"]["auc"], "classes": [names[j] for j in est]}
    if not len(est):
        return {**out, "difference": None, "ci": None, "note": "no estimable class"}
    c = contrast_bootstrap([([(1.0, [probs[:, cols][:, est]]), (-1.0, [random_probs[:, cols][:, est]])],
                             t[:, est], m[:, est])], n_boot=max(int(cfg.bootstrap), 100), seed=int(cfg.seed))
    return {**out, "difference": c["estimate"], "ci": list(c["ci"]), "n_valid": c["n_valid"]}


def fine_tune(pre: Pretrained, site: SiteConfig, fraction: float, cfg: DictConfig, *,
              head_init: dict | None = None) -> dict[str, Any]:
    """Fine-tune encoder + a new linear head on ``fraction`` of the site's training images; test mean AUC."""
    from ..engine.metrics import classification_metrics

    f = cfg.fine_tune
    n_train = len(site_dataset(site, {"size": pre.image_size}, split="train", train=False))
    idx = train_subset(n_train, fraction, int(cfg.seed), int(f.min_images))
    model, steps = fine_tune_model(pre.encoder, site, image_size=pre.image_size, indices=idx, seed=int(cfg.seed),
                                   batch_size=int(cfg.batch_size), epochs=int(f.epochs), max_steps=f.max_steps,
                                   lr=float(f.lr), head_lr=float(f.head_lr), head_init=head_init,
                                   schedule=str(f.schedule), min_steps=int(f.min_steps or 0))
    own = site.load_manifest().label_names
    pred = predict_site(model, site, own, split=cfg.split, image_size=pre.image_size,
                        batch_size=cfg.batch_size, limit=cfg.get("limit"), progress=False)
    cols = pred.annotated_classes()
    res = classification_metrics(pred.probs[:, cols], pred.targets[:, cols], pred.mask[:, cols],
                                 [own[j] for j in cols], min_positives=int(cfg.min_positives))
    return {"mean_auc": res["mean"]["auc"], "mean_f1": res["mean"]["f1"], "n_train": len(idx), "steps": steps}


def attention_maps(pre: Pretrained, site: SiteConfig, out: Path, n: int, cfg: DictConfig) -> list[dict]:
    """The run's attention over the image for positive test images (methods with ``Pretrained.attention``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .predict import site_targets

    ds, targets, mask = site_targets(site, pre.class_names, cfg.split, image_size=pre.image_size)
    pos = [(i, j) for i, j in zip(*np.nonzero(targets * mask)) if pre.class_names[j] != "No Finding"][:n]
    if not pos:
        return []
    fig, axes = plt.subplots(1, len(pos), figsize=(3 * len(pos), 3.3), squeeze=False)
    for ax, (i, j) in zip(axes[0], pos):
        item = ds[int(i)]
        if item is None:
            ax.axis("off")
            continue
        x = item["image"][None]
        with torch.no_grad():
            attn, prob = pre.attention(x)[0, j], float(pre.classifier(x)[0, j])
        g = int(round(math.sqrt(attn.numel())))
        heat = attn.reshape(g, g)[None, None]
        heat = torch.nn.functional.interpolate(heat, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(x[0, 0].numpy(), cmap="gray")
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.35)
        ax.set_title(f"{pre.class_names[j]}\np={prob:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{site.name}: query-network attention on positive test images", fontsize=9)
    fig.tight_layout()
    path = out / f"attention_{site.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [{"path": path.name, "caption": f"{site.name}: cross-attention of the shared query network "
             f"(last layer) for {len(pos)} positive findings"}]


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.run`` on the registered sites and write ``results.json``, ``metrics.csv`` and the report."""
    from .report import write_report

    sites = select_sites(cfg)
    unbuilt = [n for n, s in sites.items() if not s.has_manifest()]
    if unbuilt:  # say how to leave them out, before any scoring starts
        built = [n for n in sites if n not in unbuilt]
        raise FileNotFoundError(
            f"site(s) {unbuilt} have no manifest (`raycxr sites build NAME`, or `raycxr synth` for the demo sites); "
            f"to evaluate on the others, name them: site_names=[{','.join(built)}]"
            + ("" if cfg.get("site_names") else " (eval takes every registered site by default)"))
    pre = load_pretrained(cfg.run)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(cfg.get("threads") or torch.get_num_threads())))
    model = {"run": str(cfg.run), "checkpoint": pre.source, "method": pre.method, "encoder": pre.encoder_name,
             "image_size": pre.image_size, "classes": pre.class_names, "sites": pre.sites}
    results: dict[str, Any] = {"model": model, "sites": {}}
    # a label-free run (method=selfsup) is an encoder only: its evaluation is the probe and fine-tuning
    steps = [(n, "classifier") for n in sites] if pre.classifier is not None else []
    if cfg.zero_shot.enabled and pre.zero_shot is not None:
        steps += [(n, "zero_shot") for n in sites]
    probe_sites = _pick(cfg.linear_probe.sites, sites, pre)
    ft_sites = _pick(cfg.fine_tune.sites, sites, pre)
    if cfg.linear_probe.enabled:
        steps += [(n, "linear_probe") for n in probe_sites]
    if cfg.fine_tune.enabled:
        steps += [(n, f"fine_tune {fr:g}") for n in ft_sites for fr in cfg.fine_tune.fractions]
        if cfg.fine_tune.lp_ft:
            steps += [(n, "lp_ft") for n in ft_sites]
    if cfg.retrieval.enabled and "encode_text" in pre.extra:
        steps += [(n, "retrieval") for n in _pick(cfg.retrieval.sites, sites, pre)]
    if _segmentation_wanted(cfg.segmentation.enabled, pre):
        steps += [("all", f"segmentation {fr:g}") for fr in cfg.segmentation.fractions]
    heads: dict[str, dict] = {}
    preds: dict[str, SitePredictions] = {}
    bar = tqdm(steps, desc="raycxr eval", unit="step", dynamic_ncols=True)
    for name, what in bar:
        bar.set_postfix_str(f"{name}: {what}")
        if what.startswith("segmentation"):
            fr = float(what.split()[1])
            results.setdefault("segmentation_frozen", {})[f"{fr * 100:g}%"] = frozen_segmentation(cfg, sites, fr, out)
            continue
        site = sites[name]
        if what == "classifier":
            results["sites"][name] = score_site(pre.classifier, site, pre.class_names, image_size=pre.image_size,
                                                cfg=cfg, ood=name not in pre.sites, keep=preds)
        elif what == "zero_shot":
            results.setdefault("zero_shot", {})[name] = zero_shot(pre, site, cfg)
        elif what == "linear_probe":
            res, heads[name] = linear_probe(pre, site, cfg)
            results.setdefault("linear_probe", {})[name] = res
        elif what.startswith("fine_tune"):
            fr = float(what.split()[1])
            results.setdefault("fine_tune", {}).setdefault(name, {})[f"{fr * 100:g}%"] = fine_tune(pre, site, fr, cfg)
        elif what == "retrieval":
            from .retrieval import image_report_retrieval

            results.setdefault("retrieval", {})[name] = image_report_retrieval(pre, site, cfg)
        elif what == "lp_ft":
            if name not in heads:
                _, heads[name] = linear_probe(pre, site, cfg)
            results.setdefault("fine_tune", {}).setdefault(name, {})["probe_then_ft"] = fine_tune(
                pre, site, 1.0, cfg, head_init=heads[name])
    trained = [n for n in preds if n in pre.sites]
    if trained:
        results["pooled_training_sites"] = pooled(preds, trained, pre.class_names, cfg)
    if cfg.attention.enabled and pre.attention is not None:
        results["attention_maps"] = [a for n, s in sites.items()
                                     for a in attention_maps(pre, s, out, int(cfg.attention.n), cfg)]
    report = write_report(results, out, title=f"raycxr evaluation of {cfg.run}")
    print_summary(results)
    print(f"wrote {out / 'results.json'}, {out / 'metrics.csv'} and {report}")
    return results


def _segmentation_wanted(enabled: Any, pre: Pretrained) -> bool:
    """``auto``: runs whose method learns from localisation (``Method.segmentation_by_default``, e.g. UmiF's
    image-segment pairs); true / false."""
    if str(enabled).lower() == "auto":
        return get_method(pre.method).segmentation_by_default
    if str(enabled).lower() in ("true", "false"):
        return str(enabled).lower() == "true"
    raise ValueError(f"segmentation.enabled must be auto, true or false, got {enabled!r}")


def frozen_segmentation(cfg: DictConfig, sites: dict[str, SiteConfig], fraction: float, out: Path) -> dict[str, Any]:
    """``raycxr segment`` with the backbone frozen on ``fraction`` of the training masks (UmiF Table 3), from
    the run's encoder and from random init, on the segmentation tasks whose sites are being evaluated."""
    from ..config import compose
    from .segmentation import run_segmentation

    seg = cfg.segmentation
    defaults = compose("segment", [f"run={cfg.run}"]).tasks
    tasks = {t: [s for s in (names or []) if s in sites] for t, names in defaults.items()}
    over = [f"tasks.{t}=[{','.join(names)}]" if names else f"tasks.{t}=null" for t, names in tasks.items()]
    if not any(tasks.values()):
        return {"rows": [], "note": f"no evaluated site holds masks for {sorted(defaults)}"}
    folder = out / "segmentation_frozen" / f"{fraction * 100:g}pct"
    over = [f"run={cfg.run}", f"sites.sites_dir={cfg.sites.sites_dir}", f"sites.data_root={cfg.sites.data_root}",
            f"seed={cfg.seed}", *over, *(f"threads={cfg.threads}",) * bool(cfg.get("threads")),
            *seg.get("overrides", []), "freeze_encoder=true", f"train_fraction={fraction}", f"out={folder}"]
    res = run_segmentation(compose("segment", over))
    keep = ("task", "init", "sites", "n_train", "n_test", "n_positive", "dice_mean", "dice_std", "hd95_mean",
            "empty_gt_dice", "steps", "seconds")
    return {"rows": [{k: r.get(k) for k in keep} for r in res["rows"]], "folder": str(folder.relative_to(out)),
            "settings": res["settings"]}


def _pick(spec: Any, sites: dict[str, SiteConfig], pre: Pretrained) -> list[str]:
    """``null``: the held-out sites if any, else the first site; ``all``; or a list of names."""
    if spec in (None, "auto"):
        ood = [n for n in sites if n not in pre.sites]
        return ood[:1] or list(sites)[:1]
    if spec == "all":
        return list(sites)
    names = list(spec)
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise ValueError(f"evaluation site(s) {unknown} are not among {list(sites)}")
    return names


def print_summary(results: dict[str, Any]) -> None:
    """A console table: mean AUC / F1 per site for each evaluation."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"raycxr eval: {results['model']['method']} ({results['model']['encoder']})")
    for col in ("site", "ood", "classifier AUC", "F1", "zero-shot AUC", "linear probe AUC", "fine-tune AUC"):
        table.add_column(col)

    def f(x: Any) -> str:
        return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"

    for name, r in results["sites"].items():
        mean = r.get("metrics", {}).get("mean", {})
        zs = results.get("zero_shot", {}).get(name, {}).get("mean", {}).get("auc")
        lp = results.get("linear_probe", {}).get(name, {}).get("mean", {}).get("auc")
        ft = results.get("fine_tune", {}).get(name, {})
        fts = " ".join(f"{k.replace('probe_then_ft', 'LP-FT')}:{f(v.get('mean_auc'))}" for k, v in ft.items())
        table.add_row(name, "yes" if r.get("ood") else "", f(mean.get("auc")), f(mean.get("f1")), f(zs), f(lp),
                      fts or "-")
    Console().print(table)
    if results.get("retrieval"):
        from .retrieval import retrieval_rows

        rt = Table(title="image-report retrieval (recall@k)")
        for col in ("site", "pairs", "i→t R@1", "R@5", "R@10", "t→i R@1", "R@5", "R@10"):
            rt.add_column(col)
        for row in retrieval_rows(results):
            rt.add_row(*row)
        Console().print(rt)
    if results.get("segmentation_frozen"):
        st = Table(title="segmentation, backbone frozen (test Dice)")
        for col in ("training share", "task", "init", "train images", "Dice"):
            st.add_column(col)
        for share, e in results["segmentation_frozen"].items():
            for r in e["rows"]:
                st.add_row(share, r["task"], r["init"], str(r["n_train"]), f(r.get("dice_mean")))
        Console().print(st)
    for line in summary_lines(results):
        print(line)

