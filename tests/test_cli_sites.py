import shutil
import subprocess
import sys

import pytest
import yaml

from raycxr.cli import main
from raycxr.sites.config import SiteConfig, SiteConfigError, discover_sites


def _sites_dir(tmp_path, corpus, names=("nih", "vindr", "siim")):
    d = tmp_path / "sites"
    d.mkdir()
    for n in names:
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
    return d, [f"sites_dir={d}", f"data_root={corpus}"]


def test_sites_list_show_validate(tmp_path, small_corpus, capsys):
    _, ov = _sites_dir(tmp_path, small_corpus)
    assert main(["sites", "list", *ov]) == 0
    out = capsys.readouterr().out
    assert "nih" in out and "vindr" in out and "24" in out
    assert main(["sites", "show", "vindr", *ov]) == 0
    assert "Aortic enlargement" in capsys.readouterr().out
    assert main(["sites", "validate", "nih", "check_images=true", *ov]) == 0
    assert "every image reads" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown site"):
        main(["sites", "show", "nope", *ov])


def test_corrupt_and_missing_images_are_quarantined_not_fatal(tmp_path, small_corpus, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus / "nih", corpus / "nih")
    imgs = sorted((corpus / "nih" / "images").glob("*.dcm"))
    imgs[0].write_bytes(imgs[0].read_bytes()[:400])  # truncated
    imgs[1].unlink()  # missing
    _, ov = _sites_dir(tmp_path, corpus, names=("nih",))
    assert main(["sites", "validate", "nih", "check_images=true", *ov]) == 0
    out = capsys.readouterr().out
    assert "quarantined 1 missing and 1 unreadable" in out
    q = (corpus / "nih" / "quarantine.jsonl").read_text()
    assert imgs[0].stem in q and imgs[1].stem in q and "file not found" in q
    # statistics count them
    main(["sites", "show", "nih", *ov])
    assert "│ 2 " in capsys.readouterr().out


def test_sites_add_and_build_with_a_real_adapter(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "hospital"
    for k, cls in enumerate(("Effusion", "Normal")):
        (root / cls).mkdir(parents=True)
        for i in range(3):  # distinct pixels: the folder adapter drops exact duplicates
            Image.new("L", (16, 16), 100 + i + 10 * k).save(root / cls / f"{cls}{i}.png")
    sites = tmp_path / "sites"
    sites.mkdir()
    new = tmp_path / "hosp.yaml"
    new.write_text(yaml.safe_dump({"name": "hosp", "adapter": "folder", "root": str(root)}))
    ov = [f"sites_dir={sites}", f"data_root={tmp_path}"]
    assert main(["sites", "add", str(new), *ov]) == 0
    assert (sites / "hosp.yaml").exists()
    assert main(["sites", "build", "hosp", *ov]) == 0
    m = discover_sites(sites, data_root=tmp_path)["hosp"].load_manifest()
    assert len(m) == 6 and sorted(m.label_names) == ["Effusion", "Normal"]
    Image.new("L", (16, 16), 100).save(root / "Normal" / "again.png")  # a copy of Effusion0.png
    assert main(["sites", "build", "hosp", *ov]) == 0
    assert "1 rows dropped" in capsys.readouterr().out
    assert "duplicate of Effusion/Effusion0.png (same pixels)" in (root / "dropped.csv").read_text()


def test_bad_site_files_name_file_and_problem(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nadapter: nosuch\nroot: r\n")
    with pytest.raises(SiteConfigError, match=r"bad.yaml: adapter 'nosuch' is not registered"):
        SiteConfig.load(p)
    p.write_text("name: x\nadapter: nih\nroot: r\ncolour: red\n")
    with pytest.raises(SiteConfigError, match=r"bad.yaml: unknown keys \['colour'\]"):
        SiteConfig.load(p)
    p.write_text("name: x\nadapter: nih\nroot: r\nlabels: {uncertain_policy: maybe}\n")
    with pytest.raises(SiteConfigError, match="uncertain_policy"):
        SiteConfig.load(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(SiteConfigError, match="not valid YAML"):
        SiteConfig.load(p)


def test_shipped_site_files_are_valid():
    from conftest import REPO

    sites = discover_sites(REPO / "sites", data_root=REPO / "data")
    assert {"nih", "chexpert", "vindr", "openi", "siim"} <= set(sites)
    for p in (REPO / "sites" / "templates").glob("*.yaml"):
        SiteConfig.load(p)


def test_console_script_reports_bad_override_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "raycxr.cli", "synth", "no_such_key=1", f"out={tmp_path}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "bad configuration" in r.stderr and "Traceback" not in r.stderr


def test_synth_command_with_overrides(tmp_path, capsys):
    assert main(["synth", f"out={tmp_path}", "sites=[openi]", "n_per_site=6", "render_size=128", "workers=1"]) == 0
    assert (tmp_path / "openi" / "manifest.parquet").exists()
    assert "openi" in capsys.readouterr().out
