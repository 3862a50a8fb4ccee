"""Results are bitwise the same for any thread count: the order of every reduction's
additions is decided by the shape alone (``_cpu.plan.sum_tasks``)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import numbabn

from helpers import ON_DEVICE, random_batch

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="the CPU thread pool")

# (shape, axis): single-thread kernels; fused per-channel passes; planes cut into
# segments; runs of samples (swept or not, by thread count); flat short planes;
# channels-last and 2-D row chunks.
CASES = [
    ((4, 3, 5, 7), 1),
    ((64, 8, 14, 14), 1),
    ((2, 3, 40000), 1),
    ((7, 5, 97, 101), 1),
    ((300, 16, 4, 4), 1),
    ((64, 20, 20, 33), -1),
    ((1000, 300), 1),
]


def results(threads: int) -> list[np.ndarray]:
    """Every output of every operation on the CASES, float16/32/64, on ``threads``."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        out = []
        for k, (shape, axis) in enumerate(CASES):
            for dtype in (np.float16, np.float32, np.float64):
                x = random_batch(shape, dtype, seed=k, loc=3.0, per_channel_axis=axis)
                dy = random_batch(shape, dtype, seed=k + 100)
                c = shape[axis]
                rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
                y, mean, invstd = numbabn.batch_norm_forward(x, axis=axis)
                out += [y, mean, invstd, *numbabn.batch_stats(x, axis=axis)]
                out.append(numbabn.batch_norm(x, rm, rv, training=True, axis=axis))
                out += [rm, rv, numbabn.batch_norm(x, rm, rv, axis=axis)]
                out += numbabn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
                out += numbabn.batch_norm_backward(dy, x, rm, invstd, axis=axis, training=False)
        return out
    finally:
        numba.set_num_threads(before)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> list[int]:
    return [i for i, (p, q) in enumerate(zip(a, b)) if p.tobytes() != q.tobytes()]


def test_one_and_two_threads_agree_bitwise():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread here")
    assert _same(results(1), results(2)) == []


def test_more_threads_than_cores_agree_bitwise():
    """In a process of 4 numba threads (more than CI's cores): 1, 3 and 4 threads."""
    script = (
        "import sys; sys.path.insert(0, 'tests'); import test_reproducible as t; "
        "r = [t.results(n) for n in (1, 3, 4)]; "
        "bad = t._same(r[0], r[1]) + t._same(r[0], r[2]); print('mismatch', bad) if bad else None; "
        "sys.exit(1 if bad else 0)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
