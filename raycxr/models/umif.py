"""UmiF (unified token space + flexible token grouping) as plain modules.

One timm ViT encodes a *unified* token sequence built from three modality tokenizers that share the
ViT width D (paper §3.1):

- radiology: the ViT's own patch embedding (+ its patch position embeddings);
- language: the text model's tokenizer and word-embedding layer (frozen), projected to D, plus learned
  text positions; class labels reach it as prompt text;
- segmentation mask: a *separate* patch embedding with the same initialisation as the radiology one
  (a copy made at construction), on the image a site rendered from its boxes / lesion masks
  (:func:`raycxr.dataset.render_annotation`), with the image's patch positions.

The flexible token grouping (§3.2) splits a pair's tokens into group 1 and group 0 by binary bits
(:func:`group_bits`); each group gets its own CLS (group 1: the ViT's own ``cls_token``, group 0:
``cls0``) and their encodings f1, f0 are the positive pair. Groups are formed by attention masks over
the full sequence rather than by gathering tokens: a CLS that cannot attend to a token is exactly a
CLS over the sequence without it, and the batch keeps one shape.

After pretraining the image tower alone is :class:`UmiFImageEncoder`: the ViT on image tokens with
group 1's CLS, exactly the student's computation for a group holding every image token and nothing
else (tested), so evaluation and ONNX export see image tokens only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .encoders import ImageEncoder


class UmiFImageEncoder(ImageEncoder):
    """The UmiF ViT on image tokens alone; ``forward`` returns ``(CLS, patch tokens)``.

    Args:
        name: a timm ViT with a class token (``vit_tiny_patch16_224`` for CPU runs, ``vit_base_patch16_224``
            as in the paper).
        img_size: the run's image size (the ViT's patch grid follows it).
        drop_path_rate: stochastic depth of the ViT blocks.
    """

    def __init__(self, name: str = "vit_tiny_patch16_224", *, img_size: int,
                 drop_path_rate: float | None = None) -> None:
        super().__init__(name, embed_dim=None, img_size=img_size, drop_path_rate=drop_path_rate)
        bb = self.backbone
        if getattr(bb, "cls_token", None) is None or not hasattr(bb, "patch_embed") or \
                getattr(bb, "reg_token", None) is not None or getattr(bb, "no_embed_class", False):
            raise ValueError(f"UmiF needs a plain timm ViT with a class token (e.g. vit_tiny_patch16_224), "
                             f"not '{name}'")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone.forward_features((x - self.mean) / self.std)
        return f[:, 0], f[:, self.prefix_tokens:]


def sample_ratios(n: int, p: float, generator: torch.Generator | None = None,
                  r_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """The share r of image tokens in group 1 per pair: 1 with probability ``p``, else r ~ U[lo, hi]
    (``r_range``; the paper's is [0, 1])."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    lo, hi = (float(x) for x in r_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"r_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(r_range)}")
    one = torch.rand(n, generator=generator) < p
    return torch.where(one, torch.ones(n), lo + (hi - lo) * torch.rand(n, generator=generator))


def scheduled_p(p: float, p_end: float | None, progress: float) -> float:
    """The r schedule's P(r = 1) at ``progress`` in [0, 1] of the run: ``p`` throughout when ``p_end`` is
    None (the paper), else linear from ``p`` to ``p_end`` (e.g. 1 → 0.2: CLIP-like first, then grouping)."""
    for name, v in (("p", p), ("p_end", p_end)):
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"umif.{name} must be in [0, 1], got {v}")
    if p_end is None:
        return float(p)
    t = min(1.0, max(0.0, float(progress)))
    return float(p) + (float(p_end) - float(p)) * t


