"""Methods as plug-ins: the registry, one driver for every method (resume included), and a method added
from outside raycxr (this file) trained through the local and the Ray runner."""

import json
import sys

import pytest
import torch
import yaml

from raycxr.checkpoint import Checkpoint, CheckpointError
from raycxr.config import compose
from raycxr.engine.device import place
from raycxr.methods import Method, Pretrained, Unit, get_method, list_methods, load_pretrained, register_method
from raycxr.methods.baselines import supervised_union_epoch
from raycxr.models.classifiers import Probabilities
from raycxr.models.factory import LinearClassifier, build_encoder
from raycxr.train.local import run_pretrain

SMALL = ["image_size=64", "batch_size=8", "encoder.embed_dim=32", "ark.proj_dim=32", "max_steps_per_epoch=2",
         "unichest.query={n_layers: 1, n_heads: 2, ffn: 64, dropout: 0.0, lambda_local: 1.0, lambda_global: 0.4}",
         "unichest.n_experts=2", "text.max_length=16", "threads=2", "probe_size=0", "val.limit=8"]


@register_method
class TinyMethod(Method):
    """A method defined outside raycxr: a linear head on the union classes, one step per unit."""

    name = "tiny"

    def setup(self, resume):
        self.model = LinearClassifier(build_encoder(self.cfg), len(self.data.union))
        place(self.cfg, self.model)
        self.loader = self.data.union_loader()
        self.optimizer = self.data.distribute(torch.optim.SGD(self.model.parameters(), lr=float(self.section.lr),
                                                                      momentum=0.9))
        if resume is not None:
            self.model.load_state_dict(resume.modules["model"])
        return resume.position if resume is not None else 0

    def units(self):
        return [Unit("step", {"epoch": e}) for e in range(int(self.section.units))]

    def run_unit(self, unit, position):
        return supervised_union_epoch(self.model, self.loader, self.optimizer, max_steps=1)

    def current_classifier(self):
        return Probabilities(self.model), list(self.data.union.names)

    def modules(self):
        return {"model": self.model}

    def meta(self):
        return {"class_names": list(self.data.union.names)}

    @classmethod
    def pretrained(cls, ckpt, cfg):
        names = ckpt.meta["class_names"]
        model = LinearClassifier(build_encoder(cfg, checkpoint=False), len(names))
        model.load_state_dict(ckpt.modules["model"])
        return Pretrained(method=cls.name, classifier=Probabilities(model), encoder=model.encoder, class_names=names,
                          image_size=ckpt.image_size, sites=ckpt.site_names, config=ckpt.config, source=ckpt.source)


TINY = ["method=tiny", "+tiny.lr=0.01", "+tiny.units=1"]  # the method's config section, as overrides


def cfg(small_sites, out, *extra):
    return compose("pretrain", [*SMALL, *small_sites, f"out={out}", *extra])


def test_registry_lists_methods_and_refuses_unknown_and_duplicate_names():
    assert {"unichest", "ark", "concurrent", "mixed", "single", "tiny"} <= set(list_methods())
    assert get_method("tiny") is TinyMethod
    with pytest.raises(ValueError, match=r"unknown method 'moco'; registered: \[.*'ark'.*'unichest'"):
        get_method("moco")

    class Other(TinyMethod):
        name = "ark"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)


def test_a_method_from_a_test_file_trains_through_the_local_runner(small_sites, tmp_path):
    res = run_pretrain(cfg(small_sites, tmp_path, *TINY))
    assert [h["epoch"] for h in res["history"]] == [0] and res["history"][0]["steps"] == 1
    pre = load_pretrained(tmp_path)
    assert pre.method == "tiny" and pre.classifier(torch.rand(2, 1, 64, 64)).shape == (2, len(pre.class_names))


