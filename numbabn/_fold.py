"""``numbabn.fold``: an eval-mode batch norm folded into the layer before it.

For z = W * x + b followed by batch norm over z's channels (running statistics),
W' = W * s along the weight's output-channel axis and b' = (b - running_mean) * s + bias,
s = weight / sqrt(running_var + eps), give the same outputs with one layer less. The
per-channel arithmetic is float64 on the host (C values); the weight is scaled where it
lives: a NumPy pass on the host, a CUDA kernel on the device (the weight never leaves
it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _interop, _validate
from ._channel import as64
from ._dispatch import backend

Array = Any


def fold(
    layer_weight: Array,
    layer_bias: Array | None,
    running_mean: Array,
    running_var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 0,
) -> tuple[Array, Array]:
    """Fold an eval-mode batch norm into the convolution or linear layer before it.

    Parameters
    ----------
    layer_weight : array
        The layer's weight: (out, in, ...) for convolutions and linear layers (axis 0),
        (in, out, ...) for transposed convolutions (axis 1).
    layer_bias : array of shape (C,) or None
        The layer's bias (None counts as 0).
    running_mean, running_var, weight, bias : arrays of shape (C,)
        The batch norm's running statistics and affine parameters (weight 1 and bias 0
        when omitted).
    eps : float
        The batch norm's eps.
    axis : int
        The output-channel axis of ``layer_weight``.

    Returns
    -------
    folded_weight, folded_bias : arrays
        In ``layer_weight``'s dtype, on its side (host or device); inputs unchanged.
    """
    if type(layer_weight) is not np.ndarray and _interop.is_foreign_host(layer_weight):
        return _interop.on_host(
            fold, layer_weight, layer_bias, running_mean, running_var, weight, bias, eps,
            axis=axis,
        )
    side, axis, eps, dtype = _validate.fold_args(
        layer_weight, layer_bias, running_mean, running_var, weight, bias, eps, axis
    )
    be = backend(side)
    scale, shift = _per_channel(
        layer_bias, running_mean, running_var, weight, bias, eps, be.to_host
    )
    folded_bias = be.from_host(shift.astype(dtype), layer_weight)
    if side == _validate.HOST:
        w = np.asarray(layer_weight)
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        return (w.astype(np.float64) * scale.reshape(shape)).astype(dtype), folded_bias
    from . import _gpu_fold

    return _gpu_fold.scaled(layer_weight, axis, scale), folded_bias


def _per_channel(layer_bias, running_mean, running_var, weight, bias, eps, to_host):
    """float64 (s, b') from the per-channel arrays (``to_host``: the backend's float64
    host copy of a per-channel vector)."""
    mean = to_host(running_mean)
    c = mean.shape[0]

    def f64(a, default):
        return as64(None if a is None else to_host(a), c, default)

    with np.errstate(divide="ignore"):
        scale = f64(weight, 1.0) / np.sqrt(f64(running_var, 0.0) + eps)
    shift = (f64(layer_bias, 0.0) - mean) * scale + f64(bias, 0.0)
    return scale, shift
