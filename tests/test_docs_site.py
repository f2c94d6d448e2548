"""The documentation site: ``mkdocs build --strict`` (a broken link, anchor or nav entry fails), the generated
configuration reference, and screenshots of built pages in headless Chromium that must not be blank."""

import importlib.util
import shutil

import pytest
from conftest import REPO

pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[test]')")


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("docs_screenshot", REPO / "docs" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return _screenshot_module().build(tmp_path_factory.mktemp("site"))


def test_docs_site_builds_strictly_with_the_generated_configuration_reference(site):
    from raycxr import schema

    page = (site / "config-reference.html").read_text()
    for name in schema.SCHEMAS:
        assert f'id="{name}"' in page, name
    assert "ray.bucket_mb" in page and "one of <code>local</code>, <code>ray</code>" in page
    assert "Intended use." in (site / "deployment.html").read_text()  # the runtime's model card, included
    assert (site / "benchmarks" / "results" / "scaling.png").is_file()  # the figures the pages link


def test_readme_links_into_the_docs_resolve():
    import re

    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs|deploy|benchmarks)/[^)#\s]+)", text)
    assert targets and [t for t in targets if not (REPO / t).exists()] == []


def test_built_pages_render_in_headless_chromium(site, tmp_path):
    shots = _screenshot_module()
    if shots.chromium() is None:
        pytest.skip("no chromium on PATH (.ci/run installs it with apt)")
    for page in ("index", "config-reference"):
        png = shots.screenshot(site / f"{page}.html", tmp_path / f"{page}.png")
        assert shots.looks_rendered(png) is None, shots.looks_rendered(png)
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")  # the check can fail: an empty page is not "rendered"
    assert shots.looks_rendered(shots.screenshot(blank, tmp_path / "blank.png")) is not None


def test_docs_site_build_fails_on_a_broken_link(tmp_path):
    """--strict is what makes a broken link fail; prove it on a copy of the docs with one bad link."""
    shots = _screenshot_module()
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "docs", copy / "docs")
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(REPO / "deploy" / "raycxr_runtime", copy / "deploy" / "raycxr_runtime")
    shutil.copytree(REPO / "benchmarks" / "results", copy / "benchmarks" / "results")
    (copy / "docs" / "sweeps.md").write_text((copy / "docs" / "sweeps.md").read_text() + "\n[gone](no-such-page.md)\n")
    shots.REPO = copy
    with pytest.raises(RuntimeError, match="no-such-page.md"):
        shots.build(tmp_path / "site")
