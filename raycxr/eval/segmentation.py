"""``raycxr segment``: downstream segmentation on top of the pretrained raycxr image encoder, with MONAI.

The pretraining run's timm backbone becomes a multi-scale feature extractor (timm ``features_only``,
the run's weights loaded into it) under a MONAI UNet decoder (:class:`monai.networks.nets.flexible_unet.UNetDecoder`,
the decoder of MONAI's ``FlexibleUNet``) and a 1x1 :class:`monai.networks.blocks.UnetOutBlock`. For each task
the same model is trained and tested twice with identical settings and seed: from the pretrained encoder
and from random initialisation. The difference is what pretraining buys downstream.

Tasks:

- ``lungs``: both lungs as one mask, from each manifest row's ``lung_mask_path`` (any site that has them).
- ``pneumothorax``: SIIM's ``mask_path``; a row without one is a negative and has an empty mask.

Metrics, per test image (and per output channel) at ``image_size`` pixels:

- Dice (MONAI ``DiceMetric``) over the images whose ground truth is **not** empty. Dice is undefined on an
  empty ground truth (MONAI returns nan), so those images are reported apart: ``empty_gt_dice`` is the
  fraction of them with an empty prediction (the SIIM convention: Dice 1 when both are empty, else 0).
- HD95 (MONAI ``HausdorffDistanceMetric``, 95th percentile, in pixels) over the images where both the
  ground truth and the prediction are non-empty (MONAI returns nan/inf otherwise); ``n_hd95`` says how
  many, ``n_missed`` counts non-empty ground truths with an empty prediction.

Outputs in ``cfg.out``: ``segmentation.json`` (settings, rows, per-site Dice, training losses),
``segmentation.md`` (the table) and ``segmentation.png`` (test images with the ground-truth and predicted
contours of every init).

The pieces live where MONAI keeps them: the network in :mod:`raycxr.models.segmentation`, the
dataset in :mod:`raycxr.dataset`, the augmentation in :mod:`raycxr.transforms`, Dice + BCE in
:mod:`raycxr.losses`, and the training loop is the one classification fine-tuning uses
(:func:`raycxr.engine.supervised.fit_supervised`). This module holds the metrics, the run and the report.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..checkpoint import Checkpoint
from ..dataset import SEGMENTATION_TASKS, SegmentationDataset, collate_skip_none
from ..engine.supervised import fit_supervised
from ..losses import DiceBCELoss
from ..models.segmentation import SegmentationModel
from ..sites.config import SiteConfig, discover_sites
from .report import jsonable

INITS = ("pretrained", "random")


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def train_segmentation(model: SegmentationModel, dataset: Dataset, *, epochs: int = 5, batch_size: int = 16,
                       lr: float = 1e-3, encoder_lr: float | None = None, weight_decay: float = 1e-4,
                       max_steps_per_epoch: int | None = None, seed: int = 0, num_workers: int = 0,
                       desc: str = "segment") -> list[dict[str, float]]:
    """Train with Dice + BCE (:class:`~raycxr.losses.DiceBCELoss`) and AdamW for a fixed number of epochs
    (and steps), through the shared fine-tuning loop (:func:`raycxr.engine.supervised.fit_supervised`).

    The model stays on its device; batches follow it. The shuffling is seeded by ``seed``.
    Returns one record per step: ``{"epoch", "step", "loss"}``."""
    g = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=True, generator=g, num_workers=int(num_workers),
                        drop_last=len(dataset) > int(batch_size), collate_fn=collate_skip_none)
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    groups = [{"params": rest, "lr": lr}] + ([{"params": enc, "lr": encoder_lr or lr}] if enc else [])
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    loss = DiceBCELoss()
    return fit_supervised(model, loader, lambda m, b: loss(m(b["image"]), b["mask"]), optimizer, epochs=int(epochs),
                          max_steps_per_epoch=max_steps_per_epoch, desc=desc)


# ---------------------------------------------------------------------------------------------- metrics


def per_image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Dice and HD95 of binary masks ``(N, C, H, W)``, one value per image and channel (arrays ``(N, C)``).

    ``dice`` is nan where the ground truth is empty; ``hd95`` (pixels) is nan unless both the ground
    truth and the prediction are non-empty. ``gt_empty`` / ``pred_empty`` say which."""
    pred, target = pred.detach().bool().cpu(), target.detach().bool().cpu()
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) masks of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    gt_empty = ~target.flatten(2).any(-1)
    pred_empty = ~pred.flatten(2).any(-1)
    dice = torch.full(gt_empty.shape, math.nan)
    hd95 = torch.full(gt_empty.shape, math.nan)
    if (~gt_empty).any():
        d = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(pred.float(), target.float())
        dice = torch.where(gt_empty, torch.tensor(math.nan), d.float())
    both = ~gt_empty & ~pred_empty
    if both.any():
        n, c = both.nonzero(as_tuple=True)
        # only the pairs where HD95 is defined go to MONAI (it warns and returns nan/inf on the others)
        with warnings.catch_warnings():
            # MONAI >= 1.5 passes its own deprecated `always_return_as_numpy` inside the metric
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            h = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                pred[n, c][:, None].float(), target[n, c][:, None].float())
        hd95[n, c] = h[:, 0].float()
    return {"dice": dice.numpy(), "hd95": hd95.numpy(), "gt_empty": gt_empty.numpy(), "pred_empty": pred_empty.numpy()}


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def summarize_metrics(per: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The table row of :func:`per_image_metrics` (see the module docstring for the empty-mask rules)."""
    dice, hd95 = np.asarray(per["dice"], float).ravel(), np.asarray(per["hd95"], float).ravel()
    gt_empty, pred_empty = np.asarray(per["gt_empty"], bool).ravel(), np.asarray(per["pred_empty"], bool).ravel()
    pos = dice[~gt_empty]
    hd = hd95[np.isfinite(hd95)]
    return {
        "n_test": int(len(dice)),
        "n_positive": int((~gt_empty).sum()),
        "n_empty_gt": int(gt_empty.sum()),
        "dice_mean": _mean(pos),
        "dice_std": float(np.std(pos)) if len(pos) else None,
        "dice_median": float(np.median(pos)) if len(pos) else None,
        "hd95_mean": _mean(hd),
        "hd95_median": float(np.median(hd)) if len(hd) else None,
        "n_hd95": int(len(hd)),
        "n_missed": int((~gt_empty & pred_empty).sum()),
        # Dice on an empty ground truth: 1 when the prediction is empty too, else 0
        "empty_gt_dice": _mean(pred_empty[gt_empty].astype(float)),
    }


@torch.no_grad()
def predict_masks(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
                  threshold: float = 0.5) -> torch.Tensor:
    """Binary masks ``(B, C, H, W)`` from a model's logits: sigmoid > ``threshold``."""
    if isinstance(model, nn.Module):
        model.eval()
    return torch.sigmoid(model(images.to(_device_of(model))).float()).cpu() > threshold


@torch.no_grad()
def evaluate_segmentation(model: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, *, batch_size: int = 16,
                          threshold: float = 0.5, num_workers: int = 0,
                          desc: str = "test") -> dict[str, Any]:
    """Dice and HD95 of a model (any callable images → logits) on a dataset of ``{"image", "mask"}`` items.

    Returns ``{"summary": summarize_metrics(...), "per_site": {site: {"n", "dice_mean"}}, "per_image": [...]}``;
    each per-image record has ``site``, ``image_id``, ``dice``, ``hd95``, ``gt_empty``, ``pred_empty``
    (channel 0; the summary covers every channel)."""
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
                        collate_fn=collate_skip_none)
    parts: list[dict[str, np.ndarray]] = []
    records: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        if batch is None:
            continue
        pred = predict_masks(model, batch["image"], threshold=threshold)
        per = per_image_metrics(pred, batch["mask"] > 0.5)
        parts.append(per)
        n = len(pred)
        sites, ids = batch.get("site", [""] * n), batch.get("image_id", [str(len(records) + i) for i in range(n)])
        for i in range(n):
            records.append({"site": str(sites[i]), "image_id": str(ids[i]), "dice": _nan_none(per["dice"][i, 0]),
                            "hd95": _nan_none(per["hd95"][i, 0]), "gt_empty": bool(per["gt_empty"][i, 0]),
                            "pred_empty": bool(per["pred_empty"][i, 0])})
    if not parts:
        raise ValueError("no readable test images to evaluate")
    per_all = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    per_site: dict[str, dict[str, Any]] = {}
    for s in dict.fromkeys(r["site"] for r in records):
        d = [r["dice"] for r in records if r["site"] == s and r["dice"] is not None]
        per_site[s] = {"n": sum(r["site"] == s for r in records), "dice_mean": _mean(np.asarray(d, float))}
    return {"summary": summarize_metrics(per_all), "per_site": per_site, "per_image": records}


