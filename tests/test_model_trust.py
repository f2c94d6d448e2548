"""Model trust (issue 23, item 8): Ed25519 signatures over a model's digests, sane thresholds and
finite outputs at load. Real ONNX graphs (onnx.helper) run by onnxruntime, real keys (cryptography),
the real CLI; a real chest DX from pydicom-data is scored through a signed model."""

import json
import stat

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from pydicom.data import get_testdata_file
from runtime_helpers import tiny_classifier

from raycxr.export import _signing_key, sign_outputs, write_metadata
from raycxr_runtime.cli import main
from raycxr_runtime.model import Model, ModelError
from raycxr_runtime.signing import load_trusted_keys, signature_path

pytest.importorskip("cryptography", reason="model signatures need cryptography (raycxr-runtime[sign])")

CHEST_CR = "RG1_UNCR.dcm"  # pydicom-data: a real CR chest PA


def keypair(tmp_path, name="publisher"):
    assert main(["keygen", "--out", str(tmp_path / f"{name}.pem")]) == 0
    return tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"


def tamper(path):
    """What an attacker with write access does: change the weights, then recompute the unkeyed digests."""
    m = onnx.load(str(path))
    w = m.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * -50.0, w.name))
    meta = {p.key: p.value for p in m.metadata_props}
    onnx.save(m, str(path))
    write_metadata(path, meta, "edited")


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_keygen_writes_a_private_key_only_its_owner_reads_and_refuses_to_overwrite(tmp_path, capsys):
    priv, pub = keypair(tmp_path)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(priv)]) == 2
    assert "already exists" in one_line_error(capsys)


def test_tampered_model_with_recomputed_digests_is_refused_when_a_signature_is_required(tmp_path, capsys):
    priv, pub = keypair(tmp_path)
    model = tiny_classifier(tmp_path / "classifier.onnx", 2, ["A", "B"])
    assert main(["sign", "--key", str(priv), str(model)]) == 0
    sig = json.loads(signature_path(model).read_text())
    assert sig["format"] == "raycxr-signature-v1" and sig["model_version"] == "tiny-1"
    keys = load_trusted_keys([pub])
    ok = Model(model, trusted_keys=keys, require_signature=True)
    assert ok.signature == {"status": "verified", "key_id": keys[0].key_id} and ok.info()["signature"]["status"] \
        == "verified"
    before = ok.predict(np.full((1, 1, 64, 64), 0.5, np.float32))

    tamper(model)
    edited = Model(model)  # the unkeyed digests were recomputed: without a key the edit passes as "verified"
    assert edited.verified and not np.allclose(edited.predict(np.full((1, 1, 64, 64), 0.5, np.float32)), before)
    with pytest.raises(ModelError, match=r"classifier\.onnx: signature check failed: classifier\.onnx\.sig: the "
                                         r"weights/graph changed after signing"):
        Model(model, trusted_keys=keys, require_signature=True)
    with pytest.raises(ModelError, match="signature check failed"):  # a trusted key checks a present signature
        Model(model, trusted_keys=keys)
    capsys.readouterr()
    assert main(["--model", str(model), "--trusted-key", str(pub), "--require-signature", str(model)]) == 2
    err = one_line_error(capsys)
    assert err.startswith("raycxr-infer: model ") and "changed after signing" in err


def test_signed_model_scores_a_real_dx_under_require_signature(tmp_path, capsys):
    priv, pub = keypair(tmp_path)
    model = tiny_classifier(tmp_path / "classifier.onnx", 2, ["A", "B"])
    assert main(["sign", "--key", str(priv), str(model)]) == 0
    out = tmp_path / "r.json"
    cr = get_testdata_file(CHEST_CR)
    if cr is None:
        pytest.skip(f"pydicom-data is not installed ({CHEST_CR})")
    assert main(["--model", str(model), "--trusted-key", str(pub), "--require-signature", cr, "--out", str(out),
                 "-q"]) == 0
    report = json.loads(out.read_text())
    assert report["model"]["signature"]["status"] == "verified"
    assert [r["status"] for r in report["results"]] == ["scored"]


