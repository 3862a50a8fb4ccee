#!/usr/bin/env bash
# Run every test suite with the given Python (default: python3):
#   1. the CPU kernels (host arrays), in this process's pytest;
#   2. the GPU kernels under numba's CUDA simulator, in pytest processes of their own,
#      since NUMBA_ENABLE_CUDASIM must be set before numba is imported;
#   3. numbabn.distributed under MPI with 2 ranks and with 3 (one of them empty),
#      on host arrays and under the simulator;
#   4. where asv is installed (the bench extra), a smoke run of the benchmarks
#      (asv_bench/smoke.sh), which loads the kernels the tests compiled.
# The host suite spends most of its time compiling, on one core. The simulator waits on
# its threads more than it computes (a process of it keeps half a core busy), so it runs
# as two processes beside the host suite, and part of 1 starts when both have ended; the
# four MPI runs, two at a time, then the benchmarks, start once the rest of 1 has ended.
# The outputs are shown at the end.
set -uo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
[ -x "$MPIEXEC" ] || MPIEXEC=mpiexec
SIM=(env NUMBA_ENABLE_CUDASIM=1 NUMBABN_TEST_SIDE=device)
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
status=0

declare -A PIDS
# run NAME COMMAND...: in the background, output to $LOGS/NAME
run() {
  local name=$1
  shift
  ( "$@" > "$LOGS/$name" 2>&1; echo $? > "$LOGS/$name.rc" ) &
  PIDS[$name]=$!
}

# finish NAME...: wait for the named runs, show their output, note failures
finish() {
  wait
  for name in "$@"; do
    echo "=== $name"
    cat "$LOGS/$name"
    [ "$(cat "$LOGS/$name.rc")" = 0 ] || { echo "=== $name FAILED"; status=1; }
  done
}

# The files of the host suite that share few kernels with the rest (the streaming tests,
# which compile every streamed walk for every dtype; the bfloat16 tests; the PTX
# compilations of the GPU kernels; numbabn.torch's, which spend their time in torch and
# in subprocesses) run apart, started when the simulator frees its core; the MPI runs start
# when the rest of the host suite frees the other.
LATER=(tests/test_streaming.py tests/test_bfloat16.py tests/test_gpu_ptx.py tests/test_torch.py)
SIM_SPLIT=tests/test_functional.py  # (run apart: two fifths of the simulator's time)
run host "$PY" -m pytest -q -p no:cacheprovider tests "${LATER[@]/#/--ignore=}"
run simulator "${SIM[@]}" "$PY" -m pytest -q -p no:cacheprovider tests --ignore="$SIM_SPLIT"
run simulator-functional "${SIM[@]}" "$PY" -m pytest -q -p no:cacheprovider "$SIM_SPLIT"
wait "${PIDS[simulator]}" "${PIDS[simulator-functional]}"
run host-later "$PY" -m pytest -q -p no:cacheprovider "${LATER[@]}"
wait "${PIDS[host]}"
for n in 2 3; do
  run "mpi-$n-host" "$MPIEXEC" -n "$n" "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py
  run "mpi-$n-simulator" "$MPIEXEC" -n "$n" "${SIM[@]}" "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py
  wait "${PIDS[mpi-$n-host]}" "${PIDS[mpi-$n-simulator]}"
done
BENCH=()
if "$PY" -c "import asv" 2> /dev/null; then
  run benchmarks bash asv_bench/smoke.sh "$PY"
  BENCH=(benchmarks)
fi
finish host simulator simulator-functional host-later mpi-2-host mpi-2-simulator mpi-3-host mpi-3-simulator "${BENCH[@]}"
exit $status