def test_eval_and_export_use_the_best_unit_not_the_last(small_sites, tmp_path, monkeypatch):
    """``best.pt`` is the unit with the best val AUC over the whole schedule (the earliest on a tie): what
    load_pretrained (eval, demo) and export read; ``checkpoint.pt`` stays the latest, for resuming."""
    import raycxr.train.driver as driver

    aucs = iter([0.6, 0.8, 0.7, 0.8])  # a later unit is worse, then one ties with the best
    monkeypatch.setattr(driver, "validation_auc", lambda *a, **k: {"val_auc": next(aucs), "val_images": 8})
    res = run_pretrain(cfg(small_sites, tmp_path, *TINY[:2], "+tiny.units=3"))
    best = Checkpoint.load(tmp_path, best=True)
    assert best.position == 2 and best.val_auc == 0.8 and best.optimizer is None
    assert Checkpoint.load(tmp_path).position == 3
    assert res["best"] == {"val_auc": 0.8, "position": 1, "epoch": 1, "checkpoint": str(tmp_path / "best.pt")}
    assert Checkpoint.find(tmp_path, best=True) == tmp_path / "best.pt"  # what `raycxr export` reads
    assert load_pretrained(tmp_path).source == str(tmp_path / "best.pt")
    latest = Checkpoint.load(tmp_path).modules["model"]["head.weight"]
    assert not torch.equal(best.modules["model"]["head.weight"], latest)
    # resumed: the earlier units still count, and a tie keeps the earlier unit
    res = run_pretrain(cfg(small_sites, tmp_path, *TINY[:2], "+tiny.units=4", f"resume={tmp_path}"))
    assert Checkpoint.load(tmp_path, best=True).position == 2 and res["best"]["position"] == 1
    # a fresh run in the same folder without validation leaves no stale best.pt: eval reads checkpoint.pt
    res = run_pretrain(cfg(small_sites, tmp_path, *TINY, "val.enabled=false"))
    assert res["best"] is None and not (tmp_path / "best.pt").exists()
    assert load_pretrained(tmp_path).source == str(tmp_path / "checkpoint.pt")


RESUME = {  # method -> (overrides for a one-unit run, overrides for the same run with two units)
    "unichest": (["unichest.conquer_epochs=1", "unichest.divide_epochs=0"],
                 ["unichest.conquer_epochs=2", "unichest.divide_epochs=0"]),
    "ark": (["ark.rounds=1", "site_names=[nih]"], ["ark.rounds=2", "site_names=[nih]"]),
    "concurrent": (["baseline.epochs=1"], ["baseline.epochs=2"]),
    "mixed": (["baseline.epochs=1"], ["baseline.epochs=2"]),
    "single": (["baseline.epochs=1", "site_names=[siim]"], ["baseline.epochs=2", "site_names=[siim]"]),
    "tiny": (["+tiny.lr=0.01", "+tiny.units=1"], ["+tiny.lr=0.01", "+tiny.units=2"]),
    "selfsup": (["selfsup.epochs=1", "selfsup.objective=mocov2"], ["selfsup.epochs=2", "selfsup.objective=mocov2"]),
    "umif": (["umif.epochs=1"], ["umif.epochs=2"]),
}


@pytest.mark.parametrize("method", sorted(RESUME))
def test_every_method_stops_after_one_unit_and_resumes(small_sites, tmp_path, method):
    one, two = RESUME[method]
    run_pretrain(cfg(small_sites, tmp_path, f"method={method}", *one))
    first = Checkpoint.load(tmp_path)
    assert first.position == 1 and first.optimizer is not None
    res = run_pretrain(cfg(small_sites, tmp_path, f"method={method}", *two, f"resume={tmp_path}"))
    last = Checkpoint.load(tmp_path)
    positions = [json.loads(line)["position"] for line in open(tmp_path / "metrics.jsonl")]
    assert [p for p in positions if p >= 0] == [0, 1]  # the first unit was not trained again
    assert [h["position"] for h in res["history"]] == [0, 1] and last.position == 2
    adam = [s for s in last.optimizer["state"].values() if "step" in s]
    if adam:  # AdamW's step count continued from the checkpoint instead of restarting at 0
        steps = sum(h["steps"] for h in res["history"])
        assert max(float(s["step"]) for s in adam) == steps
    else:  # SGD (Ark, tiny): the momentum buffers travelled with the checkpoint
        assert first.optimizer["state"] and last.optimizer["state"]