def _choose(valid: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per row, ``k`` of the valid positions at random (bool, same shape as ``valid``)."""
    scores = torch.rand(valid.shape, generator=generator).to(valid.device).masked_fill(~valid, float("inf"))
    ranks = scores.argsort(1).argsort(1)
    return (ranks < k[:, None]) & valid


def group_bits(valid_image: torch.Tensor, valid_sup: torch.Tensor, r: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bits b = (b_i, b_s) of the flexible token grouping (paper §3.2).

    Among a pair's valid image tokens ``round(r·n_i)`` are 1, among its valid supervision tokens
    ``round((1-r)·n_s)``; the rest are 0 (padding is neither group). r = 1 puts the image in group 1
    and the supervision in group 0 (CLIP-like). Deliberate difference: a pair without supervision tokens
    (image-only) keeps at least one image token in each group, so neither view is empty.

    Args:
        valid_image: ``(B, N_i)`` bool, the image tokens present.
        valid_sup: ``(B, N_s)`` bool, the supervision tokens present (text or mask tokens).
        r: ``(B,)`` ratios in [0, 1].

    Returns:
        ``(b_i, b_s)`` bool tensors shaped like ``valid_image`` and ``valid_sup``.
    """
    n_i, n_s = valid_image.sum(1), valid_sup.sum(1)
    r = r.to(valid_image.device, torch.float32)
    k_i = torch.round(r * n_i).long()
    k_s = torch.round((1 - r) * n_s).long()
    alone = (n_s == 0) & (n_i >= 2)
    k_i = torch.where(alone, k_i.clamp(min=1).minimum(n_i - 1), k_i)
    return _choose(valid_image, k_i, generator), _choose(valid_sup, k_s, generator)


class UmiF(nn.Module):
    """The UmiF student (and, copied, its EMA teacher): modality tokenizers + one ViT.

    Args:
        encoder: the image tower (its ViT encodes every token).
        word_embeddings: ``(V, H)`` the text model's word-embedding table (frozen, not checkpointed: it is
            rebuilt from the text model folder).
        max_text: the most language tokens per pair (the text positions learned).
    """

    def __init__(self, encoder: UmiFImageEncoder, word_embeddings: torch.Tensor, max_text: int) -> None:
        super().__init__()
        self.encoder = encoder
        bb = encoder.backbone
        self.dim = int(bb.embed_dim)
        self.mask_embed = copy.deepcopy(bb.patch_embed)  # separate tokenizer, same initialisation
        self.register_buffer("word_embeddings", word_embeddings.detach().clone().float(), persistent=False)
        self.text_proj = nn.Linear(word_embeddings.shape[1], self.dim)
        self.text_pos = nn.Parameter(torch.zeros(1, int(max_text), self.dim))
        nn.init.trunc_normal_(self.text_pos, std=0.02)
        self.cls0 = nn.Parameter(torch.zeros_like(bb.cls_token))  # group 0's CLS; group 1's is the ViT's own
        nn.init.trunc_normal_(self.cls0, std=0.02)

    @property
    def n_image_tokens(self) -> int:
        return int(self.encoder.backbone.patch_embed.num_patches)

    def _patch_pos(self) -> torch.Tensor:
        bb = self.encoder.backbone
        return bb.pos_embed[:, bb.num_prefix_tokens:]

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        return e.backbone.patch_embed((images - e.mean) / e.std) + self._patch_pos()

    def mask_tokens(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_embed(masks) + self._patch_pos()

    def text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.text_proj(nn.functional.embedding(ids, self.word_embeddings))
        return t + self.text_pos[:, :ids.shape[1]]

    def _cls(self, group: int, b: int) -> torch.Tensor:
        bb = self.encoder.backbone
        cls = bb.cls_token if group == 1 else self.cls0
        return (cls + bb.pos_embed[:, :1]).expand(b, -1, -1)  # the CLS position, as timm's ViT adds it

    def encode(self, tokens: torch.Tensor, keep: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """The CLS encodings ``(B, D)`` of ``cls`` ``(B, 1, D)`` over the tokens where ``keep`` holds."""
        bb = self.encoder.backbone
        x = bb.norm_pre(torch.cat([cls, tokens], 1))
        keep = torch.cat([keep.new_ones(keep.shape[0], 1), keep], 1)
        for blk in bb.blocks:
            x = blk(x, attn_mask=keep[:, None, None, :])  # every query attends to the kept keys only
        return bb.norm(x)[:, 0]

    def tokens(self, images: torch.Tensor, text_ids: torch.Tensor | None = None,
               text_valid: torch.Tensor | None = None, masks: torch.Tensor | None = None,
               mask_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unified sequence ``[image | text | mask]`` ``(B, L, D)`` with the validity of image and
        supervision tokens (``(B, N_i)`` and ``(B, L - N_i)`` bool). A pair's supervision is its valid
        text tokens or its valid mask tokens (``mask_valid`` ``(B,)``: the pair uses its mask)."""
        img = self.image_tokens(images)
        b = img.shape[0]
        parts, valid = [img], []
        if text_ids is not None:
            parts.append(self.text_tokens(text_ids))
            valid.append(text_valid.bool())
        if masks is not None:
            parts.append(self.mask_tokens(masks))
            valid.append(mask_valid.bool()[:, None].expand(b, self.n_image_tokens))
        sup_valid = torch.cat(valid, 1) if valid else img.new_zeros(b, 0, dtype=torch.bool)
        return torch.cat(parts, 1), img.new_ones(b, img.shape[1], dtype=torch.bool), sup_valid

    def grouped(self, tokens: torch.Tensor, valid_image: torch.Tensor, valid_sup: torch.Tensor,
                r: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Student encodings ``(f1, f0)`` after the flexible grouping with ratios ``r``, both groups in
        one pass over 2B sequences."""
        b = tokens.shape[0]
        b_i, b_s = group_bits(valid_image, valid_sup, r, generator)
        bits, valid = torch.cat([b_i, b_s], 1), torch.cat([valid_image, valid_sup], 1)
        f = self.encode(torch.cat([tokens, tokens], 0), torch.cat([bits & valid, ~bits & valid], 0),
                        torch.cat([self._cls(1, b), self._cls(0, b)], 0))
        return f[:b], f[b:]

    def complete(self, tokens: torch.Tensor, valid_image: torch.Tensor, valid_sup: torch.Tensor) -> torch.Tensor:
        """The CLS over the complete (ungrouped) sequence: the teacher's target t (group 1's CLS)."""
        return self.encode(tokens, torch.cat([valid_image, valid_sup], 1), self._cls(1, tokens.shape[0]))

    def text_features(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Group 0's CLS over language tokens alone (a class prompt's embedding, the r = 1 view)."""
        return self.encode(self.text_tokens(ids), valid.bool(), self._cls(0, ids.shape[0]))
