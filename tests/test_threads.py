"""Calls from several Python threads at once give the same results as serial calls."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import numbabn

from helpers import ON_DEVICE, random_batch, to_host, to_side


def test_concurrent_calls_agree_with_serial():
    """Calls from 4 threads give the results of serial calls: the CPU thread pool, and on
    a real GPU the launcher and view caches and the per-stream scratch."""
    from numba import config

    if ON_DEVICE and config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator is not for thread stress")
    xs = [to_side(random_batch((4, 3, 257), np.float32, seed=s, per_channel_axis=1)) for s in range(8)]
    expected = [to_host(numbabn.batch_norm(x, training=True)) for x in xs]

    def work(i):
        x = xs[i % len(xs)]
        y = numbabn.batch_norm(x, training=True)
        dx, _, _ = numbabn.batch_norm_backward(x, x, *numbabn.batch_norm_forward(x)[1:])
        return i, to_host(y), to_host(dx)

    with ThreadPoolExecutor(4) as pool:
        for i, y, dx in pool.map(work, range(32)):
            np.testing.assert_array_equal(y, expected[i % len(xs)])
            assert np.isfinite(dx).all()


@pytest.mark.skipif(ON_DEVICE, reason="the CPU thread pool")
def test_thread_count_follows_numba_per_python_thread():
    """The CPU backend sizes its work by the calling thread's numba thread count, which
    it reads without numba's public getter after the first call: it must still follow
    ``numba.set_num_threads``, which is per Python thread."""
    import threading

    import numba

    from numbabn import _cpu

    start = numba.get_num_threads()
    try:
        assert _cpu._threads() == start
        numba.set_num_threads(1)
        assert _cpu._threads() == 1
        seen = []

        def other():
            seen.append(_cpu._threads())  # a new thread starts at the default
            numba.set_num_threads(1)
            seen.append(_cpu._threads())

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen == [numba.config.NUMBA_NUM_THREADS, 1]
        numba.set_num_threads(start)
        assert _cpu._threads() == start
    finally:
        numba.set_num_threads(start)
