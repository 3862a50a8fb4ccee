"""Property tests over random shapes, axes and dtypes."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbabn
import numbabn.reference as ref

from helpers import ON_DEVICE, assert_close, to_host, to_side


@st.composite
def batches(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    loc = draw(st.sampled_from([0.0, 3.0, -100.0]))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) + loc).astype(dtype)
    return x, axis


SETTINGS = settings(
    max_examples=15 if ON_DEVICE else 60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(batches())
def test_forward_and_backward_match_reference(case):
    x, axis = case
    count = x.size // x.shape[axis]
    stat_tol = np.float32 if x.dtype == np.float16 else x.dtype
    mean, var = numbabn.batch_stats(to_side(x), axis=axis)
    mref, vref = ref.batch_stats(x, axis)
    assert_close(mean, mref, stat_tol, scale=4 + np.abs(mref).max())
    assert_close(var, vref, stat_tol, scale=1, factor=1 + np.abs(mref).max())
    if count < 2:
        return
    y, m, s = numbabn.batch_norm_forward(to_side(x), eps=1e-3, axis=axis)
    yref, _, _ = ref.batch_norm_forward(x, eps=1e-3, axis=axis)
    # Data far from zero loses digits when rounded into its own dtype; scale for it.
    loss = 1 + np.abs(mref).max() * np.sqrt(1 / (vref.min() + 1e-3))
    assert_close(y, yref, x.dtype, factor=2 * loss)
    dy = np.ones_like(x)
    dx, dw, db = numbabn.batch_norm_backward(to_side(dy), to_side(x), m, s, axis=axis)
    assert_close(db, np.full(x.shape[axis], count), stat_tol)
    # A uniform upstream gradient has zero gradient through a batch-norm layer, and
    # dweight = sum(xhat) = 0.
    assert np.abs(to_host(dx)).max() <= (1e-2 if x.dtype == np.float16 else 1e-4) * loss
    dw_tol = (1e-2 if x.dtype == np.float16 else 1e-4) * loss * count
    assert np.abs(to_host(dw)).max() <= dw_tol
