"""The fused epilogues, y = relu(bn(x) + residual), and their backward, against the
float64 reference of the composition (``numbabn.reference`` with ``residual=`` and
``activation=``)."""

from __future__ import annotations

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref

from cases import LAYOUTS, SHAPES, on_side
from helpers import DTYPES, ON_DEVICE, assert_close, channel_vector, random_batch, to_host, to_side

# On the device (the simulator runs a Python thread per CUDA thread) a share of the
# shapes: one kernel serves them all, whatever the epilogue.
SHAPES = SHAPES[1::2] if ON_DEVICE else SHAPES
SHAPE_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in SHAPES]
KINDS = [("residual", None), (None, "relu"), ("residual", "relu")]


def _sd(dtype):
    return np.float64 if dtype == np.float64 else np.float32


@pytest.fixture(params=SHAPES, ids=SHAPE_IDS)
def shape_axis(request):
    return request.param


def _inputs(shape, axis, dtype, seed):
    c = shape[axis]
    x = random_batch(shape, dtype, seed=seed, per_channel_axis=axis)
    z = random_batch(shape, dtype, seed=seed + 1, loc=0.0, scale=1.0)
    w, b = channel_vector(c, np.float32, seed + 2), channel_vector(c, np.float32, seed + 3, -0.5, 0.5)
    return x, z, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward(shape_axis, dtype, training, layout):
    """relu(bn(x) + z), x and z in different memory layouts; running statistics as
    without the epilogue."""
    shape, axis = shape_axis
    c = shape[axis]
    x, z, w, b = _inputs(shape, axis, dtype, 3)
    rm, rv = channel_vector(c, np.float32, 7, -1, 1), channel_vector(c, np.float32, 8)
    yr, rmr, rvr = ref.batch_norm(
        x, rm, rv, w, b, training, 0.1, 1e-5, axis, residual=z, activation="relu"
    )
    rm_s, rv_s = to_side(rm.copy()), to_side(rv.copy())
    other = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    y = numbabn.batch_norm(
        on_side(x, axis, layout), rm_s, rv_s, to_side(w), to_side(b), training, axis=axis,
        residual=on_side(z, axis, other), activation="relu",
    )
    assert to_host(y).dtype == x.dtype and to_host(y).shape == shape
    assert_close(y, yr, dtype, factor=2)
    assert (to_host(y) >= 0).all()
    if training:
        assert_close(rm_s, rmr, np.float32, factor=2)
        assert_close(rv_s, rvr, np.float32, factor=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual,activation", KINDS)
@pytest.mark.parametrize("shape,axis", [((3, 5, 7, 9), 1), ((4, 9, 5, 6), -1), ((5, 7), 1)])
def test_each_epilogue_and_forward_statistics(dtype, residual, activation, shape, axis):
    """Residual alone, ReLU alone, both; ``batch_norm_forward`` returns the statistics
    of x, whatever the epilogue."""
    x, z, w, b = _inputs(shape, axis, dtype, 11)
    z = z if residual else None
    yr, mr, ir = ref.batch_norm_forward(x, w, b, 1e-5, axis, residual=z, activation=activation)
    y, mean, invstd = numbabn.batch_norm_forward(
        to_side(x), to_side(w), to_side(b), axis=axis, residual=to_side(z), activation=activation
    )
    assert_close(y, yr, dtype, factor=2)
    assert_close(mean, mr, _sd(dtype), scale=1.0, factor=2)
    assert_close(invstd, ir, _sd(dtype), factor=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual_grad", [False, True])
def test_backward(shape_axis, dtype, training, residual_grad):
    """dx, dweight, dbias (and dresidual) through the ReLU of the forward's output."""
    shape, axis = shape_axis
    c = shape[axis]
    x, z, w, b = _inputs(shape, axis, dtype, 21)
    dy = random_batch(shape, dtype, seed=25, loc=0.1, scale=1.0)
    y, mean, invstd = numbabn.batch_norm_forward(
        to_side(x), to_side(w), to_side(b), axis=axis, residual=to_side(z), activation="relu"
    )
    y_host = to_host(y)
    assert (y_host == 0).any() and (y_host > 0).any()  # the mask does something
    mean, invstd = to_host(mean), to_host(invstd)
    got = numbabn.batch_norm_backward(
        to_side(dy), to_side(x), to_side(mean), to_side(invstd), to_side(w), axis=axis,
        training=training, activation="relu", y=y, residual_grad=residual_grad,
    )
    want = ref.batch_norm_backward(
        dy, x, mean, invstd, w, axis, training, activation="relu", y=y_host,
        residual_grad=residual_grad,
    )
    assert len(got) == (4 if residual_grad else 3)
    count = x.size // c
    sdt = np.float32 if dtype == np.float16 else dtype
    assert_close(got[0], want[0], dtype, factor=4)
    assert_close(got[1], want[1], sdt, scale=np.sqrt(count), factor=2)
    assert_close(got[2], want[2], sdt, scale=np.sqrt(count), factor=2)
    if residual_grad:
        assert to_host(got[3]).dtype == x.dtype
        np.testing.assert_array_equal(to_host(got[3]), want[3].astype(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_relu_backward_with_y_in_any_layout(layout):
    """y in another memory order than dy and x (the passes read the three together):
    the same gradients. Host: (3, 4, 3001) runs the fused per-channel pass."""
    shape = (3, 4, 3001) if not ON_DEVICE else (3, 2, 67)
    x, _, w, _ = _inputs(shape, 1, np.float32, 71)
    dy = random_batch(shape, np.float32, seed=72)
    y = np.maximum(random_batch(shape, np.float32, seed=73, loc=0.0, scale=1.0), 0)
    dy.flat[np.flatnonzero(y)[::5]] = -0.0  # kept in dresidual, bit for bit
    _, mean, invstd = ref.batch_norm_forward(x, w, None, 1e-5, 1)
    mean, invstd = mean.astype(np.float32), invstd.astype(np.float32)
    got = numbabn.batch_norm_backward(
        to_side(dy), to_side(x), to_side(mean), to_side(invstd), to_side(w),
        activation="relu", y=on_side(y, 1, layout), residual_grad=True,
    )
    want = ref.batch_norm_backward(dy, x, mean, invstd, w, 1, True, activation="relu", y=y,
                                   residual_grad=True)
    assert_close(got[0], want[0], np.float32, factor=4)
    for g, r in zip(got[1:3], want[1:3]):
        assert_close(g, r, np.float32, scale=np.sqrt(x.size / 4), factor=2)
    dr, want_dr = to_host(got[3]), want[3].astype(np.float32)
    np.testing.assert_array_equal(dr.view(np.int32), want_dr.view(np.int32))  # -0.0 kept


@pytest.mark.parametrize("training", [True, False])
def test_backward_residual_without_activation(training):
    """dresidual of a plain residual add is dy itself, in a new array."""
    shape, axis = (4, 3, 5, 6), 1
    x, _, w, _ = _inputs(shape, axis, np.float32, 31)
    dy = random_batch(shape, np.float32, seed=32)
    dy.flat[::7] = -0.0
    _, mean, invstd = ref.batch_norm_forward(x, w, None, 1e-5, axis)
    mean, invstd = mean.astype(np.float32), invstd.astype(np.float32)
    dys = to_side(dy)
    dx, dw, db, dr = numbabn.batch_norm_backward(
        dys, to_side(x), to_side(mean), to_side(invstd), to_side(w), training=training,
        residual_grad=True,
    )
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, w, axis, training)
    assert dr is not dys
    np.testing.assert_array_equal(to_host(dr).view(np.int32), dy.view(np.int32))  # -0.0 kept
    assert_close(dx, dxr, np.float32, factor=4)


def test_relu_keeps_nan_and_masks_its_gradient():
    """relu(NaN) is NaN (as torch.relu); the backward passes dy only where y > 0."""
    x = random_batch((4, 3, 8), np.float32, seed=41)
    z = np.zeros_like(x)
    z[0, 0, 0] = np.nan
    y = to_host(numbabn.batch_norm(to_side(x), training=True, residual=to_side(z), activation="relu"))
    assert np.isnan(y[0, 0, 0]) and not np.isnan(y.ravel()[1:]).any()
    y[0, 0, 0] = 0.0
    dy = np.full_like(x, np.nan)
    dy[y > 0] = 1.0
    _, mean, invstd = numbabn.batch_norm_forward(to_side(x))
    *_, dr = numbabn.batch_norm_backward(
        to_side(dy), to_side(x), mean, invstd, activation="relu", y=to_side(y), residual_grad=True
    )
    np.testing.assert_array_equal(to_host(dr), (y > 0).astype(np.float32))


@pytest.mark.parametrize("target", ["residual", "x"])
@pytest.mark.parametrize("training", [True, False])
def test_out_may_be_the_residual_or_x(target, training):
    shape, axis = (3, 4, 5, 7), 1
    x, z, w, b = _inputs(shape, axis, np.float32, 51)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    yr, _, _ = ref.batch_norm(x, rm, rv, w, b, training, residual=z, activation="relu")
    xs, zs = to_side(x.copy()), to_side(z.copy())
    out = zs if target == "residual" else xs
    y = numbabn.batch_norm(
        xs, to_side(rm), to_side(rv), to_side(w), to_side(b), training, out=out, residual=zs,
        activation="relu",
    )
    assert y is out
    assert_close(out, yr, np.float32, factor=2)


@pytest.mark.skipif(ON_DEVICE, reason="host memory layouts")
def test_out_overlapping_the_residual():
    """An out that overlaps the residual one element off still gets the right result."""
    shape = (3, 4, 5, 7)
    x, z, _, _ = _inputs(shape, 1, np.float32, 61)
    buf = np.zeros(z.size + 1, np.float32)
    zs = buf[1:].reshape(shape)
    zs[...] = z
    out = buf[:-1].reshape(shape)
    yr, _, _ = ref.batch_norm(x, None, None, None, None, True, residual=z, activation="relu")
    y = numbabn.batch_norm(x, training=True, out=out, residual=zs, activation="relu")
    assert y is out
    assert_close(out, yr, np.float32, factor=2)


def test_inputs_unchanged():
    x, z, w, b = _inputs((3, 4, 5, 7), 1, np.float32, 71)
    copies = [a.copy() for a in (x, z, w, b)]
    xs, zs, ws, bs = (to_side(a) for a in (x, z, w, b))
    numbabn.batch_norm(xs, None, None, ws, bs, True, residual=zs, activation="relu")
    for a, c in zip((xs, zs, ws, bs), copies):
        np.testing.assert_array_equal(to_host(a), c)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"activation": "gelu"}, ValueError),
        ({"activation": "ReLU"}, ValueError),
        ({"residual": np.zeros((3, 4, 5, 6), np.float32)}, ValueError),
        ({"residual": np.zeros((3, 4, 5, 7), np.float64)}, TypeError),
    ],
)
def test_forward_errors_write_nothing(kwargs, error):
    x = random_batch((3, 4, 5, 7), np.float32, seed=81)
    rm, rv = to_side(np.zeros(4, np.float32)), to_side(np.ones(4, np.float32))
    out = to_side(np.full(x.shape, 7.0, np.float32))
    kwargs = {k: to_side(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    with pytest.raises(error):
        numbabn.batch_norm(to_side(x), rm, rv, training=True, out=out, **kwargs)
    with pytest.raises(error):
        numbabn.batch_norm_forward(to_side(x), **kwargs)
    np.testing.assert_array_equal(to_host(rm), 0.0)
    np.testing.assert_array_equal(to_host(rv), 1.0)
    np.testing.assert_array_equal(to_host(out), 7.0)


def test_backward_errors():
    x = random_batch((3, 4, 5, 7), np.float32, seed=91)
    args = (to_side(x), to_side(x), to_side(np.zeros(4, np.float32)), to_side(np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="needs y"):
        numbabn.batch_norm_backward(*args, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        numbabn.batch_norm_backward(*args, activation="tanh", y=args[0])
    with pytest.raises(ValueError, match="shape"):
        numbabn.batch_norm_backward(*args, activation="relu", y=to_side(x[:2]))
    with pytest.raises(TypeError, match="dtype"):
        numbabn.batch_norm_backward(*args, activation="relu", y=to_side(x.astype(np.float64)))


@pytest.mark.skipif(ON_DEVICE, reason="host and device arrays mixed")
def test_residual_on_the_other_side_is_refused():
    pytest.importorskip("numba.cuda")
    x = random_batch((3, 4, 5), np.float32, seed=95)

    class Device:  # a stand-in: anything with a CUDA array interface is a device array
        __cuda_array_interface__ = {
            "shape": x.shape, "typestr": "<f4", "data": (0, False), "version": 3, "strides": None,
        }

    with pytest.raises(TypeError, match="same side"):
        numbabn.batch_norm(x, training=True, residual=Device(), activation="relu")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_layer(training, axis):
    """``BatchNorm(activation="relu")``: bn(x, residual) and its backward, against the
    reference; ``residual_grad`` None after a forward without a residual."""
    shape = (6, 5, 4, 7) if axis == 1 else (6, 4, 7, 5)
    x, z, _, _ = _inputs(shape, axis, np.float32, 101)
    dy = random_batch(shape, np.float32, seed=102)
    bn = numbabn.BatchNorm(5, axis=axis, activation="relu").train(training)
    bn.running_mean[:] = 0.25
    y = bn(to_side(x), to_side(z))
    yr, _, _ = ref.batch_norm(
        x, np.full(5, 0.25), np.ones(5), None, None, training, axis=axis, residual=z,
        activation="relu",
    )
    assert_close(y, yr, np.float32, factor=2)
    dx = bn.backward(to_side(dy))
    if training:
        _, mean, invstd = ref.batch_norm_forward(x, None, None, 1e-5, axis)
    else:
        mean, invstd = np.full(5, 0.25), 1 / np.sqrt(np.ones(5) + 1e-5)
    want = ref.batch_norm_backward(
        dy, x, mean, invstd, None, axis, training, activation="relu", y=to_host(y),
        residual_grad=True,
    )
    assert_close(dx, want[0], np.float32, factor=4)
    assert_close(bn.weight_grad, want[1], np.float32, scale=np.sqrt(x.size / 5), factor=2)
    np.testing.assert_array_equal(to_host(bn.residual_grad), want[3].astype(np.float32))
    bn(to_side(x))
    bn.backward(to_side(dy))
    assert bn.residual_grad is None
    assert "activation='relu'" in repr(bn)
    with pytest.raises(ValueError, match="activation"):
        numbabn.BatchNorm(5, activation="sigmoid")
