import warnings

import pytest

from helpers import SIDE


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
