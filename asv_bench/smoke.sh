#!/usr/bin/env bash
# A smoke run of the benchmark suite: it must load and run (a quick run of a few cases
# against the working tree, in this environment); timings here are not compared. It
# loads the kernels the tests compiled, from their cache directory (tests/conftest.py),
# when it can. Of the parametrized operations, the float32 cases at two sizes (all 144
# took 3.5 minutes). Usage: bash asv_bench/smoke.sh [python with asv installed]
set -euo pipefail
PY=${1:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute, links kept (a venv)
cd "$(dirname "$0")"
cache=$("$PY" -c 'import os, sys; sys.path.insert(0, "../tests"); import conftest
print(os.environ["NUMBA_CACHE_DIR"])' 2>/dev/null) || cache=""
[ -n "$cache" ] && export NUMBA_CACHE_DIR="$cache"
ASV=(env PATH="$(dirname "$PY"):$PATH" "$PY" -m asv)
"${ASV[@]}" machine --yes > /dev/null
"${ASV[@]}" check --python=same
"${ASV[@]}" run --python=same --quick --dry-run --show-stderr \
  --bench "cpu.Ops.time_train_forward\\(.*'(tiny|resnet)', 'float32'\\)" \
  --bench 'cpu.Memory|first_call.timeraw_import' 2>&1 | grep -v "n/a" | tail -n 25
