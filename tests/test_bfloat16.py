"""bfloat16 (``ml_dtypes.bfloat16`` NumPy arrays and device arrays, torch bfloat16 CPU
tensors) against the float64 reference of the same values: outputs within bfloat16's
rounding, statistics float32, every CPU route (single-thread, plane segments, fused per
channel, flat rows, channels-last spans and lines, streamed stores) and both GPU views."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref

from helpers import (
    ON_DEVICE,
    assert_close,
    channel_vector,
    random_batch,
    to_host,
    to_side,
    tune_cpu,
)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
# bfloat16 keeps 8 significant bits: a rounded result is within 2**-9 of its value
RTOL = 2.0**-8

CASES = [
    ((3, 5, 7, 9), 1, False),  # single-thread
    ((6, 7), 1, False),
    ((2, 3, 9001), 1, False),  # plane segments
    ((3, 4, 3001), 1, False),  # fused per channel
    ((701, 7, 3, 3), 1, False),  # flat rows of short planes
    ((20011, 3), 1, False),  # channels-last spans
    ((5, 41, 67), -1, False),
    ((67, 3, 32), -1, True),  # lines of whole cache lines, streamed
    ((3, 4, 1504), 1, True),  # planes of whole vectors, streamed
]
if ON_DEVICE:  # the simulator: the (N, C, L) and (M, C) views, partial blocks
    CASES = [((3, 5, 7, 9), 1, False), ((6, 7), 1, False), ((5, 6, 9), -1, False)]
HOST_ONLY = pytest.mark.skipif(ON_DEVICE, reason="host memory")


def _bf16(a):
    return np.asarray(a, np.float32).astype(BF16)


def _close(actual, expected, scale=1.0):
    actual = to_host(actual)
    assert actual.dtype == BF16
    a, e = actual.astype(np.float64), np.asarray(expected, np.float64)
    err, tol = np.abs(a - e), RTOL * (np.abs(e) + 1e-3 * scale)
    assert (err <= tol).all(), f"worst {err.max()} at {np.unravel_index(np.argmax(err - tol), err.shape)}"


@pytest.mark.parametrize("shape,axis,streamed", CASES)
def test_operations(shape, axis, streamed, monkeypatch):
    tune_cpu(monkeypatch, **({"stream_min_bytes": 0, "small_values_ncl": 0, "small_values_mc": 0}
                             if streamed else {}))
    c = shape[axis]
    x = _bf16(random_batch(shape, np.float32, seed=1, per_channel_axis=axis))
    dy = _bf16(random_batch(shape, np.float32, seed=2, loc=0.0, scale=1.0))
    z = _bf16(random_batch(shape, np.float32, seed=3, loc=0.0, scale=1.0))
    w, b = channel_vector(c, np.float32, 4), channel_vector(c, np.float32, 5, -0.5, 0.5)
    rm, rv = to_side(np.zeros(c, np.float32)), to_side(np.ones(c, np.float32))
    xs, dys, zs, ws, bs = (to_side(a) for a in (x, dy, z, w, b))

    y, mean, invstd = numbabn.batch_norm_forward(xs, ws, bs, axis=axis, running_mean=rm, running_var=rv)
    yr, rmr, rvr = ref.batch_norm(x, np.zeros(c), np.ones(c), w, b, True, axis=axis)
    _close(y, yr, scale=np.abs(yr).max())
    mean, invstd, rm, rv = to_host(mean), to_host(invstd), to_host(rm), to_host(rv)
    assert mean.dtype == invstd.dtype == np.float32
    assert_close(rm, rmr, np.float32, factor=2)
    assert_close(rv, rvr, np.float32, factor=2)

    y = numbabn.batch_norm(xs, to_side(rm), to_side(rv), ws, bs, axis=axis)
    _close(y, ref.batch_norm(x, rm, rv, w, b, axis=axis)[0])

    dx, dw, db = numbabn.batch_norm_backward(dys, xs, to_side(mean), to_side(invstd), ws, axis=axis)
    dw, db = to_host(dw), to_host(db)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, w, axis)
    _close(dx, dxr, scale=np.abs(dxr).max())
    count = x.size // c
    assert_close(dw, dwr, np.float32, scale=np.sqrt(count), factor=2)
    assert_close(db, dbr, np.float32, scale=np.sqrt(count), factor=2)

    y2, mean, invstd = numbabn.batch_norm_forward(xs, axis=axis, residual=zs, activation="relu")
    _close(y2, ref.batch_norm_forward(x, axis=axis, residual=z, activation="relu")[0], scale=4)
    dx2, *_, dr = numbabn.batch_norm_backward(
        dys, xs, mean, invstd, axis=axis, activation="relu", y=y2, residual_grad=True
    )
    y2, mean, invstd = to_host(y2), to_host(mean), to_host(invstd)
    want = ref.batch_norm_backward(dy, x, mean, invstd, None, axis, activation="relu", y=y2,
                                   residual_grad=True)
    _close(dx2, want[0], scale=np.abs(want[0]).max())
    np.testing.assert_array_equal(to_host(dr), want[3].astype(BF16))


def test_numerics():
    """A constant channel normalizes to exactly 0; a large offset (values 1000 + 8k, all
    exact in bfloat16) costs no accuracy; a NaN and an infinity come through."""
    rng = np.random.default_rng(7)
    x = (1000 + 8 * rng.integers(-4, 5, (6, 3, 40))).astype(BF16)
    x[:, 1] = 5.0
    y = to_host(numbabn.batch_norm_forward(to_side(x))[0])
    assert (y[:, 1].astype(np.float32) == 0).all()
    _close(y, ref.batch_norm_forward(x)[0], scale=2)
    x[0, 0, 0], x[1, 0, 0] = np.nan, -np.inf
    rm, rv = to_side(np.zeros(3, np.float32)), to_side(np.ones(3, np.float32))
    y = to_host(numbabn.batch_norm(to_side(x), rm, rv)).astype(np.float32)
    assert np.isnan(y[0, 0, 0]) and y[1, 0, 0] == -np.inf
    assert np.isfinite(y).sum() == y.size - 2


def test_bfloat16_parameters_and_layer():
    """Running statistics, weight and bias may be bfloat16 too (as a torch model
    converted with .to(torch.bfloat16) has them); ``BatchNorm(dtype=bfloat16)``."""
    x = _bf16(random_batch((8, 4, 5, 5), np.float32, seed=9, per_channel_axis=1))
    bn = numbabn.BatchNorm(4, dtype=BF16)
    y = to_host(bn(to_side(x)))
    running_mean = to_host(bn.running_mean)
    assert y.dtype == running_mean.dtype == BF16
    rm = ref.batch_norm(x, np.zeros(4), np.ones(4), training=True)[1]
    np.testing.assert_allclose(running_mean.astype(np.float64), rm, rtol=RTOL, atol=1e-3)
    dx = to_host(bn.backward(to_side(_bf16(np.ones(x.shape)))))
    assert dx.dtype == BF16 and to_host(bn.weight_grad).dtype == np.float32


@HOST_ONLY
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_bfloat16_layer(channels_last):
    torch = pytest.importorskip("torch")
    import numbabn.torch as nbt

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12).to(torch.bfloat16).to(memory_format=fmt)
    ours = nbt.BatchNorm2d(16).to(torch.bfloat16)
    theirs = torch.nn.BatchNorm2d(16).to(torch.float64)
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    ys = [ours(xs[0]), theirs(xs[1])]
    g = torch.randn(ys[0].shape)
    ys[0].backward(g.to(torch.bfloat16))
    ys[1].backward(g.double())
    assert ys[0].dtype == torch.bfloat16 and xs[0].grad.dtype == torch.bfloat16
    for mine, want in [(ys[0], ys[1]), (xs[0].grad, xs[1].grad)]:
        atol = RTOL * want.abs().max().item()
        torch.testing.assert_close(mine.double(), want, rtol=RTOL, atol=atol)
    torch.testing.assert_close(ours.running_var.double(), theirs.running_var, rtol=RTOL, atol=0)
    y = numbabn.batch_norm(x, training=True)  # numbabn's own functions: tensor in, tensor out
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16


@HOST_ONLY
def test_float16_and_bfloat16_share_plans():
    """The two dtypes of one size share the CPU plans of a shape (cached by geometry and
    item size), each call with its own layout object."""
    x = random_batch((4, 6, 30, 30), np.float32, seed=11, per_channel_axis=1)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    for dtype in (np.float16, BF16, np.float16):
        y = numbabn.batch_norm(x.astype(dtype), rm, rv)
        _close(y.astype(np.float32).astype(BF16), ref.batch_norm(x.astype(dtype), rm, rv)[0])


@HOST_ONLY
@pytest.mark.parametrize("dtype", [BF16, np.float16])
def test_vector_loops_carry_every_value_exactly(dtype):
    """The explicit vector loops' widening and narrowing (``vector.span_nt``, in the
    streamed span), with the identity constants (``_channel.IDENTITY``), give back every
    16-bit pattern bitwise, subnormals, infinities and signed zeros included; a NaN stays
    a NaN of its sign."""
    from numbabn._channel import IDENTITY
    from numbabn._cpu import arrays, elementwise

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    x = np.concatenate([every, every[:61]])  # (a tail past the last whole vector)
    y = arrays.aligned_empty(x.shape, dtype)
    one = tuple(np.float32(v) for v in IDENTITY)
    elementwise.span_streamed(None, arrays.kernel_array(x), one, arrays.kernel_array(y))
    nan = np.isnan(x.astype(np.float32))
    np.testing.assert_array_equal(y.view(np.uint16)[~nan], x.view(np.uint16)[~nan])
    assert np.isnan(y.astype(np.float32)[nan]).all()
    np.testing.assert_array_equal(np.signbit(y.astype(np.float32)), np.signbit(x.astype(np.float32)))


@HOST_ONLY
def test_conversions_round_once_as_numpy():
    """``_half.store`` of float32 and float64 values into bfloat16 and float16 bits equals
    NumPy's and ml_dtypes' ``astype`` (one rounding to nearest even, also from float64:
    values just off a tie included), ``load`` widens exactly, and the simulator's twins
    agree; infinities, NaN, zeros and subnormals included."""
    from numba import njit

    from numbabn import _half

    @njit
    def store_all(values, out):
        for i in range(values.size):
            out[i] = _half.store(values[i], out)

    @njit
    def load_all(bits, out):
        for i in range(bits.size):
            out[i] = _half.load(bits[i])

    rng = np.random.default_rng(3)
    spread = rng.standard_normal(20000) * np.exp(rng.uniform(-40, 40, 20000))
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300, 3.3961e38, 1e-45, -1e-50, 6e-8]
    with np.errstate(over="ignore"):  # (overflow to infinity is part of what is checked)
        for dtype, bits in ((BF16, np.int16), (np.dtype(np.float16), np.uint16)):
            grid = rng.standard_normal(5000).astype(dtype)
            beyond = (grid.view(bits).astype(np.int64) + 1).astype(bits).view(dtype)  # one ulp out
            tie = (grid.astype(np.float64) + beyond.astype(np.float64)) / 2  # (exact)
            ties = np.concatenate([tie * (1 + e) for e in (0, 2.0**-30, -(2.0**-30))])
            values = np.concatenate([spread, ties, specials])
            want = values.astype(dtype)
            for v in (values, values.astype(np.float32)):
                got = np.empty(v.size, bits)
                store_all(v, got)
                np.testing.assert_array_equal(got.view(dtype).astype(np.float64),
                                              v.astype(dtype).astype(np.float64))
            wide = np.empty(values.size, np.float32)
            load_all(want.view(bits), wide)
            np.testing.assert_array_equal(wide, want.astype(np.float32))
        like = np.empty(1, np.int16)
        twins = np.array([_half.sim_store(v, like) for v in values[:3000]])
        np.testing.assert_array_equal(twins, values[:3000].astype(BF16).view(np.int16))
    assert _half.sim_load(np.float32(1.5).astype(BF16).view(np.int16)) == np.float32(1.5)


@HOST_ONLY
def test_ml_dtypes_is_imported_only_for_bfloat16():
    """Importing ml_dtypes takes 0.7-0.9 s: numbabn leaves it to whoever makes a bfloat16
    array, and imports it itself only for a dtype named "bfloat16"."""
    code = (
        "import sys, numpy as np, numbabn\n"
        "numbabn.batch_norm(np.ones((2, 3, 4), np.float32), training=True)\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        "bn = numbabn.BatchNorm(3, dtype='bfloat16')\n"
        "assert bn.running_mean.dtype.name == 'bfloat16', bn.running_mean.dtype\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
