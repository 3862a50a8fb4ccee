#!/usr/bin/env bash
# Run every test suite with the given Python (default: python3):
#   1. the CPU kernels (host arrays), in this process's pytest;
#   2. the GPU kernels under numba's CUDA simulator, in their own pytest process,
#      since NUMBA_ENABLE_CUDASIM must be set before numba is imported.
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
status=0
"$PY" -m pytest -q tests || status=1
if [ -f numbabn/_gpu.py ]; then
  NUMBA_ENABLE_CUDASIM=1 NUMBABN_TEST_SIDE=device "$PY" -m pytest -q tests || status=1
fi
exit $status
