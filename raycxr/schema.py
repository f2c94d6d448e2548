# ruff: noqa: UP045 - OmegaConf structured configs need typing.Optional, not `X | None`
"""Every knob of every command, once: its type, default, allowed values and a one-line doc (structured configs).

Each field is a :func:`knob` (or a :func:`section` of more knobs). The dataclass is the one home of a knob's
default and range; ``raycxr/configs/<command>.yaml`` is a preset over it that restates the defaults with longer
comments for people reading the file, and a test fails when the two disagree or the YAML has a key without a
field (tests/test_config.py). :func:`check_config` checks a composed config so that a wrong key or value fails as
one line naming it (``image_size: must be >= 1, got -5``; ``baseline.epochs: 'two' is not an int``) instead of
a traceback from deep inside training; the configuration reference page (docs/hooks.py) is generated from the
same fields. Code reads ``cfg.key`` (the composed config always has it); a function taking a knob as an
argument defaults it with :func:`default`. A method registered outside raycxr may add its own top-level section
(``+tiny.lr=0.1``); such sections are passed through unchecked.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def knob(default: Any = MISSING, doc: str = "", *, ge: float | None = None,
         choices: Sequence[Any] | None = None, preset: bool = False) -> Any:
    """A config field: its ``default`` (``MISSING``: must be given), a one-line ``doc``, and the allowed values,
    either a lowest value ``ge`` or a list of ``choices`` (checked by :func:`check_config`; ``null`` always passes)."""
    metadata: dict[str, Any] = {"doc": doc, "preset": preset}  # preset: a table of data the YAML holds
    if ge is not None:
        metadata["range"] = (ge, None)
    if choices is not None:
        metadata["choices"] = list(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, doc: str = "", **overrides: Any) -> Any:
    """A nested config section; ``overrides`` change some of its defaults where this command differs."""
    return field(default_factory=lambda: cls(**copy.deepcopy(overrides)), metadata={"doc": doc})


# ------------------------------------------------------------------------------------------ sections


@dataclass
class SitesSection:
    sites_dir: str = knob("sites", "one YAML per registered site")
    data_root: str = knob("data", "relative site roots are resolved against this")
    check_images: bool = knob(False, "validate: also read every image (bad ones are quarantined)")
    workers: int = knob(2, ge=1)


@dataclass
class ScheduleSection:
    kind: str = knob("cosine", "cosine: linear warm-up, then cosine to min_lr (UniChest U.6; Ark A.6 as intended) | "
                     "constant | none", choices=["cosine", "constant", "none"])
    warmup: float = knob(0.05, "warm-up steps, or a fraction of the run's steps when < 1. Deliberate difference: the "
                         "authors warm up for 2,000 iterations, longer than a whole CPU run; a fraction "
                         "scales", ge=0.0)
    min_lr: float = knob(1e-06)


@dataclass
class TrackingSection:
    backend: str = knob("none", "none | mlflow (local store <out>/mlruns unless uri is set) | tensorboard "
                        "(<out>/tensorboard)", choices=["none", "mlflow", "tensorboard"])
    uri: Optional[str] = knob(None, "an MLflow tracking URI, e.g. http://mlflow.hospital.lan:5000")
    experiment: str = knob("raycxr")


@dataclass
class ValSection:
    enabled: bool = knob(True, "mean AUC on the val split of the training sites after every epoch (metrics.jsonl: "
                         "val_auc)")
    split: str = knob("val", "the manifest split scored")
    limit: Optional[int] = knob(None, "cap val images per site (fast smoke runs)", ge=1)


@dataclass
class EncoderSection:
    name: str = knob("resnet18", "any timm backbone: resnet50, densenet121 (UniChest), swin_base_patch4_window7_224 "
                     "(Ark), vit_base_patch16_224")
    embed_dim: Optional[int] = knob(256, "token MLP output (UniChest uses 768); null = backbone width", ge=1)
    checkpoint: Optional[str] = knob(None, "start from these weights (timm/torchvision state dict or a raycxr "
                                     "checkpoint)")
    patch_size: Optional[int] = knob(None, "ViT backbones: the patch side in pixels; null = the model's own (16: a "
                                     "64 px image is 16 tokens, 8: 64 tokens)", ge=1)
    norm: str = knob("default", "default (the backbone's own, BatchNorm for ResNets) | group (GroupNorm: "
                     "batch-independent, for methods that train on one site's batches at a time, see docs/demo.md, "
                     "Ark notes)")


@dataclass
class DecodeCacheSection:
    enabled: bool = knob(False, "decode once (raycxr/cache.py): each site keeps its images read, windowed, inverted "
                         "and resized to `size` in memory-mapped files; epochs after the first only augment. Rebuilt "
                         "per file when its content changes, and whole when the settings do")
    dir: Optional[str] = knob(None, "null = decode_cache/ next to the manifest")
    dtype: str = knob("uint16", "uint16 (within 1/131070 of the reader's float32) | uint8 | float32 (exact, 2x the "
                      "disk)", choices=["uint8", "uint16", "float32"])


@dataclass
class TransformsSection:
    size: int = knob("${image_size}")
    train: dict[str, Any] = knob(
        {"rotate_deg": 10.0,
         "scale": 0.1,
         "translate": 0.05,
         "affine_prob": 0.8,
         "contrast_gamma": [0.7, 1.5],
         "contrast_prob": 0.5,
         "intensity_scale": 0.1,
         "intensity_shift": 0.05,
         "intensity_prob": 0.5,
         "noise_std": 0.01,
         "noise_prob": 0.2},
        "augmentation strengths (raycxr.transforms.train_transforms); *_prob: 0 turns one off")
    augment: str = knob("device", "device: sites only read + collate (uint8/uint16 from the cache), augmentation runs "
                        "batched on the trainer's device after the copy (~10x the images per host core, "
                        "benchmarks/scaleout.py); host: per sample in the site's process (MONAI), as "
                        "before", choices=["device", "host"])
    cache: DecodeCacheSection = section(DecodeCacheSection)


@dataclass
class TextSection:
    kind: str = knob("auto", "auto: $RAYCXR_TEXT_MODEL, else the shipped MiniLM, else a small BERT built from Open-I "
                     "reports")
    model_dir: Optional[str] = knob(None, "any Hugging Face BERT-family folder (PubMedBERT, ClinicalBERT...)")
    max_length: int = knob(64, ge=1)
    cache_size: int = knob(100000, "frozen text features cached per string (class names, label texts); 0 = recompute "
                           "every step")
    train_projection: bool = knob(True, "the projection (mlp_embed) after the frozen tower trains. Deliberate "
                                  "difference: the authors freeze it too (U.2); frozen, a small run's linear probe "
                                  "fell to the random-init level")


@dataclass
class QuerySection:
    n_layers: int = knob(4, ge=1)
    n_heads: int = knob(4, ge=1)
    ffn: int = knob(1024, ge=1)
    dropout: float = knob(0.1)
    lambda_local: float = knob(1.0)
    lambda_global: float = knob(0.4)


@dataclass
class UniChestLossSection:
    gamma_neg: float = knob(6.0)
    gamma_pos: float = knob(0.0)
    clip: float = knob(0.05)
    asl_reduction: str = knob("sum", "authors: sum; mean is an option", choices=["sum", "mean"])
    detach_focal: bool = knob(False, "deliberate difference: the authors detach the focal weight (true); on small CPU "
                              "runs that gradient did not reduce the loss on a fixed probe set, the full ASL gradient "
                              "did")
    itc_temperature: Optional[float] = knob(None, "null = the coded fixed scale ln(1/0.07) (effective temperature "
                                            "0.376)")
    itc_normalize: bool = knob(False)
    itc_weight: float = knob(1.0)
    scl_temperature: float = knob(1.0)
    scl_weight: float = knob(1.0)
    text_branch: bool = knob(True)
    fourier_p: float = knob(0.5, "Fourier amplitude mix between sites, per batch")
    fourier_space: str = knob("image", "image: on the [0, 1] images | normalized: on the normalised batch, as the "
                              "authors (U.5); measured no gain from following them", choices=["image", "normalized"])


@dataclass
class UniChestSection:
    conquer_epochs: int = knob(2, ge=0)
    divide_epochs: int = knob(1, ge=0)
    divide_from: str = knob("best", "best: the conquer epoch with the best val AUC (conquer.pt) | "
                            "last", choices=["best", "last"])
    expert_init: str = knob("random", "random: experts and gate as initialised, as the authors (U.7) | copy: each "
                            "expert starts as the trained shared network and the gate uniform, so divide starts "
                            "exactly at conquer's output", choices=["random", "copy"])
    divide_share: float = knob(0.25, "raycxr study budgets: the share of a row's units spent in divide (0 = conquer "
                               "only)")
    n_experts_min: typing.ClassVar[int] = 2  # the shared network and at least one expert
    n_experts: int = knob(4, "K: the shared query network + K-1 experts", ge=n_experts_min)
    lam: float = knob(0.5, "Eq. 5 weight of the shared network")
    bias_ratio: Optional[float] = knob(None, "null = 1 - lam (paper); the authors' code uses an independent 0.5")
    scl_dim: int = knob(32, ge=1)
    lr: float = knob(5e-05, ge=0.0)
    weight_decay: float = knob(0.02, ge=0.0)
    query: QuerySection = section(QuerySection)
    share_norm: bool = knob(False, "true: the authors' one LayerNorm shared by every query network (U.3); measured no "
                            "clear difference")
    loss: UniChestLossSection = section(UniChestLossSection)


@dataclass
class ArkSection:
    rounds: int = knob(2, ge=0)
    order: Optional[list[str]] = knob(None, "site order per round; null = registration order")
    proj_dim: int = knob(256, "Ark uses 1376", ge=1)
    mlp_projector: bool = knob(True)
    optimizer: str = knob("sgd", "sgd (the authors': momentum 0.9, Nesterov) | adamw", choices=["sgd", "adamw"])
    lr: float = knob(0.01, ge=0.0)
    weight_decay: float = knob(0.0)
    momentum_base: float = knob(0.9, "EMA momentum rises 0.9 -> 1 on a cosine over rounds x sites")
    consistency_max: float = knob(0.5, "consistency weight rises 0 -> 0.5")
    ema_mode: str = knob("epoch", "epoch (Ark default) | iteration", choices=["epoch", "iteration"])
    tencrop: bool = knob(False, "the finished run averages ten crops at test time (the authors' test transform, A.5)")


@dataclass
class BaselineSection:
    epochs: int = knob(2, ge=0)
    lr: float = knob(0.001, ge=0.0)
    weight_decay: float = knob(0.02)


@dataclass
class SelfSupSection:
    objective: str = knob("simclr", "simclr | mocov2 | vicreg | clip (image-report) | slip (clip + "
                          "simclr)", choices=["simclr", "mocov2", "vicreg", "clip", "slip"])
    epochs: int = knob(2, ge=0)
    lr: float = knob(0.001)
    weight_decay: float = knob(0.02)
    proj_dim: int = knob(128, "the report projection of clip / slip", ge=1)
    momentum: float = knob(0.99, "mocov2: EMA of the key encoder")


@dataclass
class UmiFSection:
    vit: str = knob("vit_tiny_patch16_224", "any timm ViT with a class token; the paper uses vit_base_patch16_224 "
                    "(img_size = image_size)")
    drop_path_rate: Optional[float] = knob(0.0)
    epochs: int = knob(2, ge=0)
    lr: float = knob(0.0001, "the paper: 4e-5 with batch 16 x 128 (AdamW, wd 0.05, warm-up + cosine)", ge=0.0)
    weight_decay: float = knob(0.05, ge=0.0)
    p: float = knob(0.2, "probability of r = 1 (image vs supervision, CLIP-like); else r ~ U[0, 1] (Table 6 "
                    "best)", ge=0.0)
    p_end: Optional[float] = knob(None, "r schedule: P(r = 1) moves linearly from p to p_end over the run (null: "
                                  "constant p, the paper)", ge=0.0)
    r_range: list[float] = knob([0.0, 1.0], "r ~ U[lo, hi] when r is not 1 (the paper: [0, 1]; e.g. [0.3, 0.7] for "
                                "balanced groups)")
    tau: float = knob(0.1, "temperature of the alignment loss (Eq. 1)", ge=1e-06)
    teacher: bool = knob(True, "the EMA teacher and the consistency loss (Eq. 2); false: alignment only (ablation)")
    con_weight: float = knob(1.0, "weight of the consistency loss (the paper adds the two losses)", ge=0.0)
    momentum: float = knob(0.996, "EMA momentum of the teacher", ge=0.0)
    segment_pairs: bool = knob(True, "image-segment pairs from the sites' boxes / masks (false: the ablation without "
                               "them)")
    prompt: str = knob("Chest X-ray showing {}.", "class labels as text (own wording; the paper's templates: appendix "
                       "A.3)")
    negative_prompt: str = knob("Chest X-ray with none of the listed findings.")


@dataclass
class AutoscaleSection:
    min: int = knob(1, ge=1)
    max: int = knob(4, ge=1)
    up_wait: float = knob(0.1, "a Train worker that waited > 10 % of a window for the site adds a replica")
    down_util: float = knob(0.5, "nobody waiting and n - 1 replicas would be < 50 % busy: one retires (after patience)")
    patience: int = knob(3, ge=1)
    every: int = knob(20, "batches per window", ge=1)
    min_gain: float = knob(0.1, "a step up is undone (and caps the pool) unless the consumers' batches/s rise by 10 %")


@dataclass
class RaySection:
    address: Optional[str] = knob(None, 'null = start a local cluster; "auto" or ray://host:10001 to join one')
    num_cpus: Optional[int] = knob(None, "for a local cluster")
    object_store_mb: Optional[int] = knob(None)
    log_to_driver: bool = knob(True)
    num_workers: int = knob(1, "Train workers (DDP-style gradient averaging across them)", ge=1)
    use_gpu: bool = knob(False)
    cpus_per_worker: float = knob(1)
    run_name: Optional[str] = knob(None, "null: from `out` (its folder name + a hash of its path), so another out is "
                                   "another run; resume = run again with the same out. A second launch into a run "
                                   "started with another method, encoder, image_size or sites is refused unless it "
                                   "says resume=")
    storage_path: Optional[str] = knob(None, "Ray Train's storage; null: <out>/ray (several nodes: shared storage)")
    max_failures: int = knob(2, "restart the worker group from the last checkpoint this many times", ge=0)
    num_to_keep: int = knob(2, ge=1)
    actor_max_restarts: int = knob(-1, "a site actor that dies is restarted by Ray (-1: always, e.g. when its node "
                                   "comes back)", ge=-1)
    placement_timeout_s: float = knob(120, "how long a site waits for a node matching its placement (at start, or "
                                      "after its node was lost) before the run fails naming the site, its selector "
                                      "and the cluster's labels", ge=0.001)
    prefetch: int = knob(4, "batch requests in flight per stream", ge=1)
    grad_sync: str = knob("bucketed", "bucketed: DDP's numerics (buckets all-reduced during the backward pass) | "
                          "per_tensor (the old scheme)", choices=["bucketed", "per_tensor"])
    bucket_mb: float = knob(25, "gradient bucket size (DDP's bucket_cap_mb)", ge=0.001)
    site_replicas: Any = knob("auto", "actors serving each site's batches, placed like the site: N, or auto (grown "
                              "while the Train workers wait for the site and an added replica helps; a site YAML's "
                              "`replicas:` wins)")
    site_cpus: float = knob(0, "cores reserved per site actor (0: not reserved, as before)")
    autoscale: AutoscaleSection = section(AutoscaleSection)


# ------------------------------------------------------------------------------------------ commands


@dataclass
class SitesConfig(SitesSection):
    pass


@dataclass
class SynthConfig:
    out: str = knob("data/demo", "one folder per site is written here")
    sites: list[Any] = knob(["nih", "chexpert", "vindr", "openi", "siim"], "names, or {name, source, n, profile: "
                            "{...}}")
    n_per_site: int = knob(400, ge=1)
    seed: int = knob(0)
    render_size: int = knob(256, "rendering resolution; each site stores at its own size", ge=32)
    workers: int = knob(2, "processes", ge=1)
    overwrite: bool = knob(False, "replace existing site folders")
    preview: bool = knob(True, "write preview.png per site")
    enrich: Optional[dict[str, Any]] = knob(None, "e.g. {classes: [Cardiomegaly, Edema], min_rate: 0.12}: at least "
                                            "that share of positives")
    split_fractions: list[float] = knob([0.8, 0.1, 0.1], "train / val / test, patient-disjoint")
    preset: Optional[str] = knob(None, "a named set of the values above from `presets` (e.g. preset=study)")
    presets: dict[str, Any] = knob({}, "named sets of the values above (data: raycxr/configs/synth.yaml holds demo, "
                                   "study, study_gpu)", preset=True)


@dataclass
class PretrainConfig:
    sites: SitesSection = section(SitesSection)
    method: str = knob("unichest", "any registered method: unichest | ark | concurrent (multi-task baseline) | mixed "
                       "(union head) | single")
    plugins: list[str] = knob([], "modules to import first that register methods, objectives, adapters or export "
                              "targets (e.g. [my_lab.plugins])")
    runner: str = knob("local", "local (one process) | ray (site actors + Ray Train "
                       "TorchTrainer)", choices=["local", "ray"])
    site_names: Optional[list[str]] = knob(None, "null = every registered site; or a list such as [nih, vindr]")
    out: str = knob("runs/${method}")
    resume: Optional[str] = knob(None, "a run folder or checkpoint.pt: continue exactly where it stopped")
    seed: int = knob(0)
    threads: Optional[int] = knob(None, ge=1)
    device: str = knob("auto", "auto: the GPU if there is one (each Ray Train worker gets its own), else cpu; or cpu "
                       "/ cuda:1")
    precision: str = knob("auto", "auto: bf16 autocast on a GPU, fp32 on the CPU | fp32 | "
                          "bf16", choices=["auto", "fp32", "bf16"])
    channels_last: str = knob("auto", "auto: NHWC weights on a GPU (faster convolutions), NCHW on the CPU | true | "
                              "false", choices=["auto", "true", "false", "True", "False"])
    compile: str = knob("off", "off | default | reduce-overhead | max-autotune: torch.compile of each encoder, in "
                        "place",
                        choices=["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    image_size: int = knob(128, ge=1)
    batch_size: int = knob(16, ge=1)
    num_workers: int = knob(0, ge=0)
    max_steps_per_epoch: Optional[int] = knob(None, "cap steps per epoch (smoke runs)", ge=1)
    probe_size: int = knob(32, "fixed un-augmented images scored after every epoch (metrics.jsonl: probe_asl)", ge=0)
    schedule: ScheduleSection = section(ScheduleSection)
    tracking: TrackingSection = section(TrackingSection)
    val: ValSection = section(ValSection)
    encoder: EncoderSection = section(EncoderSection)
    transforms: TransformsSection = section(TransformsSection)
    text: TextSection = section(TextSection)
    unichest: UniChestSection = section(UniChestSection)
    ark: ArkSection = section(ArkSection)
    baseline: BaselineSection = section(BaselineSection)
    selfsup: SelfSupSection = section(SelfSupSection)
    umif: UmiFSection = section(UmiFSection)
    ray: RaySection = section(RaySection)


@dataclass
class UmiFGrid:
    p: list[float] = knob([0.0, 0.2, 0.5], "umif.p: P(r = 1) (the paper's Table 6 grid; p = 1 is CLIP-like)")
    tau: list[float] = knob([0.05, 0.1], "umif.tau: the alignment temperature (Eq. 1)")
    p_end: list[Optional[float]] = knob([None], "umif.p_end: the r schedule (null = constant p; e.g. [null, 0.0] "
                                        "compares a decay to 0)")


@dataclass
class TuneSection:
    name: str = knob("unichest-sweep")
    storage_path: str = knob("runs/tune")
    lam: list[float] = knob([0.3, 0.5, 0.7], "unichest.lam: Eq. 5 weight of the shared network (the paper's "
                            "robustness grid)")
    n_experts: list[int] = knob([3, 4, 5], "unichest.n_experts: K", ge=UniChestSection.n_experts_min)
    lr: list[float] = knob([5e-05, 0.0001], "unichest.lr (AdamW, both stages)")
    umif: UmiFGrid = section(UmiFGrid)
    trial_runner: str = knob("local", "local: the plain schedule in the trial process; ray: site actors + a "
                             "TorchTrainer per trial (ray.num_workers workers each; the trial holds no CPU, "
                             "max_concurrent_trials bounds them)", choices=["local", "ray"])
    cpus_per_trial: float = knob(1, "trial_runner=local (ray: ray.num_workers x ray.cpus_per_worker, ray.use_gpu)")
    gpus_per_trial: float = knob(0, "Ray gives the trial that GPU and device: auto picks it (not run on a GPU yet)")
    max_concurrent_trials: Optional[int] = knob(None, "null = as many as the resources allow")
    grace_period: Optional[int] = knob(None, "ASHA: epochs before a trial can be stopped; null = UniChest's first "
                                       "divide epoch (else 1) (λ and K only act in divide: conquer epochs of trials "
                                       "differing in λ, K differ by noise)")
    reduction_factor: float = knob(2, "ASHA keeps the top 1/reduction_factor at each rung", ge=1.0001)
    max_failures: int = knob(1, "a crashed trial restarts from its last checkpoint this many times")
    checkpoint: bool = knob(True, "report a checkpoint every epoch (a restarted or restored trial resumes from it)")
    num_to_keep: int = knob(1, "per trial: the latest")


@dataclass
class TuneConfig(PretrainConfig):
    out: str = knob("${tune.storage_path}/${tune.name}", "always the sweep's folder: Tune's trial folders, "
                    "runs/<trial>, tune_results.*")
    tune: TuneSection = section(TuneSection)


@dataclass
class FederateSection:
    strategy: str = knob("fedavg", "fedavg (sample-weighted) | fedprox (proximal term mu) | fedper (federate.local "
                         "stays local)", choices=["fedavg", "fedprox", "fedper"])
    mu: float = knob(0.01, "fedprox: mu/2 ||w - w_global||^2 in each site's loss", ge=0.0)
    local: list[str] = knob([], "fedper: `module/key` globs kept at each site, e.g. [model/encoder.backbone.layer4.*]")
    share_projector: bool = knob(False, "ark / concurrent: false keeps the projector local (Ark+, Extended Data Fig. "
                                 "2)")
    local_epochs: int = knob(1, "schedule units of the method per site per round (Method.budget_overrides)", ge=1)
    client_fraction: float = knob(1.0, "share of the sites sampled each round", ge=0.0)
    min_clients: int = knob(1, "fewer successful sites than this: the round is not aggregated (the global model "
                            "stays)", ge=1)
    deadline_s: Optional[float] = knob(None, "seconds a site has for its round; a late site is left out (and "
                                       "logged)", ge=0.0)
    clip_norm: Optional[float] = knob(None, "DP-style: each site's update (delta to the global model) clipped to this "
                                      "L2 norm", ge=0.0)
    noise_multiplier: float = knob(0.0, "... plus Gaussian noise of std noise_multiplier x clip_norm (needs "
                                   "clip_norm)", ge=0.0)
    dp_delta: float = knob(1e-05, "with noise: each round's record (and the end of the run) states epsilon at this "
                           "delta", ge=1e-12)
    aggregator: str = knob("mean", "mean (sample-weighted) | trimmed_mean | median: robust to sites you do not "
                           "control", choices=["mean", "trimmed_mean", "median"])
    trim_fraction: float = knob(0.1, "trimmed_mean: share of the largest and of the smallest values dropped per "
                                "coordinate", ge=0.0)
    max_weight_ratio: Optional[float] = knob(10, "mean: a site's weight is capped at this multiple of the other "
                                             "sites' median n_train (null: no cap)", ge=1.0)
    max_update_norm: Optional[float] = knob(None, "the server refuses an update farther (L2) than this from the "
                                            "global model (null: no bound)", ge=0.0)
    cpus_per_site: float = knob(1, "runner=ray: CPUs of each site's actor (ray.use_gpu gives it a GPU)", ge=0.0)


@dataclass
class FederateConfig(PretrainConfig):
    method: str = knob("ark", "any registered method")
    out: str = knob("runs/federate-${method}")
    rounds: int = knob(3, "total rounds (a resumed run continues up to this number)", ge=0)
    federate: FederateSection = section(FederateSection)


@dataclass
class ZeroShotSection:
    enabled: bool = knob(True, "UniChest only: the site's own class names as text queries")
    template: str = knob("{}", 'prompt template, e.g. "chest x-ray showing {}"')


@dataclass
class LinearProbeSection:
    enabled: bool = knob(True)
    sites: Any = knob(None, "null = the first held-out site (else the first site); all; or a list")
    C: float = knob(0.5, "inverse L2 strength of the logistic regression")
    max_iter: int = knob(2000)
    random_baseline: bool = knob(True, "the same probe on a random-init encoder, and the paired-bootstrap difference")


@dataclass
class FineTuneSection:
    enabled: bool = knob(True)
    sites: Any = knob(None, "as linear_probe.sites")
    fractions: list[float] = knob([0.01, 0.1, 1.0])
    lp_ft: bool = knob(True, "also linear-probe-then-fine-tune on 100 %")
    min_images: int = knob(8, "the 1 % subset never has fewer images than this", ge=1)
    epochs: int = knob(3, ge=0)
    max_steps: Optional[int] = knob(None)
    lr: float = knob(0.001, "encoder (the study's recipe, benchmarks/finetune_protocol.py: 1e-4 for 2 epochs "
                     "under-trains)")
    head_lr: float = knob(0.01)
    schedule: str = knob("cosine", "every learning rate decays to 0 over the fine-tuning steps | constant")
    min_steps: int = knob(30, "at least this many optimiser steps, however small the fraction")


@dataclass
class AttentionSection:
    enabled: bool = knob(True, "UniChest: cross-attention heat-maps of positive test images")
    n: int = knob(6, "images per site", ge=0)


@dataclass
class RetrievalSection:
    enabled: bool = knob(True)
    sites: Any = knob("all", "all (sites without test reports say so), null = as linear_probe.sites, or a list")
    ks: list[int] = knob([1, 5, 10])


@dataclass
class EvalSegmentationSection:
    enabled: Any = knob("auto", "these shares of the training masks, beside the same from random init (`raycxr "
                        "segment`")
    fractions: list[float] = knob([0.01, 0.1, 1.0], "freeze_encoder=true train_fraction=F). auto: UmiF runs; true: "
                                  "every run")
    overrides: list[str] = knob([], "any `raycxr segment` knob, on the command line quoted: "
                                '"segmentation.overrides=[\'epochs=3\']"')


@dataclass
class EvalConfig:
    sites: SitesSection = section(SitesSection)
    run: str = knob("runs/unichest", "a pretraining run folder (or its checkpoint.pt)")
    out: str = knob("${run}/eval", "results.json, metrics.csv, report.md / report.html and the plots")
    site_names: Optional[list[str]] = knob(None, "null = every registered site; sites the run did not train on are "
                                           "out-of-distribution")
    split: str = knob("test")
    batch_size: int = knob(32, ge=1)
    limit: Optional[int] = knob(None, "cap images per site and split (smoke runs)", ge=1)
    bootstrap: int = knob(200, "bootstrap resamples for the AUC confidence intervals (0 = none)", ge=0)
    min_positives: int = knob(10, "a class with fewer test positives (or negatives) at a site is not estimable: "
                              "reported, not averaged", ge=1)
    seed: int = knob(0)
    threads: Optional[int] = knob(None)
    zero_shot: ZeroShotSection = section(ZeroShotSection)
    linear_probe: LinearProbeSection = section(LinearProbeSection)
    fine_tune: FineTuneSection = section(FineTuneSection)
    attention: AttentionSection = section(AttentionSection)
    retrieval: RetrievalSection = section(RetrievalSection)
    segmentation: EvalSegmentationSection = section(EvalSegmentationSection)


@dataclass
class ThresholdsSection:
    split: str = knob("val", "per-class max-F1 on this split of the training sites; 0.5 where a class has no positive")
    limit: Optional[int] = knob(None, "cap images per site")


@dataclass
class ParitySection:
    batch: int = knob(8, "real images from the training sites' test split (plus random batches of 1 and 7)", ge=1)
    split: str = knob("test")
    atol: float = knob(0.0001, "max |PyTorch - onnxruntime| per output (float32); above it the export fails")


@dataclass
class ExportConfig:
    sites: SitesSection = section(SitesSection)
    run: str = knob("runs/unichest", "a pretraining run folder (or its checkpoint.pt)")
    out: str = knob("${run}/export", "classifier.onnx, encoder.onnx, classifier.int8.onnx, export.json")
    opset: int = knob(17, ge=11)
    exporter: str = knob("legacy", "legacy: torch.onnx TorchScript tracer (dynamo=False) | dynamo: torch.export + "
                         "onnxscript")
    model_version: Optional[str] = knob(None, "null = <method>-<first 12 hex of the checkpoint's sha256>")
    frontal_only: bool = knob(True, "the runtime flags lateral views instead of scoring them")
    batch_size: int = knob(32, "scoring batch (thresholds, INT8 AUC)", ge=1)
    limit: Optional[int] = knob(None, "cap test images per site for the INT8 AUC (smoke runs)")
    threads: Optional[int] = knob(None)
    thresholds: ThresholdsSection = section(ThresholdsSection)
    parity: ParitySection = section(ParitySection)
    int8: bool = knob(False, "also write classifier.int8.onnx and compare its test AUC with float32")
    int8_mode: str = knob("dynamic", "dynamic (quantize_dynamic) | static (QDQ, calibrated on training "
                          "images)", choices=["dynamic", "static"])
    calibration_images: int = knob(64, "int8_mode=static", ge=1)
    bundle: bool = knob(False, "also write ${out}/bundle: a MONAI Bundle (configs/metadata.json, models/model.onnx, "
                        "docs/README.md)")
    bundle_version: str = knob("0.1.0")
    sign_key: Optional[str] = knob(None, "an Ed25519 private key (raycxr-infer keygen): also write <file>.sig for "
                                   "every ONNX file")


@dataclass
class SegmentConfig:
    sites: SitesSection = section(SitesSection)
    run: str = knob("runs/unichest", "a pretraining run folder (or its checkpoint.pt)")
    out: str = knob("${run}/segmentation", "segmentation.json, segmentation.md, segmentation.png")
    tasks: Optional[dict[str, Any]] = knob({"lungs": ["nih", "vindr"], "pneumothorax": ["siim"]}, "task: the sites "
                                           "whose train split trains it and whose test split tests it (null: skip)")
    inits: list[str] = knob(["pretrained", "random"], "pretrained: the run's encoder weights; random: the same "
                            "backbone from scratch")
    image_size: int = knob(128, "images and masks are resized to image_size x image_size (HD95 is in these "
                           "pixels)", ge=1)
    frontal_only: bool = knob(True, "drop lateral views (the lung masks are frontal)")
    epochs: int = knob(5, ge=0)
    max_steps_per_epoch: Optional[int] = knob(40, "null = the whole train split every epoch", ge=1)
    batch_size: int = knob(16, ge=1)
    lr: float = knob(0.001, "AdamW, decoder and head")
    encoder_lr: Optional[float] = knob(None, "null = lr; e.g. 1.0e-4 to move the encoder less than the decoder")
    weight_decay: float = knob(0.0001)
    freeze_encoder: bool = knob(False, "true: train the decoder only (the encoder's BatchNorm statistics stay fixed "
                                "too)")
    decoder_channels: list[int] = knob([256, 128, 64, 32, 16], "one per encoder scale, deepest first (extra entries "
                                       "are dropped)")
    augment: bool = knob(True, "light affine (image and mask together) and intensity jitter on training images")
    threshold: float = knob(0.5, "on the sigmoid probability")
    n_train_limit: Optional[int] = knob(None, "cap training images per site (smoke runs)")
    train_fraction: float = knob(1.0, "train on this share of the training images (seeded; e.g. 0.01 / 0.1 / 1.0 with "
                                 "freeze_encoder=true: UmiF's frozen-backbone protocol, Table 3)", ge=1e-06)
    n_test_limit: Optional[int] = knob(None, "cap test images per site (smoke runs)")
    n_figure: int = knob(4, "test images per task in segmentation.png (those with a non-empty mask first)")
    seed: int = knob(0)
    threads: Optional[int] = knob(None, "torch CPU threads; null = torch's default")
    device: str = knob("auto", "auto: the GPU if there is one, else cpu; or cpu / cuda:1")
    num_workers: int = knob(0, "DataLoader workers")


@dataclass
class StepSection:
    enabled: bool = knob(True)
    overrides: list[str] = knob([])


@dataclass
class DemoConfig:
    synth: SynthConfig = section(SynthConfig, out="${sites.data_root}/demo", split_fractions=[0.7, 0.1, 0.2],
                                 enrich={"classes": ["Cardiomegaly", "Pleural Effusion", "Edema"], "min_rate": 0.15})
    sites: SitesSection = section(SitesSection)
    out: str = knob("outputs/demo", "corpus statistics and pictures")
    method: str = knob("unichest", "unichest (conquer + divide) | ark | concurrent | mixed")
    run: str = knob("runs/demo-${method}", "the pretraining run folder; evaluation and export go inside it")
    # sized to finish the whole demo in under 10 minutes on 2 CPU cores (docs/demo.md, "Does the demo learn?")
    pretrain: StepSection = section(StepSection, overrides=[
        "image_size=64", "batch_size=32", "max_steps_per_epoch=null", "unichest.lr=2e-3",
        "unichest.query={n_layers: 1, n_heads: 4, ffn: 512, dropout: 0.1, lambda_local: 1.0, lambda_global: 0.4}",
        "unichest.conquer_epochs=6", "unichest.divide_epochs=1", "ark.rounds=4", "baseline.epochs=10",
        "baseline.lr=3e-3", "probe_size=0", "site_names=[nih,chexpert,vindr,siim]"])
    eval: StepSection = section(StepSection, overrides=[
        "bootstrap=100", "fine_tune.sites=[openi]", "linear_probe.sites=[openi]", "fine_tune.epochs=1",
        "fine_tune.max_steps=15", "attention.n=4"])
    export: StepSection = section(StepSection)


@dataclass
class StudyCorpusSection:
    preset: Optional[str] = knob("study", "raycxr/configs/synth.yaml presets: study (CPU), study_gpu")
    out: str = knob("${sites.data_root}/study", "where the corpus is written (the demo's stays in data/demo)")
    overrides: list[str] = knob([], "any synth override, e.g. [n_per_site=300]")
    sites: list[str] = knob(["nih", "chexpert", "vindr", "openi", "siim"])


@dataclass
class StudyBudgetSection:
    steps: int = knob(200, "optimiser steps (sized so the default study takes about an hour on 2 cores)", ge=1)
    batch_size: int = knob(32, ge=1)
    steps_per_unit: int = knob(40, "max_steps_per_epoch: a method's unit (epoch, site-epoch) is at most this many "
                               "steps", ge=1)


@dataclass
class StudyDownstreamSection:
    seeds: list[int] = knob([0, 1, 2], "the paper uses 5")
    fractions: list[float] = knob([0.01, 0.1, 1.0])
    linear_probe: bool = knob(True)
    lp_ft: bool = knob(True, "linear probe then fine-tune, on 100 %")
    zero_shot: bool = knob(True, "rows whose method scores class names (UniChest): the target's class names")
    epochs: int = knob(3, "fine-tuning (and LP-FT) epochs over the fraction's images; the paper uses 30 on NIH.", ge=0)
    max_steps: Optional[int] = knob(None, "benchmarks/finetune_protocol.py: at 2 epochs and lr 1e-4 (the old recipe) "
                                    "nothing")
    batch_size: int = knob(32, "converged and fine-tuned AUCs fell below the linear probe's", ge=1)
    cache: bool = knob(True, "fine-tuning and scoring read the sites' decode cache (the one pretraining fills)")
    device: str = knob("auto", "where embedding, fine-tuning and scoring run: auto (the GPU when the cell sees one) | "
                       "cpu | cuda")
    lr: float = knob(0.001, "encoder")
    head_lr: float = knob(0.01)
    schedule: str = knob("cosine", "every learning rate decays to 0 over the fine-tuning steps | constant")
    warmup: Optional[float] = knob(None, "a fraction of the fine-tuning steps of linear warm-up before the cosine; "
                                   "null = none", ge=0.0)
    layer_decay: Optional[float] = knob(None, "ViT backbones: each block fine-tunes at this times the rate of the "
                                        "block above (BEiT / MAE, e.g. 0.75)", ge=0.0)
    min_steps: int = knob(30, "at least this many steps (the 1 % subset is one batch per epoch; 10 % of CheXpert "
                          "fine-tuned 9 steps scored 0.57, 30 steps 0.79: benchmarks/results/finetune_protocol.md)")
    min_images: int = knob(8, "the 1 % subset never has fewer images than this")
    C: float = knob(0.5, "linear probe: inverse L2 strength")
    max_iter: int = knob(1000)


@dataclass
class StudyAnalysisSection:
    diseases: list[str] = knob(
        ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"])
    min_positives: int = knob(10, "per class and site: fewer test positives (or negatives) = not estimable", ge=1)
    bootstrap: int = knob(300, "paired bootstrap draws for the differences between rows", ge=0)
    thresholds: list[float] = knob([0.1, 0.2, 0.3, 0.4, 0.5])
    referral: list[float] = knob([0.0, 0.05, 0.1, 0.15, 0.2, 0.25])


@dataclass
class StudyRaySection:
    address: Optional[str] = knob(None)
    num_cpus: Optional[int] = knob(None)


@dataclass
class StudyConfig:
    sites: SitesSection = section(SitesSection, sites_dir='${out}/sites')
    name: str = knob("default")
    out: str = knob("runs/study/${name}", "study.json, sites/, cells/, report.md / report.html / claims.md / "
                    "results.json, plots")
    report_dir: Optional[str] = knob(None, "also copy the report files here (docs/study.md quotes "
                                     "benchmarks/results/study)")
    seed: int = knob(0)
    threads: Optional[int] = knob(None, "torch threads per cell; null = cpus_per_cell for Ray tasks, else torch's "
                                  "default")
    runner: str = knob("auto", "auto: Ray tasks when there is room for two cells at once, else this process | local | "
                       "ray", choices=["auto", "local", "ray"])
    cpus_per_cell: float = knob(1, "what a cell asks Ray for. 1: two single-thread cells at once on 2 cores train "
                                "1.17x the images/s of one cell on two threads (benchmarks/study_speed.py)", ge=0.01)
    gpus_per_cell: float = knob(0, "what a Ray cell asks for on a GPU node: 0.125 = eight cells share one GPU; 0 = "
                                "Ray hides the GPUs from the cells", ge=0.0)
    ray: StudyRaySection = section(StudyRaySection)
    tracking: TrackingSection = section(TrackingSection, experiment='raycxr-study')
    corpus: StudyCorpusSection = section(StudyCorpusSection)
    target: str = knob("chexpert", "fine-tuned on; its test split is in-distribution, every other site "
                       "out-of-distribution")
    pretrain_sites: list[str] = knob(["nih", "vindr", "openi", "siim"], "the pooled sources a row pretrains on unless "
                                     "it says otherwise")
    eval_sites: Optional[list[str]] = knob(None, "null = every corpus site")
    pretrain: list[str] = knob(
        ["image_size=64",
         "transforms.cache.enabled=true",
         "probe_size=0",
         "val.limit=64",
         "encoder.embed_dim=128",
         "text.max_length=32",
         "unichest.query={n_layers: 1, n_heads: 4, ffn: 256, dropout: 0.1, lambda_local: 1.0, lambda_global: 0.4}",
         "unichest.lr=2e-3",
         "baseline.lr=3e-3"],
        "overrides of raycxr/configs/pretrain.yaml for every row (then the backbone, the budget, the row)")
    budget: StudyBudgetSection = section(StudyBudgetSection)
    backbones: dict[str, list[str]] = knob(
        {"cnn": ["encoder.name=resnet18"], "vit": ["encoder.name=vit_tiny_patch16_224"],
         "vit8": ["encoder.name=vit_tiny_patch16_224", "encoder.patch_size=8"],
         "convnext": ["encoder.name=convnext_atto"]},
        "name -> overrides; a row picks one (default cnn). convnext: LayerNorm, normalisation independent of the batch")
    rows: list[dict[str, Any]] = knob(
        [{"name": "random", "method": None},
         {"name": "mixed", "method": "mixed"},
         {"name": "concurrent", "method": "concurrent"},
         {"name": "ark", "method": "ark", "overrides": ["encoder.norm=group"], "control": "random_gn"},
         {"name": "ark_minus_one",
          "method": "ark",
          "sites": ["nih", "vindr", "openi"],
          "overrides": ["encoder.norm=group"],
          "control": "random_gn"},
         {"name": "random_gn", "method": None, "overrides": ["encoder.norm=group"]},
         {"name": "unichest_conquer", "method": "unichest", "overrides": ["unichest.divide_share=0"]},
         {"name": "unichest_conquer_single",
          "method": "unichest",
          "sites": ["nih"],
          "overrides": ["unichest.divide_share=0"]},
         {"name": "unichest", "method": "unichest"},
         {"name": "simclr", "method": "selfsup", "sites": ["openi"], "overrides": ["selfsup.objective=simclr"]},
         {"name": "clip", "method": "selfsup", "sites": ["openi"], "overrides": ["selfsup.objective=clip"]},
         {"name": "slip", "method": "selfsup", "sites": ["openi"], "overrides": ["selfsup.objective=slip"]},
         {"name": "random_vit", "method": None, "backbone": "vit"},
         {"name": "mixed_vit", "method": "mixed", "backbone": "vit"}])
    ablations: list[str] = knob([], "named groups of extra rows from ablation_rows, e.g. `raycxr study name=umif "
                                "ablations=[umif]`")
    ablation_rows: dict[str, list[dict[str, Any]]] = knob({}, "the named groups (data: raycxr/configs/study.yaml "
                                                          "holds them)", preset=True)
    include_registered: bool = knob(True, "every registered method without a row gets one (pretrain_sites, cnn)")
    skip_methods: list[str] = knob(["single"], "registered methods left out by include_registered")
    preset: Optional[str] = knob(None, "a named set of the values above from `presets` (preset=study_gpu); the command "
                                 "line wins")
    presets: dict[str, Any] = knob({}, "named sets of values (data: raycxr/configs/study.yaml holds study_gpu)",
                                   preset=True)
    downstream: StudyDownstreamSection = section(StudyDownstreamSection)
    analysis: StudyAnalysisSection = section(StudyAnalysisSection)


SCHEMAS: dict[str, type] = {"sites": SitesConfig, "synth": SynthConfig, "pretrain": PretrainConfig, "tune": TuneConfig,
                            "eval": EvalConfig, "export": ExportConfig, "segment": SegmentConfig, "demo": DemoConfig,
                            "study": StudyConfig, "federate": FederateConfig}


def knobs(schema: type, prefix: str = ""):
    """``(dotted key, field, type)`` of every knob of ``schema``, sections included, depth first."""
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        yield prefix + f.name, f, hints[f.name]
        if is_dataclass(hints[f.name]):
            yield from knobs(hints[f.name], prefix + f.name + ".")


def default(key: str, schema: type = PretrainConfig) -> Any:
    """The default of a knob, e.g. ``default("ray.bucket_mb")``, for a function that takes the knob as an argument."""
    node = OmegaConf.structured(schema)
    value = OmegaConf.select(node, key, throw_on_missing=True, default=KeyError)
    if value is KeyError:
        raise KeyError(f"{schema.__name__} has no knob '{key}'")
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _section_keys(schema: type) -> set[str]:
    return {f.name for f in fields(schema)}


def check_config(name: str, cfg: DictConfig) -> None:
    """Check ``cfg`` (the composed ``raycxr/configs/<name>.yaml``) against its schema and the knobs' allowed values.

    Raises ``ValueError`` with one line naming the key and the problem. Commands without a schema
    pass unchecked."""
    schema = SCHEMAS.get(name)
    if schema is None:
        return
    data = OmegaConf.to_container(cfg, resolve=False)
    # a method outside raycxr brings its own section (``+tiny.lr=...``): not raycxr's to check
    extra = [k for k in data if k not in _section_keys(schema) and isinstance(data[k], dict)]
    for k in extra:
        data.pop(k)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ValueError(f"configuration '{name}': {_one_line(e)}") from None
    for key, f, _ in knobs(schema):
        choices, lowest = f.metadata.get("choices"), f.metadata.get("range", (None,))[0]
        if choices is None and lowest is None:
            continue
        value = OmegaConf.select(merged, key)
        if value is None:
            continue
        # a list knob (a sweep's grid) holds values of one knob: each is checked
        values = list(value) if OmegaConf.is_list(value) else [value]
        for v in values:
            if choices is not None and v not in choices:
                raise ValueError(f"configuration '{name}': {key}: must be one of {choices}, got {v!r}")
            if lowest is not None and v is not None and v < lowest:
                raise ValueError(f"configuration '{name}': {key}: must be >= {lowest}, got {v}")


def _one_line(e: OmegaConfBaseException) -> str:
    """OmegaConf's error as ``key: problem`` (its messages span several lines and name the dataclass)."""
    from omegaconf.errors import ConfigKeyError

    key = getattr(e, "full_key", None)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0].strip()
    if isinstance(e, ConfigKeyError):
        msg = "unknown key (no such setting; check the spelling against the config file)"
    if "Value '" in msg and "could not be converted to" in msg:
        value = msg.split("Value '", 1)[1].split("'", 1)[0]
        kind = msg.rsplit("converted to", 1)[1].strip(" .")
        msg = f"{value!r} is not {'an' if kind[:1] in 'AEIOU' else 'a'} {kind.lower()}"
    return f"{key}: {msg}" if key and not msg.startswith(str(key)) else msg

