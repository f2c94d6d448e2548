"""Corpus statistics: what a person checks before training on a set of sites."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .labels import UnionLabelSpace
from .manifest import Manifest


def site_statistics(manifest: Manifest, quarantined: int = 0) -> dict[str, Any]:
    """Images, patients, splits, views, sex, age, reports, boxes and per-class label counts."""
    df = manifest.to_pandas()
    lab = manifest.label_matrix()
    prevalence = {}
    for j, name in enumerate(manifest.label_names):
        col = lab[:, j]
        prevalence[name] = {"pos": int((col == 1).sum()), "neg": int((col == 0).sum()),
                            "uncertain": int((col == -1).sum()), "missing": int(np.isnan(col).sum())}
    return {
        "images": len(df), "patients": int(df["patient_id"].nunique()),
        "split": df["split"].value_counts().to_dict(), "view": df["view"].fillna("?").value_counts().to_dict(),
        "sex": df["sex"].fillna("?").value_counts().to_dict(),
        "age_mean": None if df["age"].isna().all() else round(float(df["age"].mean()), 1),
        "with_report": int(df["report"].notna().sum()), "with_boxes": int(df["boxes"].notna().sum()),
        "with_lesion_mask": int(df["mask_path"].notna().sum()), "n_labels": len(manifest.label_names),
        "labels": prevalence, "quarantined": quarantined,
    }


def _top_labels(st: Mapping[str, Any], k: int = 3) -> str:
    items = sorted(st["labels"].items(), key=lambda kv: -kv[1]["pos"])
    return ", ".join(f"{n} {v['pos'] / max(st['images'], 1):.0%}" for n, v in items[:k] if v["pos"])


def corpus_rows(stats: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per site (used for the console table and the Markdown report)."""
    rows = []
    for site, st in stats.items():
        sp, vw, sx = st["split"], st["view"], st["sex"]
        rows.append({
            "site": site, "images": st["images"], "patients": st["patients"],
            "train/val/test": f"{sp.get('train', 0)}/{sp.get('val', 0)}/{sp.get('test', 0)}",
            "PA/AP/LAT": f"{vw.get('PA', 0)}/{vw.get('AP', 0)}/{vw.get('LATERAL', 0)}",
            "F/M": f"{sx.get('F', 0)}/{sx.get('M', 0)}", "age": st["age_mean"], "classes": st["n_labels"],
            "reports": st["with_report"], "boxes": st["with_boxes"], "quarantined": st.get("quarantined", 0),
            "most frequent": _top_labels(st),
        })
    return rows


def print_corpus_table(stats: Mapping[str, Mapping[str, Any]], title: str = "corpus") -> None:
    from rich.console import Console
    from rich.table import Table

    rows = corpus_rows(stats)
    console = Console(width=max(Console().width, 120))
    table = Table(title=title)
    cols = [c for c in (rows[0] if rows else []) if c != "most frequent"]
    for col in cols:
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(*[str(r[c]) for c in cols])
    console.print(table)
    for r in rows:
        console.print(f"  {r['site']}: most frequent findings: {r['most frequent'] or 'none'}")


def markdown_table(stats: Mapping[str, Mapping[str, Any]]) -> str:
    rows = corpus_rows(stats)
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[c]) for c in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_prevalence(manifests: Mapping[str, Manifest], path: str | Path) -> Path:
    """Heat-map of positive rate per union class and site; grey where a site does not annotate it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    union = UnionLabelSpace.build({s: m.label_names for s, m in manifests.items()})
    grid = np.full((len(manifests), len(union)), np.nan)
    for i, (site, m) in enumerate(manifests.items()):
        lab = m.label_matrix()
        for j, u in enumerate(union.site_index[site]):
            col = lab[:, j]
            known = col[~np.isnan(col)]
            grid[i, u] = float((known == 1).mean()) if len(known) else np.nan
    keep = np.argsort(-np.nan_to_num(grid, nan=0).max(0))[:40]
    fig, ax = plt.subplots(figsize=(max(8, len(keep) * 0.32), 1.0 + 0.45 * len(manifests)))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#dddddd")
    im = ax.imshow(np.ma.masked_invalid(grid[:, keep]), cmap=cmap, aspect="auto", vmin=0)
    ax.set_xticks(range(len(keep)), [union.names[k] for k in keep], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(manifests)), list(manifests), fontsize=8)
    ax.set_title("positive rate among annotated images, per class and site (grey: the site does not annotate it)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def corpus_montage(sites: Mapping[str, tuple[Manifest, Path]], path: str | Path, per_site: int = 6) -> Path:
    """One row of images per site, as the reader displays them: the sources' styles side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .readers import read_image

    fig, axes = plt.subplots(len(sites), per_site, figsize=(per_site * 1.6, len(sites) * 1.75), squeeze=False)
    for i, (site, (m, root)) in enumerate(sites.items()):
        df = m.to_pandas()
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(df):
                r = df.iloc[j]
                ax.imshow(read_image(Path(root) / r["path"]), cmap="gray", vmin=0, vmax=1)
                pos = [m.label_names[k] for k, v in enumerate(r["labels"]) if v == 1]
                ax.set_title(", ".join(pos[:2]) or "no finding", fontsize=5)
            if j == 0:
                ax.set_ylabel(site, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
