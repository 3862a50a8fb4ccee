#!/usr/bin/env bash
# Run every test suite with the given Python (default: python3):
#   1. the CPU kernels (host arrays), in this process's pytest;
#   2. the GPU kernels under numba's CUDA simulator, in their own pytest process,
#      since NUMBA_ENABLE_CUDASIM must be set before numba is imported;
#   3. numbabn.distributed under MPI with 2 ranks and with 3 (one of them empty),
#      on host arrays and under the simulator.
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
[ -x "$MPIEXEC" ] || MPIEXEC=mpiexec
SIM=(env NUMBA_ENABLE_CUDASIM=1 NUMBABN_TEST_SIDE=device)
status=0
"$PY" -m pytest -q tests || status=1
"${SIM[@]}" "$PY" -m pytest -q tests || status=1
for n in 2 3; do
  "$MPIEXEC" -n "$n" "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py || status=1
  "$MPIEXEC" -n "$n" "${SIM[@]}" "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py || status=1
done
exit $status
