#!/usr/bin/env bash
# GPU check (benchmarks/gpu_check.py): each method a few hundred steps at 224 and 512 px on one GPU,
# images/s, GPU utilisation, peak memory, TFLOP/s and MFU, and the data plane's images/s beside them.
# Under 5 minutes on a modern GPU with the defaults; results in benchmarks/results/gpu_check.{json,md}.
#
#   bash benchmarks/gpu_check.sh                  # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run        # the same code on CPU at tiny size (no GPU needed)
#   bash benchmarks/gpu_check.sh --steps 300 --batch 64 --methods ark unichest
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do [[ "$a" == "--dry-run" ]] && DRY=1; done
if [[ $DRY == 0 ]]; then
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch; use --dry-run to check the code on CPU" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # 6 methods x 2 sizes: 150 timed steps each keeps the whole check under 5 minutes
  exec timeout 300 python benchmarks/gpu_check.py --steps 150 "$@"
fi
OMP_NUM_THREADS=1 exec timeout 600 python benchmarks/gpu_check.py "$@"
