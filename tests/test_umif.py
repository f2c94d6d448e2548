"""UmiF: token grouping, CLS handling, both losses by hand, mask rendering inside the site, the
pair-type sampler, the EMA teacher; then training through the local runner, resume and export."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from raycxr.config import compose
from raycxr.dataset import (
    abnormality_intensity,
    collate_skip_none,
    pair_type_probabilities,
    render_annotation,
    sample_pairs,
    site_pair_types,
)
from raycxr.losses import byol_consistency_loss, ema_update, umif_alignment_loss
from raycxr.methods.umif import pair_types_of
from raycxr.models.umif import UmiF, UmiFImageEncoder, group_bits, sample_ratios, scheduled_p


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# -- grouping ---------------------------------------------------------------------------------------
def test_group_bits_ratios_follow_r_and_leave_padding_out():
    g = torch.Generator().manual_seed(0)
    valid_i = torch.ones(4, 16, dtype=torch.bool)
    valid_s = torch.ones(4, 10, dtype=torch.bool)
    valid_s[1, 6:] = False  # a shorter text: 6 tokens
    r = torch.tensor([1.0, 0.5, 0.25, 0.0])
    b_i, b_s = group_bits(valid_i, valid_s, r, g)
    assert b_i.sum(1).tolist() == [16, 8, 4, 0]  # round(r · n_i) image tokens in group 1
    assert b_s.sum(1).tolist() == [0, 3, 8, 10]  # round((1 - r) · n_s) supervision tokens in group 1
    assert not b_s[1, 6:].any()  # padding is in neither group
    # r = 1: image alone in group 1, supervision alone in group 0 (the CLIP-like split)
    assert b_i[0].all() and not b_s[0].any()
    # positions are random: two draws of the same ratio differ
    b2, _ = group_bits(valid_i, valid_s, r, g)
    assert not torch.equal(b_i[1], b2[1])


def test_an_image_only_pair_keeps_both_groups_non_empty():
    valid_i = torch.ones(3, 4, dtype=torch.bool)
    none = torch.zeros(3, 0, dtype=torch.bool)
    b_i, b_s = group_bits(valid_i, none, torch.tensor([1.0, 0.0, 0.5]))
    assert b_i.sum(1).tolist() == [3, 1, 2] and b_s.shape == (3, 0)


def test_sample_ratios_r_is_one_with_probability_p():
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_ratios(50, 1.0, g), torch.ones(50))
    r0 = sample_ratios(4000, 0.0, g)
    assert (r0 < 1).all() and abs(float(r0.mean()) - 0.5) < 0.03
    r = sample_ratios(4000, 0.2, g)
    assert abs(float((r == 1).float().mean()) - 0.2) < 0.03
    with pytest.raises(ValueError, match="p must be in"):
        sample_ratios(2, 1.5)


def test_r_range_bounds_the_ratios_that_are_not_one():
    g = torch.Generator().manual_seed(2)
    r = sample_ratios(4000, 0.0, g, (0.3, 0.7))
    assert float(r.min()) >= 0.3 and float(r.max()) <= 0.7 and abs(float(r.mean()) - 0.5) < 0.02
    assert torch.equal(sample_ratios(10, 0.0, g, (0.4, 0.4)), torch.full((10,), 0.4))
    with pytest.raises(ValueError, match="r_range"):
        sample_ratios(2, 0.2, g, (0.8, 0.2))


def test_the_p_schedule_is_constant_without_p_end_and_linear_with_it():
    assert scheduled_p(0.2, None, 0.0) == scheduled_p(0.2, None, 1.0) == 0.2
    assert scheduled_p(1.0, 0.2, 0.0) == 1.0
    assert scheduled_p(1.0, 0.2, 0.5) == pytest.approx(0.6)
    assert scheduled_p(1.0, 0.2, 1.0) == pytest.approx(0.2)
    assert scheduled_p(0.0, 1.0, 2.0) == 1.0  # progress is clamped to the run
    with pytest.raises(ValueError, match="p_end"):
        scheduled_p(0.2, 1.5, 0.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    enc = UmiFImageEncoder("vit_tiny_patch16_224", img_size=32)
    return UmiF(enc, torch.randn(50, 12), max_text=8).eval()


def test_cls_handling_two_cls_tokens_and_the_image_only_tower(model):
    x = torch.rand(3, 1, 32, 32)
    ids = torch.randint(0, 50, (3, 5))
    valid_t = torch.ones(3, 5, dtype=torch.bool)
    tokens, v_i, v_s = model.tokens(x, ids, valid_t)
    assert tokens.shape == (3, 4 + 5, 192) and v_i.shape == (3, 4) and v_s.shape == (3, 5)
    with torch.no_grad():
        f1, f0 = model.grouped(tokens, v_i, v_s, torch.ones(3))
        # r = 1: group 1 is the image alone with the ViT's own CLS, i.e. exactly the exported image tower
        cls, patches = model.encoder(x)
        assert torch.allclose(f1, cls, atol=1e-5) and patches.shape == (3, 4, 192)
        # group 0 is the text alone under its own CLS (cls0), the same as the prompt encoder
        assert torch.allclose(f0, model.text_features(ids, valid_t), atol=1e-5)
        # each group has its own CLS: moving cls0 moves f0 only
        kick = torch.randn_like(model.cls0)  # not a constant shift: LayerNorm would remove that
        model.cls0.add_(kick)
        g1, g0 = model.grouped(tokens, v_i, v_s, torch.ones(3))
        model.cls0.sub_(kick)
        assert torch.allclose(g1, f1, atol=1e-6) and not torch.allclose(g0, f0, atol=1e-3)
        assert model.cls0 is not model.encoder.backbone.cls_token
        # a token outside a group does not change that group's CLS
        edited = tokens.clone()
        edited[:, 4:] += torch.randn_like(edited[:, 4:])  # change every text token
        g1, g0 = model.grouped(edited, v_i, v_s, torch.ones(3))
        assert torch.allclose(g1, f1, atol=1e-5) and not torch.allclose(g0, f0, atol=1e-3)


def test_mask_tokens_have_their_own_tokenizer_with_the_same_init(model):
    torch.manual_seed(0)
    fresh = UmiF(UmiFImageEncoder("vit_tiny_patch16_224", img_size=32), torch.randn(50, 12), max_text=8)
    pe, me = fresh.encoder.backbone.patch_embed, fresh.mask_embed
    assert torch.equal(pe.proj.weight, me.proj.weight) and pe.proj.weight is not me.proj.weight
    assert "word_embeddings" not in fresh.state_dict()  # rebuilt from the text model folder, not checkpointed


# -- losses by hand ---------------------------------------------------------------------------------
def test_alignment_loss_hand_values():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    tau = 0.5
    # identical groups: each point's positive at 1/τ, two other points at 0 → ℓ = log(1 + 2e^{-1/τ});
    # Eq. 1 sums the two directions per pair and divides by B: 2ℓ
    got = umif_alignment_loss(t([e1, e2]), t([e1, e2]), tau)
    assert got.item() == pytest.approx(2 * math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-12)
    # swapped: f1 = (e1, e2), f0 = (e2, e1): every positive at cos 0, the other pair's same vector at 1/τ
    # ℓ = -0 + log(e^{0} + e^{1/τ} + e^{0}) for all four points
    got = umif_alignment_loss(t([[2.0, 0.0], e2]), t([e2, e1]), tau)
    assert got.item() == pytest.approx(2 * math.log(2 + math.exp(1 / tau)), rel=1e-12)


def test_consistency_loss_hand_values_and_no_gradient_into_the_teacher():
    teacher = t([[1.0, 0.0], [0.0, 2.0]]).requires_grad_(True)
    f0 = t([[1.0, 0.0], [1.0, 0.0]]).requires_grad_(True)  # cos 1, cos 0
    f1 = t([[-3.0, 0.0], [1.0, 1.0]])  # cos -1, cos 1/√2
    got = byol_consistency_loss(teacher, f0, f1)
    want = ((2 - 2) + (2 + 2) + (2 - 0) + (2 - 2 / math.sqrt(2))) / 2
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    assert teacher.grad is None and f0.grad is not None
    assert byol_consistency_loss(t([e := [1.0, 0.0]]), t([e]), t([e])).item() == 0.0
    with pytest.raises(ValueError, match="must all be"):
        byol_consistency_loss(t([[1.0, 0.0]]), t([[1.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]]))


# -- the site's mask image --------------------------------------------------------------------------
def test_annotation_rendered_from_boxes_one_intensity_per_abnormality():
    boxes = [{"label": "Nodule", "x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 0.25},
             {"label": "Effusion", "x0": 0.5, "y0": 0.5, "x1": 1.0, "y1": 1.0}]
    img = render_annotation(boxes, None, 8)
    assert img.shape == (1, 8, 8) and img.dtype == np.float32
    nod, eff = abnormality_intensity("Nodule"), abnormality_intensity("Effusion")
    assert nod != eff and 0.25 <= min(nod, eff) and max(nod, eff) <= 1.0
    assert (img[0, :2, :4] == nod).all() and (img[0, 4:, 4:] == eff).all()
    assert img[0, 2:, :4].sum() == 0 and img[0, :4, 4:].sum() == 0  # black background elsewhere
    assert abnormality_intensity("effusion") == eff  # the same class name gives the same level at every site
    assert render_annotation(None, None, 4).sum() == 0


def test_annotation_rendered_from_a_lesion_mask(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[8:, :8] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    img = render_annotation([{"label": "Nodule", "x0": 0.75, "y0": 0.0, "x1": 1.0, "y1": 0.25}],
                            tmp_path / "m.png", 4, mask_label="Pneumothorax")
    ptx = abnormality_intensity("Pneumothorax")
    assert (img[0, 2:, :2] == ptx).all() and img[0, 0, 3] == abnormality_intensity("Nodule")
    assert img[0, :2, :2].sum() == 0 and img[0, 2:, 2:].sum() == 0


def test_the_site_renders_annotations_and_declares_its_pair_types(small_corpus):
    from raycxr.dataset import site_dataset
    from raycxr.manifest import Manifest
    from raycxr.sites.config import SiteConfig

    types = {}
    for name in ("nih", "vindr", "siim"):
        site = SiteConfig.from_dict({"name": name, "adapter": "manifest", "root": str(small_corpus / name)})
        types[name] = site_pair_types(site.load_manifest())
    assert types["siim"] == ["image-class", "image-segment"]  # labels + pneumothorax masks
    assert "image-class" in types["nih"]
    m = Manifest.read(small_corpus / "siim" / "manifest.parquet")
    bare = Manifest.from_records(m.to_pandas().drop(columns=["labels", "mask_path", "boxes"]).assign(
        labels=[[None] * len(m.label_names)] * len(m)).to_dict("records"), m.label_names)
    assert site_pair_types(bare) == ["image-only"]
    site = SiteConfig.from_dict({"name": "siim", "adapter": "manifest", "root": str(small_corpus / "siim")})
    ds = site_dataset(site, {"size": 32}, split=None, train=False, second_view="annotation")
    items = [ds[i] for i in range(len(ds))]
    with_mask = [it for it in items if it["has_annotation"]]
    assert with_mask and all(it["annotation"].shape == (1, 32, 32) for it in items) and "image2" not in items[0]
    drawn = [it for it in with_mask if it["annotation"].max() > 0]
    ptx = float(np.float32(abnormality_intensity("Pneumothorax")))
    assert drawn and all(set(it["annotation"].unique().tolist()) <= {0.0, ptx} for it in drawn)


def test_a_site_declares_its_pair_types_in_its_yaml(small_corpus, tmp_path):
    import yaml

    from raycxr.dataset import site_dataset
    from raycxr.sites.config import SiteConfig, SiteConfigError
    from raycxr.validate import validate_site

    base = {"name": "siim", "adapter": "manifest", "root": str(small_corpus / "siim")}
    for bad, why in ((["image-caption"], "pair_types must be"), ([], "pair_types must be"),
                     (["image-only", "image-class"], "cannot be combined")):
        with pytest.raises(SiteConfigError, match=why):
            SiteConfig.from_dict({**base, "pair_types": bad}, source="siim.yaml")
    seg = SiteConfig.from_dict({**base, "pair_types": ["image-segment"]})
    assert seg.to_dict()["pair_types"] == ["image-segment"]
    assert site_pair_types(seg.load_manifest(), seg.pair_types) == ["image-segment"]
    ds = site_dataset(seg, {"size": 32}, split=None, train=False, second_view="annotation")
    batch = collate_skip_none([ds[i] for i in range(len(ds))])
    assert batch["pair_offer"].tolist() == [[False, False, True]] * len(ds)
    types = pair_types_of(batch)  # labels are there, but the site offers only its masks (or nothing)
    assert {t for ts in types for t in ts} == {"image-segment", "image-only"}
    # declaring what the manifest cannot supply fails with the file's name, in the data path and in validate
    path = tmp_path / "siim.yaml"
    path.write_text(yaml.safe_dump({**base, "pair_types": ["image-report", "image-class"]}))
    wrong = SiteConfig.load(path)
    with pytest.raises(SiteConfigError, match=r"siim.yaml: pair_types declares \['image-report'\]"):
        site_dataset(wrong, {"size": 32}, split=None, train=False, second_view="annotation")
    res = validate_site(wrong, progress=False)
    assert not res["ok"] and "image-report" in res["message"]
    site_dataset(wrong, {"size": 32}, split=None, train=False)  # other methods do not read pair_types


def test_sites_show_lists_a_sites_pair_types(umif_run, capsys):
    from raycxr.cli import main

    _, _, sites = umif_run
    assert main(["sites", "show", "nih", sites[0].removeprefix("sites.")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("pair types")]
    assert line and "image-report" in line[0] and "image-class" in line[0]


# -- the pair-type sampler --------------------------------------------------------------------------
def test_pair_types_are_drawn_in_proportion_to_their_data_size():
    assert pair_type_probabilities({"image-report": 3, "image-class": 1}) == {"image-report": 0.75,
                                                                              "image-class": 0.25}
    with pytest.raises(ValueError, match="no pairs"):
        pair_type_probabilities({"image-report": 0})
    # 6 samples: 4 with a report and labels, 2 with labels and boxes → 4 report, 6 class, 2 segment pairs
    supported = [["image-report", "image-class"]] * 4 + [["image-class", "image-segment"]] * 2
    want = pair_type_probabilities({"image-report": 4, "image-class": 6, "image-segment": 2})
    rng = np.random.default_rng(0)
    counts, per_pair = {}, {}
    for _ in range(4000):
        pairs = sample_pairs(supported, 3, rng)
        assert len(set(pairs)) == 3  # without replacement within a batch
        for p in pairs:
            counts[p[1]] = counts.get(p[1], 0) + 1
            per_pair[p] = per_pair.get(p, 0) + 1
    total = sum(counts.values())
    for k, v in want.items():
        assert abs(counts[k] / total - v) < 0.02
    # every pair about equally likely (Algorithm 1: all samples about the same chance)
    assert len(per_pair) == 12 and max(per_pair.values()) / min(per_pair.values()) < 1.15
    assert sample_pairs([], 4, rng) == [] and len(sample_pairs([["image-only"]] * 2, 5, rng)) == 2


# -- the EMA teacher --------------------------------------------------------------------------------
def test_the_teacher_is_an_ema_of_the_student(model):
    import copy

    student = copy.deepcopy(model)
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    s = dict(student.named_parameters())
    for k, v in teacher.named_parameters():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * s[k])
    assert torch.equal(teacher.word_embeddings, model.word_embeddings)  # a buffer: not averaged


def test_class_prompts_and_pair_types_of_a_batch():
    from raycxr.methods.umif import class_prompt, pair_types_of

    names = ["Edema", "Nodule", "Mass"]
    assert class_prompt(names, torch.tensor([1.0, 0, 1]), torch.ones(3)) == "Chest X-ray showing Edema and Mass."
    assert class_prompt(names, torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 1])).startswith("Chest X-ray with none")
    batch = {"image": torch.zeros(3, 1, 4, 4), "report": ["a report", "", ""],
             "targets": torch.zeros(3, 3), "target_mask": torch.tensor([[1.0, 1, 1], [0, 0, 0], [0, 0, 0]]),
             "has_annotation": torch.tensor([False, True, False])}
    assert pair_types_of(batch) == [["image-report", "image-class"], ["image-segment"], ["image-only"]]
    assert pair_types_of(batch, segment=False)[1] == ["image-only"]


def test_the_config_section_and_its_ranges():
    c = compose("pretrain", ["method=umif"])
    assert c.umif.p == 0.2 and c.umif.teacher is True and c.umif.vit == "vit_tiny_patch16_224"
    with pytest.raises(ValueError, match="umif.tau"):
        compose("pretrain", ["method=umif", "umif.tau=0"])
    with pytest.raises(ValueError, match="umif"):
        compose("pretrain", ["method=umif", "+umif.bogus=1"])


# -- through the runners ----------------------------------------------------------------------------
UMIF_SMALL = ["image_size=64", "batch_size=8", "max_steps_per_epoch=2", "text.max_length=16", "threads=2",
              "probe_size=12", "val.limit=8", "val.split=train", "method=umif", "umif.lr=1e-3"]


@pytest.fixture(scope="module")
def umif_run(small_corpus, tmp_path_factory):
    """A tiny UmiF run on three sites, one of them with a report on every image (image-report pairs)."""
    import yaml

    from raycxr.manifest import Manifest
    from raycxr.train.local import run_pretrain

    tmp = tmp_path_factory.mktemp("umif")
    d = tmp / "sites"
    d.mkdir()
    m = Manifest.read(small_corpus / "nih" / "manifest.parquet")
    df = m.to_pandas()
    df["report"] = [("Small right pleural effusion." if i % 2 else "Clear lungs, no acute finding.")
                    for i in range(len(df))]
    Manifest.from_records(df.to_dict("records"), m.label_names, m.site_meta).write(tmp / "nih.parquet")
    (d / "nih.yaml").write_text(yaml.safe_dump({"name": "nih", "adapter": "manifest", "root": str(small_corpus / "nih"),
                                                "manifest": str(tmp / "nih.parquet")}))
    for n in ("vindr", "siim"):
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": str(small_corpus / n)}))
    sites = [f"sites.sites_dir={d}"]
    res = run_pretrain(compose("pretrain", [*UMIF_SMALL, *sites, f"out={tmp / 'run'}", "umif.epochs=4",
                                                 "umif.p_end=0.8"]))
    return tmp / "run", res, sites


def test_umif_trains_through_the_local_runner_and_the_probe_loss_falls(umif_run):
    import json

    run, res, _ = umif_run
    h = res["history"]
    assert [r["epoch"] for r in h] == [0, 1, 2, 3] and all(r["steps"] == 2 for r in h)
    assert all(np.isfinite(r["loss"]) and "align" in r and "con" in r for r in h)
    # the r schedule: P(r = 1) from p = 0.2 at the first of 8 steps to p_end = 0.8 at the last
    assert [round(r["p"], 4) for r in h] == pytest.approx([0.2 + 0.6 * (2 * e + 0.5) / 7 for e in range(4)], abs=1e-4)
    kinds = {k for r in h for k in r if k.startswith("pairs_")}
    assert {"pairs_image_report", "pairs_image_class", "pairs_image_segment"} <= kinds  # a batch mixes types
    curve = [json.loads(line)["probe_align"] for line in open(run / "metrics.jsonl")]
    assert len(curve) == 5 and curve[-1] < curve[0]
    assert all(r.get("val_auc") is not None for r in h)  # the prompt head is scored after each unit


def test_a_umif_run_is_the_image_only_vit_with_a_prompt_head(umif_run):
    from raycxr.checkpoint import Checkpoint
    from raycxr.methods import load_pretrained

    run, _, _ = umif_run
    ck = Checkpoint.load(run)
    assert ck.method == "umif" and ck.config["encoder"]["name"] == "vit_tiny_patch16_224" and "teacher" in ck.modules
    pre = load_pretrained(run)
    x = torch.rand(3, 1, 64, 64)
    p = pre.classifier(x)
    assert p.shape == (3, len(pre.class_names)) and ((p > 0) & (p < 1)).all()
    assert pre.embedding_model(x).shape == (3, 192)
    assert pre.zero_shot_classifier(["Pneumothorax", "Edema"])(x).shape == (3, 2)


def test_a_umif_run_exports_to_onnx_with_parity(umif_run, tmp_path):
    from raycxr.export import export_onnx

    run, _, sites = umif_run
    result = export_onnx(compose("export", [f"run={run}", f"out={tmp_path / 'export'}", "parity.batch=3",
                                            "threads=2", *sites]))
    assert (tmp_path / "export" / "classifier.onnx").is_file() and (tmp_path / "export" / "encoder.onnx").is_file()
    for kind in ("classifier", "encoder"):
        assert result["parity"][kind]["max_abs_diff"] <= 1e-4
    meta = result["metadata"]["classifier"]
    assert meta["method"] == "umif" and meta["encoder"] == "vit_tiny_patch16_224" and meta["input_size"] == "64"
    # the hospital runtime scores a site's image as the PyTorch classifier does
    from raycxr.methods import load_pretrained
    from raycxr.readers import read_image, resize
    from raycxr_runtime.inference import Predictor
    from raycxr_runtime.model import Model

    pre = load_pretrained(run)
    path = sorted((small_corpus_root(sites) / "nih").rglob("*.dcm"))[0]
    got = Predictor(Model(tmp_path / "export" / "classifier.onnx", threads=2), force=True).predict_file(str(path))
    assert got.status == "scored"
    with torch.no_grad():
        want = pre.classifier(torch.from_numpy(resize(read_image(path), 64))[None, None]).numpy()[0]
    assert np.abs(np.array([got.probabilities[c] for c in pre.class_names]) - want).max() <= 1e-4


def small_corpus_root(sites):
    from pathlib import Path

    import yaml

    d = Path(sites[0].split("=", 1)[1])
    return Path(yaml.safe_load((d / "vindr.yaml").read_text())["root"]).parent


@pytest.mark.ray
def test_umif_trains_through_the_ray_runner_with_masks_rendered_in_the_site_actors(umif_run, tmp_path):
    import ray

    from raycxr.methods import load_pretrained
    from raycxr.ray.runner import run_pretrain_ray

    _, _, sites = umif_run
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    try:
        res = run_pretrain_ray(compose("pretrain", [
            *UMIF_SMALL, *sites, "runner=ray", "site_names=[nih,siim]", "umif.epochs=1", "val.enabled=false",
            f"out={tmp_path / 'run'}", f"ray.storage_path={tmp_path / 'store'}", "ray.run_name=t-umif"]))
    finally:
        ray.shutdown()
    h = res["history"]
    assert len(h) == 1 and h[0]["steps"] == 2 and np.isfinite(h[0]["loss"])
    assert h[0].get("pairs_image_segment", 0) > 0 and h[0].get("pairs_image_report", 0) > 0
    assert load_pretrained(tmp_path / "run").method == "umif"


# -- UmiF's own evaluation --------------------------------------------------------------------------
def test_recall_at_k_by_hand():
    from raycxr.eval.retrieval import recall_at_k

    img = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = t([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    # image→text: image 0's best is text 1 (cos 1) then its own text 0 → rank 2; image 1's own text 1 is
    # last (cos 0) → rank 3; image 2: own text 2 (cos 1) first → rank 1
    # text→image: text 0 → image 0 (cos .995) first; text 1 → image 0 (cos 1) beats image 1 (cos 0): rank 3;
    # text 2 → image 2 first
    r = recall_at_k(img, txt, ks=(1, 2, 3))
    assert r["image_to_text_r@1"] == pytest.approx(1 / 3) and r["image_to_text_r@2"] == pytest.approx(2 / 3)
    assert r["image_to_text_r@3"] == 1.0
    assert r["text_to_image_r@1"] == pytest.approx(2 / 3) and r["text_to_image_r@2"] == pytest.approx(2 / 3)
    same = recall_at_k(torch.ones(4, 2), torch.ones(4, 2), ks=(1,))  # ties count against the partner
    assert same["image_to_text_r@1"] == 0.0


def test_raycxr_eval_gives_umif_retrieval_and_the_linear_probe(umif_run, tmp_path):
    from raycxr.eval.evaluate import run_eval

    run, _, sites = umif_run
    res = run_eval(compose("eval", [f"run={run}", f"out={tmp_path}", *sites, "split=train", "limit=12",
                                    "bootstrap=0", "min_positives=1", "fine_tune.enabled=false",
                                    "linear_probe.sites=[nih]", "linear_probe.random_baseline=false", "threads=2",
                                    "segmentation.fractions=[0.1,1.0]", "segmentation.overrides=['epochs=1',"
                                    "'max_steps_per_epoch=1','image_size=64','batch_size=4','n_test_limit=4',"
                                    "'n_figure=1']"]))
    # frozen-backbone segmentation at each share, the run's encoder beside random init (auto: a UmiF run)
    seg = res["segmentation_frozen"]
    assert list(seg) == ["10%", "100%"]
    for share in seg.values():
        assert {(r["task"], r["init"]) for r in share["rows"]} == {(t, i) for t in ("lungs", "pneumothorax")
                                                                   for i in ("pretrained", "random")}
        assert share["settings"]["freeze_encoder"] is True
    n = {k: {r["task"]: r["n_train"] for r in v["rows"]} for k, v in seg.items()}
    assert all(n["10%"][t] == max(1, round(0.1 * n["100%"][t])) < n["100%"][t] for t in n["100%"])
    assert "Segmentation, backbone frozen" in (tmp_path / "report.md").read_text()
    assert "Image-report retrieval" in (tmp_path / "report.md").read_text()
    r = res["retrieval"]["nih"]
    assert r["n_pairs"] == 12 and r["distinct_reports"] == 2
    assert all(0.0 <= r[f"{d}_r@{k}"] <= 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    assert r["image_to_text_r@10"] >= r["image_to_text_r@5"] >= r["image_to_text_r@1"]
    assert "note" in res["retrieval"]["siim"]  # no reports at siim: said, not scored
    assert res["linear_probe"]["nih"]["mean"]["auc"] is not None
    assert res["sites"]["nih"]["metrics"]["mean"]  # the prompt-head classifier scored too


def test_frozen_backbone_segmentation_of_a_umif_run_at_a_fraction_of_the_data(umif_run, tmp_path):
    from raycxr.eval.segmentation import run_segmentation
    from raycxr.models.segmentation import SegmentationModel

    run, _, sites = umif_run
    common = [f"run={run}", *sites, "tasks.lungs=[siim]", "tasks.pneumothorax=null", "inits=[pretrained]",
              "image_size=64", "epochs=1", "max_steps_per_epoch=2", "batch_size=4", "n_test_limit=4", "n_figure=1",
              "threads=2", "freeze_encoder=true"]
    full = run_segmentation(compose("segment", [*common, f"out={tmp_path / 'full'}"]))["rows"][0]
    tenth = run_segmentation(compose("segment", [*common, "train_fraction=0.1",
                                                 f"out={tmp_path / 'tenth'}"]))["rows"][0]
    assert tenth["n_train"] == max(1, round(0.1 * full["n_train"])) < full["n_train"]
    assert full["encoder_tensors_loaded"] == 150 and 0.0 <= full["dice_mean"] <= 1.0  # every ViT tensor from the run
    # the frozen ViT stays the run's; only the pyramid and the decoder train
    m = SegmentationModel.from_run(run, 1, freeze_encoder=True)
    assert not any(p.requires_grad for p in m.encoder.parameters())
    assert all(p.requires_grad for p in m.pyramid.parameters()) and m(torch.rand(2, 1, 64, 64)).shape == (2, 1, 64, 64)
