#!/usr/bin/env bash
# Everything to run in one lease of a GPU machine (numba-cuda, torch and pytest-xdist
# installed there), from the repository root:
#   1. scripts/gpu_check.py --profile: checks, host cost per piece of a call, timings;
#   2. the test modules on numba device arrays on the real GPU (NUMBABN_TEST_SIDE=device
#      without the simulator; the simulator-only and host-only modules are left out).
# Logs go to $OUT (or /tmp). The sitecustomize shim: the device image pairs numba-cuda
# 0.30 with NumPy 2.5, which removed np.row_stack that numba-cuda names at import.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
shim=$(mktemp -d)
printf 'import numpy as np\nif not hasattr(np, "row_stack"):\n    np.row_stack = np.vstack\n' >"$shim/sitecustomize.py"
export PYTHONPATH=".:$shim"
timeout 240 python3 scripts/gpu_check.py --profile 2>&1 | tee "$out/gpu_check.log"
echo "gpu_check exit status ${PIPESTATUS[0]}"
NUMBABN_TEST_SIDE=device timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark \
  -W ignore::DeprecationWarning --maxfail=30 tests --ignore=tests/test_foreign.py \
  --ignore=tests/test_distributed.py --ignore=tests/test_gpu_ptx.py \
  --ignore=tests/test_gpu_host_side.py >"$out/pytest.log" 2>&1
echo "device tests exit status $?"
tail -c 3000 "$out/pytest.log"
