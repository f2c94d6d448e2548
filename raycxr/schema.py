# ruff: noqa: UP045 - OmegaConf structured configs need typing.Optional, not `X | None`
"""Typed schemas of the command configs (OmegaConf structured configs), checked when a config is composed.

The YAML files in ``configs/`` hold the defaults and the comments; the dataclasses here hold the
types and the allowed ranges, so that a wrong key or value fails as one line naming it
(``image_size: must be >= 1, got -5``; ``baseline.epochs: 'two' is not an int``) instead of a traceback
from deep inside training. Fields have no defaults of their own (``MISSING``): the YAML is the one
place a default lives. A method registered outside raycxr may add its own top-level section
(``+tiny.lr=0.1``); such sections are passed through unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# ------------------------------------------------------------------------------------------ sections


@dataclass
class SitesSection:
    sites_dir: str = MISSING
    data_root: str = MISSING
    check_images: bool = MISSING
    workers: int = MISSING


@dataclass
class ScheduleSection:
    kind: str = MISSING
    warmup: float = MISSING
    min_lr: float = MISSING


@dataclass
class TrackingSection:
    backend: str = MISSING
    uri: Optional[str] = MISSING
    experiment: str = MISSING


@dataclass
class ValSection:
    enabled: bool = MISSING
    split: str = MISSING
    limit: Optional[int] = MISSING


@dataclass
class EncoderSection:
    name: str = MISSING
    embed_dim: Optional[int] = MISSING
    checkpoint: Optional[str] = MISSING
    norm: str = MISSING


@dataclass
class DecodeCacheSection:
    enabled: bool = MISSING
    dir: Optional[str] = MISSING
    dtype: str = MISSING


@dataclass
class TransformsSection:
    size: int = MISSING
    train: dict[str, Any] = field(default_factory=dict)
    cache: DecodeCacheSection = MISSING


@dataclass
class TextSection:
    kind: str = MISSING
    model_dir: Optional[str] = MISSING
    max_length: int = MISSING
    cache_size: int = MISSING
    train_projection: bool = MISSING


@dataclass
class QuerySection:
    n_layers: int = MISSING
    n_heads: int = MISSING
    ffn: int = MISSING
    dropout: float = MISSING
    lambda_local: float = MISSING
    lambda_global: float = MISSING


@dataclass
class UniChestLossSection:
    gamma_neg: float = MISSING
    gamma_pos: float = MISSING
    clip: float = MISSING
    asl_reduction: str = MISSING
    detach_focal: bool = MISSING
    itc_temperature: Optional[float] = MISSING
    itc_normalize: bool = MISSING
    itc_weight: float = MISSING
    scl_temperature: float = MISSING
    scl_weight: float = MISSING
    text_branch: bool = MISSING
    fourier_p: float = MISSING
    fourier_space: str = MISSING


@dataclass
class UniChestSection:
    conquer_epochs: int = MISSING
    divide_epochs: int = MISSING
    divide_from: str = MISSING
    divide_share: float = MISSING
    n_experts: int = MISSING
    lam: float = MISSING
    bias_ratio: Optional[float] = MISSING
    scl_dim: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    query: QuerySection = MISSING
    share_norm: bool = MISSING
    loss: UniChestLossSection = MISSING


@dataclass
class ArkSection:
    rounds: int = MISSING
    order: Optional[list[str]] = MISSING
    proj_dim: int = MISSING
    mlp_projector: bool = MISSING
    optimizer: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    momentum_base: float = MISSING
    consistency_max: float = MISSING
    ema_mode: str = MISSING
    tencrop: bool = MISSING


@dataclass
class BaselineSection:
    epochs: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING


@dataclass
class SelfSupSection:
    objective: str = MISSING
    epochs: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    proj_dim: int = MISSING
    momentum: float = MISSING


@dataclass
class UmiFSection:
    vit: str = MISSING
    drop_path_rate: Optional[float] = MISSING
    epochs: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    p: float = MISSING
    p_end: Optional[float] = MISSING
    r_range: list[float] = MISSING
    tau: float = MISSING
    teacher: bool = MISSING
    con_weight: float = MISSING
    momentum: float = MISSING
    segment_pairs: bool = MISSING
    prompt: str = MISSING
    negative_prompt: str = MISSING


@dataclass
class AutoscaleSection:
    min: int = MISSING
    max: int = MISSING
    up_wait: float = MISSING
    down_util: float = MISSING
    patience: int = MISSING
    every: int = MISSING
    min_gain: float = 0.1


@dataclass
class RaySection:
    address: Optional[str] = MISSING
    num_cpus: Optional[int] = MISSING
    object_store_mb: Optional[int] = MISSING
    log_to_driver: bool = MISSING
    num_workers: int = MISSING
    use_gpu: bool = MISSING
    cpus_per_worker: float = MISSING
    run_name: str = MISSING
    storage_path: str = MISSING
    max_failures: int = MISSING
    num_to_keep: int = MISSING
    actor_max_restarts: int = MISSING
    prefetch: int = MISSING
    grad_sync: str = MISSING
    bucket_mb: float = MISSING
    site_replicas: Any = MISSING  # a positive int or "auto"
    site_cpus: float = MISSING
    autoscale: AutoscaleSection = MISSING


# ------------------------------------------------------------------------------------------ commands


@dataclass
class SitesConfig(SitesSection):
    pass


@dataclass
class SynthConfig:
    out: str = MISSING
    sites: list[Any] = MISSING
    n_per_site: int = MISSING
    seed: int = MISSING
    render_size: int = MISSING
    workers: int = MISSING
    overwrite: bool = MISSING
    preview: bool = MISSING
    enrich: Optional[dict[str, Any]] = MISSING
    split_fractions: list[float] = MISSING
    preset: Optional[str] = MISSING
    presets: dict[str, Any] = MISSING


@dataclass
class PretrainConfig:
    sites: SitesSection = MISSING
    method: str = MISSING
    plugins: list[str] = MISSING
    runner: str = MISSING
    site_names: Optional[list[str]] = MISSING
    out: str = MISSING
    resume: Optional[str] = MISSING
    seed: int = MISSING
    threads: Optional[int] = MISSING
    device: str = MISSING
    precision: str = MISSING
    channels_last: str = MISSING
    compile: str = MISSING
    image_size: int = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    max_steps_per_epoch: Optional[int] = MISSING
    probe_size: int = MISSING
    schedule: ScheduleSection = MISSING
    tracking: TrackingSection = MISSING
    val: ValSection = MISSING
    encoder: EncoderSection = MISSING
    transforms: TransformsSection = MISSING
    text: TextSection = MISSING
    unichest: UniChestSection = MISSING
    ark: ArkSection = MISSING
    baseline: BaselineSection = MISSING
    selfsup: SelfSupSection = MISSING
    umif: UmiFSection = MISSING
    ray: RaySection = MISSING


@dataclass
class UmiFGrid:
    p: list[float] = MISSING
    tau: list[float] = MISSING
    p_end: list[Optional[float]] = MISSING


@dataclass
class TuneSection:
    name: str = MISSING
    storage_path: str = MISSING
    lam: list[float] = MISSING
    n_experts: list[int] = MISSING
    lr: list[float] = MISSING
    umif: UmiFGrid = MISSING
    trial_runner: str = MISSING
    cpus_per_trial: float = MISSING
    gpus_per_trial: float = MISSING
    max_concurrent_trials: Optional[int] = MISSING
    grace_period: Optional[int] = MISSING
    reduction_factor: float = MISSING
    max_failures: int = MISSING
    checkpoint: bool = MISSING
    num_to_keep: int = MISSING


@dataclass
class TuneConfig(PretrainConfig):
    tune: TuneSection = MISSING


@dataclass
class FederateSection:
    strategy: str = MISSING
    mu: float = MISSING
    local: list[str] = MISSING
    share_projector: bool = MISSING
    local_epochs: int = MISSING
    client_fraction: float = MISSING
    min_clients: int = MISSING
    deadline_s: Optional[float] = MISSING
    clip_norm: Optional[float] = MISSING
    noise_multiplier: float = MISSING
    cpus_per_site: float = MISSING


@dataclass
class FederateConfig(PretrainConfig):
    rounds: int = MISSING
    federate: FederateSection = MISSING


@dataclass
class ZeroShotSection:
    enabled: bool = MISSING
    template: str = MISSING


@dataclass
class LinearProbeSection:
    enabled: bool = MISSING
    sites: Any = MISSING  # null, "all" or a list of names
    C: float = MISSING
    max_iter: int = MISSING
    random_baseline: bool = MISSING


@dataclass
class FineTuneSection:
    enabled: bool = MISSING
    sites: Any = MISSING
    fractions: list[float] = MISSING
    lp_ft: bool = MISSING
    min_images: int = MISSING
    epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    lr: float = MISSING
    head_lr: float = MISSING
    schedule: str = "cosine"
    min_steps: int = 0


@dataclass
class AttentionSection:
    enabled: bool = MISSING
    n: int = MISSING


@dataclass
class RetrievalSection:
    enabled: bool = MISSING
    sites: Any = MISSING  # null, "all" or a list of names
    ks: list[int] = MISSING


@dataclass
class EvalSegmentationSection:
    enabled: Any = MISSING  # auto | true | false
    fractions: list[float] = MISSING
    overrides: list[str] = MISSING


@dataclass
class EvalConfig:
    sites: SitesSection = MISSING
    run: str = MISSING
    out: str = MISSING
    site_names: Optional[list[str]] = MISSING
    split: str = MISSING
    batch_size: int = MISSING
    limit: Optional[int] = MISSING
    bootstrap: int = MISSING
    min_positives: int = MISSING
    seed: int = MISSING
    threads: Optional[int] = MISSING
    zero_shot: ZeroShotSection = MISSING
    linear_probe: LinearProbeSection = MISSING
    fine_tune: FineTuneSection = MISSING
    attention: AttentionSection = MISSING
    retrieval: RetrievalSection = MISSING
    segmentation: EvalSegmentationSection = MISSING


@dataclass
class ThresholdsSection:
    split: str = MISSING
    limit: Optional[int] = MISSING


@dataclass
class ParitySection:
    batch: int = MISSING
    split: str = MISSING
    atol: float = MISSING


@dataclass
class ExportConfig:
    sites: SitesSection = MISSING
    run: str = MISSING
    out: str = MISSING
    opset: int = MISSING
    exporter: str = MISSING
    model_version: Optional[str] = MISSING
    frontal_only: bool = MISSING
    batch_size: int = MISSING
    limit: Optional[int] = MISSING
    threads: Optional[int] = MISSING
    thresholds: ThresholdsSection = MISSING
    parity: ParitySection = MISSING
    int8: bool = MISSING
    int8_mode: str = MISSING
    calibration_images: int = MISSING
    bundle: bool = MISSING
    bundle_version: str = MISSING


@dataclass
class SegmentConfig:
    sites: SitesSection = MISSING
    run: str = MISSING
    out: str = MISSING
    tasks: Optional[dict[str, Any]] = MISSING
    inits: list[str] = MISSING
    image_size: int = MISSING
    frontal_only: bool = MISSING
    epochs: int = MISSING
    max_steps_per_epoch: Optional[int] = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    encoder_lr: Optional[float] = MISSING
    weight_decay: float = MISSING
    freeze_encoder: bool = MISSING
    decoder_channels: list[int] = MISSING
    augment: bool = MISSING
    threshold: float = MISSING
    n_train_limit: Optional[int] = MISSING
    train_fraction: float = MISSING
    n_test_limit: Optional[int] = MISSING
    n_figure: int = MISSING
    seed: int = MISSING
    threads: Optional[int] = MISSING
    device: str = MISSING
    num_workers: int = MISSING


@dataclass
class StepSection:
    enabled: bool = MISSING
    overrides: list[str] = MISSING


@dataclass
class DemoConfig:
    synth: SynthConfig = MISSING
    sites: SitesSection = MISSING
    out: str = MISSING
    method: str = MISSING
    run: str = MISSING
    pretrain: StepSection = MISSING
    eval: StepSection = MISSING
    export: StepSection = MISSING


@dataclass
class StudyCorpusSection:
    preset: Optional[str] = MISSING
    out: str = MISSING
    overrides: list[str] = MISSING
    sites: list[str] = MISSING


@dataclass
class StudyBudgetSection:
    steps: int = MISSING
    batch_size: int = MISSING
    steps_per_unit: int = MISSING


@dataclass
class StudyDownstreamSection:
    seeds: list[int] = MISSING
    fractions: list[float] = MISSING
    linear_probe: bool = MISSING
    lp_ft: bool = MISSING
    zero_shot: bool = MISSING
    epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    batch_size: int = MISSING
    cache: bool = False
    lr: float = MISSING
    head_lr: float = MISSING
    schedule: str = "cosine"
    min_steps: int = 0
    min_images: int = MISSING
    C: float = MISSING
    max_iter: int = MISSING


@dataclass
class StudyAnalysisSection:
    diseases: list[str] = MISSING
    min_positives: int = MISSING
    bootstrap: int = MISSING
    thresholds: list[float] = MISSING
    referral: list[float] = MISSING


@dataclass
class StudyRaySection:
    address: Optional[str] = MISSING
    num_cpus: Optional[int] = MISSING


@dataclass
class StudyConfig:
    sites: SitesSection = MISSING
    name: str = MISSING
    out: str = MISSING
    report_dir: Optional[str] = MISSING
    seed: int = MISSING
    threads: Optional[int] = MISSING
    runner: str = MISSING
    cpus_per_cell: float = MISSING
    ray: StudyRaySection = MISSING
    tracking: TrackingSection = MISSING
    corpus: StudyCorpusSection = MISSING
    target: str = MISSING
    pretrain_sites: list[str] = MISSING
    eval_sites: Optional[list[str]] = MISSING
    pretrain: list[str] = MISSING
    budget: StudyBudgetSection = MISSING
    backbones: dict[str, list[str]] = MISSING
    rows: list[dict[str, Any]] = MISSING
    ablations: list[str] = MISSING
    ablation_rows: dict[str, list[dict[str, Any]]] = MISSING
    include_registered: bool = MISSING
    skip_methods: list[str] = MISSING
    downstream: StudyDownstreamSection = MISSING
    analysis: StudyAnalysisSection = MISSING


SCHEMAS: dict[str, type] = {"sites": SitesConfig, "synth": SynthConfig, "pretrain": PretrainConfig, "tune": TuneConfig,
                            "eval": EvalConfig, "export": ExportConfig, "segment": SegmentConfig, "demo": DemoConfig,
                            "study": StudyConfig, "federate": FederateConfig}

# ----------------------------------------------------------------------------------------- value ranges
# key -> (lowest allowed value, or a tuple of allowed values); checked after the types.
_POSITIVE = 1
RULES: dict[str, dict[str, Any]] = {
    "pretrain": {
        "image_size": _POSITIVE, "batch_size": _POSITIVE, "num_workers": 0, "max_steps_per_epoch": _POSITIVE,
        "probe_size": 0, "threads": _POSITIVE, "schedule.kind": ("cosine", "constant", "none"),
        "tracking.backend": ("none", "mlflow", "tensorboard"),
        "schedule.warmup": 0.0, "runner": ("local", "ray"), "precision": ("auto", "fp32", "bf16"),
        "channels_last": ("auto", "true", "false", "True", "False"),
        "compile": ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        "val.limit": _POSITIVE, "encoder.embed_dim": _POSITIVE, "text.max_length": _POSITIVE,
        "unichest.conquer_epochs": 0, "unichest.divide_epochs": 0, "unichest.divide_from": ("best", "last"),
        "unichest.n_experts": 2, "unichest.scl_dim": _POSITIVE, "unichest.lr": 0.0, "unichest.weight_decay": 0.0,
        "unichest.loss.asl_reduction": ("sum", "mean"), "unichest.loss.fourier_space": ("image", "normalized"),
        "unichest.query.n_layers": _POSITIVE,
        "unichest.query.n_heads": _POSITIVE, "unichest.query.ffn": _POSITIVE,
        "ark.rounds": 0, "ark.proj_dim": _POSITIVE, "ark.lr": 0.0, "ark.ema_mode": ("epoch", "iteration"),
        "ark.optimizer": ("sgd", "adamw"),
        "baseline.epochs": 0, "baseline.lr": 0.0, "selfsup.epochs": 0, "selfsup.proj_dim": _POSITIVE,
        "selfsup.objective": ("simclr", "mocov2", "vicreg", "clip", "slip"),
        "umif.epochs": 0, "umif.lr": 0.0, "umif.p": 0.0, "umif.p_end": 0.0, "umif.tau": 1e-6, "umif.con_weight": 0.0,
        "umif.momentum": 0.0, "umif.weight_decay": 0.0,
        "ray.num_workers": _POSITIVE, "ray.max_failures": 0, "ray.num_to_keep": _POSITIVE, "ray.prefetch": _POSITIVE,
        "ray.grad_sync": ("bucketed", "per_tensor"), "ray.autoscale.min": _POSITIVE, "ray.autoscale.max": _POSITIVE,
        "ray.autoscale.patience": _POSITIVE, "ray.autoscale.every": _POSITIVE,
        "transforms.cache.dtype": ("uint8", "uint16", "float32"), "ray.bucket_mb": 0.001,
    },
    "eval": {"batch_size": _POSITIVE, "bootstrap": 0, "min_positives": _POSITIVE, "limit": _POSITIVE,
             "fine_tune.epochs": 0, "fine_tune.min_images": _POSITIVE, "attention.n": 0},
    "export": {"opset": 11, "batch_size": _POSITIVE, "exporter": ("legacy", "dynamo"),
               "int8_mode": ("dynamic", "static"), "parity.batch": _POSITIVE, "calibration_images": _POSITIVE},
    "segment": {"image_size": _POSITIVE, "epochs": 0, "train_fraction": 1e-6, "batch_size": _POSITIVE,
                "max_steps_per_epoch": _POSITIVE},
    "synth": {"n_per_site": _POSITIVE, "render_size": 32, "workers": _POSITIVE},
    "sites": {"workers": _POSITIVE},
}
RULES["study"] = {"runner": ("auto", "local", "ray"), "budget.steps": _POSITIVE, "budget.batch_size": _POSITIVE,
                  "budget.steps_per_unit": _POSITIVE, "downstream.epochs": 0, "downstream.batch_size": _POSITIVE,
                  "analysis.min_positives": _POSITIVE, "analysis.bootstrap": 0, "cpus_per_cell": 0.01}
RULES["federate"] = {**RULES["pretrain"], "rounds": 0, "federate.strategy": ("fedavg", "fedprox", "fedper"),
                     "federate.mu": 0.0, "federate.local_epochs": _POSITIVE, "federate.client_fraction": 0.0,
                     "federate.min_clients": _POSITIVE, "federate.deadline_s": 0.0, "federate.clip_norm": 0.0,
                     "federate.noise_multiplier": 0.0, "federate.cpus_per_site": 0.0}
RULES["tune"] = {**RULES["pretrain"], "tune.trial_runner": ("local", "ray"), "tune.reduction_factor": 1.0001}


def _section_keys(schema: type) -> set[str]:
    return {f.name for f in fields(schema)}


def validate(name: str, cfg: DictConfig) -> None:
    """Check ``cfg`` (the composed ``configs/<name>.yaml``) against its schema and value ranges.

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
    for key, rule in RULES.get(name, {}).items():
        value = OmegaConf.select(merged, key)
        if value is None:
            continue
        if isinstance(rule, tuple):
            if value not in rule:
                raise ValueError(f"configuration '{name}': {key}: must be one of {list(rule)}, got {value!r}")
        elif value < rule:
            raise ValueError(f"configuration '{name}': {key}: must be >= {rule}, got {value}")


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