@pytest.mark.parametrize("objective", ["simclr", "vicreg", "clip", "slip"])
def test_label_free_pretraining_trains_the_encoder_with_each_objective(small_corpus, tmp_path, objective):
    import numpy as np

    from raycxr.manifest import Manifest

    # one site with reports: copy siim's manifest with a report on every image
    d = tmp_path / "sites"
    d.mkdir()
    m = Manifest.read(small_corpus / "siim" / "manifest.parquet")
    df = m.to_pandas()
    df["report"] = [f"finding number {i} in the right lung." for i in range(len(df))]
    Manifest.from_records(df.to_dict("records"), m.label_names, m.site_meta).write(tmp_path / "m.parquet")
    (d / "siim.yaml").write_text(yaml.safe_dump({"name": "siim", "adapter": "manifest",
                                                 "root": str(small_corpus / "siim"),
                                                 "manifest": str(tmp_path / "m.parquet")}))
    c = compose("pretrain", [*SMALL, f"sites.sites_dir={d}", f"out={tmp_path / 'run'}", "method=selfsup",
                             f"selfsup.objective={objective}", "selfsup.epochs=1", "selfsup.proj_dim=16"])
    res = run_pretrain(c)
    assert res["history"][0]["steps"] == 2 and np.isfinite(res["history"][0]["loss"])
    pre = load_pretrained(tmp_path / "run")
    assert pre.classifier is None and pre.embedding_model(torch.rand(2, 1, 64, 64)).shape == (2, 32)
    torch.manual_seed(int(c.seed))
    start = build_encoder(c, checkpoint=False)  # the same seed's untrained encoder: training moved it
    assert not torch.equal(start.backbone.conv1.weight, pre.encoder.backbone.conv1.weight)


def test_sites_added_on_resume_get_fresh_heads_for_heads_methods(small_sites, tmp_path):
    for method in ("concurrent", "mixed"):
        out = tmp_path / method
        run_pretrain(cfg(small_sites, out, f"method={method}", "baseline.epochs=1", "site_names=[nih]"))
        before = Checkpoint.load(out)
        run_pretrain(cfg(small_sites, out, f"method={method}", "baseline.epochs=2", "site_names=[nih,vindr]",
                         f"resume={out}"))
        after = Checkpoint.load(out)
        if method == "concurrent":
            assert after.meta["site_classes"] == {"nih": 14, "vindr": 14}
        else:  # the union head grew fresh rows for vindr's own classes; nih's rows were kept by name
            old, new = before.meta["class_names"], after.meta["class_names"]
            assert new[:len(old)] == old and "Aortic Enlargement" in new and len(new) > len(old)
            w0, w1 = before.modules["model"]["head.weight"], after.modules["model"]["head.weight"]
            assert w1.shape[0] == len(new) and not torch.equal(w0, w1[:len(old)])  # kept rows trained on
        assert load_pretrained(out).classifier(torch.rand(1, 1, 64, 64)).shape[1] >= 14


def test_site_head_settings_are_honoured_and_unknown_keys_refused(small_corpus, tmp_path):
    from raycxr.sites.config import SiteConfig, SiteConfigError

    d = tmp_path / "sites"
    d.mkdir()
    (d / "nih.yaml").write_text(yaml.safe_dump({"name": "nih", "adapter": "manifest", "root": "nih",
                                                "head": {"kind": "mlp", "hidden": 24}}))
    c = compose("pretrain", [*SMALL, f"sites.sites_dir={d}", f"sites.data_root={small_corpus}",
                             f"out={tmp_path / 'run'}", "method=ark", "ark.rounds=1"])
    run_pretrain(c)
    ck = Checkpoint.load(tmp_path / "run")
    assert ck.meta["head_specs"]["nih"] == {"n_classes": 14, "kind": "mlp", "hidden": 24}
    assert ck.modules["model"]["heads.nih.0.weight"].shape == (24, 32)  # Linear(proj 32 -> hidden 24) first
    assert load_pretrained(tmp_path / "run").classifier(torch.rand(1, 1, 64, 64)).shape == (1, 14)
    for bad, msg in [({"expert": {"layers": 4}}, "'expert' is not a site setting"),
                     ({"head": {"kind": "conv"}}, "head.kind 'conv'"),
                     ({"head": {"kind": "linear", "hidden": 8}}, "only for head: {kind: mlp}"),
                     ({"head": {"kind": "mlp", "hiddden": 8}}, "head: unknown keys")]:
        with pytest.raises(SiteConfigError, match=msg):
            SiteConfig.from_dict({"name": "x", "adapter": "manifest", "root": "x", **bad}, source="x.yaml")


def test_a_method_refuses_a_site_objective_it_cannot_train(small_corpus, tmp_path):
    d = tmp_path / "sites"
    d.mkdir()
    (d / "nih.yaml").write_text(yaml.safe_dump({"name": "nih", "adapter": "manifest", "root": "nih"}))
    (d / "siim.yaml").write_text(yaml.safe_dump({"name": "siim", "adapter": "manifest", "root": "siim",
                                                 "objective": "simclr"}))
    for method in ("unichest", "mixed"):
        c = compose("pretrain", [*SMALL, f"sites.sites_dir={d}", f"sites.data_root={small_corpus}",
                                 f"out={tmp_path / method}", f"method={method}"])
        with pytest.raises(ValueError, match=rf"'{method}' cannot train site objective\(s\) {{'siim': 'simclr'}}"):
            run_pretrain(c)


