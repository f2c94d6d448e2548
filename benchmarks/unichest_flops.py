"""FLOPs of UniChest's conquer vs divide forward pass (the paper reports +2.7 % for divide).

Counted with torch.utils.flop_counter on one image at the paper's setting (ResNet-50 at 512 px,
768-d tokens, 4-layer query networks, K = 4, 60 class queries) and at the CPU demo setting.
The conquer forward is the baseline measured in the same run.

    python benchmarks/unichest_flops.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from raycxr.models.encoders import ImageEncoder
from raycxr.models.unichest import UniChest


def count(model: UniChest, x: torch.Tensor, q: torch.Tensor, stage: str) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, q, stage=stage)
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    settings = {"paper (resnet50, 512 px, d=768, 60 classes, K=4)": ("resnet50", 512, 768, 60, 4),
                "demo (resnet18, 128 px, d=256, 39 classes, K=4)": ("resnet18", 128, 256, 39, 4)}
    res = {}
    for name, (backbone, size, dim, n_cls, k) in settings.items():
        model = UniChest(ImageEncoder(backbone, embed_dim=dim), n_experts=k).eval()
        x, q = torch.rand(1, 1, size, size), torch.randn(n_cls, dim)
        conquer, divide = count(model, x, q, "conquer"), count(model, x, q, "divide")
        res[name] = {"conquer_gflops": round(conquer / 1e9, 3), "divide_gflops": round(divide / 1e9, 3),
                     "divide_over_conquer_percent": round(100 * (divide / conquer - 1), 2)}
        print(name, res[name])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "unichest_flops.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
