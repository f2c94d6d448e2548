"""Image-report retrieval (UmiF's evaluation, which raycxr's classification metrics do not cover).

On a site's test split, every image with a report is embedded by the run's image tower and every report
by its text side (a method that offers one puts ``encode_text`` in :attr:`Pretrained.extra`, e.g.
UmiF); recall@k in both directions is the share of queries whose own partner is among the k most
cosine-similar candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ..dataset import collate_skip_none, site_dataset
from ..methods import Pretrained
from ..sites.config import SiteConfig


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of paired embeddings (row i of each is one pair), image→text and text→image.

    A tie with the true partner counts against it (the partner's rank is the number of candidates
    scoring at least as high), so a constant embedding gives chance-level or worse, never 1."""
    if image_emb.shape[0] != text_emb.shape[0] or image_emb.shape[0] == 0:
        raise ValueError(f"need the same number (> 0) of images and reports, got {image_emb.shape[0]} and "
                         f"{text_emb.shape[0]}")
    sim = F.normalize(image_emb.float(), dim=1) @ F.normalize(text_emb.float(), dim=1).t()
    out: dict[str, float] = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.t())):
        own = s.diagonal()[:, None]
        rank = (s >= own).sum(1)  # 1 = the partner is strictly first
        for k in ks:
            out[f"{name}_r@{int(k)}"] = float((rank <= int(k)).float().mean())
    return out


@torch.no_grad()
def image_report_retrieval(pre: Pretrained, site: SiteConfig, cfg: DictConfig) -> dict[str, Any]:
    """Recall@k both ways on ``site``'s ``cfg.split`` images that have a report (``cfg.limit`` caps them)."""
    encode_text = pre.extra.get("encode_text")
    if encode_text is None:
        raise ValueError(f"a '{pre.method}' run has no text side: retrieval needs a method with one (umif)")
    ds = site_dataset(site, {"size": pre.image_size}, split=cfg.split, train=False, use_labels=False)
    keep = [i for i, r in enumerate(ds.df["report"]) if isinstance(r, str) and r.strip()]
    if cfg.get("limit"):
        keep = keep[:int(cfg.limit)]
    if len(keep) < 2:
        return {"n_pairs": len(keep), "note": f"site '{site.name}' has fewer than 2 {cfg.split} images with a report"}
    loader = DataLoader(torch.utils.data.Subset(ds, keep), batch_size=int(cfg.batch_size), collate_fn=collate_skip_none)
    images, reports = [], []
    pre.encoder.eval()
    for batch in loader:
        if batch is None:
            continue
        images.append(pre.encoder(batch["image"])[0])
        reports += list(batch["report"])
    image_emb = torch.cat(images)
    text_emb = torch.cat([encode_text(reports[i:i + int(cfg.batch_size)])
                          for i in range(0, len(reports), int(cfg.batch_size))])
    ks = [int(k) for k in OmegaConf.select(cfg, "retrieval.ks", default=[1, 5, 10])]
    res = recall_at_k(image_emb, text_emb, ks)
    # chance: a random ranking puts the partner in the top k with probability k / n
    n = len(reports)
    return {"n_pairs": n, "distinct_reports": len(set(reports)), **res,
            "chance": {f"r@{k}": round(min(k, n) / n, 4) for k in ks}}


def retrieval_rows(results: dict[str, Any]) -> list[list[str]]:
    """``results["retrieval"]`` as table rows (site, pairs, i→t and t→i recall@1/5/10)."""
    rows = []
    for site, r in (results.get("retrieval") or {}).items():
        if "image_to_text_r@1" not in r:
            continue
        cells = [f"{r.get(f'{d}_r@{k}', np.nan):.3f}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
        rows.append([site, str(r["n_pairs"]), *cells])
    return rows
