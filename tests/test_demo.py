"""``raycxr demo`` end to end on a tiny corpus: synthesise, register, report, pretrain, evaluate, export."""

import json

from raycxr.cli import main


def _list(key: str, *items: str) -> str:
    return f"{key}=[" + ",".join(f"'{i}'" for i in items) + "]"


def test_demo_end_to_end(tmp_path, capsys):
    data, sites = tmp_path / "data", tmp_path / "sites"
    rc = main(["demo", f"sites.data_root={data}", f"sites.sites_dir={sites}", f"out={tmp_path / 'report'}",
               f"run={tmp_path / 'run'}", "synth.n_per_site=24", "synth.render_size=96", "synth.preview=false",
               "synth.sites=[nih,siim,openi]",
               _list("pretrain.overrides", "image_size=48", "batch_size=8", "max_steps_per_epoch=2",
                     "unichest.conquer_epochs=2", "unichest.divide_epochs=1", "probe_size=0", "encoder.embed_dim=32",
                     "unichest.query.ffn=64", "site_names=[nih,siim]", "val.split=train"),
               _list("eval.overrides", "bootstrap=20", "fine_tune.sites=[openi]", "linear_probe.sites=[openi]",
                     "fine_tune.max_steps=2", "fine_tune.fractions=[0.1,1.0]", "attention.n=2")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[6/6] exporting" in out and "parity" in out
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m["stage"] for m in metrics if m.get("position", -1) >= 0] == ["conquer", "conquer", "divide"]
    assert all(m.get("val_auc") is not None for m in metrics if m.get("position", -1) >= 0)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["sites"]["openi"]["ood"] and not results["sites"]["nih"]["ood"]
    assert set(results["fine_tune"]["openi"]) == {"10%", "100%", "probe_then_ft"}
    assert (run / "eval" / "report.md").is_file()
    assert (run / "export" / "classifier.onnx").is_file() and (run / "export" / "encoder.onnx").is_file()
    # evaluation and export used the epoch with the best val AUC across both stages, and the summary says which
    assert "best epoch (eval, export)" in out
    assert results["model"]["checkpoint"] == str(run / "best.pt")
    assert json.loads((run / "export" / "export.json").read_text())["checkpoint"] == str(run / "best.pt")
