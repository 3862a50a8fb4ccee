"""Plain NumPy batch normalization: the oracle for tests and the baseline for benchmarks.

Straightforward, vectorized NumPy with two-pass statistics. With the default
``dtype=numpy.float64`` every function computes in float64 whatever the input dtype;
this is the reference all numbabn kernels are tested against. With ``dtype=None`` it
computes in the input's dtype (float16 in float32), which is what a NumPy user would write, and serves as
the "plain NumPy" baseline in benchmarks.

Nothing here validates arguments or modifies its inputs.
"""

from __future__ import annotations

import numpy as np


def _prep(x, axis, dtype):
    axis = axis % x.ndim
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    if dtype is None:  # the input's dtype, with float16 and bfloat16 computed in float32
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float32
    return np.asarray(x, dtype=dtype), reduce_axes, tuple(shape)


def _vec(v, c, default, dtype):
    return np.full(c, default, dtype) if v is None else np.asarray(v, dtype=dtype)


def batch_stats(x, axis=1, dtype=np.float64):
    """Per-channel mean and biased variance (two passes)."""
    xd, red, shape = _prep(x, axis, dtype)
    mean = xd.mean(axis=red)
    var = ((xd - mean.reshape(shape)) ** 2).mean(axis=red)
    return mean, var


def _train(xd, weight, bias, eps, axis, shape):
    c = shape[axis % xd.ndim]
    mean, var = batch_stats(xd, axis, xd.dtype)
    invstd = 1.0 / np.sqrt(var + eps)
    w = _vec(weight, c, 1.0, xd.dtype)
    b = _vec(bias, c, 0.0, xd.dtype)
    y = (xd - mean.reshape(shape)) * (invstd * w).reshape(shape) + b.reshape(shape)
    return y, mean, var, invstd


def _epilogue(y, residual, activation):
    """act(y + residual), in y's dtype (residual None: no addition)."""
    if residual is not None:
        y = y + np.asarray(residual, y.dtype)
    if activation == "relu":
        y = np.where(y < 0, 0.0, y).astype(y.dtype)  # NaN kept, as torch.relu
    return y


def batch_norm_forward(
    x, weight=None, bias=None, eps=1e-5, axis=1, dtype=np.float64, residual=None, activation=None
):
    """Training forward: ``(y, mean, invstd)`` from the batch statistics, y through the
    epilogue act(bn(x) + residual)."""
    xd, _, shape = _prep(x, axis, dtype)
    y, mean, _, invstd = _train(xd, weight, bias, eps, axis, shape)
    return _epilogue(y, residual, activation), mean, invstd


def batch_norm(
    x,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    axis=1,
    dtype=np.float64,
    residual=None,
    activation=None,
):
    """Returns ``(y, new_running_mean, new_running_var)``; the inputs are untouched.

    The new running statistics are None when none were given (or in eval); y goes
    through the epilogue act(bn(x) + residual).
    """
    y, rm, rv = _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, dtype)
    return _epilogue(y, residual, activation), rm, rv


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, dtype):
    xd, _, shape = _prep(x, axis, dtype)
    c = shape[axis % x.ndim]
    if training:
        y, mean, var, _ = _train(xd, weight, bias, eps, axis, shape)
        if running_mean is None:
            return y, None, None
        count = xd.size // max(c, 1)  # (no channels: nothing to count)
        rm = (1 - momentum) * np.asarray(running_mean, xd.dtype) + momentum * mean
        rv = (1 - momentum) * np.asarray(running_var, xd.dtype) + momentum * var * count / (count - 1)
        return y, rm, rv
    mean = np.asarray(running_mean, xd.dtype)
    with np.errstate(divide="ignore"):
        invstd = 1.0 / np.sqrt(np.asarray(running_var, xd.dtype) + eps)
    w = _vec(weight, c, 1.0, xd.dtype)
    b = _vec(bias, c, 0.0, xd.dtype)
    y = (xd - mean.reshape(shape)) * (invstd * w).reshape(shape) + b.reshape(shape)
    return y, None, None


def batch_norm_backward(
    dy, x, mean, invstd, weight=None, axis=1, training=True, dtype=np.float64,
    activation=None, y=None, residual_grad=False,
):
    """``(dx, dweight, dbias)`` as in the API contract; with ``activation="relu"`` the
    gradient goes through the ReLU of output ``y`` first; ``residual_grad``: also
    dresidual, that gradient."""
    xd, red, shape = _prep(x, axis, dtype)
    dyd = np.asarray(dy, xd.dtype)
    if activation == "relu":
        dyd = np.where(np.asarray(y, xd.dtype) > 0, dyd, 0.0)
    grads = _backward(dyd, xd, red, shape, mean, invstd, weight, axis, training)
    return (*grads, dyd) if residual_grad else grads


def _backward(dyd, xd, red, shape, mean, invstd, weight, axis, training):
    c = shape[axis % xd.ndim]
    mean = np.asarray(mean, xd.dtype).reshape(shape)
    invstd = np.asarray(invstd, xd.dtype)
    w = _vec(weight, c, 1.0, xd.dtype)
    xhat = (xd - mean) * invstd.reshape(shape)
    dbias = dyd.sum(axis=red)
    dweight = (dyd * xhat).sum(axis=red)
    k = (invstd * w).reshape(shape)
    if not training:
        return dyd * k, dweight, dbias
    count = xd.size // max(c, 1)  # (no channels: nothing to count)
    dx = (dyd - (dbias / count).reshape(shape) - xhat * (dweight / count).reshape(shape)) * k
    return dx, dweight, dbias


def with_constants(params, x, dy=None, axis=1):
    """The kernels' elementwise step from packed per-channel constants (rows of C), in
    float64: y = ((x - hi) - lo) * a + b from rows (hi, lo, a, b); with ``dy``, the
    gradient dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 from rows (hi, lo, k2, mdy, k1).
    A reference for tests that drive the kernels with constants of their own."""
    p = np.asarray(params, np.float64)
    shape = [1] * np.ndim(x)
    shape[axis % np.ndim(x)] = p.shape[1]
    rows = [r.reshape(shape) for r in p]
    xmu = (np.asarray(x, np.float64) - rows[0]) - rows[1]
    if dy is None:
        return xmu * rows[2] + rows[3]
    return (np.asarray(dy, np.float64) - rows[3] - xmu * rows[2]) * rows[4]
