"""The functional API against the float64 reference, over shapes, axes, layouts, dtypes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref

from cases import LAYOUTS, SHAPES, on_side
from helpers import (
    DTYPES,
    ON_DEVICE,
    assert_close,
    channel_vector,
    random_batch,
    to_host,
    to_side,
    tune_cpu,
)

SHAPE_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in SHAPES]


def _stats_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


@pytest.fixture(params=SHAPES, ids=SHAPE_IDS)
def shape_axis(request):
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_stats(shape_axis, dtype, layout):
    shape, axis = shape_axis
    x = random_batch(shape, dtype, per_channel_axis=axis)
    xs = on_side(x, axis, layout)
    mean, var = numbabn.batch_stats(xs, axis=axis)
    mref, vref = ref.batch_stats(x, axis)
    assert to_host(mean).dtype == _stats_dtype(dtype)
    assert to_host(var).dtype == _stats_dtype(dtype)
    tol_scale = 1 if dtype != np.float16 else 0.1  # float16 input is exact in float32 sums
    assert_close(mean, mref, np.float32 if dtype == np.float16 else dtype, scale=4, factor=tol_scale)
    assert_close(var, vref, np.float32 if dtype == np.float16 else dtype, scale=1, factor=tol_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
def test_train_forward_updates_running_stats(shape_axis, dtype, layout, stat_dtype):
    shape, axis = shape_axis
    c = shape[axis]
    x = random_batch(shape, dtype, seed=1, per_channel_axis=axis)
    w = channel_vector(c, stat_dtype, 2)
    b = channel_vector(c, stat_dtype, 3, -1, 1)
    rm0 = channel_vector(c, stat_dtype, 4, -1, 1)
    rv0 = channel_vector(c, stat_dtype, 5)
    rm, rv = to_side(rm0.copy()), to_side(rv0.copy())
    xs = on_side(x, axis, layout)
    x_before = to_host(xs).copy()
    y = numbabn.batch_norm(xs, rm, rv, to_side(w), to_side(b), True, 0.3, 1e-4, axis=axis)
    yref, rmref, rvref = ref.batch_norm(x, rm0, rv0, w, b, True, 0.3, 1e-4, axis)
    yh = to_host(y)
    assert yh.shape == x.shape and yh.dtype == x.dtype
    assert_close(yh, yref, dtype, factor=2)
    assert_close(rm, rmref, stat_dtype, scale=4, factor=2)
    assert_close(rv, rvref, stat_dtype, scale=1, factor=2)
    np.testing.assert_array_equal(to_host(xs), x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_forward_uses_running_stats(shape_axis, dtype, layout):
    shape, axis = shape_axis
    c = shape[axis]
    x = random_batch(shape, dtype, seed=6, per_channel_axis=axis)
    rm = channel_vector(c, np.float32, 7, -2, 2)
    rv = channel_vector(c, np.float32, 8, 0.5, 4)
    w = channel_vector(c, np.float32, 9)
    b = channel_vector(c, np.float32, 10, -1, 1)
    sides = [to_side(a) for a in (rm, rv, w, b)]
    y = numbabn.batch_norm(on_side(x, axis, layout), *sides, training=False, eps=1e-3, axis=axis)
    yref, _, _ = ref.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3, axis)
    assert_close(y, yref, dtype, factor=2)
    np.testing.assert_array_equal(to_host(sides[0]), rm)
    np.testing.assert_array_equal(to_host(sides[1]), rv)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_forward_returns_statistics(shape_axis, dtype):
    shape, axis = shape_axis
    c = shape[axis]
    x = random_batch(shape, dtype, seed=11, per_channel_axis=axis)
    w = channel_vector(c, np.float64, 12)
    y, mean, invstd = numbabn.batch_norm_forward(to_side(x), to_side(w), None, 1e-3, axis=axis)
    yref, mref, iref = ref.batch_norm_forward(x, w, None, 1e-3, axis)
    for a in (mean, invstd):
        assert to_host(a).dtype == _stats_dtype(dtype)
    sd = np.float32 if dtype == np.float16 else dtype
    assert_close(y, yref, dtype, factor=2)
    assert_close(mean, mref, sd, scale=4)
    assert_close(invstd, iref, sd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward(shape_axis, dtype, training, layout):
    shape, axis = shape_axis
    c = shape[axis]
    x = random_batch(shape, dtype, seed=13, per_channel_axis=axis)
    dy = random_batch(shape, dtype, seed=14, loc=0.1, scale=1.0)
    w = channel_vector(c, np.float32, 15)
    _, mean, invstd = ref.batch_norm_forward(x, None, None, 1e-3, axis)
    sd = _stats_dtype(dtype)
    mean, invstd = mean.astype(sd), invstd.astype(sd)
    dx, dw, db = numbabn.batch_norm_backward(
        on_side(dy, axis, layout), on_side(x, axis, layout), to_side(mean), to_side(invstd),
        to_side(w), axis=axis, training=training,
    )
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, w, axis, training)
    count = x.size // c
    assert to_host(dx).dtype == x.dtype and to_host(dx).shape == x.shape
    assert to_host(dw).dtype == sd and to_host(db).dtype == sd
    sdt = np.float32 if dtype == np.float16 else dtype
    assert_close(dx, dxr, dtype, factor=4)
    assert_close(db, dbr, sdt, scale=np.sqrt(count), factor=2)
    assert_close(dw, dwr, sdt, scale=np.sqrt(count), factor=2)


def test_backward_matches_finite_differences():
    """Training-mode gradient of sum(y * g) by central differences, float64."""
    shape, axis = (3, 2, 5), 1
    x = random_batch(shape, np.float64, seed=20, per_channel_axis=axis)
    g = random_batch(shape, np.float64, seed=21)
    w = channel_vector(2, np.float64, 22)
    b = channel_vector(2, np.float64, 23)

    def loss(xv, wv, bv):
        y = numbabn.batch_norm(to_side(xv), None, None, to_side(wv), to_side(bv), True, eps=1e-3)
        return float(np.sum(to_host(y) * g))

    _, mean, invstd = numbabn.batch_norm_forward(to_side(x), to_side(w), to_side(b), 1e-3)
    dx, dw, db = numbabn.batch_norm_backward(to_side(g), to_side(x), mean, invstd, to_side(w))
    h = 1e-6
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        num = np.empty(arr.shape)
        for idx in np.ndindex(arr.shape):
            saved = arr[idx]
            arr[idx] = saved + h
            up = loss(x, w, b)
            arr[idx] = saved - h
            down = loss(x, w, b)
            arr[idx] = saved
            num[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(to_host(grad), num, rtol=1e-6, atol=1e-7)


def test_eval_backward_matches_finite_differences():
    """Eval mode: running statistics are constants, so dx = dy * invstd * w."""
    shape = (2, 3, 4)
    x = random_batch(shape, np.float64, seed=30, per_channel_axis=1)
    g = random_batch(shape, np.float64, seed=31)
    rm = channel_vector(3, np.float64, 32, -1, 1)
    rv = channel_vector(3, np.float64, 33)
    w = channel_vector(3, np.float64, 34)

    def loss(xv):
        y = numbabn.batch_norm(to_side(xv), to_side(rm), to_side(rv), to_side(w), None, False, eps=1e-3)
        return float(np.sum(to_host(y) * g))

    invstd = 1 / np.sqrt(rv + 1e-3)
    dx, _, _ = numbabn.batch_norm_backward(
        to_side(g), to_side(x), to_side(rm), to_side(invstd), to_side(w), training=False
    )
    h = 1e-6
    num = np.empty(shape)
    for idx in np.ndindex(shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (loss(xp) - loss(xm)) / (2 * h)
    np.testing.assert_allclose(to_host(dx), num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_out_and_in_place(dtype, training):
    shape, axis = (3, 4, 5, 7), 1
    x = random_batch(shape, dtype, seed=40, per_channel_axis=axis)
    rm = np.zeros(4, np.float32)
    rv = np.ones(4, np.float32)
    yref, _, _ = ref.batch_norm(x, rm, rv, None, None, training, 0.1, 1e-5, axis)

    out = to_side(np.zeros_like(x))
    y = numbabn.batch_norm(to_side(x), to_side(rm.copy()), to_side(rv.copy()), training=training, out=out)
    assert y is out
    assert_close(out, yref, dtype, factor=2)

    xs = to_side(x.copy())
    y = numbabn.batch_norm(xs, to_side(rm.copy()), to_side(rv.copy()), training=training, out=xs)
    assert y is xs
    assert_close(xs, yref, dtype, factor=2)


@pytest.mark.skipif(ON_DEVICE, reason="host memory layouts")
@pytest.mark.parametrize("out_layout", ["channels_last", "strided", "overlapping"])
def test_out_in_other_layouts(out_layout):
    shape, axis = (3, 4, 5, 7), 1
    x = random_batch(shape, np.float32, seed=41, per_channel_axis=axis)
    yref, _, _ = ref.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, axis)
    if out_layout == "overlapping":
        buf = np.concatenate([x.ravel(), np.zeros(1, x.dtype)])
        xs = buf[1:].reshape(shape)
        xs[...] = x
        out = buf[:-1].reshape(shape)
    else:
        xs = x
        out = np.zeros_like(in_layout_of(x, out_layout))
        out = in_layout_of(out, out_layout)
    y = numbabn.batch_norm(xs, training=True, out=out)
    assert y is out
    assert_close(out, yref, np.float32, factor=2)


def in_layout_of(x, layout):
    from cases import in_layout

    return in_layout(x, 1, layout)


@pytest.mark.skipif(ON_DEVICE, reason="host memory layouts")
def test_output_keeps_channels_last_memory_order():
    x = random_batch((2, 3, 4, 5), np.float32)
    xcl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    y = numbabn.batch_norm(xcl, training=True)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous
    y2, _, _ = numbabn.batch_norm_forward(x)
    assert y2.flags.c_contiguous


@pytest.mark.parametrize("training", [True, False])
def test_without_optional_arguments(training):
    x = random_batch((4, 3, 6), np.float32, seed=50, per_channel_axis=1)
    if training:
        y = numbabn.batch_norm(to_side(x), training=True)
        yref, _, _ = ref.batch_norm(x, training=True)
    else:
        rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
        y = numbabn.batch_norm(to_side(x), to_side(rm), to_side(rv))
        yref, _, _ = ref.batch_norm(x, rm, rv)
    assert_close(y, yref, np.float32)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_extremes(momentum):
    x = random_batch((4, 3, 6), np.float64, seed=51, per_channel_axis=1)
    rm0, rv0 = np.full(3, 0.25), np.full(3, 3.0)
    rm, rv = to_side(rm0.copy()), to_side(rv0.copy())
    numbabn.batch_norm(to_side(x), rm, rv, training=True, momentum=momentum)
    _, rmref, rvref = ref.batch_norm(x, rm0, rv0, training=True, momentum=momentum)
    assert_close(rm, rmref, np.float64)
    assert_close(rv, rvref, np.float64)
    if momentum == 0.0:
        np.testing.assert_array_equal(to_host(rm), rm0)


@pytest.mark.skipif(not ON_DEVICE, reason="GPU grids")
@pytest.mark.parametrize("shape,axis", [((4, 1, 2100), 1), ((400, 6), -1)])
def test_reductions_split_over_many_blocks(shape, axis, monkeypatch):
    """A channel split over dozens of blocks: the last block's threads share the adding
    of the partials (U at a time, then a tree). The simulator's device reports one
    SM, which alone gives a handful of blocks; more are asked for here."""
    from numbabn import _gpu, _validate
    from numbabn import _gpu_kernels as K

    monkeypatch.setattr(_gpu, "_BLOCKS_PER_SM", 80)
    x = random_batch(shape, np.float32, seed=51, per_channel_axis=axis)
    dy = random_batch(shape, np.float32, seed=52, loc=0.1, scale=1.0)
    chk = _validate.batch_norm_args(to_side(x), None, None, None, None, True, 0.1, 1e-5, axis, None)
    (_, blocks), _ = _gpu._reduce_grid(chk.layout)
    if _gpu._sm_count() == 1:  # the simulator: the unrolled adding runs
        rows = K.BLOCK if chk.layout.kind == "ncl" else K.TY
        assert blocks >= K.U * rows
    y, mean, invstd = numbabn.batch_norm_forward(to_side(x), axis=axis)
    yref, mref, iref = ref.batch_norm_forward(x, axis=axis)
    assert_close(y, yref, np.float32)
    assert_close(mean, mref, np.float32)
    assert_close(invstd, iref, np.float32)
    dx, dw, db = numbabn.batch_norm_backward(to_side(dy), to_side(x), mean, invstd, axis=axis)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, to_host(mean), to_host(invstd), None, axis)
    count = x.size // x.shape[axis]
    assert_close(dx, dxr, np.float32, factor=4)
    assert_close(db, dbr, np.float32, scale=np.sqrt(count), factor=2)
    assert_close(dw, dwr, np.float32, scale=np.sqrt(count), factor=2)


SHIPPED_SMALL_VALUES = {"small_values_ncl": 1 << 16, "small_values_mc": 1 << 18}


@pytest.mark.skipif(ON_DEVICE, reason="the CPU backend's single-thread limits")
def test_single_thread_limits(monkeypatch):
    """The limits up to which an operation stays on the calling thread: per layout,
    the same for every thread count (results must not depend on it), never for empty
    inputs."""
    from numbabn import _validate
    from numbabn._cpu import plan

    tune_cpu(monkeypatch, **SHIPPED_SMALL_VALUES)

    def small(shape, axis):
        x = np.empty(shape, np.float32)
        return plan.small(_validate.plan_layout(_validate.describe(x, "x"), axis % x.ndim))

    assert small((16, 64, 8, 8), 1) and not small((16, 64, 8, 9), 1)
    assert small((1024, 256), 1) and not small((1025, 256), 1)
    assert small((64, 8, 8, 64), -1) and not small((64, 8, 8, 65), -1)
    assert not small((0, 3, 5), 1)
    layout = _validate.plan_layout(_validate.describe(np.empty((1024, 64), np.float32), "x"), 1)
    assert len({plan.make(layout, t, 4).small for t in (1, 2, 8, 64)}) == 1


@pytest.mark.skipif(ON_DEVICE, reason="the CPU backend's single-thread limits")
@pytest.mark.parametrize("shape,axis", [((9, 13, 7, 71), 1), ((997, 211), 1), ((31, 5, 7, 211), -1)])
def test_mid_sizes_on_the_calling_thread(shape, axis, monkeypatch):
    """Inputs between the suite's limit and the shipped ones (here they run on the
    calling thread): train forward, eval and backward against the reference."""
    from numbabn import _validate
    from numbabn._cpu import plan

    tune_cpu(monkeypatch, **SHIPPED_SMALL_VALUES)
    x = random_batch(shape, np.float32, seed=61, per_channel_axis=axis)
    layout = _validate.plan_layout(_validate.describe(x, "x"), axis % x.ndim)
    assert x.size > 1 << 15 and plan.small(layout)
    c = shape[axis]
    w, b = channel_vector(c, np.float32, 62), channel_vector(c, np.float32, 63, -1, 1)
    rm, rv = channel_vector(c, np.float32, 64, -1, 1), channel_vector(c, np.float32, 65)
    y = numbabn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=True, axis=axis)
    assert_close(y, ref.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis)[0], np.float32, factor=2)
    y = numbabn.batch_norm(x, rm, rv, w, b, axis=axis)
    assert_close(y, ref.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, axis)[0], np.float32, factor=2)
    dy = random_batch(shape, np.float32, seed=66)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis)
    dx, dw, db = numbabn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, w, axis)
    count = x.size // c
    assert_close(dx, dxr, np.float32, factor=4)
    assert_close(db, dbr, np.float32, scale=np.sqrt(count), factor=2)
    assert_close(dw, dwr, np.float32, scale=np.sqrt(count), factor=2)


@pytest.mark.skipif(ON_DEVICE, reason="the CPU backend's work plans")
def test_tuned_limits_take_effect_on_a_cached_geometry(monkeypatch):
    """The CPU backend caches its work plan per geometry; the tests' tuning helper
    must not leave a stale one behind, or a test meant for one path runs another."""
    from numbabn import _validate
    from numbabn._cpu import plan

    x = random_batch((16, 8, 9), np.float32, seed=67)
    layout = _validate.plan_layout(_validate.describe(x, "x"), 1)
    tune_cpu(monkeypatch, **SHIPPED_SMALL_VALUES)
    assert plan.make(layout, 2, x.itemsize).small
    numbabn.batch_stats(x)
    tune_cpu(monkeypatch, small_values_ncl=0, small_values_mc=0)
    assert not plan.make(layout, 2, x.itemsize).small
    mean, var = numbabn.batch_stats(x)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=(0, 2)), rtol=1e-5)


# Every dtype's operations where ml_dtypes is not installed (an import of it fails), on
# host arrays, or on device arrays (``side``: "device") under the simulator.
_WITHOUT_ML_DTYPES = """
import sys
sys.modules["ml_dtypes"] = None
import numpy as np, numbabn, numbabn.reference as ref
if sys.argv[1] == "device":
    from numba import cuda
    on, off = cuda.to_device, lambda a: a.copy_to_host()
else:
    on = off = np.asarray
for dtype in (np.float16, np.float32, np.float64):
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 3, 5)).astype(dtype)
    y, mean, invstd = numbabn.batch_norm_forward(on(x))
    dx = numbabn.batch_norm_backward(on(x), on(x), mean, invstd)[0]
    mean, invstd, y, dx = off(mean), off(invstd), off(y), off(dx)
    want = ref.batch_norm_backward(x, x, mean, invstd)[0]
    tol = 1e-12 if dtype == np.float64 else 1e-2
    assert np.abs(y - ref.batch_norm_forward(x)[0]).max() <= tol, dtype
    assert np.abs(dx - want).max() <= tol * (1 + np.abs(want).max()), dtype
print("ok")
"""


def test_every_dtype_without_ml_dtypes():
    """bfloat16's dtype is None without ml_dtypes, and NumPy reads a dtype compared with
    None as float64: float64 data was taken for bfloat16 bits there (both backends)."""
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ML_DTYPES, "device" if ON_DEVICE else "host"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
