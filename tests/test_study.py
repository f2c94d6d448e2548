"""raycxr study end to end on a tiny corpus: two rows, one seed, a few steps; cached cells and resume
(``runner=ray`` on a multi-node cluster: tests/test_cluster.py)."""

import json
from pathlib import Path

import pytest
import torch

from raycxr.config import compose
from raycxr.study import run_study


def tiny(out, data, **extra):
    cfg = compose("study", [f"out={out}", f"sites.data_root={data}", "corpus.preset=null", "target=chexpert",
                            "include_registered=false", "downstream.epochs=1", "downstream.lp_ft=false",
                            "downstream.zero_shot=false", "budget.steps=2", "budget.steps_per_unit=1",
                            "budget.batch_size=8", "analysis.min_positives=2", "analysis.bootstrap=20",
                            "runner=local", "threads=2"])
    cfg.corpus.overrides = ["n_per_site=40", "render_size=64", "split_fractions=[0.5,0.1,0.4]"]
    cfg.corpus.sites = ["nih", "chexpert"]
    cfg.pretrain_sites = ["nih"]
    cfg.rows = [{"name": "random", "method": None}, {"name": "mixed", "method": "mixed"}]
    cfg.downstream.seeds = [0]
    cfg.downstream.fractions = [1.0]
    cfg.pretrain = ["image_size=64", "probe_size=0", "encoder.embed_dim=32"]
    for k, v in extra.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = tiny(root / "s", root / "data")
    return cfg, run_study(cfg)


