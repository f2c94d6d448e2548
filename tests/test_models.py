import pytest
import torch

from raycxr.models.ark import ArkModel, make_teacher
from raycxr.models.encoders import ImageEncoder
from raycxr.models.unichest import QueryNetwork, UniChest

Q = dict(n_layers=2, n_heads=2, ffn=64, dropout=0.0)


@pytest.fixture(scope="module")
def unichest():
    torch.manual_seed(0)
    return UniChest(ImageEncoder("resnet18", embed_dim=32), n_experts=4, query=Q)


def test_encoder_outputs_for_cnn_swin_vit():
    for name in ("resnet18", "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"):
        e = ImageEncoder(name, embed_dim=16, img_size=64 if "resnet" not in name else None)
        pooled, tokens = e(torch.rand(2, 1, 64, 64))
        assert pooled.shape == (2, 16) and tokens.shape[0] == 2 and tokens.shape[2] == 16
        assert torch.allclose(pooled, tokens.mean(1))
    with pytest.raises(ValueError, match="unknown timm backbone"):
        ImageEncoder("no_such_net")
    # encoder.patch_size: 8 px patches give a 64 px ViT 64 tokens instead of 16
    assert ImageEncoder("vit_tiny_patch16_224", embed_dim=16, img_size=64)(torch.rand(1, 1, 64, 64))[1].shape[1] == 16
    assert ImageEncoder("vit_tiny_patch16_224", embed_dim=16, img_size=64,
                        patch_size=8)(torch.rand(1, 1, 64, 64))[1].shape[1] == 64
    with pytest.raises(ValueError, match="patch_size is for ViT"):
        ImageEncoder("resnet18", patch_size=8)


def test_conquer_and_divide_outputs_and_gate(unichest):
    x, q = torch.rand(3, 1, 64, 64), torch.randn(5, 32)
    unichest.set_stage("conquer")
    out = unichest(x, q)
    assert out["prob"].shape == (3, 5) and torch.allclose(out["prob"], torch.sigmoid(out["s1"]))
    assert out["attn"].shape == (3, 5, 4)  # 64 px -> 2x2 tokens
    out = unichest(x, q, stage="divide")
    assert out["gate"].shape == (3, 3) and torch.allclose(out["gate"].sum(1), torch.ones(3))
    assert out["scl"].shape == (3, 32)
    mix = sum(out["gate"][:, k:k + 1] * torch.sigmoid(e) for k, e in enumerate(out["experts"]))
    assert torch.allclose(out["prob"], 0.5 * torch.sigmoid(out["s1"]) + 0.5 * mix, atol=1e-6)
    assert ((out["prob"] >= 0) & (out["prob"] <= 1)).all()


