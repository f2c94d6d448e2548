"""Single-process pretraining from a config: the schedule, checkpoints and resume around the loops.

``raycxr pretrain runner=local`` runs this. It owns what the Ray Train coordinator will own on a
cluster (which loop to call when, what to checkpoint), with the same loops underneath.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from ..dataset import SiteDataset, collate_skip_none
from ..labels import UnionLabelSpace
from ..losses import cosine_schedule
from ..models.ark import ArkModel, make_teacher
from ..models.encoders import ImageEncoder
from ..models.unichest import UniChest
from ..objectives import make_objective
from ..quarantine import Quarantine
from ..sites.config import SiteConfig, discover_sites
from ..transforms import eval_transforms, transforms_from_config
from .loops import (
    UniChestLossConfig,
    ark_site_epoch,
    concurrent_multitask_epoch,
    supervised_union_epoch,
    to_device,
    unichest_epoch,
)

METHODS = ("unichest", "ark", "concurrent", "mixed", "single")


def select_sites(cfg: DictConfig) -> dict[str, SiteConfig]:
    sites = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    wanted = list(cfg.site_names) if cfg.get("site_names") else list(sites)
    unknown = [s for s in wanted if s not in sites]
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}; registered: {sorted(sites)}")
    return {s: sites[s] for s in wanted}


def site_datasets(cfg: DictConfig, sites: dict[str, SiteConfig], *, split: str = "train", train: bool = True,
                  union: UnionLabelSpace | None = None, second_view: bool = False) -> dict[str, SiteDataset]:
    """One dataset per site; unreadable images go to that site's quarantine.

    ``second_view``: supervised sites get a clean view (Ark's teacher input); sites with a
    self-supervised objective get a second augmented view."""
    tf = transforms_from_config(OmegaConf.to_container(cfg.transforms, resolve=True), train=train)
    out = {}
    for i, (name, site) in enumerate(sites.items()):
        view2 = None
        if second_view:
            view2 = eval_transforms(cfg.transforms.size) if site.objective == "supervised" else tf
        out[name] = SiteDataset(site.load_manifest(), site.root, transform=tf, split=split, label_space=union,
                                uncertain_policy=site.uncertain_policy, site_index=i,
                                quarantine=Quarantine(site.quarantine_path, site=name), seed=cfg.seed,
                                second_view=view2)
    return out


def loader(ds: torch.utils.data.Dataset, cfg: DictConfig, *, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(int(cfg.seed))
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=cfg.num_workers,
                      collate_fn=collate_skip_none, drop_last=shuffle and len(ds) > cfg.batch_size, generator=g)


class LocalData:
    """The data plane of a single process: datasets read straight from the site folders.

    The Ray runner provides the same methods backed by site actors, so the method code below is
    shared by both."""

    def __init__(self, cfg: DictConfig, sites: dict[str, SiteConfig]) -> None:
        self.cfg, self.sites = cfg, sites
        self.label_names = {n: s.load_manifest().label_names for n, s in sites.items()}
        self.union = UnionLabelSpace.build(self.label_names)
        self._val: DataLoader | None = None

    def site_classes(self) -> dict[str, int]:
        return {n: len(names) for n, names in self.label_names.items()}

    def union_loader(self) -> Iterable:
        return loader(ConcatDataset(list(site_datasets(self.cfg, self.sites, union=self.union).values())), self.cfg)

    def site_loaders(self, second_view: bool = True) -> dict[str, Iterable]:
        return {n: loader(d, self.cfg) for n, d in site_datasets(self.cfg, self.sites,
                                                                  second_view=second_view).items()}

    def val_batches(self) -> Iterable | None:
        """Un-augmented val split of every site, union targets (``None`` when validation is off)."""
        if not _val_enabled(self.cfg):
            return None
        if self._val is None:  # built once: every epoch scores the same images
            split = self.cfg.val.get("split", "val")
            sets = list(site_datasets(self.cfg, self.sites, split=split, train=False, union=self.union).values())
            limit = self.cfg.val.get("limit")
            if limit:
                sets = [torch.utils.data.Subset(d, range(min(int(limit), len(d)))) for d in sets]
            self._val = loader(ConcatDataset(sets), self.cfg, shuffle=False)
        return self._val

    def probe(self) -> dict | None:
        return _probe_batch(site_datasets(self.cfg, self.sites, union=self.union, train=False), self.cfg.probe_size)

    def distribute(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer  # one process: nothing to synchronise

    def site_heads(self) -> dict[str, dict]:
        return {}

    def hand_back_heads(self, heads: dict[str, dict], version: int) -> None:
        pass


def resolve_device(cfg: DictConfig) -> torch.device:
    """``device: auto`` is the GPU when there is one (a Ray Train worker sets its own), else the CPU."""
    d = str(cfg.get("device") or "auto")
    return torch.device("cuda" if d == "auto" and torch.cuda.is_available() else "cpu" if d == "auto" else d)


def place(cfg: DictConfig, *modules: nn.Module | None) -> torch.device:
    """Move the run's modules to its device and set their mixed precision (``model.amp_dtype``, read by
    the loops): ``precision: auto`` is bf16 autocast on a GPU and fp32 on the CPU."""
    device = resolve_device(cfg)
    precision = str(cfg.get("precision") or "auto")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got '{precision}'")
    amp = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None
    for m in modules:
        if m is not None:
            m.to(device)
            m.amp_dtype = amp
    return device


def _val_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.get("val") and cfg.val.get("enabled", True))


def _validate(data: Any, model: nn.Module, **kw: Any) -> dict:
    """``{"val_auc", "val_images"}`` for the model as it is now, or ``{}`` when validation is off."""
    from .validation import epoch_classifier, validate

    batches = data.val_batches()
    if batches is None:
        return {}
    t0 = time.perf_counter()
    classifier, names = epoch_classifier(model, label_names=getattr(data, "label_names", None), **kw)
    out = validate(classifier, names, batches, data.union.names)
    return {**out, "val_seconds": round(time.perf_counter() - t0, 2)}


def adamw(params: list[nn.Parameter] | Any, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without decay on biases and other 1-D parameters (REFERENCE U.6)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def build_encoder(cfg: DictConfig) -> ImageEncoder:
    e = cfg.encoder
    return ImageEncoder(e.name, embed_dim=e.get("embed_dim"), checkpoint=e.get("checkpoint"),
                        img_size=cfg.transforms.size)


def build_text_encoder(cfg: DictConfig, dim: int) -> nn.Module:
    from ..text import TextEncoder, text_model_dir

    t = cfg.text
    model_dir = t.model_dir or text_model_dir(t.kind)
    return TextEncoder(model_dir, embed_dim=dim, max_length=t.max_length, freeze=True)


class Run:
    """Output folder of a run: ``checkpoint.pt`` (latest), stage checkpoints, ``metrics.jsonl``."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out / "metrics.jsonl"

    def write_config(self, cfg: DictConfig) -> None:
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    def log(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, state: dict, name: str = "checkpoint.pt") -> Path:
        path = self.out / name
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # never a half-written checkpoint
        return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def run_pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on the registered sites in this process; returns ``{"history", "checkpoint"}``."""
    check_method(cfg)
    sites = select_sites(cfg)
    resume = load_checkpoint(cfg.resume) if cfg.get("resume") else None
    return train_method(cfg, sites, Run(cfg.out), resume, LocalData(cfg, sites))


def check_method(cfg: DictConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method '{cfg.method}'; expected one of {METHODS}")


def train_method(cfg: DictConfig, sites: dict[str, SiteConfig], run: Run, resume: dict | None, data: Any) -> dict:
    """The method's schedule with a given data plane (local or site actors) and checkpoint sink."""
    torch.manual_seed(int(cfg.seed))
    torch.set_num_threads(max(1, int(cfg.get("threads") or torch.get_num_threads())))
    run.write_config(cfg)
    fn = {"unichest": _run_unichest, "ark": _run_ark, "concurrent": _run_concurrent, "mixed": _run_mixed,
          "single": _run_single}[cfg.method]
    return fn(cfg, sites, run, resume, data)


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="epoch", dynamic_ncols=True)


