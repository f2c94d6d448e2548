"""UniChest: conquer (shared query network) then divide (mixture of query-network experts).

Follows the authors' code as summarised in ``docs/references.md`` (U.3):

- A query network is a pre-norm transformer decoder (4 layers, 4 heads, FFN 1024, dropout 0.1, no
  positional encodings). Queries are the text embeddings of class names; keys/values are the image
  tokens. Each cross-attention is ``λ_l·Attn(u, X, X) + λ_g·Attn(u, pool, pool)`` with the *same*
  attention weights (λ = [1.0, 0.4]); one LayerNorm normalises both inputs and the output.
  An MLP head gives one score per class. Cross-attention maps are kept for heat-maps.
- The gate ω = softmax(Linear(pool)) over the K-1 new experts (a single linear layer, as coded and
  as the paper's "one-layer MLP"), on the mean of the LayerNormed image tokens.
- Eq. 5: ``λ·σ(s1) + (1-λ)·Σ ω_k σ(s_k)`` on probabilities. The authors use two independent ratios
  (main 0.5, bias 0.5); ``bias_ratio`` offers that, the default is the paper's ``1-λ``.
- The source-contrastive feature is ``Linear(K-1, 32)`` on the gate vector.

Deliberate differences: the experts are built and initialised independently (N(0, 0.02) on linear and
attention weights, as coded); the released code's bugs (U.11) are not reproduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import combine_experts
from .encoders import ImageEncoder


class QueryDecoderLayer(nn.Module):
    """Pre-norm decoder layer: self-attention over queries, fine + global cross-attention, FFN."""

    def __init__(self, d_model: int, n_heads: int, ffn: int, dropout: float, lambda_local: float,
                 lambda_global: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn, d_model))
        self.drop = nn.Dropout(dropout)
        self.lambda_local, self.lambda_global = lambda_local, lambda_global

    def forward(self, q: torch.Tensor, mem: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm1(q)
        q = q + self.drop(self.self_attn(h, h, h, need_weights=False)[0])
        u = self.norm2(q)
        local, attn = self.cross_attn(u, mem, mem, need_weights=True, average_attn_weights=True)
        if mem.shape[1] > 1:  # a single memory token (the text branch) has no separate global term
            glob = self.cross_attn(u, pool, pool, need_weights=False)[0]
            local = self.lambda_local * local + self.lambda_global * glob
        q = q + self.drop(local)
        q = q + self.drop(self.ffn(self.norm3(q)))
        return q, attn


class QueryNetwork(nn.Module):
    """Class-name queries attend to image tokens; one logit per class. ``forward`` returns
    ``(logits (B, C), attention of the last layer (B, C, N))``."""

    def __init__(self, d_model: int = 768, n_layers: int = 4, n_heads: int = 4, ffn: int = 1024,
                 dropout: float = 0.1, lambda_local: float = 1.0, lambda_global: float = 0.4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)  # shared: inputs and output, as coded
        self.layers = nn.ModuleList([QueryDecoderLayer(d_model, n_heads, ffn, dropout, lambda_local, lambda_global)
                                     for _ in range(n_layers)])
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, 1)
        self.apply(_init_weights)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean of the LayerNormed tokens (B, D): the global key and the gate's input."""
        return self.norm(tokens).mean(1)

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mem = self.norm(tokens)
        pool = mem.mean(1, keepdim=True)
        q = self.norm(queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        attn = None
        for layer in self.layers:
            q, attn = layer(q, mem, pool)
        return self.head(self.drop(self.norm(q))).squeeze(-1), attn


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.MultiheadAttention):
        nn.init.normal_(m.in_proj_weight, std=0.02)
        nn.init.normal_(m.out_proj.weight, std=0.02)


