"""The device side of ``numbabn.fold``: the layer weight scaled per output channel by a
CUDA kernel (float64 arithmetic, the weight's dtype out), on the default stream."""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float64

from . import _gpu_arrays
from ._gpu_reduce import load, store

_BLOCK = 16 if config.ENABLE_CUDASIM else 256


@cuda.jit
def _scale(w, s, inner, c, out):
    """out[i] = w[i] * s[channel of i], flat C-ordered arrays whose channel axis has
    ``c`` entries, each ``inner`` values apart."""
    i = cuda.grid(1)
    if i < w.size:
        out[i] = store(float64(load(w[i])) * s[(i // inner) % c], out)


def scaled(layer_weight, axis: int, scale: np.ndarray):
    """A new device array: ``layer_weight`` times float64 ``scale`` along ``axis``, as
    ``layer_weight``'s kind of array."""
    w = _gpu_arrays.numba_array(layer_weight)
    if not w.is_c_contiguous():
        dense = cuda.device_array(w.shape, w.dtype)
        _gpu_arrays.copy_strided(w, dense, cuda.default_stream())
        w = dense
    out = cuda.device_array(w.shape, w.dtype)
    if w.size:
        inner = math.prod(w.shape[axis + 1 :])
        blocks = -(-w.size // _BLOCK)
        _scale[blocks, _BLOCK](
            w.reshape(w.size), cuda.to_device(scale), inner, w.shape[axis], out.reshape(out.size)
        )
    return _gpu_arrays.as_kind_of(layer_weight, out)