def test_divide_freezes_encoder_including_batchnorm(unichest):
    unichest.set_stage("divide")
    unichest.train()
    assert all(not p.requires_grad for p in unichest.encoder.parameters())
    bn = next(m for m in unichest.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    out = unichest(torch.rand(4, 1, 64, 64), torch.randn(5, 32))
    (out["prob"].sum() + out["scl"].sum()).backward()
    assert torch.equal(bn.running_mean, before)
    assert all(p.grad is None for p in unichest.encoder.parameters())
    for qn in unichest.query_networks:
        assert qn.head.weight.grad is not None
    assert unichest.gate.weight.grad is not None and unichest.scl_head.weight.grad is not None
    unichest.set_stage("conquer")
    assert all(p.requires_grad for p in unichest.encoder.parameters())
    with pytest.raises(ValueError):
        unichest.set_stage("rule")


def test_zero_shot_scores_any_class_embedding(unichest):
    x = torch.rand(2, 1, 64, 64)
    seen = torch.randn(4, 32)
    unseen = torch.randn(1, 32)  # e.g. the embedding of "Tuberculosis", a class no site labels
    p = unichest.zero_shot(x, torch.cat([seen, unseen]))
    assert p.shape == (2, 5) and torch.isfinite(p).all()
    assert unichest.training  # mode restored
    # queries interact only through attention: permuting the classes permutes the scores
    perm = torch.tensor([4, 2, 0, 3, 1])
    p2 = unichest.zero_shot(x, torch.cat([seen, unseen])[perm])
    assert torch.allclose(p2, p[:, perm], atol=1e-5)


def test_query_network_text_branch_single_token():
    qn = QueryNetwork(16, **Q).eval()
    logits, attn = qn(torch.randn(3, 1, 16), torch.randn(4, 16))
    assert logits.shape == (3, 4) and torch.allclose(attn, torch.ones_like(attn))


def test_ark_heads_and_teacher():
    torch.manual_seed(0)
    s = ArkModel(ImageEncoder("resnet18"), {"nih": 14, "siim": 1}, proj_dim=32)
    proj, logits = s(torch.rand(2, 1, 64, 64), "siim")
    assert proj.shape == (2, 32) and logits.shape == (2, 1)
    s.add_head("vindr", 14)
    with pytest.raises(ValueError):
        s.add_head("vindr", 14)
    with pytest.raises(KeyError, match="no head for site"):
        s(torch.rand(1, 1, 64, 64), "padchest")
    t = make_teacher(s)
    es, et = s.encoder.state_dict(), t.encoder.state_dict()
    assert all(torch.equal(es[k], et[k]) for k in es)  # same encoder weights
    assert not torch.equal(s.heads["nih"].weight, t.heads["nih"].weight)  # independent heads (as Ark)
    assert not any(p.requires_grad for p in t.parameters())


def test_zero_shot_on_an_unseen_class_name_through_the_text_encoder():
    from raycxr.text import TextEncoder, encode_class_names, text_model_dir

    torch.manual_seed(0)
    model = UniChest(ImageEncoder("resnet18", embed_dim=32), n_experts=3, query=Q)
    text = TextEncoder(text_model_dir("shipped"), embed_dim=32, max_length=16).eval()
    # no site of the demo corpus labels tuberculosis; any prompt works as a query
    names = ["Pneumothorax", "Tuberculosis", "There is a cavitating lesion in the right upper lobe."]
    with torch.no_grad():
        q = encode_class_names(text, names, prompt="{}")
    x = torch.rand(2, 1, 64, 64)
    for stage in ("conquer", "divide"):
        model.set_stage(stage)
        p = model.zero_shot(x, q)
        assert p.shape == (2, 3) and ((p > 0) & (p < 1)).all()
    assert not torch.allclose(p[:, 0], p[:, 1])  # different names give different scores


@pytest.mark.parametrize("share_norm", [False, True])
def test_expert_init_copy_makes_divides_first_forward_equal_conquers_output(share_norm):
    torch.manual_seed(0)
    model = UniChest(ImageEncoder("resnet18", embed_dim=32), n_experts=3, query=Q, share_norm=share_norm).eval()
    for p in model.query_networks[0].parameters():  # a "trained" shared network, unlike the fresh experts
        p.data.add_(0.05 * torch.randn_like(p))
    x, q = torch.rand(2, 1, 64, 64), torch.randn(5, 32)
    with torch.no_grad():
        conquer = model(x, q, stage="conquer")["prob"]
        random_divide = model(x, q, stage="divide")["prob"]
        model.copy_shared_to_experts()
        out = model(x, q, stage="divide")
    assert not torch.allclose(random_divide, conquer, atol=1e-4)  # the authors' switch moves the output
    assert torch.allclose(out["prob"], conquer, atol=1e-6)
    assert torch.allclose(out["gate"], torch.full_like(out["gate"], 0.5))
    assert all(qn.head.weight.data_ptr() != model.query_networks[0].head.weight.data_ptr()
               for qn in model.query_networks[1:])  # copies, not shared parameters: experts can diverge
