import warnings

import pytest

from helpers import SIDE, tune_cpu


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
        from numbabn import _cpu

        tune_cpu(monkeypatch, _SMALL_VALUES={"ncl": 1 << 15, "mc": 1 << 15})
        yield
        _cpu._plan.cache_clear()  # no plan made with a test's tunables outlives it
    else:
        yield