def test_a_tiny_study_runs_every_cell_and_writes_its_report(study):
    cfg, res = study
    out = Path(cfg.out)
    keys = sorted(json.loads(p.read_text())["key"] for p in (out / "cells").rglob("cell.json"))
    assert keys == ["embed/mixed", "embed/random", "ft/mixed/1/0", "ft/random/1/0", "lp/mixed/1/0", "lp/random/1/0",
                    "pretrain/mixed"]
    assert res["pretraining"]["mixed"]["steps"] == 2 and res["pretraining"]["mixed"]["images"] == 16  # the budget
    entry = res["table"]["ft/mixed/1"]
    assert set(entry["sites"]) == {"chexpert", "nih"} and entry["sites"]["chexpert"]["role"] == "ID"
    assert entry["sites"]["nih"]["seen_in_pretraining"] and not res["table"]["ft/random/1"]["sites"]["nih"][
        "seen_in_pretraining"]
    against = [c for c in res["contrasts"] if c["row"] == "mixed" and c["against"] == "random" and c["mode"] == "ft"]
    assert len(against) == 1 and set(against[0]) >= {"id", "ood"}
    names = {c["claim"]: c for c in res["claims"]}
    assert names["Domain-matched pretraining beats random initialisation"]["verdict"] != "not run"
    assert names["Ark with one more source beats Ark without it (Ark-6 > Ark-5)"]["verdict"] == "not run"
    for f in ("report.md", "report.html", "claims.md", "results.json", "per_disease.png", "fractions.png"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "## Claims" in md and "Not estimable" in md
    json.loads((out / "results.json").read_text())  # strict JSON (no NaN)


def test_a_rerun_resumes_from_the_cached_cells_and_a_changed_study_is_refused(study, capsys):
    cfg, _ = study
    out = Path(cfg.out)
    ft = out / "cells" / "ft" / "mixed" / "1" / "0"
    (ft / "cell.json").unlink()  # as if the study had been stopped during this cell
    before = {p: p.stat().st_mtime for p in (out / "cells").rglob("cell.json")}
    run_study(cfg)
    after = {p: p.stat().st_mtime for p in (out / "cells").rglob("cell.json")}
    assert (ft / "cell.json").is_file()
    assert all(after[p] == t for p, t in before.items())  # nothing else ran again
    elsewhere = tiny(cfg.out, cfg.sites.data_root)
    elsewhere.downstream.device = "cpu"  # where cells run is not what they compute: resumed, nothing reruns
    run_study(elsewhere)
    assert {p: p.stat().st_mtime for p in (out / "cells").rglob("cell.json")} == after
    changed = tiny(cfg.out, cfg.sites.data_root)
    changed.budget.steps = 3
    with pytest.raises(ValueError, match=r"started with other settings \(differs in: \['budget'\]\)"):
        run_study(changed)


def test_the_rows_of_a_study_with_ablations_and_registered_methods():
    from raycxr.methods import list_methods
    from raycxr.study.run import _row_overrides, build_rows

    rows = {r.name: r for r in build_rows(compose("study", ["ablations=[umif]"]))}
    assert {"umif_p0", "umif_p05", "umif_p1", "umif_no_segment", "umif_no_teacher"} <= set(rows)
    assert rows["umif"].overrides == () and "umif" in list_methods()  # the default row is still there
    assert "single" not in rows  # skip_methods
    cfg = compose("study", ["ablations=[umif]"])
    sizes = {s: 700 for s in rows["umif_no_teacher"].sites}
    over = _row_overrides(cfg, rows["umif_no_teacher"], sizes)
    assert over[-1] == "umif.teacher=false" and "method=umif" in over
    assert any(o.startswith("umif.epochs=") for o in over)  # the same budget as every row
    plain = {r.name for r in build_rows(compose("study"))}
    assert "umif" in plain and not any(n.startswith("umif_") for n in plain)
    with pytest.raises(ValueError, match="not groups of ablation_rows"):
        build_rows(compose("study", ["ablations=[nope]"]))
    # the groups the claims table reads: Ark and its control at one batch-independent encoder, UniChest's
    # divide from copied experts
    rows = {r.name: r for r in build_rows(compose("study", ["ablations=[batch_independent,expert_init]"]))}
    assert {rows[n].backbone for n in ("random_ln", "ark_ln", "mixed_ln")} == {"convnext"}
    assert rows["ark_ln"].method == "ark" and rows["random_ln"].method is None
    assert rows["unichest_copy"].overrides == ("unichest.expert_init=copy",)
    assert (rows["ark_ln"].control, rows["unichest_copy"].control, rows["ark"].control) == ("random_ln", "unichest",
                                                                                            "random_gn")
    with pytest.raises(ValueError, match=r"control that is not a row of this study: \['a -> nope'\]"):
        build_rows(compose("study", ["rows=[{name: a, method: ark, control: nope}]", "include_registered=false"]))


def test_a_row_is_contrasted_with_its_own_control():
    """Beside random and mixed, a row that names a control (Ark and its untrained encoder) gets a paired
    difference against it; the better row's difference is positive, with an interval."""
    import numpy as np

    from raycxr.study.analysis import contrasts

    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, (200, 2)).astype(np.float32)
    m = np.ones_like(t)
    good = {s: {"chexpert": (t * 0.6 + rng.random(t.shape) * 0.4, t, m)} for s in range(2)}
    poor = {s: {"chexpert": (rng.random(t.shape), t, m)} for s in range(2)}
    preds = {("ft", "ark_ln", 1.0): good, ("ft", "random_ln", 1.0): poor, ("ft", "random", 1.0): good}
    cfg = compose("study", ["analysis.bootstrap=50"])
    sets = {"chexpert": {"diseases": [0, 1]}}
    out = contrasts(cfg, preds, sets, "chexpert", [], {"ark_ln": "random_ln"})
    against = {(c["row"], c["against"]): c for c in out}
    assert set(against) == {("ark_ln", "random"), ("ark_ln", "random_ln"), ("random_ln", "random")}
    c = against[("ark_ln", "random_ln")]["id"]
    assert c["estimable"] and c["estimate"] > 0.2 and c["ci"][0] > 0
    without = {(c["row"], c["against"]) for c in contrasts(cfg, preds, sets, "chexpert", [])}
    assert without == set(against) - {("ark_ln", "random_ln")}  # no control named, no such contrast


def test_two_rows_with_the_same_predictions_are_not_estimable_rather_than_equal():
    """Two rows that ship the same encoder (Ark and Ark without one source, both at their first unit) give
    identical predictions: the claim says so instead of a zero difference with a zero-width interval."""
    import numpy as np

    from raycxr.study.analysis import _fmt, _verdict, contrast

    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, (200, 2)).astype(np.float32)
    m = np.ones_like(t)
    a = {s: {"chexpert": (rng.random(t.shape), t, m)} for s in range(2)}
    same = {s: {"chexpert": (a[s]["chexpert"][0].copy(), t, m)} for s in range(2)}
    other = {s: {"chexpert": (rng.random(t.shape), t, m)} for s in range(2)}
    preds = {("ft", "ark", 1.0): a, ("ft", "ark_minus_one", 1.0): same, ("ft", "x", 1.0): other}
    cfg = compose("study", ["analysis.bootstrap=50"])
    sets = {"chexpert": {"diseases": [0, 1]}}
    c = contrast(preds, [(1.0, ("ft", "ark", 1.0)), (-1.0, ("ft", "ark_minus_one", 1.0))], ["chexpert"], sets, cfg)
    assert c["identical"] and not c["estimable"]
    assert _verdict(c).startswith("not estimable") and "same encoder" in _fmt(c)
    d = contrast(preds, [(1.0, ("ft", "ark", 1.0)), (-1.0, ("ft", "x", 1.0))], ["chexpert"], sets, cfg)
    assert d["estimable"] and not d.get("identical") and d["ci"][0] < d["ci"][1]


