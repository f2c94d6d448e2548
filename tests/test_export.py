"""`raycxr export`: ONNX files with metadata and a dynamic batch, parity that can fail, INT8 AUC.

The run is an untrained UniChest (divide stage, with experts and gate) saved in the exact
checkpoint format `raycxr pretrain` writes, on the small synthetic corpus: training one takes
over a minute on 2 cores and the export does not care whether the weights were learnt.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import untrained_unichest_state

from raycxr.config import compose
from raycxr.export import (
    ParityError,
    check_parity,
    classifier_output_names,
    export_model,
    export_onnx,
    parity_inputs,
    read_metadata,
)
from raycxr.methods import load_pretrained


@pytest.fixture(scope="module")
def exported(small_sites, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    untrained_unichest_state(small_sites).save(run / "checkpoint.pt")
    from raycxr_runtime.signing import generate_key

    generate_key(run / "publisher.pem")
    cfg = compose("export", [f"run={run}", "int8=true", "bundle=true", "parity.batch=5", "threads=2",
                             f"sign_key={run / 'publisher.pem'}", *small_sites])
    result = export_onnx(cfg)
    return run, run / "export", result


def test_export_writes_both_files_with_metadata_and_dynamic_batch(exported):
    run, out, result = exported
    assert {p.name for p in out.iterdir()} >= {"classifier.onnx", "encoder.onnx", "classifier.int8.onnx",
                                               "export.json"}
    pre = load_pretrained(run)
    names = pre.class_names
    meta = read_metadata(out / "classifier.onnx")
    assert meta["kind"] == "classifier" and json.loads(meta["class_names"]) == names
    assert meta["input_size"] == "64" and meta["frontal_only"] == "true" and meta["method"] == "unichest"
    assert json.loads(meta["training_sites"]) == ["nih", "siim", "vindr"] and meta["encoder"] == "resnet18"
    assert meta["model_version"].startswith("unichest-") and len(meta["model_version"]) == len("unichest-") + 12
    assert json.loads(meta["preprocessing"])["value_range"] == [0.0, 1.0]
    assert {"created", "raycxr_version", "thresholds_note", "checkpoint_sha256"} <= set(meta)
    thr = json.loads(meta["thresholds"])
    assert len(thr) == len(names) and all(0.0 <= t <= 1.0 for t in thr)
    # classes without a validation positive get 0.5 and are named in the note (siim has only Pneumothorax)
    summary = result["thresholds_summary"]
    for c, t in zip(names, thr):
        if summary["positives"][c] == 0:
            assert t == 0.5 and c in meta["thresholds_note"]
    enc_meta = read_metadata(out / "encoder.onnx")
    assert enc_meta["kind"] == "encoder" and "thresholds" not in enc_meta and int(enc_meta["embedding_dim"]) == 32

    model = onnx.load(str(out / "classifier.onnx"))
    assert "not a medical device" in model.doc_string
    assert [o.name for o in model.graph.output] == classifier_output_names(names)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 64, 64]
    enc = onnx.load(str(out / "encoder.onnx"))
    assert [o.name for o in enc.graph.output] == ["embedding"]
    assert enc.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    int8_meta = read_metadata(out / "classifier.int8.onnx")
    assert int8_meta["model_version"] == meta["model_version"] + "+int8" and "int8" in int8_meta["quantization"]


def test_parity_figures_and_int8_auc_in_export_json(exported):
    _, out, _ = exported
    report = json.loads((out / "export.json").read_text())
    for kind in ("classifier", "encoder"):
        par = report["parity"][kind]
        assert par["max_abs_diff"] <= 1e-4
        batches = sorted(v["batch"] for v in par["inputs"].values())
        assert batches == [1, 5, 7]  # real test images, and random batches 1 and 7 through the dynamic axis
    names = json.loads(report["metadata"]["classifier"]["class_names"])
    per_output = report["parity"]["classifier"]["inputs"]["test images (batch 5)"]["per_output"]
    assert list(per_output) == classifier_output_names(names)  # one figure per output, per class included
    q = report["int8"]
    assert q["bytes"] < q["fp32_bytes"] and set(q["sites"]) == {"nih", "vindr", "siim"}
    assert all(row["images"] > 0 for row in q["sites"].values())
    measured = [row for row in q["sites"].values() if row["fp32"] is not None]  # AUC needs both classes
    assert measured
    for row in measured:
        assert 0.0 <= row["fp32"] <= 1.0 and 0.0 <= row["int8"] <= 1.0
        assert row["delta"] == pytest.approx(row["int8"] - row["fp32"])


def test_parity_check_fails_when_onnx_and_torch_disagree(exported):
    run, out, _ = exported
    pre = load_pretrained(run)
    inputs = parity_inputs(pre.image_size, None)
    ok = check_parity(pre.classifier, out / "classifier.onnx", inputs)  # the plain classifier is expanded per class
    assert ok["max_abs_diff"] <= 1e-4 and len(ok["inputs"]) == 2
    with torch.no_grad():
        head = pre.classifier.model.query_networks[0].head
        head.weight.add_(0.05 * torch.randn_like(head.weight))
    with pytest.raises(ParityError, match=r"classifier\.onnx: ONNX differs from PyTorch .* output '"):
        check_parity(pre.classifier, out / "classifier.onnx", inputs)
    with torch.no_grad():
        next(pre.encoder.parameters()).mul_(1.5)  # the stem convolution
    with pytest.raises(ParityError, match="encoder.onnx"):
        check_parity(pre.embedding_model, out / "encoder.onnx", inputs)


def test_export_deletes_a_file_that_fails_parity(exported, tmp_path):
    pre = load_pretrained(exported[0])
    with pytest.raises(ParityError, match="tolerance -1"):  # no graph meets a negative tolerance
        export_model(pre, tmp_path, atol=-1.0, progress=False)
    assert not (tmp_path / "classifier.onnx").exists()


def test_export_bad_run_is_one_clear_error(tmp_path, small_sites):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nope.*raycxr pretrain"):
        export_onnx(compose("export", [f"run={tmp_path / 'nope'}", *small_sites]))
    # refused before any work, naming the key and the registered choices
    with pytest.raises(ValueError, match=r"exporter: must be one of \['legacy', 'dynamo'\], got 'magic'"):
        export_onnx(compose("export", [f"run={tmp_path}", "exporter=magic", *small_sites]))


def test_random_inputs_are_batches_of_one_and_seven():
    inputs = parity_inputs(16, np.zeros((3, 1, 16, 16), np.float32))
    assert [x.shape[0] for x in inputs.values()] == [3, 1, 7]
    assert all(x.dtype == np.float32 and x.shape[1:] == (1, 16, 16) for x in inputs.values())


def test_monai_bundle_passes_verify_metadata_offline(exported, tmp_path):
    import shutil
    import subprocess

    from raycxr.bundle import verify_command
    from raycxr_runtime.model import Model

    _, out, result = exported
    bundle = out / "bundle"
    assert result["bundle"] == str(bundle)
    assert {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} == {
        "configs/metadata.json", "models/model.onnx", "models/model.onnx.sig", "docs/README.md"}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    names = json.loads(read_metadata(out / "classifier.onnx")["class_names"])
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [64, 64] and fmt["inputs"]["image"]["num_channels"] == 1
    assert fmt["outputs"]["pred"]["num_channels"] == len(names)
    assert list(fmt["outputs"]["pred"]["channel_def"].values()) == names
    assert {"version", "monai_version", "pytorch_version", "task", "description", "authors", "copyright"} <= set(meta)
    assert Model(bundle / "models" / "model.onnx").verified  # the same file, digests intact
    card = (bundle / "docs" / "README.md").read_text()
    assert "not a medical device" in card.lower()
    assert "**Intended use.**" in card  # the runtime package's model_card.md, shipped as package data
    proc = subprocess.run(verify_command(bundle), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "metadata is verified with no error" in proc.stdout + proc.stderr, \
        proc.stderr[-2000:]
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    del meta["network_data_format"]["inputs"]["image"]["dtype"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    proc = subprocess.run(verify_command(broken), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "dtype" in proc.stdout + proc.stderr  # the check can fail


def test_sign_key_signs_every_exported_file_and_the_bundle_copy(exported, tmp_path):
    from raycxr_runtime.model import Model, ModelError
    from raycxr_runtime.signing import load_trusted_keys

    run, out, result = exported
    files = ["bundle/models/model.onnx", "classifier.int8.onnx", "classifier.onnx", "encoder.onnx"]
    assert result["signatures"] == {f: f + ".sig" for f in files}
    keys = load_trusted_keys([run / "publisher.pub.pem"])
    for f in files:
        assert Model(out / f, trusted_keys=keys, require_signature=True).signature["status"] == "verified"
    # the signature is over this file's digests: the int8 file's signature does not vouch for the float32 one
    (tmp_path / "classifier.onnx").write_bytes((out / "classifier.onnx").read_bytes())
    (tmp_path / "classifier.onnx.sig").write_bytes((out / "classifier.int8.onnx.sig").read_bytes())
    with pytest.raises(ModelError, match="changed after signing"):
        Model(tmp_path / "classifier.onnx", trusted_keys=keys, require_signature=True)
