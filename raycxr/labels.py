"""Label spaces: every site keeps its own label names; a union space aligns them.

A site's labels are stored as 1 / 0 / -1 (uncertain) / NaN (not annotated). The union space maps
every site's names through a synonym table to canonical names ("Effusion" and "Pleural Effusion"
are one class), and turns a site's label vector into a union target vector plus a mask that is 0
for classes the site does not annotate, so losses never treat "not annotated" as "negative".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros", "lsr_ones")

# Canonical spelling for names that public CXR data sets write differently. Keys are compared
# after lower-casing and turning '_', '-' and runs of spaces into one space (see `_key`).
SYNONYMS: dict[str, str] = {
    "effusion": "Pleural Effusion",
    "pleural effusion": "Pleural Effusion",
    "pleural thickening": "Pleural Thickening",
    "infiltrate": "Infiltration",
    "infiltrates": "Infiltration",
    "infiltration": "Infiltration",
    "pulmonary fibrosis": "Fibrosis",
    "fibrosis": "Fibrosis",
    "cardiomegaly": "Cardiomegaly",
    "enlarged cardiomediastinum": "Enlarged Cardiomediastinum",
    "aortic enlargement": "Aortic Enlargement",
    "lung opacity": "Lung Opacity",
    "airspace opacity": "Lung Opacity",
    "opacity": "Lung Opacity",
    "lung lesion": "Lung Lesion",
    "nodule": "Nodule",
    "mass": "Mass",
    "nodule/mass": "Nodule/Mass",
    "nodule or mass": "Nodule/Mass",
    "atelectasis": "Atelectasis",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "oedema": "Edema",
    "pulmonary edema": "Edema",
    "emphysema": "Emphysema",
    "hernia": "Hernia",
    "hiatal hernia": "Hernia",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "fracture": "Fracture",
    "rib fracture": "Fracture",
    "support devices": "Support Devices",
    "support device": "Support Devices",
    "no finding": "No Finding",
    "normal": "No Finding",
    "pleural other": "Pleural Other",
    "calcification": "Calcification",
    "ild": "ILD",
    "interstitial lung disease": "ILD",
    "tuberculosis": "Tuberculosis",
    "tb": "Tuberculosis",
    "other lesion": "Other Lesion",
    "lung cyst": "Lung Cyst",
    "granuloma": "Granuloma",
    "scoliosis": "Scoliosis",
    "copd": "COPD",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def canonical_name(name: str, synonyms: Mapping[str, str] | None = None) -> str:
    """Canonical spelling of a class name; unknown names keep their own spelling (trimmed)."""
    table = {**SYNONYMS, **{_key(k): v for k, v in (synonyms or {}).items()}}
    return table.get(_key(name), name.strip())


def apply_uncertain_policy(labels: np.ndarray, policy: str, *, rng: np.random.Generator | None = None,
                           lsr_range: tuple[float, float] = (0.55, 0.85)) -> np.ndarray:
    """Resolve CheXpert-style uncertain (-1) entries; NaN (not annotated) is left as NaN.

    - ``ignore``: uncertain becomes NaN, so it is masked out like a missing label (default);
    - ``ones`` / ``zeros``: uncertain becomes 1 / 0 (the U-Ones / U-Zeros policies);
    - ``lsr_ones``: uncertain becomes a soft label drawn from U(0.55, 0.85), as Ark does
      (drawn once, so call it once per data set build with a seeded ``rng``).
    """
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"unknown uncertain-label policy '{policy}'; expected one of {UNCERTAIN_POLICIES}")
    out = np.asarray(labels, dtype=np.float32).copy()
    unc = out == -1
    if policy == "ignore":
        out[unc] = np.nan
    elif policy == "ones":
        out[unc] = 1.0
    elif policy == "zeros":
        out[unc] = 0.0
    else:
        rng = rng or np.random.default_rng(0)
        out[unc] = rng.uniform(*lsr_range, size=int(unc.sum())).astype(np.float32)
    return out


@dataclass
class UnionLabelSpace:
    """The union of several sites' label spaces, after synonym mapping.

    ``names`` are canonical union class names; ``site_index[site][j]`` is the union column of the
    site's j-th own class.
    """

    names: list[str]
    site_names: dict[str, list[str]]
    site_index: dict[str, np.ndarray] = field(repr=False)

    @classmethod
    def build(cls, site_label_names: Mapping[str, Sequence[str]],
              synonyms: Mapping[str, str] | None = None, *, sort: bool = False) -> UnionLabelSpace:
        """Union in order of first appearance (or sorted); a site whose own names collapse onto the
        same canonical class is an error, since its vector would become ambiguous."""
        names: list[str] = []
        index: dict[str, np.ndarray] = {}
        for site, own in site_label_names.items():
            canon = [canonical_name(n, synonyms) for n in own]
            dup = {c for c in canon if canon.count(c) > 1}
            if dup:
                clash = [n for n, c in zip(own, canon) if c in dup]
                raise ValueError(f"site '{site}': labels {clash} map to the same class {sorted(dup)}; "
                                 "rename one or override the synonym table")
            for c in canon:
                if c not in names:
                    names.append(c)
            index[site] = np.array([names.index(c) for c in canon], dtype=np.int64)
        if sort:
            order = sorted(range(len(names)), key=lambda i: names[i].lower())
            remap = np.empty(len(names), np.int64)
            remap[order] = np.arange(len(names))
            names = [names[i] for i in order]
            index = {s: remap[ix] for s, ix in index.items()}
        return cls(names, {s: list(v) for s, v in site_label_names.items()}, index)

    @classmethod
    def onto(cls, class_names: Sequence[str], site_label_names: Mapping[str, Sequence[str]], *,
             strict: bool = False, synonyms: Mapping[str, str] | None = None) -> UnionLabelSpace:
        """A label space whose classes are exactly ``class_names`` (in that order), with each site's own
        classes matched by canonical name: the one way raycxr projects a site's labels onto a model's
        or a run's class list. A site class that is not in ``class_names`` is dropped (index -1), or,
        with ``strict``, an error."""
        canon = [canonical_name(n, synonyms) for n in class_names]
        col = {c: i for i, c in enumerate(canon)}
        index = {}
        for site, own in site_label_names.items():
            ix = np.array([col.get(canonical_name(n, synonyms), -1) for n in own], dtype=np.int64)
            if strict and (ix < 0).any():
                missing = [n for n, i in zip(own, ix) if i < 0]
                raise ValueError(f"site '{site}': classes {missing} are not in the class list {list(class_names)}")
            index[site] = ix
        return cls(list(class_names), {s: list(v) for s, v in site_label_names.items()}, index)

    def __len__(self) -> int:
        return len(self.names)

    def sites(self) -> list[str]:
        return list(self.site_names)

    def to_union(self, site: str, labels: np.ndarray, *, policy: str = "ignore",
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Site labels ``(N, C_site)`` (1/0/-1/NaN) to union ``targets, mask`` of shape ``(N, U)``.

        ``mask`` is 1 where the target is known: the class belongs to the site, is not missing,
        and is not an uncertain label dropped by the ``ignore`` policy. Targets are 0 where masked.
        """
        if site not in self.site_index:
            raise KeyError(f"site '{site}' is not part of this label space (sites: {self.sites()})")
        labels = np.atleast_2d(np.asarray(labels, np.float32))
        ix = self.site_index[site]
        if labels.shape[1] != len(ix):
            raise ValueError(f"site '{site}' has {len(ix)} classes but labels have {labels.shape[1]} columns")
        resolved = apply_uncertain_policy(labels, policy, rng=rng)
        targets = np.zeros((labels.shape[0], len(self.names)), np.float32)
        mask = np.zeros_like(targets)
        known = ~np.isnan(resolved)
        keep = ix >= 0  # site classes outside this space (see :meth:`onto`) are left out
        targets[:, ix[keep]] = np.where(known, resolved, 0.0)[:, keep]
        mask[:, ix[keep]] = known[:, keep].astype(np.float32)
        return targets, mask
