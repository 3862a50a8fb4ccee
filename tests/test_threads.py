"""Calls from several Python threads at once give the same results as serial calls."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import numbabn
from helpers import ON_DEVICE, random_batch


@pytest.mark.skipif(ON_DEVICE, reason="host arrays; the device run has its own test below")
def test_concurrent_calls_agree_with_serial():
    xs = [random_batch((4, 3, 257), np.float32, seed=s, per_channel_axis=1) for s in range(8)]
    expected = [numbabn.batch_norm(x, training=True) for x in xs]

    def work(i):
        x = xs[i % len(xs)]
        y = numbabn.batch_norm(x, training=True)
        dx, _, _ = numbabn.batch_norm_backward(x, x, *numbabn.batch_norm_forward(x)[1:])
        return i, y, dx

    with ThreadPoolExecutor(4) as pool:
        for i, y, dx in pool.map(work, range(32)):
            np.testing.assert_array_equal(y, expected[i % len(xs)])
            assert np.isfinite(dx).all()


@pytest.mark.skipif(not ON_DEVICE, reason="device arrays")
def test_concurrent_device_calls_agree_with_serial():
    """On a real GPU: the launcher and view caches and the per-stream scratch under
    calls from several threads (the simulator runs one kernel at a time anyway)."""
    from numba import config

    if config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator is not for thread stress")
    from helpers import to_host, to_side

    xs = [random_batch((4, 3, 257), np.float32, seed=s, per_channel_axis=1) for s in range(8)]
    ds = [to_side(x) for x in xs]
    expected = [to_host(numbabn.batch_norm(d, training=True)) for d in ds]

    def work(i):
        d = ds[i % len(ds)]
        y = numbabn.batch_norm(d, training=True)
        dx, _, _ = numbabn.batch_norm_backward(d, d, *numbabn.batch_norm_forward(d)[1:])
        return i, to_host(y), to_host(dx)

    with ThreadPoolExecutor(4) as pool:
        for i, y, dx in pool.map(work, range(32)):
            np.testing.assert_array_equal(y, expected[i % len(ds)])
            assert np.isfinite(dx).all()
