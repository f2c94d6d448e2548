"""CPU smoke runs of every method from the config, on the small synthetic corpus."""

import time

import pytest
import torch
from omegaconf import OmegaConf

from raycxr.checkpoint import Checkpoint
from raycxr.config import compose
from raycxr.methods import load_pretrained
from raycxr.train.local import DataWait, EpochLoader, run_pretrain

SMALL = ["image_size=64", "batch_size=8", "encoder.embed_dim=32", "ark.proj_dim=32",
         "unichest.query={n_layers: 2, n_heads: 2, ffn: 64, dropout: 0.0, lambda_local: 1.0, lambda_global: 0.4}",
         "text.max_length=32", "threads=2"]


def cfg(small_sites, out, *extra):
    return compose("pretrain", [*SMALL, *small_sites, f"out={out}", *extra])


def test_unichest_conquer_then_divide_loss_falls_and_restores(small_sites, tmp_path):
    # 24 images per site leave too few val images for an AUC: validation scores the train split here
    res = run_pretrain(cfg(small_sites, tmp_path / "a", "unichest.conquer_epochs=4", "unichest.divide_epochs=1",
                           "unichest.lr=1e-3", "val.split=train"))
    h = res["history"]
    assert [r["stage"] for r in h] == ["conquer"] * 4 + ["divide"]
    # conquer learns: the loss on a fixed, un-augmented probe set falls (metrics.jsonl holds the curve)
    import json

    curve = [json.loads(line)["probe_asl"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert curve[4] < curve[0]
    assert "scl" in h[4] and "scl" not in h[0]
    assert (tmp_path / "a" / "conquer.pt").exists() and (tmp_path / "a" / "metrics.jsonl").exists()
    # conquer.pt is the conquer epoch with the best val AUC, and divide started from it
    val = [r["val_auc"] for r in h]
    assert all(v is not None for v in val)
    assert Checkpoint.load(tmp_path / "a" / "conquer.pt").val_auc == max(val[:4])
    # best.pt, what eval and export use, is the best unit across both stages, and the summary says which
    at = val.index(max(val))
    assert Checkpoint.load(tmp_path / "a", best=True).val_auc == max(val) and res["best"]["position"] == at
    assert (res["best"]["stage"], res["best"]["epoch"]) == (h[at]["stage"], h[at]["epoch"])
    # divide kept the conquer encoder exactly (frozen, BatchNorm statistics included)
    conquer, final = Checkpoint.load(tmp_path / "a" / "conquer.pt"), Checkpoint.load(tmp_path / "a")
    c_enc, f_enc = conquer.encoder_state(), final.encoder_state()
    assert all(torch.equal(c_enc[k], f_enc[k]) for k in c_enc)

    # a run stopped after conquer continues into divide from its checkpoint
    run_pretrain(cfg(small_sites, tmp_path / "b", "unichest.conquer_epochs=1", "unichest.divide_epochs=0"))
    res_b = run_pretrain(cfg(small_sites, tmp_path / "b", "unichest.conquer_epochs=1", "unichest.divide_epochs=1",
                             f"resume={tmp_path / 'b'}"))
    assert [r["stage"] for r in res_b["history"]] == ["conquer", "divide"]
    b = Checkpoint.load(tmp_path / "b")
    assert b.position == 2 and b.meta["stage"] == "divide"
    with pytest.raises(ValueError, match="cannot resume"):
        run_pretrain(cfg(small_sites, tmp_path / "c", "method=ark", f"resume={tmp_path / 'b'}"))


def test_ark_rounds_ema_and_a_site_joining(small_sites, tmp_path):
    res = run_pretrain(cfg(small_sites, tmp_path / "ark", "method=ark", "ark.rounds=2", "site_names=[nih,vindr]"))
    h = res["history"]
    assert [(r["round"], r["site"]) for r in h] == [(0, "nih"), (0, "vindr"), (1, "nih"), (1, "vindr")]
    assert h[0]["momentum"] == pytest.approx(0.9) and h[0]["consistency_weight"] == 0.0
    assert h[2]["supervised"] < h[0]["supervised"]  # the nih head learns across rounds
    ck = Checkpoint.load(tmp_path / "ark")
    t_enc = {k: v for k, v in ck.modules["teacher"].items() if k.startswith("encoder.backbone.conv1")}
    s_enc = {k: v for k, v in ck.modules["model"].items() if k.startswith("encoder.backbone.conv1")}
    assert not all(torch.equal(t_enc[k], s_enc[k]) for k in t_enc)  # EMA teacher lags the student
    # resume with one more site: it gets a fresh head; the others keep theirs
    res2 = run_pretrain(cfg(small_sites, tmp_path / "ark", "method=ark", "ark.rounds=3", f"resume={tmp_path / 'ark'}"))
    assert [(r["round"], r["site"]) for r in res2["history"]][-3:] == [(2, "nih"), (2, "vindr"), (2, "siim")]
    ck2 = Checkpoint.load(tmp_path / "ark")
    assert ck2.meta["site_classes"] == {"nih": 14, "vindr": 14, "siim": 1}
    # the run as a classifier: every head averaged into the union classes
    pre = load_pretrained(tmp_path / "ark")
    assert "Pneumothorax" in pre.class_names and pre.site_labels["siim"] == ["Pneumothorax"]
    p = pre.classifier(torch.rand(3, 1, 64, 64))
    assert p.shape == (3, len(pre.class_names)) and bool(((p >= 0) & (p <= 1)).all())


@pytest.mark.parametrize("method,extra", [("concurrent", []), ("mixed", []), ("single", ["site_names=[siim]"])])
def test_baselines_run(small_sites, tmp_path, method, extra):
    res = run_pretrain(cfg(small_sites, tmp_path, f"method={method}", "baseline.epochs=2", *extra))
    assert len(res["history"]) == 2 and all(r["loss"] > 0 for r in res["history"])
    # the time spent waiting for batches (decoding, with num_workers=0) is logged per unit, within it
    assert all(0 < r["data_wait_s"] <= r["seconds"] and 0 < r["data_wait_frac"] <= 1 for r in res["history"])
    pre = load_pretrained(tmp_path)
    assert pre.classifier(torch.rand(2, 1, 64, 64)).shape == (2, len(pre.class_names))


def test_logged_val_auc_is_the_saved_models_auc(small_sites, tmp_path):
    """One definition of "the model's prediction": the val AUC logged during training equals the AUC
    of the saved run scored through load_pretrained + predict_site (the evaluation path)."""
    import numpy as np

    from raycxr.engine.metrics import classification_metrics
    from raycxr.eval.predict import predict_site
    from raycxr.train.local import select_sites

    c = cfg(small_sites, tmp_path, "method=mixed", "baseline.epochs=1", "val.split=train")
    res = run_pretrain(c)
    pre = load_pretrained(tmp_path)
    preds = [predict_site(pre.classifier, s, pre.class_names, split="train", image_size=64, progress=False)
             for s in select_sites(c).values()]
    auc = classification_metrics(*(np.concatenate([getattr(p, k) for p in preds]) for k in ("probs", "targets",
                                                                                            "mask")),
                                 pre.class_names)["mean"]["auc"]
    assert res["history"][-1]["val_auc"] == pytest.approx(auc, abs=1e-4)


def test_bad_method_and_sites(small_sites, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        run_pretrain(cfg(small_sites, tmp_path, "method=moco"))
    with pytest.raises(ValueError, match="unknown site"):
        run_pretrain(cfg(small_sites, tmp_path, "site_names=[nope]"))
    with pytest.raises(ValueError, match="exactly one site"):
        run_pretrain(cfg(small_sites, tmp_path, "method=single"))


def test_a_training_loader_measures_the_time_its_trainer_waits():
    class Slow(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            time.sleep(0.05)
            return {"image": torch.zeros(1)}

    wait = DataWait()
    loader = EpochLoader(Slow(), OmegaConf.create({"seed": 0, "batch_size": 2, "num_workers": 0}), wait=wait)
    assert len(list(loader)) == 2 and wait.seconds >= 0.2  # four items of 50 ms, all waited for
    assert wait.take() >= 0.2 and wait.seconds == 0.0  # taken: the next unit starts from zero
    untimed = EpochLoader(Slow(), OmegaConf.create({"seed": 0, "batch_size": 2, "num_workers": 0}))
    assert len(list(untimed)) == 2 and wait.seconds == 0.0  # a loader without one (validation) adds nothing
