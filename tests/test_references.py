"""Every citation points at something a user has: no path into the developers' private reference
folder, and every ``references U.n`` / ``A.n`` a docstring cites exists in ``docs/references.md``."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRIVATE = re.compile("|".join(["shared/" + "REFERENCE", "shared/" + "papers", r"\.\./" + "shared",
                               "REFERENCE" + r"\.md",
                               r"\b(?:ark|unichest|umif|reports_vs_ssl|domain_pretraining)" + r"\.txt\b"]))


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files = []
    for name in out:
        p = REPO / name
        if p.suffix in {".png", ".jpg", ".dcm", ".parquet", ".pt", ".onnx", ".npz"} or not p.is_file():
            continue
        files.append(p)
    return files


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for p in tracked_text_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{p.relative_to(REPO)}:{i}" for i, line in enumerate(text.splitlines(), 1) if PRIVATE.search(line)]
    assert not hits, f"references to files users do not have: {hits[:10]}"


def test_the_pattern_would_catch_one():
    assert PRIVATE.search("see ../" + "shared/" + "REFERENCE" + ".md U.4") and PRIVATE.search("(" + "ark" + ".txt §2)")


def test_cited_sections_exist_in_the_references_page():
    page = (REPO / "docs" / "references.md").read_text()
    listed = set(re.findall(r"\*\*([UA]\.\d+) ", page))
    assert {"U.1", "U.11", "A.1", "A.7"} <= listed
    cited = set()
    for p in (REPO / "raycxr").rglob("*.py"):
        cited |= set(re.findall(r"references ([UA]\.\d+)", p.read_text()))
    assert cited and cited <= listed, f"cited but not in docs/references.md: {sorted(cited - listed)}"
