"""Test helpers: which side the arrays live on, tolerances, input makers.

The same test modules run twice in CI: on host (NumPy) arrays against the CPU
kernels, and, in a separate process with ``NUMBA_ENABLE_CUDASIM=1`` and
``NUMBABN_TEST_SIDE=device``, on numba device arrays against the GPU kernels.
"""

from __future__ import annotations

import os

import numpy as np

SIDE = os.environ.get("NUMBABN_TEST_SIDE", "host")
ON_DEVICE = SIDE == "device"
DTYPES = (np.float16, np.float32, np.float64)

# Relative tolerance against the float64 reference, per dtype of the result: the one
# table every comparison with ``numbabn.reference`` goes through (``assert_close``);
# tests widen it by a named factor where an operation adds rounding steps.
RTOL = {np.dtype(np.float16): 4e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def to_side(a):
    """Put a NumPy array on the side under test (None passes through)."""
    if a is None or not ON_DEVICE:
        return a
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(a) if a.ndim == 0 else a)


def to_host(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    return a.copy_to_host()


def assert_close(actual, expected, dtype, scale=1.0, factor=1.0):
    """|actual - expected| <= rtol(dtype) * factor * (scale + |expected|)."""
    actual = np.asarray(to_host(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    tol = RTOL[np.dtype(dtype)] * factor * (scale + np.abs(expected))
    err = np.abs(actual - expected)
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} values off; worst error {np.nanmax(err)} "
        f"at {np.unravel_index(np.nanargmax(err - tol), err.shape)}"
    )


def random_batch(shape, dtype, seed=0, loc=0.5, scale=2.0, per_channel_axis=None):
    """Random data (never constant); channel means differ when per_channel_axis is given."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale + loc
    if per_channel_axis is not None:
        c = shape[per_channel_axis]
        sh = [1] * len(shape)
        sh[per_channel_axis] = c
        x = x + rng.uniform(-3, 3, c).reshape(sh)
    return x.astype(dtype)


def channel_vector(c, dtype, seed, low=0.5, high=1.5):
    return np.random.default_rng(seed).uniform(low, high, c).astype(dtype)


def tune_cpu(monkeypatch, threads=None, **values):
    """Set fields of the CPU side's tunables (``small_values_ncl=...``, see
    ``numbabn._cpu.tuning``) and, given ``threads`` (a function), the thread count it
    plans for, for one test. Plans are cached per geometry, so the cache is emptied here
    too (and after every test, by ``conftest``)."""
    import dataclasses

    from numbabn import _cpu
    from numbabn._cpu import plan, tuning

    monkeypatch.setattr(tuning, "TUNING", dataclasses.replace(tuning.TUNING, **values))
    if threads is not None:
        monkeypatch.setattr(_cpu, "_threads", threads)
    plan.make.cache_clear()


def mc_pass(g, x, params, l, w, nchunk, streamed, y):
    """Run the channels-last elementwise kernel the CPU plan picks for (M, C) kernel
    arrays (``g`` None: normalize of ``x``; else grad_input of ``g`` and ``x``), plan
    work (l, span ``w``, ``nchunk`` chunks), directly."""
    from types import SimpleNamespace

    from numbabn._cpu import plan

    elem = SimpleNamespace(n=x.shape[0], c=x.shape[1])
    lines = plan._whole_lines(y.reshape(-1))
    kernel, work = plan._mc_route(elem, (l, w, nchunk), y.itemsize, streamed, lines)
    kernel(g, x, params, *work, y)
