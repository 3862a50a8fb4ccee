"""The GPU host path stays short: the Python-level calls numbabn's own code makes for a
tiny train forward, counted under the CUDA simulator (whose kernels run as Python, which
is not counted: only frames of numbabn's modules are)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import numbabn

from helpers import ON_DEVICE, to_side

pytestmark = pytest.mark.skipif(not ON_DEVICE, reason="device arrays (the CUDA simulator)")

MOST_CALLS = 150


def _calls(fn) -> int:
    root = os.path.dirname(numbabn.__file__)
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "call" and frame.f_code.co_filename.startswith(root):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_train_forward_host_calls():
    x = to_side(np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32))
    rm, rv = to_side(np.zeros(3, np.float32)), to_side(np.ones(3, np.float32))

    def call():
        numbabn.batch_norm(x, rm, rv, training=True)

    call()  # launchers, views and scratch made once
    calls = _calls(call)
    assert 0 < calls <= MOST_CALLS, calls
