"""``raycxr demo``: the main job on the embedded data set.

Today it synthesises the demo corpus if absent, registers its sites, checks them, and reports on
them (console table, Markdown, pictures). Pretraining, evaluation and export join as they land.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .sites.config import discover_sites
from .stats import corpus_montage, markdown_table, plot_prevalence, print_corpus_table, site_statistics


def _site_names(items: list[Any]) -> list[str]:
    return [s if isinstance(s, str) else s["name"] for s in items]


def register_synthetic_sites(names: list[str], corpus: Path, sites_dir: Path, data_root: Path) -> list[Path]:
    """Write ``sites/<name>.yaml`` for synthetic sites that have none (existing files are kept)."""
    written = []
    sites_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = sites_dir / f"{name}.yaml"
        if path.exists():
            continue
        root = corpus / name
        try:  # relative to data_root when inside it, so the YAML moves with the data
            rel = os.path.relpath(root, data_root)
        except ValueError:  # another drive (Windows)
            rel = ".."
        root_s = str(root.resolve()) if rel.split(os.sep)[0] == ".." else rel
        path.write_text(yaml.safe_dump({"name": name, "adapter": "manifest", "root": root_s,
                                        "description": f"synthetic site '{name}' (raycxr synth)",
                                        "labels": {"uncertain_policy": "ignore"}}, sort_keys=False))
        written.append(path)
    return written


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    from .synth.generator import synthesize
    from .validate import validate_site

    s = cfg.synth
    corpus, out = Path(s.out), Path(cfg.out)
    data_root, sites_dir = Path(cfg.sites.data_root), Path(cfg.sites.sites_dir)
    items = OmegaConf.to_container(s.sites)
    names = _site_names(items)
    missing = [it for it, n in zip(items, names) if not (corpus / n / "manifest.parquet").exists()]
    if missing:
        print(f"[1/3] synthesising {len(missing)} site(s) into {corpus}")
        synthesize(corpus, missing, n_per_site=s.n_per_site, seed=s.seed, render_size=s.render_size,
                   workers=s.workers, overwrite=True, preview=s.preview)
    else:
        print(f"[1/3] demo corpus found in {corpus} (delete it or run `raycxr synth overwrite=true` to rebuild)")
    new = register_synthetic_sites(names, corpus, sites_dir, data_root)
    sites = {n: site for n, site in discover_sites(sites_dir, data_root=data_root).items() if n in names}
    print(f"[2/3] {len(sites)} sites registered in {sites_dir}" + (f" ({len(new)} new)" if new else ""))
    stats, manifests = {}, {}
    for name, site in sites.items():
        report = validate_site(site, check_images=False, progress=False)
        if not report["ok"]:
            raise ValueError(f"site '{name}' failed validation: {report['message']}")
        manifests[name] = site.load_manifest()
        stats[name] = site_statistics(manifests[name], quarantined=report["quarantined"])
    print("[3/3] corpus report")
    print_corpus_table(stats, title="raycxr demo corpus")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    (out / "stats.md").write_text(markdown_table(stats))
    plot_prevalence(manifests, out / "prevalence.png")
    corpus_montage({n: (m, sites[n].root) for n, m in manifests.items()}, out / "corpus.png")
    for n in names:
        prev = corpus / n / "preview.png"
        if prev.exists():
            shutil.copyfile(prev, out / f"preview_{n}.png")
    print(f"wrote {out}/stats.md, stats.json, prevalence.png, corpus.png and per-site previews")
    return stats
