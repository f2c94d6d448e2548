import pytest
import torch
import yaml

from raycxr.objectives import OBJECTIVES, make_objective


def _batch(n=6, c=3):
    return {"labels": torch.randint(0, 2, (n, c)).float(), "label_mask": torch.ones(n, c)}


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_every_objective_gives_a_finite_loss_with_gradients(kind):
    torch.manual_seed(0)
    obj = make_objective(kind, 16, n_classes=3, text_dim=8)
    f = torch.randn(6, 16, requires_grad=True)
    kw = {"features2": torch.randn(6, 16, requires_grad=True), "key_features": torch.randn(6, 16),
          "text_emb": torch.randn(6, 8, requires_grad=True)}
    loss, terms = obj(f, _batch(), **{k: v for k, v in kw.items() if k in obj.needs})
    assert torch.isfinite(loss) and terms
    loss.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_moco_queue_advances_and_key_projection_is_not_trained():
    obj = make_objective("mocov2", 16, queue_size=8)
    q0 = obj.queue.clone()
    loss, _ = obj(torch.randn(5, 16), {}, key_features=torch.randn(5, 16))
    loss.backward()
    assert int(obj.ptr) == 5 and not torch.equal(obj.queue[:5], q0[:5]) and torch.equal(obj.queue[5:], q0[5:])
    assert all(p.grad is None for p in obj.key_proj.parameters())


def test_objective_errors():
    with pytest.raises(ValueError, match="at least one label"):
        make_objective("supervised", 8, n_classes=0)
    with pytest.raises(ValueError, match="needs a text encoder"):
        make_objective("clip", 8)
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("byol", 8)


def test_ark_with_a_self_supervised_site(small_corpus, tmp_path):
    from raycxr.checkpoint import Checkpoint
    from raycxr.config import compose
    from raycxr.train.local import run_pretrain

    d = tmp_path / "sites"
    d.mkdir()
    (d / "nih.yaml").write_text(yaml.safe_dump({"name": "nih", "adapter": "manifest", "root": "nih"}))
    (d / "siim.yaml").write_text(yaml.safe_dump({"name": "siim", "adapter": "manifest", "root": "siim",
                                                 "objective": "simclr"}))
    cfg = compose("pretrain", ["method=ark", "ark.rounds=1", "image_size=64", "batch_size=8", "ark.proj_dim=32",
                               f"sites.sites_dir={d}", f"sites.data_root={small_corpus}", f"out={tmp_path / 'run'}"])
    res = run_pretrain(cfg)
    assert [r["site"] for r in res["history"]] == ["nih", "siim"]
    ck = Checkpoint.load(tmp_path / "run")
    assert ck.meta["site_objectives"] == {"siim": "simclr"} and "siim" not in ck.meta["site_classes"]
