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
    assert "duplicate of Effusion/Effusion0.png (same pixels)" in (root / "hosp.dropped.csv").read_text()


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


def _csv_site(root, n=30):
    """A generic_csv site: n distinct PNGs, two images per patient."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": [f"{k}.png" for k in range(n)], "patient_id": [f"p{k // 2}" for k in range(n)],
                  "split": "test"}).to_csv(root / "t.csv", index=False)
    for k in range(n):
        Image.fromarray(((np.arange(256) * (k + 1)) % 251).astype(np.uint8).reshape(16, 16)).save(root / f"{k}.png")


def test_show_names_the_split_and_validate_reports_shared_patients(tmp_path, capsys):
    for name in ("a", "b", "c"):
        _csv_site(tmp_path / name)
    sites = tmp_path / "sites"
    sites.mkdir()
    for name, extra in (("a", {}), ("b", {}), ("c", {"split_col": "split"})):
        (sites / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "adapter": "generic_csv", "root": str(tmp_path / name),
             "adapter_options": {"csv": "t.csv", **extra}}))
    ov = [f"sites_dir={sites}", f"data_root={tmp_path}"]
    for name in ("a", "b", "c"):
        assert main(["sites", "build", name, *ov]) == 0
    capsys.readouterr()
    assert main(["sites", "show", "a", *ov]) == 0
    assert "splits: hashed (no split_col given): train" in " ".join(capsys.readouterr().out.split())
    assert main(["sites", "validate", "a", "b", *ov]) == 0
    assert "a and b share 15 patients (in the same splits)" in capsys.readouterr().out
    # c is the same export with its own split column (all test): its patients trained on at a and b
    assert main(["sites", "validate", *ov]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "a and c share 15 patients" in out and "in different splits" in out


def _readme_block(heading: str, doc: str = "README.md") -> list[str]:
    """The commands of the first ```bash block after ``heading`` in ``doc``, comments stripped."""
    from conftest import REPO

    text = (REPO / doc).read_text()
    block = text[text.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_adding_a_site_walk_through_runs_as_written(tmp_path, monkeypatch, capsys):
    import shlex

    import numpy as np
    import pandas as pd
    from conftest import REPO
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "sites" / "templates", tmp_path / "sites" / "templates")
    export = tmp_path / "export"  # a stand-in for the PACS export the template describes
    export.mkdir()
    findings = ["Effusion|Cardiomegaly", "", "Pneumothorax", "", "Atelectasis|Effusion", ""]
    rows = []
    for k in range(12):
        name = f"img{k}.png"
        Image.fromarray(((np.arange(1024) * (k + 3)) % 251).astype(np.uint8).reshape(32, 32)).save(export / name)
        rows.append({"file": name, "patient": f"P{k // 2}", "sex": "F", "age": 50 + k, "view": "PA",
                     "report": "", "findings": findings[k % 6]})
    pd.DataFrame(rows).to_csv(export / "labels.csv", index=False)
    commands = _readme_block("## Adding your own site")
    assert commands == _readme_block("## Adding a site", "docs/sites.md")  # the guide shows the same walk-through
    assert commands[0].startswith("cp sites/templates/hospital_csv.yaml ")
    for line in commands:
        argv = shlex.split(line)
        if argv[0] == "cp":
            shutil.copyfile(argv[1], argv[2])
            site = yaml.safe_load(open(argv[2]))
            site["root"] = str(export)  # the walk-through's "edit name, root, columns"
            yaml.safe_dump(site, open(argv[2], "w"))
            continue
        assert argv[0] == "raycxr", line
        assert main(argv[1:]) == 0, line
    out = capsys.readouterr().out
    assert "every image reads" in out
    m = discover_sites(tmp_path / "sites", data_root=tmp_path / "data")["hospital-a"].load_manifest()
    df = m.to_pandas().set_index("image_id")
    labels = dict(zip(df.index, m.label_matrix()))
    normal = [r["file"] for r in rows if not r["findings"]]
    assert len(m) == 12 and all((labels[f] == 0).all() for f in normal)  # a normal study: negative for every class
    assert labels["img0.png"][m.label_names.index("Effusion")] == 1


def test_site_add_rejects_an_adapter_option_the_adapter_does_not_take(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: h\nadapter: generic_csv\nroot: r\nadapter_options: {csv: t.csv, separator: '|'}\n")
    with pytest.raises(SiteConfigError,
                       match=r"s.yaml: adapter_options: .*\['separator'\] \(did you mean 'separator' -> 'sep'"):
        SiteConfig.load(p)
    sites = tmp_path / "sites"
    sites.mkdir()
    assert main(["sites", "add", str(p), f"sites_dir={sites}", f"data_root={tmp_path}"]) == 2
    assert not (sites / "s.yaml").exists() and not (sites / "h.yaml").exists()


def test_two_sites_share_a_root_update_and_remove(tmp_path, capsys):
    root = tmp_path / "export"
    _csv_site(root, n=8)
    sites = tmp_path / "sites"
    sites.mkdir()
    ov = [f"sites_dir={sites}", f"data_root={tmp_path}"]
    for name, limit in (("first", 3), ("second", 6)):  # one root, two sites
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump({"name": name, "adapter": "generic_csv", "root": str(root),
                                     "adapter_options": {"csv": "t.csv", "limit": limit}}))
        assert main(["sites", "add", str(p), *ov]) == 0
        assert main(["sites", "build", name, *ov]) == 0
    found = discover_sites(sites, data_root=tmp_path)
    assert len(found["first"].load_manifest()) == 3 and len(found["second"].load_manifest()) == 6
    assert (root / "first.manifest.parquet").is_file() and not (root / "manifest.parquet").exists()
    capsys.readouterr()
    # update: a changed YAML replaces the registered one, checked like `sites add`
    p = tmp_path / "first.yaml"
    p.write_text(yaml.safe_dump({"name": "first", "adapter": "generic_csv", "root": str(root),
                                 "adapter_options": {"csv": "t.csv", "limit": 2}}))
    assert main(["sites", "update", str(p), *ov]) == 0
    assert main(["sites", "build", "first", *ov]) == 0
    assert len(discover_sites(sites, data_root=tmp_path)["first"].load_manifest()) == 2
    p.write_text(yaml.safe_dump({"name": "first", "adapter": "generic_csv", "root": str(root),
                                 "adapter_options": {"csv": "t.csv", "limt": 2}}))
    assert main(["sites", "update", str(p), *ov]) == 2  # rejected; the registered file is unchanged
    assert "limt" not in (sites / "first.yaml").read_text()
    p.write_text(yaml.safe_dump({"name": "third", "adapter": "folder", "root": str(root)}))
    with pytest.raises(SystemExit, match="no site named 'third'"):
        main(["sites", "update", str(p), *ov])
    # remove: unregistered; the other site and the data stay
    assert main(["sites", "remove", "second", *ov]) == 0
    assert set(discover_sites(sites, data_root=tmp_path)) == {"first"} and (root / "second.manifest.parquet").is_file()


def test_an_ambiguous_file_name_is_listed(tmp_path, capsys):
    from test_adapters import PNG, _touch

    pytest.importorskip("torchxrayvision")
    import pandas as pd
    from test_adapters import DATA

    raw = pd.read_csv(DATA / "Data_Entry_2017_v2020.csv.gz", nrows=5)
    for i in raw["Image Index"]:
        _touch(tmp_path / "images_001" / "images" / i, PNG)
    _touch(tmp_path / "backup" / raw["Image Index"].iloc[0], PNG)
    raw.to_csv(tmp_path / "Data_Entry.csv", index=False)
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "n.yaml").write_text(yaml.safe_dump({"name": "n", "adapter": "nih", "root": str(tmp_path),
                                                  "adapter_options": {"csvpath": "Data_Entry.csv"}}))
    ov = [f"sites_dir={sites}", f"data_root={tmp_path}"]
    assert main(["sites", "build", "n", *ov]) == 0
    dropped = (tmp_path / "n.dropped.csv").read_text()
    first = raw["Image Index"].iloc[0]
    # the first in path order is used (here the stray copy: sorted before images_001/); the other is listed
    assert f"images_001/images/{first},ambiguous file name: backup/{first} has the same name and is the one used" \
        in dropped
    capsys.readouterr()
    assert main(["sites", "show", "n", *ov]) == 0
    assert "1 files share a name" in " ".join(capsys.readouterr().out.split())