def test_unsigned_foreign_and_forged_signatures_are_refused(tmp_path, capsys):
    priv, pub = keypair(tmp_path)
    other_priv, _ = keypair(tmp_path, "other")
    keys = load_trusted_keys([pub])
    model = tiny_classifier(tmp_path / "m.onnx", 2, ["A", "B"])
    with pytest.raises(ModelError, match=r"m\.onnx: unsigned \(no m\.onnx\.sig\) and a signature is required"):
        Model(model, trusted_keys=keys, require_signature=True)
    assert Model(model, trusted_keys=keys).signature == {"status": "unsigned"}  # allowed unless required
    with pytest.raises(ModelError, match="--require-signature needs the publisher's public key"):
        Model(model, require_signature=True)

    assert main(["sign", "--key", str(other_priv), str(model)]) == 0
    assert Model(model).signature == {"status": "not checked"}
    with pytest.raises(ModelError, match=r"signed by key [0-9a-f]{16}, which is not a trusted key"):
        Model(model, trusted_keys=keys)

    assert main(["sign", "--key", str(priv), str(model)]) == 0
    doc = json.loads(signature_path(model).read_text())
    doc["model_version"] = "tiny-2"  # a forged claim under a genuine signature
    signature_path(model).write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="the signature does not verify"):
        Model(model, trusted_keys=keys)
    signature_path(model).write_text("{not json")
    with pytest.raises(ModelError, match="malformed signature file"):
        Model(model, trusted_keys=keys)

    capsys.readouterr()
    assert main(["--model", str(model), "--trusted-key", str(priv), str(model)]) == 2
    assert "is a private key; give the runtime the public key" in one_line_error(capsys)
    assert main(["sign", "--key", str(pub), str(model)]) == 2
    assert "not a usable PEM private key" in one_line_error(capsys)


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, float("inf")])
def test_thresholds_not_finite_or_outside_0_1_are_refused(tmp_path, bad, capsys):
    model = tiny_classifier(tmp_path / "t.onnx", 2, ["A", "B"], thresholds=[0.5, bad])
    with pytest.raises(ModelError, match=r"t\.onnx: raycxr\.thresholds must be finite and within \[0, 1\]: B="):
        Model(model)
    capsys.readouterr()
    assert main(["--model", str(model), str(model)]) == 2
    assert "thresholds must be finite" in one_line_error(capsys)


def test_a_model_with_non_finite_or_non_probability_outputs_is_refused_at_load(tmp_path, capsys):
    with pytest.raises(ModelError, match=r"nan\.onnx: output 'probabilities' is not finite \(NaN or inf\) on a "
                                         "probe image"):
        Model(tiny_classifier(tmp_path / "nan.onnx", 2, ["A", "B"], expr="nan"))
    with pytest.raises(ModelError, match=r"inf\.onnx: output 'probabilities' is not finite"):
        Model(tiny_classifier(tmp_path / "inf.onnx", 2, ["A", "B"], weight=np.inf))
    with pytest.raises(ModelError, match=r"outside \[0, 1\] on a probe image .*not probabilities"):
        Model(tiny_classifier(tmp_path / "logit.onnx", 2, ["A", "B"], expr="logit"))
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "nan.onnx"), str(tmp_path / "nan.onnx")]) == 2
    assert "is not finite" in one_line_error(capsys)
    assert main(["sign", "--key", str(keypair(tmp_path)[0]), str(tmp_path / "nan.onnx")]) == 2  # never signed
    assert not signature_path(tmp_path / "nan.onnx").exists()


def test_exporter_signs_every_onnx_file_and_the_bundle_copy(tmp_path):
    priv, pub = keypair(tmp_path)
    out = tmp_path / "export"
    (out / "bundle" / "models").mkdir(parents=True)
    tiny_classifier(out / "classifier.onnx", 2, ["A", "B"])
    (out / "bundle" / "models" / "model.onnx").write_bytes((out / "classifier.onnx").read_bytes())
    signed = sign_outputs(out, _signing_key(str(priv)))
    assert signed == {"classifier.onnx": "classifier.onnx.sig", "bundle/models/model.onnx":
                      "bundle/models/model.onnx.sig"}
    keys = load_trusted_keys([pub])
    for f in signed:
        assert Model(out / f, trusted_keys=keys, require_signature=True).signature["status"] == "verified"
    with pytest.raises(ValueError, match=r"sign_key: .*nope\.pem: cannot read the key"):
        _signing_key(str(tmp_path / "nope.pem"))
