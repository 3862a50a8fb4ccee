"""Test set-up. Numba's disk cache keys a kernel on its own source file only, and the CPU
kernels inline code from other modules (formulas, LLVM vector loops, float16 loads,
atomics): the tests therefore keep their cache in a directory named after the sources
of all of those, so that an edit anywhere among them never runs stale kernels."""

import hashlib
import os
import pathlib
import sys
import warnings

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "numbabn"


def _kernel_sources_digest() -> str:
    files = sorted(_PACKAGE.glob("_cpu/*.py")) + [
        _PACKAGE / name for name in ("_half.py", "_atomic.py", "_channel.py", "_bench.py")
    ]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = str(
        pathlib.Path.home() / ".cache" / "numbabn-tests" / _kernel_sources_digest()
    )
    # pytest has imported numba's config already (for the warning filters): read again
    from numba.core import config

    config.reload_config()

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    # The simulator runs a Python thread per CUDA thread while the launching thread polls
    # them: at Python's default switch interval (5 ms) the poll held the interpreter for
    # most of each wait at a barrier (0.2 ms ran the simulator's tests 3x as fast). With
    # the poll yielding (simulator.repair), 1 ms ran them 4-15% faster than 0.2 ms.
    sys.setswitchinterval(1e-3)
    import simulator

    simulator.repair()

import pytest  # noqa: E402

from helpers import SIDE, tune_cpu  # noqa: E402


def pytest_report_header(config):
    return f"numbabn test side: {SIDE}"


@pytest.fixture(autouse=True)
def _quiet_simulator_warnings():
    # Tiny simulator grids trip numba-cuda's low-occupancy warning; it says nothing
    # about correctness.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]rid size.*")
        warnings.filterwarnings("ignore", message=".*[Hh]ost array used in CUDA kernel.*")
        yield


@pytest.fixture(autouse=True)
def _parallel_kernels_for_mid_sizes(monkeypatch):
    """The mid-size cases (``cases.py``, ``test_numerics``) are sized to run the
    multi-threaded kernels above 2**15 values; the shipped limits of the single-thread
    path are higher (tuned for speed), so the suite keeps 2**15. ``test_functional``
    checks the shipped limits on their own."""
    if SIDE == "host":
        from numbabn._cpu import plan

        tune_cpu(monkeypatch, small_values_ncl=1 << 15, small_values_mc=1 << 15)
        yield
        plan.make.cache_clear()  # no plan made with a test's tunables outlives it
    else:
        yield