def test_the_site_actor_keeps_the_sites_own_quarantine_path(small_corpus, tmp_path):
    """The actor gets the site's config object itself, so a custom ``quarantine:`` holds inside it."""
    import shutil

    from raycxr.ray.actor import SiteActorImpl
    from raycxr.sites.config import SiteConfig

    root = tmp_path / "nih"
    shutil.copytree(small_corpus / "nih", root)
    victim = sorted(root.rglob("*.dcm"))[0]
    victim.write_bytes(b"not a dicom")
    site = SiteConfig.from_dict({"name": "nih", "adapter": "manifest", "root": str(root),
                                 "quarantine": str(tmp_path / "elsewhere" / "q.jsonl")})
    actor = SiteActorImpl(site.resolved(), {"size": 32}, 0)
    n = actor.num_items(split=None)
    actor.batch(list(range(n)), split=None)
    lines = (tmp_path / "elsewhere" / "q.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["path"].endswith(victim.name)


def test_checkpoint_errors_name_the_file(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt is empty \(0 bytes\)"):
        Checkpoint.load(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt cannot be read \(truncated"):
        Checkpoint.load(tmp_path)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt is not a raycxr pretraining checkpoint"):
        Checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Checkpoint.load(tmp_path / "missing")


@pytest.mark.ray
def test_a_method_from_a_test_file_trains_through_the_ray_runner(val_sites, tmp_path):
    """The driver looks ``method=tiny`` up and sends the class to the Train workers with the config."""
    import ray
    import ray.cloudpickle

    from raycxr.ray.runner import run_pretrain_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    try:  # a site with a val split, so that the run has a best unit to keep
        res = run_pretrain_ray(compose("pretrain", [
            *SMALL, *TINY, "runner=ray", *val_sites, "site_names=[nih]", f"out={tmp_path / 'run'}",
            f"ray.storage_path={tmp_path / 'store'}", "ray.run_name=t-tiny"]))
    finally:
        ray.shutdown()
    assert [h["epoch"] for h in res["history"]] == [0] and res["history"][0]["steps"] == 1
    # the same driver wrote best.pt in the run folder (rank 0), and evaluation reads it
    assert res["best"]["checkpoint"] == str(tmp_path / "run" / "best.pt")
    assert res["best"]["val_auc"] == res["history"][0]["val_auc"] is not None
    pre = load_pretrained(tmp_path / "run")
    assert pre.method == "tiny" and pre.source == res["best"]["checkpoint"]


def test_the_learning_rate_schedule_by_hand_and_across_a_resume():
    from raycxr.engine.schedule import LRSchedule

    def lrs(opt, n):
        out = []
        for _ in range(n):
            out.append(round(opt.param_groups[0]["lr"], 6))
            opt.step()
        return out

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    LRSchedule(opt, 10, kind="cosine", warmup=0.2, min_lr=0.0)  # 2 warm-up steps, then 8 of cosine
    full = lrs(opt, 10)
    assert full[:3] == [0.5, 1.0, 1.0] and full[6] == pytest.approx(0.5) and full[-1] == pytest.approx(0.038060, 1e-4)
    # a resumed run continues the curve: the same optimiser state, the step count from the checkpoint
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt2.load_state_dict(opt.state_dict())  # carries the peak rate ('initial_lr'), not the last scheduled one
    LRSchedule(opt2, 10, kind="cosine", warmup=0.2, min_lr=0.0, step=6)
    assert lrs(opt2, 4) == pytest.approx(full[6:], abs=1e-6)
    opt3 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    LRSchedule(opt3, 4, kind="constant", warmup=2)
    assert lrs(opt3, 4) == pytest.approx([0.05, 0.1, 0.1, 0.1])


def test_a_resumed_run_continues_the_schedule(small_sites, tmp_path):
    run_pretrain(cfg(small_sites, tmp_path, "method=mixed", "baseline.epochs=1"))
    first = Checkpoint.load(tmp_path)
    run_pretrain(cfg(small_sites, tmp_path, "method=mixed", "baseline.epochs=2",
                     f"resume={tmp_path}"))
    last = Checkpoint.load(tmp_path)
    assert first.meta["lr_step"] == 2 and last.meta["lr_step"] == 4  # max_steps_per_epoch=2 per epoch