def test_the_gpu_preset_is_the_same_protocol_at_224_px_on_a_shared_gpu():
    from raycxr.config import compose_preset
    from raycxr.study.cells import cell_device

    cpu, gpu = compose("study"), compose_preset("study", ["preset=study_gpu", "budget.steps=300"])
    assert "image_size=224" in gpu.pretrain and gpu.corpus.preset == "study_gpu"
    assert gpu.gpus_per_cell > 0 and gpu.runner == "ray"  # Ray hides the GPU from a cell that asks for none
    assert gpu.budget.steps == 300  # the command line wins over the preset
    assert [r["name"] for r in gpu.rows] == [r["name"] for r in cpu.rows]
    assert cpu.downstream.seeds == gpu.downstream.seeds and cpu.downstream.fractions == gpu.downstream.fractions
    assert cell_device({"device": "auto"}).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cell_device({"device": "cpu"}).type == "cpu"


@pytest.mark.parametrize("sizes", [[700, 700, 700, 700], [700], [700, 700, 700], [100, 700, 2000]])
@pytest.mark.parametrize("method", ["mixed", "concurrent", "ark", "unichest", "selfsup", "umif"])
def test_every_method_gets_the_study_budget_whatever_its_sites(method, sizes):
    """200 steps (or the fewest above) for one small site, four, or sites of unequal size. Ark's unit is a
    site-epoch: before the budget counted its sites' sizes, four 700-image sites gave it 85 steps of 200."""
    from raycxr.methods import get_method

    sites = {f"s{i}": n for i, n in enumerate(sizes)}
    base = ["batch_size=32", "max_steps_per_epoch=40", f"method={method}"]
    cls = get_method(method)
    cfg = compose("pretrain", [*base, *cls.step_budget(compose("pretrain", base), 200, sites)])
    cap, batch = int(cfg.max_steps_per_epoch), int(cfg.batch_size)

    def per_pass(n: int) -> int:  # steps of one site-epoch: the loaders drop the last partial batch
        return min(cap, max(1, n // batch))

    if method == "ark":  # rounds of one site-epoch per site, each of the site's own batches
        steps = int(cfg.ark.rounds) * sum(per_pass(n) for n in sizes)
    elif method == "concurrent":  # a step takes one batch from every site; an epoch ends with the shortest
        assert batch * len(sizes) <= 32
        steps = int(cfg.baseline.epochs) * min(per_pass(n) for n in sizes)
    elif method == "unichest":
        steps = (int(cfg.unichest.conquer_epochs) + int(cfg.unichest.divide_epochs)) * per_pass(sum(sizes))
    else:  # epochs over the pooled images
        steps = int(cfg[cls.config_key or cls.name].epochs) * per_pass(sum(sizes))
    assert 200 <= steps < 200 + len(sizes) * int(cfg.get("ark", {}).get("rounds", 1)), steps


def test_a_cell_whose_spec_changed_runs_again(tmp_path):
    """A cached cell is read back only for the spec it ran; threads and the decode cache do not count."""
    from raycxr.study.cells import DONE, is_done, spec_digest

    spec = {"dir": str(tmp_path), "kind": "pretrain", "overrides": ["ark.rounds=1"], "threads": 1, "cache": False}
    assert not is_done(spec)
    (tmp_path / DONE).write_text(json.dumps({"steps": 85, "spec": spec_digest(spec)}))
    assert is_done(spec) and is_done({**spec, "threads": 2, "cache": True})
    assert not is_done({**spec, "overrides": ["ark.rounds=3", "max_steps_per_epoch=17"]})
    (tmp_path / DONE).write_text(json.dumps({"steps": 85}))  # a record from before digests: kept
    assert is_done({**spec, "overrides": ["ark.rounds=3"]})
    (tmp_path / DONE).write_text('{"steps": 8')  # a broken record: named, not a JSON traceback
    with pytest.raises(ValueError, match=r"cell\.json: not a readable study cell record"):
        is_done(spec)
