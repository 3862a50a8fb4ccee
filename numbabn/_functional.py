"""The functional API: validate, pick the backend, run. Nothing else happens here."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _epilogue, _interop, _validate
from ._dispatch import backend

Array = Any  # a NumPy array or a CUDA array (see the README)


# (batch_norm's length is its docstring: the contract's summary for help().)
def batch_norm(
    x: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: Array | None = None,
    residual: Array | None = None,
    activation: str | None = None,
    stream: Any = None,
) -> Array:
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : array, ndim >= 2
        float16, bfloat16, float32 or float64; the channel axis is ``axis``, every other axis
        is reduced.
    running_mean, running_var : array of shape (C,), optional
        Running statistics. Read in eval mode (required there); updated in place in
        training mode when given (both or neither):
        ``r = (1 - momentum) * r + momentum * batch_stat``, the variance unbiased.
    weight, bias : array of shape (C,), optional
        Affine scale and shift (1 and 0 when omitted).
    training : bool
        Normalize with the batch statistics (True) or the running ones (False).
    momentum : float in [0, 1]
        Weight of the current batch in the running-statistics update.
    eps : float
        Added to the variance; > 0 in training, >= 0 in eval.
    axis : int
        The channel axis (1 for NCHW, -1 for channels-last).
    out : array, optional
        Receives the result; same shape and dtype as ``x``; may be ``x`` itself (or
        ``residual``).
    residual : array, optional
        Added after the affine step (x's shape and dtype, any strides).
    activation : None or "relu"
        Applied last: ``y = relu(bn(x) + residual)``, in the same pass.
    stream : CUDA stream, optional
        For CUDA arrays: the stream the kernels run on (default: the default stream):
        a numba stream, a PyTorch or CuPy stream, or any object with ``__cuda_stream__``.

    Returns
    -------
    y : array
        ``(x - mean) / sqrt(var + eps) * weight + bias``, with ``x``'s shape and dtype.

    Raises
    ------
    TypeError
        Unsupported dtype or array kind, or host and device arrays mixed.
    ValueError
        Bad shapes, axis, eps or momentum, fewer than 2 values per channel in
        training, eval without running statistics. Nothing is written then.
    """
    if type(x) is not np.ndarray and _interop.is_foreign_host(x):
        return _interop.on_host(
            batch_norm, x, running_mean, running_var, weight, bias, training, momentum, eps,
            axis=axis, out=out, residual=residual, activation=activation, stream=stream,
        )
    chk = _validate.batch_norm_args(
        x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out
    )
    be, kw = backend(chk.side), _validate.stream_kwargs(chk.side, stream)
    kw.update(_epilogue.forward(chk.side, x, residual, activation))
    if training:
        y, _, _ = be.forward_train(x, chk, weight, bias, running_mean, running_var, out, **kw)
        return y
    return be.forward_eval(x, chk, running_mean, running_var, weight, bias, out, **kw)


def batch_stats(x: Array, *, axis: int = 1, stream: Any = None) -> tuple[Array, Array]:
    """Per-channel mean and biased variance.

    Parameters
    ----------
    x : array, ndim >= 2
        float16, bfloat16, float32 or float64.
    axis : int
        The channel axis.

    Returns
    -------
    mean, var : arrays of shape (C,)
        float32 for float16, bfloat16 and float32 input, float64 for float64 input.
    """
    if type(x) is not np.ndarray and _interop.is_foreign_host(x):
        return _interop.on_host(batch_stats, x, axis=axis, stream=stream)
    chk = _validate.batch_stats_args(x, axis)
    return backend(chk.side).batch_stats(x, chk, **_validate.stream_kwargs(chk.side, stream))


