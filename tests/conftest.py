import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus (3 sites x 24 images), built once per test session."""
    from raycxr.synth.generator import synthesize

    out = tmp_path_factory.mktemp("corpus")
    synthesize(out, ["nih", "vindr", "siim"], n_per_site=24, seed=1, render_size=128, workers=2, progress=False)
    return out


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