class UniChest(nn.Module):
    """Image encoder + K query networks (index 0 is the shared one from conquer) + gate + SCL head.

    ``forward(images, class_emb)`` returns a dict with ``prob`` (B, C) for the current ``stage``
    (``conquer``: σ(s1); ``divide``: Eq. 5), the pieces (``s1``, ``experts``, ``gate``), the SCL
    feature ``scl`` (B, 32), the pooled image embedding ``pooled`` and the attention maps ``attn``.
    """

    def __init__(self, encoder: ImageEncoder, *, n_experts: int = 4, lam: float = 0.5, bias_ratio: float | None = None,
                 scl_dim: int = 32, query: dict | None = None, share_norm: bool = False) -> None:
        super().__init__()
        if n_experts < 2:
            raise ValueError(f"UniChest needs K >= 2 query networks (1 shared + experts), got {n_experts}")
        self.encoder = encoder
        d = encoder.dim
        self.query_networks = nn.ModuleList([QueryNetwork(d, **(query or {})) for _ in range(n_experts)])
        if share_norm:  # the authors' one decoder_norm for every stack (U.3); default: one per query network
            for qn in self.query_networks[1:]:
                qn.norm = self.query_networks[0].norm
        self.gate = nn.Linear(d, n_experts - 1)
        self.scl_head = nn.Linear(n_experts - 1, scl_dim)
        self.lam, self.bias_ratio = lam, bias_ratio
        self.stage = "conquer"

    @property
    def n_experts(self) -> int:
        return len(self.query_networks)

    @torch.no_grad()
    def copy_shared_to_experts(self) -> None:
        """Start every expert as a copy of the trained shared query network and the gate uniform, so that
        divide's first forward is exactly conquer's output (Eq. 5 with equal experts is σ(s1) when the
        two weights sum to 1) and divide can only move from there. The authors start divide from random
        experts (references U.7), which halves what conquer learned at the switch; ``unichest.expert_init``."""
        shared = self.query_networks[0].state_dict()
        for qn in self.query_networks[1:]:
            qn.load_state_dict(shared)
        self.gate.weight.zero_()
        self.gate.bias.zero_()

    def set_stage(self, stage: str) -> None:
        """``divide`` freezes the image encoder (UniChest U.7); the query networks, gate and SCL head train."""
        if stage not in ("conquer", "divide"):
            raise ValueError(f"unknown UniChest stage '{stage}'; expected conquer or divide")
        self.stage = stage
        for p in self.encoder.parameters():
            p.requires_grad_(stage == "conquer")

    def train(self, mode: bool = True) -> UniChest:
        super().train(mode)
        # Deliberate difference: the authors leave the frozen encoder in train mode, so BatchNorm
        # statistics keep drifting in divide; a frozen encoder here is frozen, statistics included.
        if self.stage == "divide":
            self.encoder.eval()
        return self

    def heads(self, tokens: torch.Tensor, class_emb: torch.Tensor, *, stage: str | None = None) -> dict:
        """Query networks, gate and Eq. 5 on given tokens (images or a single text token)."""
        stage = stage or self.stage
        s1, attn = self.query_networks[0](tokens, class_emb)
        out = {"s1": s1, "attn": attn}
        if stage == "conquer":
            out["prob"] = torch.sigmoid(s1)
            return out
        experts = [qn(tokens, class_emb)[0] for qn in self.query_networks[1:]]
        gate = F.softmax(self.gate(self.query_networks[0].pooled(tokens)), dim=-1)
        out.update(experts=experts, gate=gate, scl=self.scl_head(gate),
                   prob=combine_experts(torch.sigmoid(s1), [torch.sigmoid(e) for e in experts], gate, self.lam,
                                        bias_ratio=self.bias_ratio))
        return out

    def forward(self, images: torch.Tensor, class_emb: torch.Tensor, *, stage: str | None = None) -> dict:
        pooled, tokens = self.encoder(images)
        out = self.heads(tokens, class_emb, stage=stage)
        out["pooled"] = pooled
        return out

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """Probabilities for any class embeddings (class names or prompts never seen in training)."""
        was = self.training
        self.eval()
        prob = self(images, class_emb)["prob"]
        self.train(was)
        return prob