def _report(run: Run, bar: tqdm, record: dict, t0: float) -> None:
    record["seconds"] = round(time.perf_counter() - t0, 2)
    train_s = record["seconds"] - record.get("val_seconds", 0.0)  # training throughput, validation excluded
    record["images_per_s"] = round(record.get("images", 0) / max(train_s, 1e-9), 1)
    run.log(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", ips=record["images_per_s"],
                    **({"val_auc": record["val_auc"]} if record.get("val_auc") is not None else {}))
    bar.update(1)


# -- UniChest: conquer then divide --------------------------------------------------------------
def _run_unichest(cfg: DictConfig, sites: dict[str, SiteConfig], run: Run, resume: dict | None, data: Any) -> dict:
    u = cfg.unichest
    union = data.union
    dl = data.union_loader()
    probe = data.probe()
    encoder = build_encoder(cfg)
    model = UniChest(encoder, n_experts=u.n_experts, lam=u.lam, bias_ratio=u.bias_ratio, scl_dim=u.scl_dim,
                     query=OmegaConf.to_container(u.query, resolve=True))
    text = build_text_encoder(cfg, encoder.dim)
    place(cfg, model, text)
    loss_cfg = UniChestLossConfig(**OmegaConf.to_container(u.loss, resolve=True))
    schedule = [("conquer", e) for e in range(u.conquer_epochs)] + [("divide", e) for e in range(u.divide_epochs)]
    start = 0
    history: list[dict] = []
    if resume is not None:
        _check_resume(resume, "unichest", union.names)
        model.load_state_dict(resume["model"])
        text.load_state_dict(resume["text_encoder"])
        start, history = resume["position"], resume["history"]
    gen = torch.Generator().manual_seed(int(cfg.seed) + start)
    opt, opt_stage = None, None
    best = {"val_auc": resume.get("best_conquer_auc") if resume else None, "state": None}
    bar = _progress(len(schedule), "unichest")
    bar.update(start)
    if start == 0:
        run.log({"method": "unichest", "position": -1, "probe_asl": _unichest_probe(model, text, union.names, probe,
                                                                                      loss_cfg)})
    for pos in range(start, len(schedule)):
        stage, epoch = schedule[pos]
        if opt_stage != stage:
            if stage == "divide" and pos == u.conquer_epochs and u.get("divide_from", "best") == "best":
                _load_best_conquer(model, text, best, run)
            model.set_stage(stage)
            opt = data.distribute(adamw(list(model.parameters()) + list(text.parameters()), u.lr, u.weight_decay))
            if resume is not None and resume.get("stage") == stage and resume.get("optimizer"):
                opt.load_state_dict(resume["optimizer"])
            opt_stage = stage
        t0 = time.perf_counter()
        means = unichest_epoch(model, text, union.names, dl, opt, stage=stage, cfg=loss_cfg,
                               max_steps=cfg.max_steps_per_epoch, generator=gen)
        record = {"method": "unichest", "stage": stage, "epoch": epoch, "position": pos, **means,
                  "probe_asl": _unichest_probe(model, text, union.names, probe, loss_cfg, stage=stage),
                  **_validate(data, model, text=text, class_names=union.names)}
        history.append(record)
        _report(run, bar, record, t0)
        improved = stage == "conquer" and record.get("val_auc") is not None and (
            best["val_auc"] is None or record["val_auc"] >= best["val_auc"])
        if improved:
            best["val_auc"] = record["val_auc"]
        state = {"method": "unichest", "position": pos + 1, "stage": stage, "model": model.state_dict(),
                 "best_conquer_auc": best["val_auc"], "val_auc": record.get("val_auc"),
                 "text_encoder": text.state_dict(), "optimizer": opt.state_dict(), "class_names": union.names,
                 "site_names": list(sites), "site_index": {n: i for i, n in enumerate(sites)},
                 "encoder": model.encoder.state_dict(), "history": history,
                 "config": OmegaConf.to_container(cfg, resolve=True)}
        run.save(state)
        if improved:
            # a copy: state_dict() tensors are the live weights, which keep training
            best["state"] = {"position": pos + 1, "model": _clone(state["model"]),
                             "text_encoder": _clone(state["text_encoder"])}
            run.save(state, "conquer.pt")  # the best conquer epoch by val AUC: divide starts from it
        elif stage == "conquer" and best["val_auc"] is None and (pos + 1 == len(schedule) or
                                                                 schedule[pos + 1][0] != stage):
            run.save(state, "conquer.pt")  # no validation data: the last conquer epoch
        if stage == "divide" and pos + 1 == len(schedule):
            run.save(state, "divide.pt")
    bar.close()
    return {"history": history, "checkpoint": str(run.out / "checkpoint.pt")}


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _load_best_conquer(model: UniChest, text: nn.Module, best: dict, run: Run) -> None:
    """Divide starts from the conquer epoch with the best val mean AUC, not simply the last one. The
    authors select by ChestX-ray14's val AUC (REFERENCE U.6); deliberate difference: here the val
    split of every training site counts, since no site is privileged."""
    state = best["state"]
    if state is None and best["val_auc"] is not None and (run.out / "conquer.pt").is_file():
        state = load_checkpoint(run.out / "conquer.pt")  # resumed exactly at the stage boundary
    if state is None:
        return
    model.load_state_dict(state["model"])
    text.load_state_dict(state["text_encoder"])
    print(f"divide starts from conquer epoch {state['position'] - 1} (val AUC {best['val_auc']})")


