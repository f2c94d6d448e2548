"""A site is a YAML file: which adapter reads its data, where the data is, and its head settings.

Example (``sites/nih.yaml``)::

    name: nih
    adapter: manifest            # or nih, chexpert, vindr, padchest, mimic_cxr_jpg, openi, siim, rsna,
                                 # generic_csv, folder (see `raycxr sites adapters`)
    root: demo/nih               # relative paths are resolved against `data_root`
    manifest: manifest.parquet   # relative to root; where `sites build` writes and readers read
                                 # (default: <name>.manifest.parquet, so sites may share a root)
    adapter_options: {}          # passed to the adapter (table paths, column names, ...)
    labels: {uncertain_policy: ignore}
    head: {kind: linear}         # the site's task head (Ark, concurrent): linear, or {kind: mlp, hidden: 256}
    objective: supervised        # or clip, simclr, mocov2, vicreg, slip for unlabelled sites
    placement: {}                # e.g. {label_selector: {site: nih}} or {resources: {site_nih: 0.001}}
    replicas: 2                  # runner=ray: site actors serving batches (default: ray.site_replicas)

Every key is checked on load; a problem names the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..labels import UNCERTAIN_POLICIES
from ..manifest import Manifest

_KEYS = {"name", "adapter", "root", "manifest", "description", "adapter_options", "labels", "head",
         "objective", "placement", "quarantine", "replicas", "pair_types"}
_HEAD_KEYS = {"kind", "hidden"}
_LABEL_KEYS = {"uncertain_policy"}
_PLACEMENT_KEYS = {"label_selector", "resources"}
HEAD_KINDS = ("linear", "mlp")
# A node whose copy of the data lives elsewhere than the driver's ``sites.data_root`` says where, for the site
# actors it runs (set it in the environment of ``ray start`` on that node): relative site roots resolve against it.
DATA_ROOT_ENV = "RAYCXR_DATA_ROOT"
# UmiF's pair types (raycxr.dataset.site_pair_types infers them from a manifest; a site YAML may narrow them)
LEGACY_MANIFEST = "manifest.parquet"  # the shared default name before per-site manifests
PAIR_TYPES = ("image-report", "image-class", "image-segment", "image-only")


class SiteConfigError(ValueError):
    """A site YAML that cannot be used; the message names the file and the problem."""


@dataclass
class SiteConfig:
    """A parsed, validated site declaration."""

    name: str
    adapter: str
    root: Path
    manifest_path: Path
    yaml_path: Path | None = None
    description: str = ""
    adapter_options: dict[str, Any] = field(default_factory=dict)
    uncertain_policy: str = "ignore"
    head: dict[str, Any] = field(default_factory=dict)
    objective: str = "supervised"
    placement: dict[str, Any] = field(default_factory=dict)
    quarantine_path: Path | None = None
    replicas: int | str | dict | None = None  # N, "auto" or {min, max}; None: the run's ray.site_replicas
    pair_types: tuple[str, ...] | None = None  # UmiF pair types this site offers; None: inferred from the manifest
    spec: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # the YAML as written (on_node)
    legacy_manifest_path: Path | None = None  # root/manifest.parquet, read when manifest_path is not built yet

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, data_root: str | Path = ".", source: str = "<dict>") -> SiteConfig:
        def fail(msg: str) -> SiteConfigError:
            return SiteConfigError(f"site file {source}: {msg}")

        if not isinstance(d, dict):
            raise fail("must be a mapping of keys to values")
        if "expert" in d:
            raise fail("'expert' is not a site setting: UniChest's experts are not tied to a site (the gate mixes "
                       "them per image); set unichest.n_experts and unichest.query in the pretraining config")
        unknown = set(d) - _KEYS
        if unknown:
            raise fail(f"unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        for key in ("name", "adapter", "root"):
            if not d.get(key) or not isinstance(d[key], str):
                raise fail(f"'{key}' is required and must be a string")
        name = d["name"]
        if not name.replace("-", "").replace("_", "").isalnum():
            raise fail(f"name '{name}' may only hold letters, digits, '-' and '_'")
        from .adapters import ADAPTER_REGISTRY, list_adapters

        if d["adapter"] not in ADAPTER_REGISTRY:
            raise fail(f"adapter '{d['adapter']}' is not registered; known: {list_adapters()}")
        labels = d.get("labels") or {}
        if not isinstance(labels, dict):
            raise fail("'labels' must be a mapping")
        if set(labels) - _LABEL_KEYS:
            raise fail(f"labels: unknown keys {sorted(set(labels) - _LABEL_KEYS)}; allowed: {sorted(_LABEL_KEYS)}")
        policy = labels.get("uncertain_policy", "ignore")
        if policy not in UNCERTAIN_POLICIES:
            raise fail(f"labels.uncertain_policy '{policy}' not in {UNCERTAIN_POLICIES}")
        objective = d.get("objective", "supervised")
        from ..objectives import OBJECTIVE_REGISTRY, list_objectives

        if objective not in OBJECTIVE_REGISTRY:
            raise fail(f"objective '{objective}' not in {list_objectives()}")
        for key in ("adapter_options", "head", "placement"):
            if not isinstance(d.get(key) or {}, dict):
                raise fail(f"'{key}' must be a mapping")
        placement = dict(d.get("placement") or {})
        if set(placement) - _PLACEMENT_KEYS:
            raise fail(f"placement: unknown keys {sorted(set(placement) - _PLACEMENT_KEYS)}; "
                       f"allowed: {sorted(_PLACEMENT_KEYS)}")
        for key, value in placement.items():
            if not isinstance(value, dict):
                raise fail(f"placement.{key} must be a mapping (e.g. {{site: nih}})")
        head = dict(d.get("head") or {})
        if set(head) - _HEAD_KEYS:
            raise fail(f"head: unknown keys {sorted(set(head) - _HEAD_KEYS)}; allowed: {sorted(_HEAD_KEYS)}")
        if head.get("kind", "linear") not in HEAD_KINDS:
            raise fail(f"head.kind '{head.get('kind')}' not in {HEAD_KINDS}")
        hidden = head.get("hidden")
        if "hidden" in head and (head.get("kind") != "mlp" or not isinstance(hidden, int) or hidden < 1):
            raise fail("head.hidden must be a positive integer, and only for head: {kind: mlp}")
        replicas = d.get("replicas")
        if isinstance(replicas, dict):  # autoscaled within bounds
            if set(replicas) - {"min", "max"} or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                        for v in replicas.values()):
                raise fail(f"replicas: {{min: N, max: M}} takes positive integers, got {replicas!r}")
            if replicas.get("min", 1) > replicas.get("max", replicas.get("min", 1)):
                raise fail(f"replicas: min must not exceed max, got {replicas!r}")
        elif replicas is not None and replicas != "auto" and (
                not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1):
            raise fail(f"replicas must be a positive integer, auto, or {{min: N, max: M}}, got {replicas!r}")
        pair_types = d.get("pair_types")
        if pair_types is not None:
            if (not isinstance(pair_types, list) or not pair_types or len(set(pair_types)) != len(pair_types)
                    or any(t not in PAIR_TYPES for t in pair_types)):
                raise fail(f"pair_types must be a non-empty list of distinct pair types from {list(PAIR_TYPES)}, "
                           f"got {pair_types!r}")
            if "image-only" in pair_types and len(pair_types) > 1:
                raise fail("pair_types: image-only means the site offers no supervision to UmiF; it cannot be "
                           f"combined with {[t for t in pair_types if t != 'image-only']}")
            pair_types = tuple(pair_types)
        from .adapters import get_adapter

        try:  # a misspelt option is caught when the site is added, not when it is built
            get_adapter(d["adapter"]).check_options(dict(d.get("adapter_options") or {}))
        except ValueError as e:
            raise fail(f"adapter_options: {e}") from None
        root = Path(d["root"]).expanduser()
        if not root.is_absolute():
            root = Path(data_root) / root
        # Default: one manifest per site, so two sites sharing a root do not overwrite each other's;
        # a manifest.parquet written before (the old default) is still read until the site is rebuilt.
        legacy = None if "manifest" in d else root / LEGACY_MANIFEST
        manifest = Path(d.get("manifest", f"{name}.manifest.parquet"))
        manifest = manifest if manifest.is_absolute() else root / manifest
        quarantine = Path(d["quarantine"]) if d.get("quarantine") else manifest.parent / "quarantine.jsonl"
        return cls(name=name, adapter=d["adapter"], root=root, manifest_path=manifest,
                   yaml_path=Path(source) if source != "<dict>" else None,
                   description=d.get("description", ""), adapter_options=dict(d.get("adapter_options") or {}),
                   uncertain_policy=policy, head=head,
                   objective=objective, placement=placement, quarantine_path=quarantine, replicas=replicas,
                   pair_types=pair_types, spec=dict(d),
                   legacy_manifest_path=legacy)

    @classmethod
    def load(cls, path: str | Path, *, data_root: str | Path = ".") -> SiteConfig:
        path = Path(path)
        if not path.is_file():
            raise SiteConfigError(f"site file {path}: does not exist")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SiteConfigError(f"site file {path}: not valid YAML ({e})") from None
        return cls.from_dict(d, data_root=data_root, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": self.adapter, "root": str(self.root),
                "manifest": str(self.manifest_path), "description": self.description,
                "adapter_options": self.adapter_options, "labels": {"uncertain_policy": self.uncertain_policy},
                "head": self.head, "objective": self.objective, "placement": self.placement,
                **({"quarantine": str(self.quarantine_path)} if self.quarantine_path else {}),
                **({"replicas": self.replicas} if self.replicas is not None else {}),
                **({"pair_types": list(self.pair_types)} if self.pair_types is not None else {})}

    def resolved(self) -> SiteConfig:
        """The same site with absolute paths: a site actor may run in another working directory or node."""
        from dataclasses import replace

        return replace(self, root=self.root.resolve(), manifest_path=self.manifest_path.resolve(),
                       quarantine_path=self.quarantine_path.resolve() if self.quarantine_path else None,
                       legacy_manifest_path=self.legacy_manifest_path.resolve() if self.legacy_manifest_path else None)

    def on_node(self) -> SiteConfig:
        """The site as the node it runs on sees it: with ``$RAYCXR_DATA_ROOT`` set there, a relative ``root``
        resolves against it; otherwise the paths stay as the driver resolved them (its ``sites.data_root``).
        An absolute ``root`` and a custom ``quarantine`` path stay as given."""
        local = os.environ.get(DATA_ROOT_ENV)
        if not local or self.spec is None or Path(self.spec["root"]).expanduser().is_absolute():
            return self
        from dataclasses import replace

        site = SiteConfig.from_dict(self.spec, data_root=Path(local).expanduser(),
                                    source=str(self.yaml_path) if self.yaml_path else "<dict>").resolved()
        return replace(site, quarantine_path=self.quarantine_path) if self.spec.get("quarantine") else site

    @property
    def manifest_file(self) -> Path:
        """The manifest file read: ``manifest_path``, else the old shared ``manifest.parquet`` where only it exists."""
        legacy = self.legacy_manifest_path
        if not self.manifest_path.is_file() and legacy is not None and legacy.is_file():
            return legacy
        return self.manifest_path

    @property
    def dropped_path(self) -> Path:
        """Where ``build_manifest`` lists the rows left out: ``<name>.dropped.csv`` next to a per-site manifest."""
        name = self.manifest_path.name
        if name == LEGACY_MANIFEST:
            return self.manifest_path.with_name("dropped.csv")
        return self.manifest_path.with_name(name.removesuffix(".parquet").removesuffix(".manifest") + ".dropped.csv")

    def has_manifest(self) -> bool:
        return self.manifest_file.is_file()

    def load_manifest(self) -> Manifest:
        """The site's manifest; a missing one says how to build it."""
        if not self.has_manifest():
            raise FileNotFoundError(f"site '{self.name}': no manifest at {self.manifest_path}; run "
                                    f"`raycxr sites build {self.name}` (or `raycxr synth` for the demo sites)")
        return Manifest.read(self.manifest_file)

    def build_manifest(self, **overrides: Any) -> tuple[Manifest, list[dict]]:
        """Run the adapter over the site's data, write the manifest, and list dropped rows next to it."""
        import csv

        from .adapters import get_adapter

        result = get_adapter(self.adapter).build(self.root, self.name, **{**self.adapter_options, **overrides})
        result.manifest.write(self.manifest_path)
        dropped_path = self.dropped_path
        if result.dropped:
            with open(dropped_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["image_id", "path", "reason"], extrasaction="ignore")
                w.writeheader()
                w.writerows(result.dropped)
        elif dropped_path.exists():
            dropped_path.unlink()
        return result.manifest, result.dropped


def discover_sites(sites_dir: str | Path, *, data_root: str | Path = ".") -> dict[str, SiteConfig]:
    """Every ``*.yaml`` directly in ``sites_dir`` (templates in sub-folders are not registered)."""
    sites_dir = Path(sites_dir)
    if not sites_dir.is_dir():
        raise FileNotFoundError(f"sites folder {sites_dir} does not exist")
    out: dict[str, SiteConfig] = {}
    for path in sorted(sites_dir.glob("*.yaml")):
        site = SiteConfig.load(path, data_root=data_root)
        if site.name in out:
            raise SiteConfigError(f"site file {path}: name '{site.name}' is already used by "
                                  f"{out[site.name].yaml_path}")
        out[site.name] = site
    return out


def select_sites(cfg: Any) -> dict[str, SiteConfig]:
    """The sites a run uses: ``cfg.site_names`` (every registered site when unset) from ``cfg.sites``."""
    sites = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    wanted = list(cfg.site_names) if cfg.get("site_names") else list(sites)
    unknown = [s for s in wanted if s not in sites]
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}; registered: {sorted(sites)}")
    return {s: sites[s] for s in wanted}
