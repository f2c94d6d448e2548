import hashlib

import numpy as np
import pydicom
import pytest

from raycxr.labels import canonical_name
from raycxr.manifest import Manifest
from raycxr.readers import read_image
from raycxr.sites.tables import source_table
from raycxr.synth.acquisition import PROFILES, SiteProfile, to_stored, write_dicom
from raycxr.synth.generator import SiteSpec, render_one, synthesize


def test_corpus_layout_manifest_and_headers(small_corpus):
    for site in ("nih", "vindr", "siim"):
        m = Manifest.read(small_corpus / site / "manifest.parquet")
        assert len(m) == 24 and m.site == site
        assert m.site_meta["source"] == site
        # labels are the real source's label space
        assert m.label_names == source_table(site).label_names
        assert (small_corpus / site / "preview.png").stat().st_size > 10_000
        df = m.to_pandas()
        for rel, lung in zip(df["path"], df["lung_mask_path"]):
            ds = pydicom.dcmread(small_corpus / site / rel)
            assert ds.BodyPartExamined == "CHEST" and ds.PatientIdentityRemoved == "YES"
            assert ds.PhotometricInterpretation == PROFILES[site].photometric
            assert ds.BitsStored == PROFILES[site].bits_stored
            img = read_image(small_corpus / site / rel)
            assert img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1 and img.std() > 0.05
            assert read_image(small_corpus / site / lung).shape == img.shape  # lung mask aligned
    vindr = pydicom.dcmread(next((small_corpus / "vindr" / "images").glob("*.dcm")))
    assert vindr.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless


def test_deterministic_by_seed(tmp_path, small_corpus):
    synthesize(tmp_path, ["nih"], n_per_site=24, seed=1, render_size=128, workers=1, progress=False)
    a = sorted((small_corpus / "nih" / "images").glob("*.dcm"))
    b = sorted((tmp_path / "nih" / "images").glob("*.dcm"))
    digest = [hashlib.sha1(p.read_bytes()).hexdigest() for p in a]
    assert digest == [hashlib.sha1(p.read_bytes()).hexdigest() for p in b]
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(tmp_path, ["nih"], n_per_site=2, seed=1, render_size=128, workers=1, progress=False)


def test_labels_are_sampled_from_the_real_table(small_corpus):
    m = Manifest.read(small_corpus / "nih" / "manifest.parquet")
    table = source_table("nih").label_matrix()
    rows = {tuple(np.nan_to_num(r, nan=9)) for r in table}
    for r in m.label_matrix():
        assert tuple(np.nan_to_num(r, nan=9)) in rows


def test_siim_pneumothorax_mask_written_for_positives(small_corpus):
    m = Manifest.read(small_corpus / "siim" / "manifest.parquet")
    df = m.to_pandas()
    pos = m.label_matrix()[:, 0] == 1
    assert pos.any()
    for has_mask, p in zip(df["mask_path"].notna(), pos):
        if p:
            assert has_mask
    rel = df["mask_path"][pos].iloc[0]
    assert read_image(small_corpus / "siim" / rel).max() == 1.0


@pytest.mark.parametrize("photometric,bits,window,rescale", [
    ("MONOCHROME1", 14, True, (1.0, -1024.0)), ("MONOCHROME2", 12, True, (2.0, 10.0)),
    ("MONOCHROME2", 8, False, None), ("MONOCHROME1", 12, False, None)])
def test_stored_values_display_back_through_the_reader(tmp_path, photometric, bits, window, rescale):
    """The acquisition chain inverts exactly through the reader's modality/VOI/MONOCHROME1 pipeline."""
    import datetime

    prof = SiteProfile(photometric=photometric, bits_stored=bits, window=window, rescale=rescale,
                       used_range=(0.1, 0.8) if window else (0.0, 1.0))
    v = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    stored, hdr = to_stored(v, prof, np.random.default_rng(0))
    write_dicom(tmp_path / "x.dcm", stored, prof, uid_seed=[0], patient_id="p", sex="F", age=40.0, view="PA",
                study_date=datetime.date(2020, 1, 1), header=hdr)
    back = read_image(tmp_path / "x.dcm")
    assert np.abs(back - v).max() < 2.5 / (2**bits - 1) * (1 / 0.7 if window else 1) + 2e-3


def _render(label_names, labels, seed=0, idx=0, view="PA", tmp=None):
    spec = SiteSpec.parse({"name": "t", "source": "nih"}, 1)
    row = {"labels": labels, "view": view, "sex": "M", "age": 50.0, "patient_id": "p", "image_id": "i",
           "boxes": None, "report": None}
    return render_one({"row": row, "spec": spec, "seed": seed, "idx": idx, "site_index": 0, "render_size": 128,
                       "out": str(tmp), "label_names": label_names})


def test_findings_are_drawn_and_boxed(tmp_path):
    names = ["Cardiomegaly", "Effusion", "Nodule", "Pneumothorax", "Support Devices", "Hernia"]
    rec = _render(names, [1, 1, 1, 1, 1, 0], tmp=tmp_path)
    drawn = {canonical_name(b["label"]) for b in rec["boxes"]}
    assert drawn == {"Cardiomegaly", "Pleural Effusion", "Nodule", "Pneumothorax", "Support Devices"}
    normal = _render(names, [0, 0, 0, 0, 0, 0], tmp=tmp_path, idx=1)
    assert normal["boxes"] is None
    lateral = _render(names, [0, 1, 0, 0, 0, 0], tmp=tmp_path, idx=2, view="LATERAL")
    assert read_image(tmp_path / lateral["path"]).std() > 0.05


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown source 'mimic'"):
        SiteSpec.parse({"name": "x", "source": "mimic"}, 1)
    with pytest.raises(ValueError, match="unknown keys"):
        SiteSpec.parse({"name": "x", "source": "nih", "colour": "red"}, 1)


def test_enriched_sampling_reaches_the_asked_share_and_keeps_rows_unique():
    import numpy as np

    from raycxr.labels import canonical_name
    from raycxr.synth.generator import sample_rows

    table = source_table("nih")
    canon = [canonical_name(c) for c in table.label_names]
    enrich = {"classes": ["Edema", "Cardiomegaly", "Tuberculosis"], "min_rate": 0.1}  # NIH has no tuberculosis
    idx = sample_rows(table, 300, np.random.default_rng(0), enrich)
    labels = table.label_matrix()[idx]
    assert len(idx) == len(set(idx)) == 300 and list(idx) == sorted(idx)
    for c in ("Edema", "Cardiomegaly"):
        assert (labels[:, canon.index(c)] == 1).mean() >= 0.1
    plain = table.label_matrix()[sample_rows(table, 300, np.random.default_rng(0))]
    assert (plain[:, canon.index("Edema")] == 1).mean() < 0.05  # the real prevalence (about 2 %) without it


def test_synthesis_workers_end_under_a_parent_sigterm_handler(tmp_path):
    """A process running a Ray node has a SIGTERM handler that waits for the node to drain; forked synthesis
    workers inherited it, and the pool's SIGTERM at exit then hung the study (seen in test_cluster). A
    parent handler that never returns stands in for it: the pool must still end."""
    import subprocess
    import sys

    code = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: time.sleep(3600))\n"
            "from raycxr.synth.generator import synthesize\n"
            f"synthesize({str(tmp_path / 'c')!r}, ['nih'], n_per_site=8, render_size=64, workers=2, "
            "preview=False, progress=False)\n"
            "print('done')\n")
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the synthesis pool hung: a worker ran the parent's SIGTERM handler")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("done")