def batch_norm_forward(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    momentum: float = 0.1,
    residual: Array | None = None,
    activation: str | None = None,
    stream: Any = None,
) -> tuple[Array, Array, Array]:
    """Training-mode forward that also returns what the backward pass needs (and, given
    running statistics, updates them: PyTorch's ``native_batch_norm`` in one call).

    Parameters
    ----------
    x : array, ndim >= 2
        float16, bfloat16, float32 or float64, at least 2 values per channel.
    weight, bias : array of shape (C,), optional
        Affine scale and shift.
    eps : float
        > 0.
    axis : int
        The channel axis.
    running_mean, running_var : array of shape (C,), optional
        Updated in place as by :func:`batch_norm` in training (both or neither).
    momentum : float in [0, 1]
        Weight of this batch in that update.
    residual, activation
        The epilogue, as for :func:`batch_norm`.

    Returns
    -------
    y : array
        The normalized ``x`` (then the epilogue).
    mean, invstd : arrays of shape (C,)
        Batch mean and ``1 / sqrt(var + eps)`` (biased variance); float32 for
        float16/float32 input, float64 for float64 input.
    """
    if type(x) is not np.ndarray and _interop.is_foreign_host(x):
        return _interop.on_host(
            batch_norm_forward, x, weight, bias, eps, axis=axis, running_mean=running_mean,
            running_var=running_var, momentum=momentum, residual=residual,
            activation=activation, stream=stream,
        )
    if running_mean is None and running_var is None:
        chk = _validate.batch_norm_forward_args(x, weight, bias, eps, axis)
    else:
        chk = _validate.batch_norm_args(
            x, running_mean, running_var, weight, bias, True, momentum, eps, axis, None
        )
    kw = _validate.stream_kwargs(chk.side, stream)
    kw.update(_epilogue.forward(chk.side, x, residual, activation))
    return backend(chk.side).forward_train(
        x, chk, weight, bias, running_mean, running_var, None, **kw
    )


# (batch_norm_backward's length is its docstring, as batch_norm's)
def batch_norm_backward(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    weight: Array | None = None,
    *,
    axis: int = 1,
    training: bool = True,
    activation: str | None = None,
    y: Array | None = None,
    residual_grad: bool = False,
    stream: Any = None,
) -> tuple[Array, ...]:
    """Gradients of batch normalization (and of its epilogue).

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to the output; shape and dtype of ``x``.
    x : array
        The forward input.
    mean, invstd : arrays of shape (C,)
        The statistics the forward pass normalized with (batch statistics from
        :func:`batch_norm_forward` in training; running mean and
        ``1 / sqrt(running_var + eps)`` in eval).
    weight : array of shape (C,), optional
        The affine scale (1 when omitted).
    axis : int
        The channel axis.
    training : bool
        True: the statistics depend on ``x`` (batch statistics). False: they are
        constants, and ``dx = dy * invstd * weight``.
    activation : None or "relu"
        The forward's activation: the gradient goes through it first (dy where
        y > 0, else 0).
    y : array
        The forward's output; required with ``activation="relu"``.
    residual_grad : bool
        Also return dresidual, the gradient of the forward's residual (the masked dy;
        a new array).

    Returns
    -------
    dx : array
        Shape and dtype of ``x``.
    dweight, dbias : arrays of shape (C,)
        ``sum(dy * (x - mean) * invstd)`` and ``sum(dy)`` per channel, always
        returned; float32 for float16/float32 input, float64 for float64.
    dresidual : array
        With ``residual_grad=True`` only.

    All functions also take ``stream=`` (a numba, PyTorch or CuPy stream) for CUDA arrays.
    """
    if type(x) is not np.ndarray and _interop.is_foreign_host(x):
        return _interop.on_host(
            batch_norm_backward, dy, x, mean, invstd, weight, axis=axis, training=training,
            activation=activation, y=y, residual_grad=residual_grad, stream=stream,
        )
    training = bool(training)
    chk = _validate.batch_norm_backward_args(dy, x, mean, invstd, weight, axis, training)
    kw = _validate.stream_kwargs(chk.side, stream)
    if activation is not None or residual_grad:
        kw["y"] = _epilogue.backward(chk.side, x, activation, y)
        kw["residual_grad"] = bool(residual_grad)
    return backend(chk.side).backward(dy, x, chk, mean, invstd, weight, training, **kw)
