"""``numbabn.precompile``: worker processes fill numba's cache; failures are reported."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import numbabn

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels")


# Runs the precompile cases, then prints the numbabn kernels this process compiled.
_COMPILED_BY_CASES = """
from numba.core import event
compiled = set()

class Listener(event.Listener):
    def on_start(self, ev):  # (a compile, not a load from the cache)
        py_func = ev.data["dispatcher"].py_func
        if py_func.__module__.startswith("numbabn"):
            compiled.add(py_func.__qualname__)

    def on_end(self, ev):
        pass

event.register("numba:compile", Listener())
from numbabn import _precompile
_precompile.run_cases("float32")
print(sorted(compiled))
"""


def test_a_filled_cache_serves_a_new_process_without_compiling():
    """``precompile`` runs every case in worker processes; after it, a new process
    running the cases compiles no kernel: each loads from numba's cache. (A kernel whose
    cache key changes from one process to the next, as it does with a dispatcher in the
    kernel's closure, compiled on every first call.)"""
    from numbabn import _precompile

    assert numbabn.precompile(dtypes=("float32",), processes=2, progress=False) > 0
    for streamed in (False, True):
        run = subprocess.run(
            [sys.executable, "-c", _COMPILED_BY_CASES], env=_precompile.worker_env(streamed),
            capture_output=True, text=True,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.splitlines()[-1] == "[]", (streamed, run.stdout)


def test_precompile_reports_a_failed_worker(monkeypatch):
    from numbabn import _precompile

    def failing(dtype, streamed):
        code = "import sys; sys.stderr.write('boom'); sys.exit(3)"
        return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)

    monkeypatch.setattr(_precompile, "_start", failing)
    with pytest.raises(RuntimeError, match="boom"):
        numbabn.precompile(dtypes=("float64",), progress=False)


def test_progress_bar():
    from numbabn import _precompile

    out = io.StringIO()
    _precompile._bar(3, 6, 12.34, out)
    assert out.getvalue() == "\r[" + "#" * 15 + "." * 15 + "] 3/6 jobs, 12.3 s"


def test_main_job_precompiles_the_dtypes_asked_for(monkeypatch, capsys):
    """``python -m numbabn --precompile``: every dtype; with ``--dtype``, that one only."""
    from numbabn import _bench, _precompile

    asked = []

    def record(dtypes=_precompile.DTYPES, **_):
        asked.append(tuple(dtypes))
        return 1.0

    monkeypatch.setattr(numbabn, "precompile", record)
    assert _bench.main(["--precompile", "--dtype", "float16"]) == 0
    assert _bench.main(["--precompile"]) == 0
    assert asked == [("float16",), _precompile.DTYPES]
    assert "(float16)" in capsys.readouterr().out
