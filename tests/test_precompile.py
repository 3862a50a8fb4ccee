"""``numbabn.precompile``: worker processes fill numba's cache; failures are reported."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import numbabn

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels")


def test_precompile_runs_every_case_in_workers():
    seconds = numbabn.precompile(dtypes=("float32",), processes=2, progress=False)
    assert seconds > 0


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
