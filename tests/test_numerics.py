"""Adversarial numerics: cancellation, constant channels, NaN containment, float16."""

from __future__ import annotations

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref

from helpers import DTYPES, ON_DEVICE, random_batch, to_host, to_side

LAYOUT_CASES = [((4, 3, 5, 7), 1), ((4, 5, 7, 3), -1)]
if not ON_DEVICE:
    # The multi-threaded kernels: split planes, the fused per-channel passes, row chunks
    # (the cases above are small enough to run on the calling thread).
    LAYOUT_CASES += [((2, 3, 9001), 1), ((4, 4, 3001), 1), ((9001, 5), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUT_CASES)
def test_constant_channel_normalizes_to_exact_zero(dtype, shape, axis):
    x = random_batch(shape, dtype, seed=1)
    idx = [slice(None)] * len(shape)
    idx[axis] = 1
    x[tuple(idx)] = dtype(7.25)
    y = to_host(numbabn.batch_norm(to_side(x), training=True, axis=axis))
    assert np.all(y[tuple(idx)] == 0)
    mean, var = numbabn.batch_stats(to_side(x), axis=axis)
    assert to_host(var)[1] == 0
    assert to_host(mean)[1] == np.float32(7.25)
    _, _, invstd = numbabn.batch_norm_forward(to_side(x), axis=axis)
    sd = np.float64 if dtype == np.float64 else np.float32
    assert to_host(invstd)[1] == sd(1 / np.sqrt(1e-5))


@pytest.mark.parametrize("shape,axis", LAYOUT_CASES)
def test_large_mean_small_std_float32(shape, axis):
    """mean 1e4, std 1e-2: float32 data, output within 1e-5 of the float64 reference."""
    rng = np.random.default_rng(2)
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    y = to_host(numbabn.batch_norm(to_side(x), training=True, eps=1e-12, axis=axis))
    yref, _, _ = ref.batch_norm(x, training=True, eps=1e-12, axis=axis)
    assert np.abs(y - yref).max() < 1e-5
    mean, var = numbabn.batch_stats(to_side(x), axis=axis)
    mref, vref = ref.batch_stats(x, axis)
    np.testing.assert_allclose(to_host(var), vref, rtol=1e-5)
    np.testing.assert_allclose(to_host(mean), mref, rtol=1e-7)
    # Running statistics see the same accurate variance.
    rm, rv = to_side(np.zeros(shape[axis], np.float32)), to_side(np.ones(shape[axis], np.float32))
    numbabn.batch_norm(to_side(x), rm, rv, training=True, momentum=1.0, axis=axis)
    count = x.size // shape[axis]
    np.testing.assert_allclose(to_host(rv), vref * count / (count - 1), rtol=1e-5)


def test_large_mean_small_std_eval_float32():
    """Eval mode with a running mean far from zero keeps its digits too."""
    rng = np.random.default_rng(3)
    x = (1e4 + 1e-2 * rng.standard_normal((4, 3, 50))).astype(np.float32)
    rm = np.full(3, 1e4 + 1e-3, np.float64)
    rv = np.full(3, 1e-4, np.float64)
    y = to_host(numbabn.batch_norm(to_side(x), to_side(rm), to_side(rv), eps=0.0))
    yref, _, _ = ref.batch_norm(x, rm, rv, eps=0.0)
    assert np.abs(y - yref).max() < 1e-5


def test_backward_large_mean_small_std_float32():
    rng = np.random.default_rng(4)
    x = (1e4 + 1e-2 * rng.standard_normal((4, 3, 50))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mean, var = ref.batch_stats(x)
    invstd = 1 / np.sqrt(var + 1e-12)
    dx, dw, db = numbabn.batch_norm_backward(
        to_side(dy), to_side(x), to_side(mean), to_side(invstd)
    )
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd)
    np.testing.assert_allclose(to_host(dw), dwr, rtol=1e-5, atol=1e-4)
    scale = np.abs(dxr).max()
    assert np.abs(to_host(dx) - dxr).max() < 1e-5 * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUT_CASES)
def test_nan_stays_in_its_channel(dtype, shape, axis):
    x = random_batch(shape, dtype, seed=5)
    idx = [0] * len(shape)
    idx[axis] = 2
    x[tuple(idx)] = np.nan
    y = to_host(numbabn.batch_norm(to_side(x), training=True, axis=axis))
    ch = np.moveaxis(y, axis, 0)
    assert np.isnan(ch[2]).all()
    others = np.delete(ch, 2, axis=0)
    assert np.isfinite(others).all()
    mean, var = (to_host(a) for a in numbabn.batch_stats(to_side(x), axis=axis))
    assert np.isnan(mean[2]) and np.isnan(var[2])
    assert np.isfinite(np.delete(mean, 2)).all() and np.isfinite(np.delete(var, 2)).all()


# The CUDA simulator runs kernels as NumPy scalar code, which warns on inf - inf; the
# GPU (and the CPU kernels) silently give NaN, which is what is checked.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_inf_gives_nan_statistics_for_its_channel_only():
    x = random_batch((3, 3, 8), np.float32, seed=6)
    x[1, 0, 3] = np.inf
    mean, var = (to_host(a) for a in numbabn.batch_stats(to_side(x)))
    assert not np.isfinite(var[0])
    assert np.isfinite(mean[1:]).all() and np.isfinite(var[1:]).all()


def test_float16_statistics_are_float32_and_exact_for_representable_data():
    x = np.arange(2 * 3 * 64, dtype=np.float16).reshape(2, 3, 64) / np.float16(8)
    mean, var = numbabn.batch_stats(to_side(x))
    mref, vref = ref.batch_stats(x)
    assert to_host(mean).dtype == np.float32
    np.testing.assert_allclose(to_host(mean), mref, rtol=1e-7)
    np.testing.assert_allclose(to_host(var), vref, rtol=1e-6)


def test_float16_sum_beyond_float16_range():
    """Sums of float16 data overflow float16 (max 65504); statistics must not."""
    x = np.full((64, 2, 64), 60000, np.float16)
    x[:, 1] = np.float16(-1000)
    x[0, 1, 0] = np.float16(1000)
    mean, var = (to_host(a) for a in numbabn.batch_stats(to_side(x)))
    mref, vref = ref.batch_stats(x)
    np.testing.assert_allclose(mean, mref, rtol=1e-6)
    np.testing.assert_allclose(var, vref, rtol=1e-5)
