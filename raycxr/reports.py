"""Radiology report text: sentences, finding entities with negation, and UniChest's entity text.

Torch-free (numpy, regex and the label synonym table only), so site adapters, statistics and the
runtime side can use it without the text encoder.

* **Report -> finding entities** (:func:`extract_entities`): sentence split, a radiology phrase table
  that maps surface phrases to canonical class names (:mod:`raycxr.labels`), NegEx-style negation
  (pre-triggers scoped to the clause, post-triggers such as "... has resolved") and hedges
  ("possible", "may represent") that keep a finding positive but flag it uncertain. This stands in
  for the RadGraph entities UniChest reads for MIMIC (references U.2), which are not shipped.
* **UniChest text** (:func:`entity_text`): ``' [ENT] e1 [ENT] e2 [SEP] '`` per sentence, the report
  text as fallback, or the positive label names joined by ``' [SEP] '`` when there is no report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .labels import SYNONYMS, _key, canonical_name

__all__ = ["PHRASES", "EntityMention", "Sentence", "split_sentences", "extract_entities", "positive_findings",
           "entity_text"]

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
    """The text UniChest pairs with an image (references U.2).

    * report with findings: per sentence that has positive (incl. uncertain) entities,
      ``' [ENT] e1 [ENT] e2' + ' [SEP] '``, concatenated. Entities are the report's own words
      (RadGraph-like, lower-cased) or, with ``use_names``, canonical class names;
    * report without findings: each of its sentences (whitespace normalised) + ``' [SEP] '``, as the
      authors build the caption fallback (U.2);
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
        sentences = [" ".join(s.text.split()) for s in split_sentences(report) if s.text.strip()]
        return "".join(f"{s} [SEP] " for s in sentences) or " ".join(report.split()) + " [SEP] "
    return "".join(f"{n} [SEP] " for n in positive_label_names)