def _nan_none(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------- the run


def _resolve_device(spec: Any) -> torch.device:
    d = str(spec or "auto")
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(d)


def _task_datasets(cfg: DictConfig, task: str, sites: Sequence[SiteConfig]) -> tuple[SegmentationDataset,
                                                                                        SegmentationDataset]:
    common = {"size": int(cfg.image_size), "seed": int(cfg.seed), "frontal_only": bool(cfg.frontal_only)}
    train = [SegmentationDataset.from_site(s, task, split="train", train=bool(cfg.augment),
                                           limit=cfg.get("n_train_limit"), **common) for s in sites]
    test = [SegmentationDataset.from_site(s, task, split="test", limit=cfg.get("n_test_limit"), **common)
            for s in sites]
    train_ds = SegmentationDataset.concat(train, seed=int(cfg.seed))
    fraction = float(cfg.get("train_fraction") or 1.0)
    if fraction < 1.0:  # UmiF Table 3 protocol: 1 % / 10 % / 100 % of the training images (seeded subset)
        keep = np.random.default_rng(int(cfg.seed)).permutation(len(train_ds))[:max(1, round(fraction * len(train_ds)))]
        train_ds = SegmentationDataset([train_ds.records[i] for i in sorted(keep)], size=train_ds.size,
                                       train=train_ds.train, seed=int(cfg.seed), quarantines=train_ds.quarantines)
    test_ds = SegmentationDataset.concat(test, seed=int(cfg.seed))
    names = [s.name for s in sites]
    if not len(train_ds) or not len(test_ds):
        raise ValueError(f"task '{task}' on sites {names}: {len(train_ds)} train and {len(test_ds)} test images; "
                         "both splits need images with masks")
    return train_ds, test_ds


def _figure_indices(ds: SegmentationDataset, n: int) -> list[int]:
    """The first ``n`` test rows that have a mask, then rows without (SIIM negatives)."""
    has = ds.has_mask
    return ([i for i in range(len(ds)) if has[i]] + [i for i in range(len(ds)) if not has[i]])[:max(0, int(n))]


def _build(init: str, cfg: DictConfig, checkpoint: Path, name: str) -> SegmentationModel:
    kw = {"decoder_channels": list(cfg.decoder_channels), "freeze_encoder": bool(cfg.freeze_encoder),
          "img_size": int(cfg.image_size)}
    torch.manual_seed(int(cfg.seed))  # the same decoder initialisation for every init
    if init == "pretrained":
        return SegmentationModel.from_run(checkpoint, 1, **kw)
    return SegmentationModel.random_init(name, 1, **kw)


def run_segmentation(cfg: DictConfig) -> dict[str, Any]:
    """Train and test a segmentation model per task and init; write ``segmentation.json``, ``segmentation.md``
    and ``segmentation.png`` in ``cfg.out`` and return the results (``rows``: one per task x init)."""
    ckpt = Checkpoint.load(cfg.run, best=True)
    checkpoint, encoder_name = Path(ckpt.source), ckpt.encoder_name
    del ckpt
    tasks = OmegaConf.to_container(cfg.tasks, resolve=True) if cfg.get("tasks") else {}
    if not isinstance(tasks, dict):
        raise ValueError(f"tasks must map a task ({', '.join(SEGMENTATION_TASKS)}) to a list of sites, got {tasks!r}")
    tasks = {t: list(s) for t, s in tasks.items() if s}  # `tasks.pneumothorax=null` drops a task
    if not tasks:
        raise ValueError("no segmentation task left: tasks maps every task to null or []")
    unknown = [t for t in tasks if t not in SEGMENTATION_TASKS]
    if unknown:
        raise ValueError(f"unknown segmentation task(s) {unknown}; expected some of {sorted(SEGMENTATION_TASKS)}")
    inits = list(cfg.inits)
    if not inits or any(i not in INITS for i in inits):
        raise ValueError(f"inits must be a non-empty subset of {list(INITS)}, got {inits}")
    registered = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    for task, names in tasks.items():
        missing = [s for s in names if s not in registered]
        if missing:
            raise ValueError(f"task '{task}': site(s) {missing} not registered in "
                             f"{cfg.sites.sites_dir}; registered: {sorted(registered)}")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = _resolve_device(cfg.get("device"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in ("image_size", "epochs", "max_steps_per_epoch", "batch_size", "lr", "encoder_lr",
                          "weight_decay", "freeze_encoder", "decoder_channels", "augment", "threshold", "frontal_only",
                          "n_train_limit", "n_test_limit", "seed")} | {"train_fraction": cfg.get("train_fraction")}
    results: dict[str, Any] = {"run": str(cfg.run), "checkpoint": str(checkpoint), "encoder": encoder_name,
                               "device": str(device), "settings": settings, "tasks": tasks, "rows": []}
    # every task's data first: a site without masks fails before any training
    data = {task: _task_datasets(cfg, task, [registered[s] for s in names]) for task, names in tasks.items()}
    panels: list[dict[str, Any]] = []
    for task, names in tasks.items():
        train_ds, test_ds = data[task]
        fig_idx = _figure_indices(test_ds, int(cfg.n_figure))
        fig_items = [test_ds[i] for i in fig_idx]
        fig_items = [it for it in fig_items if it is not None]
        panel = {"task": task, "items": fig_items, "pred": {}, "dice": {}}
        for init in inits:
            t0 = time.perf_counter()
            model = _build(init, cfg, checkpoint, encoder_name).to(device)
            train_ds.set_random_state(int(cfg.seed))
            history = train_segmentation(model, train_ds, epochs=int(cfg.epochs), batch_size=int(cfg.batch_size),
                                         lr=float(cfg.lr), encoder_lr=cfg.get("encoder_lr"),
                                         weight_decay=float(cfg.weight_decay),
                                         max_steps_per_epoch=cfg.get("max_steps_per_epoch"), seed=int(cfg.seed),
                                         num_workers=int(cfg.num_workers), desc=f"{task} / {init}")
            ev = evaluate_segmentation(model, test_ds, batch_size=int(cfg.batch_size), threshold=float(cfg.threshold),
                                       num_workers=int(cfg.num_workers), desc=f"{task} / {init} test")
            losses = [h["loss"] for h in history]
            k = max(1, min(5, len(losses) // 4))  # smooth the first / last loss over a few steps
            results["rows"].append({
                "task": task, "init": init, "sites": list(names), **ev["summary"], "n_train": len(train_ds),
                "steps": len(history), "encoder_tensors_loaded": model.n_loaded,
                "train_loss_first": _mean(np.asarray(losses[:k])), "train_loss_last": _mean(np.asarray(losses[-k:])),
                "seconds": round(time.perf_counter() - t0, 1), "per_site": ev["per_site"],
                "per_image": ev["per_image"]})
            if fig_items:
                images = torch.stack([it["image"] for it in fig_items])
                panel["pred"][init] = predict_masks(model, images, threshold=float(cfg.threshold))[:, 0].numpy()
                by_id = {r["image_id"]: r["dice"] for r in ev["per_image"]}
                panel["dice"][init] = [by_id.get(it["image_id"]) for it in fig_items]
            del model
        panels.append(panel)
    (out / "segmentation.json").write_text(json.dumps(jsonable(results), indent=1))
    plot_segmentations(panels, out / "segmentation.png")
    (out / "segmentation.md").write_text(segmentation_markdown(results, figure="segmentation.png"))
    _print_table(results)
    print(f"wrote {out / 'segmentation.json'}, {out / 'segmentation.md'} and {out / 'segmentation.png'}")
    return results


# ----------------------------------------------------------------------------------------------- report


def _fmt(x: Any, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


TABLE_HEADER = ["task", "init", "sites", "Dice mean ± std", "HD95 mean (px)", "n test", "n empty GT",
                "Dice on empty GT", "train loss first → last"]


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """The results table as strings, one row per task x init (columns: :data:`TABLE_HEADER`)."""
    return [[r["task"], r["init"], ", ".join(r["sites"]),
             f"{_fmt(r['dice_mean'])} ± {_fmt(r['dice_std'])}" if r["n_positive"] else "–",
             f"{_fmt(r['hd95_mean'], 1)} (n={r['n_hd95']})", str(r["n_test"]), str(r["n_empty_gt"]),
             _fmt(r["empty_gt_dice"]) if r["n_empty_gt"] else "–",
             f"{_fmt(r['train_loss_first'])} → {_fmt(r['train_loss_last'])}"] for r in results["rows"]]


def segmentation_markdown(results: Mapping[str, Any], *, figure: str | None = None) -> str:
    """``segmentation.md``: settings, the table, how empty masks are counted, the figure."""
    s = results["settings"]
    lines = [f"# raycxr segmentation: {results['encoder']} encoder from {results['run']} vs random initialisation",
             "",
             f"MONAI UNet decoder on the encoder's feature maps; Dice + BCE, AdamW lr {s['lr']}, {s['epochs']} epochs "
             f"(at most {s['max_steps_per_epoch']} steps each), batch {s['batch_size']}, {s['image_size']} px, "
             f"encoder {'frozen' if s['freeze_encoder'] else 'fine-tuned'}, seed {s['seed']}; "
             "identical for both inits.",
             "",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += ["",
              "- Dice: mean ± std over the test images whose ground-truth mask is not empty (MONAI `DiceMetric`).",
              "- HD95: 95th-percentile Hausdorff distance in pixels at the image size above (MONAI "
              "`HausdorffDistanceMetric`), over the images where both the ground truth and the prediction are "
              "non-empty (n in brackets); it is undefined otherwise.",
              "- Dice on empty GT: images with an empty ground truth (SIIM negatives) count 1 when the prediction is "
              "empty too, else 0; they are not in the Dice mean."]
    per_site = [(r["task"], r["init"], r["per_site"]) for r in results["rows"] if len(r["per_site"]) > 1]
    if per_site:
        lines += ["", "Dice per site:", ""]
        lines += [f"- {t} / {i}: " + ", ".join(f"{k} {_fmt(v['dice_mean'])} (n={v['n']})" for k, v in ps.items())
                  for t, i, ps in per_site]
    if figure:
        lines += ["", f"![test images: ground truth (green) and predicted contours]({figure})"]
    return "\n".join(lines) + "\n"


INIT_COLOURS = {"pretrained": "tab:red", "random": "tab:blue"}


def _closed(mask: np.ndarray) -> np.ndarray:
    """The mask with a background frame, so that a mask touching the border still draws a closed contour."""
    m = np.asarray(mask, dtype=float).copy()
    m[[0, -1], :] = 0.0
    m[:, [0, -1]] = 0.0
    return m


def plot_segmentations(panels: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One row per task and init: test images with the ground-truth (green) and predicted contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(p, init) for p in panels for init in p["pred"]] or [(p, None) for p in panels]
    ncol = max([len(p["items"]) for p in panels] + [1])
    fig, axes = plt.subplots(max(len(rows), 1), ncol, figsize=(2.4 * ncol, 2.6 * max(len(rows), 1)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (p, init) in enumerate(rows):
        for c, it in enumerate(p["items"]):
            ax = axes[r, c]
            gt = it["mask"][0].numpy()
            ax.imshow(it["image"][0].numpy(), cmap="gray", vmin=0, vmax=1)
            if gt.any():
                ax.contour(_closed(gt), levels=[0.5], colors="lime", linewidths=1.0)
            if init is not None:
                pred = p["pred"][init][c]
                if pred.any():
                    ax.contour(_closed(pred), levels=[0.5], colors=INIT_COLOURS.get(init, "red"), linewidths=1.0)
                d = p["dice"][init][c]
                score = (f"Dice {_fmt(d, 2)}" if d is not None else
                         "empty GT, " + ("empty prediction" if not pred.any() else "false positive"))
                ax.set_title(f"{p['task']} / {init}\n{it['image_id']} {score}", fontsize=7)
            else:
                ax.set_title(f"{p['task']}\n{it['image_id']}", fontsize=7)
    fig.suptitle("ground truth (green); prediction: pretrained (red), random init (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _print_table(results: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"raycxr segment: {results['encoder']} from {results['run']}")
    for col in TABLE_HEADER:
        table.add_column(col)
    for row in table_rows(results):
        table.add_row(*row)
    Console().print(table)
