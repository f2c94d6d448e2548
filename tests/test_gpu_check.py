"""benchmarks/gpu_check.sh --dry-run: the GPU check's code on CPU at tiny size (no GPU needed)."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "deploy"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--methods", "ark",
                    "--out", str(tmp_path)], check=True, env=env, cwd=REPO, timeout=500, stdout=subprocess.DEVNULL)
    res = json.loads((tmp_path / "gpu_check_dryrun.json").read_text())
    assert res["dry_run"] and res["device"] == "cpu"
    (cell,) = res["cells"]
    assert cell["method"] == "ark" and cell["size"] == 32 and cell["steps"] == 2
    assert cell["images_per_s"] > 0 and cell["tflops_per_s"] > 0
    # ResNet-18 at 32 px: ~0.07 GFLOP forward per image, x3 with the backward pass (plus Ark's teacher view)
    assert 0.1 < cell["gflops_per_image"] < 1.0
    d = res["data_plane"]["32"]
    assert d["decode"] > 0 and d["cached"] > 0
    assert "| ark | 32 |" in (tmp_path / "gpu_check_dryrun.md").read_text()