def _probe_batch(datasets: dict[str, SiteDataset], n: int) -> dict | None:
    """A fixed, un-augmented batch from every site: the same images scored after every epoch."""
    if n <= 0:
        return None
    per = max(1, n // max(len(datasets), 1))
    return collate_skip_none([d[i] for d in datasets.values() for i in range(min(per, len(d)))])


@torch.no_grad()
def _unichest_probe(model: UniChest, text: nn.Module, class_names: list[str], probe: dict | None,
                    cfg: UniChestLossConfig, stage: str = "conquer") -> float | None:
    """Image ASL (mean over known labels) on the probe batch, in eval mode: a deterministic curve."""
    if probe is None:
        return None
    from ..losses import asymmetric_loss

    was = model.training, text.training
    model.eval()
    text.eval()
    probe = to_device(probe, next(model.parameters()).device)
    prob = model(probe["image"], text(list(class_names)), stage=stage)["prob"].float()
    loss = asymmetric_loss(prob, probe["targets"], probe["target_mask"], gamma_neg=cfg.gamma_neg,
                           gamma_pos=cfg.gamma_pos, clip=cfg.clip, from_probs=True, reduction="mean")
    model.train(was[0])
    text.train(was[1])
    return round(float(loss), 6)


def _check_resume(state: dict, method: str, classes: list[str] | None) -> None:
    if state.get("method") != method:
        raise ValueError(f"cannot resume a '{state.get('method')}' checkpoint as '{method}'")
    if classes is not None and state.get("class_names") is not None and state["class_names"] != classes:
        raise ValueError("the checkpoint's class list differs from the sites' union label space")


# -- Ark: cyclic rounds over the sites ------------------------------------------------------------
def _run_ark(cfg: DictConfig, sites: dict[str, SiteConfig], run: Run, resume: dict | None, data: Any) -> dict:
    a = cfg.ark
    loaders = data.site_loaders(second_view=True)
    site_classes = data.site_classes()
    student = ArkModel(build_encoder(cfg), {}, proj_dim=a.proj_dim, mlp_projector=a.mlp_projector)
    teacher_heads_from = None
    start, history = 0, []
    if resume is not None:
        _check_resume(resume, "ark", None)
        for n, k in resume["site_classes"].items():
            student.add_head(n, k)
        for n, kind in resume.get("site_objectives", {}).items():
            student.add_objective(n, make_objective(kind, student.proj_dim, text_dim=student.proj_dim))
        student.load_state_dict(resume["model"])
        teacher_heads_from = resume["teacher"]
        start, history = resume["position"], resume["history"]
    text = None
    if any(s.objective in ("clip", "slip") for s in sites.values()):
        text = build_text_encoder(cfg, student.proj_dim)
        if resume is not None and resume.get("text_encoder"):
            text.load_state_dict(resume["text_encoder"])
    for n, k in site_classes.items():
        if n in student.heads or n in student.objectives:
            continue
        # a new site joins: a fresh head (or objective), the shared encoder from the checkpoint
        if sites[n].objective == "supervised":
            student.add_head(n, k)
        else:
            student.add_objective(n, make_objective(sites[n].objective, student.proj_dim, n_classes=k,
                                                    text_dim=student.proj_dim))
    if resume is None:  # heads that site actors kept from an earlier run of the same name
        for n, state in data.site_heads().items():
            if n in student.heads and state["weight"].shape == student.heads[n].weight.shape:
                student.heads[n].load_state_dict(state)
    place(cfg, student, text)
    teacher = make_teacher(student, seed=int(cfg.seed) + 1)
    if teacher_heads_from is not None:
        teacher.load_state_dict(teacher_heads_from, strict=False)
    order = list(a.order) if a.get("order") else list(sites)
    if resume is not None and not a.get("order"):
        # keep the run's order; new sites join at the end of each round (as Ark's continual training does)
        old = [n for n in resume["order"] if n in sites]
        order = old + [n for n in sites if n not in old]
    unknown = [n for n in order if n not in sites]
    if unknown:
        raise ValueError(f"ark.order names unknown site(s) {unknown}; sites: {list(sites)}")
    if resume is not None and order != resume["order"]:
        # the set of sites changed: continue at the next full round
        start = -(-start // len(resume["order"])) * len(order)
    n_units = a.rounds * len(order)
    momentum = cosine_schedule(a.momentum_base, 1.0, a.rounds, len(order))
    weight = cosine_schedule(0.0, a.consistency_max, a.rounds, len(order))
    trainable = list(student.parameters()) + (list(text.parameters()) if text is not None else [])
    opt = data.distribute(torch.optim.SGD([p for p in trainable if p.requires_grad], lr=a.lr, momentum=0.9,
                                          nesterov=True, weight_decay=a.weight_decay))
    if resume is not None and resume.get("optimizer") and resume["site_classes"] == site_classes:
        opt.load_state_dict(resume["optimizer"])
    bar = _progress(n_units, "ark")
    bar.update(start)
    for it in range(start, n_units):
        rnd, site = divmod(it, len(order))
        name = order[site]
        t0 = time.perf_counter()
        means = ark_site_epoch(student, teacher, name, loaders[name], opt, consistency_weight=float(weight[it]),
                               momentum=float(momentum[it]), ema_mode=a.ema_mode, max_steps=cfg.max_steps_per_epoch,
                               text_encoder=text)
        record = {"method": "ark", "round": rnd, "site": name, "position": it, "momentum": float(momentum[it]),
                  "consistency_weight": float(weight[it]), **means,
                  **(_validate(data, student) if student.heads else {})}
        history.append(record)
        _report(run, bar, record, t0)
        run.save({"method": "ark", "position": it + 1, "order": order, "model": student.state_dict(),
                  "teacher": teacher.state_dict(), "optimizer": opt.state_dict(),
                  "site_classes": {n: student.heads[n].out_features for n in student.heads},
                  "site_labels": {n: list(data.label_names[n]) for n in student.heads if n in data.label_names},
                  "site_objectives": {n: sites[n].objective if n in sites else "?" for n in student.objectives},
                  "text_encoder": text.state_dict() if text is not None else None,
                  "heads": {n: student.head_state(n) for n in student.heads},
                  "encoder": student.encoder.state_dict(), "history": history,
                  "config": OmegaConf.to_container(cfg, resolve=True)})
        data.hand_back_heads({n: student.head_state(n) for n in student.heads}, it + 1)
    bar.close()
    return {"history": history, "checkpoint": str(run.out / "checkpoint.pt")}


# -- baselines ------------------------------------------------------------------------------------------
def _run_concurrent(cfg: DictConfig, sites: dict[str, SiteConfig], run: Run, resume: dict | None, data: Any) -> dict:
    model = ArkModel(build_encoder(cfg), data.site_classes(), proj_dim=cfg.ark.proj_dim,
                     mlp_projector=cfg.ark.mlp_projector)
    place(cfg, model)
    opt = data.distribute(adamw(model.parameters(), cfg.baseline.lr, cfg.baseline.weight_decay))
    loaders = data.site_loaders(second_view=False)
    return _epochs(cfg, run, "concurrent", model, lambda: {**concurrent_multitask_epoch(
        model, loaders, opt, max_steps=cfg.max_steps_per_epoch), **_validate(data, model)},
        extra={"site_classes": data.site_classes(), "site_labels": {n: list(v) for n, v in data.label_names.items()},
               "site_names": list(sites)})


class UnionClassifier(nn.Module):
    """Encoder + one linear head over the union label space (the naive mixing baseline)."""

    def __init__(self, encoder: ImageEncoder, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[0])


def _run_mixed(cfg: DictConfig, sites: dict[str, SiteConfig], run: Run, resume: dict | None, data: Any) -> dict:
    union = data.union
    dl = data.union_loader()
    model = UnionClassifier(build_encoder(cfg), len(union))
    place(cfg, model)
    opt = data.distribute(adamw(model.parameters(), cfg.baseline.lr, cfg.baseline.weight_decay))
    return _epochs(cfg, run, "mixed", model, lambda: {**supervised_union_epoch(
        model, dl, opt, max_steps=cfg.max_steps_per_epoch), **_validate(data, model, class_names=union.names)},
                   extra={"class_names": union.names, "site_names": list(sites)})


def _run_single(cfg: DictConfig, sites: dict[str, SiteConfig], run: Run, resume: dict | None, data: Any) -> dict:
    if len(sites) != 1:
        raise ValueError(f"method=single trains on exactly one site; pass site_names=[NAME] (got {list(sites)})")
    return _run_mixed(cfg, sites, run, resume, data)


def _epochs(cfg: DictConfig, run: Run, method: str, model: nn.Module, epoch_fn, extra: dict | None = None) -> dict:
    history = []
    bar = _progress(cfg.baseline.epochs, method)
    for epoch in range(cfg.baseline.epochs):
        t0 = time.perf_counter()
        record = {"method": method, "epoch": epoch, **epoch_fn()}
        history.append(record)
        _report(run, bar, record, t0)
        run.save({"method": method, "position": epoch + 1, "model": model.state_dict(),
                  "encoder": model.encoder.state_dict(), "history": history, **(extra or {}),
                  "config": OmegaConf.to_container(cfg, resolve=True)})
    bar.close()
    return {"history": history, "checkpoint": str(run.out / "checkpoint.pt")}
