"""raycxr study end to end on a tiny corpus: two rows, one seed, a few steps; cached cells and resume."""

import json
from pathlib import Path

import pytest

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
    changed = tiny(cfg.out, cfg.sites.data_root)
    changed.budget.steps = 3
    with pytest.raises(ValueError, match=r"started with other settings \(differs in: \['budget'\]\)"):
        run_study(changed)


@pytest.mark.ray
def test_cells_run_as_ray_tasks(study, tmp_path):
    import ray

    cfg, res = study
    again = tiny(tmp_path / "s", cfg.sites.data_root, runner="ray", cpus_per_cell=1)  # the corpus is reused
    again.ray.num_cpus = 2
    try:
        res2 = run_study(again)
    finally:
        ray.shutdown()
    assert res2["pretraining"]["mixed"]["steps"] == res["pretraining"]["mixed"]["steps"]
    assert sorted(res2["table"]) == sorted(res["table"])


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
