"""Per-channel arithmetic on the host, in float64 on C-length NumPy vectors.

Shared by the CPU backend (between its passes), the GPU backend (where constants are
computed on the host, as in the distributed path) and ``numbabn.distributed``. The
constants are packed as rows of one array in the compute dtype, the layout the
elementwise kernels of both backends read:

* normalize: ``(mean hi, mean lo, scale, shift)``, ``y = ((x - hi) - lo) * scale + shift``
  (on the CPU computed by the kernels, ``_cpu_kernels._norm_params``);
* gradient: ``(mean hi, mean lo, k2, mean(dy), k1)``,
  ``dx = (dy - mean(dy) - ((x - hi) - lo) * k2) * k1``; in eval mode the rows are
  ``(0, 0, k1, 0, k1)`` so that the normalize kernel gives ``dx = dy * k1``.

``hi + lo`` carries the mean in more than float32 precision.
"""

from __future__ import annotations

import numpy as np


_F64 = np.dtype(np.float64)


def as64(a, c: int, default: float) -> np.ndarray:
    """A host per-channel vector as float64 (``default`` everywhere when None)."""
    if a is not None:
        return np.asarray(a, dtype=_F64)
    v = np.empty(c)  # empty and fill: a quarter of np.full's cost (2 us), paid every call
    v.fill(default)
    return v


def split_mean(mean: np.ndarray, ctype) -> tuple[np.ndarray, np.ndarray]:
    """mean = hi + lo with hi, lo in the compute type (lo = 0 for float64)."""
    hi = mean.astype(ctype)
    return hi, (mean - hi).astype(ctype)


def grad_constants(mean, invstd, weight, sums, count, training, ctype) -> np.ndarray:
    """Constants of the dx pass from the sums (sum dy, sum dy * (x - mean))."""
    c = mean.shape[0]
    params = np.zeros((5, c), ctype)
    k1 = invstd * as64(weight, c, 1.0)
    if training:
        params[0], params[1] = split_mean(mean, ctype)
        params[2] = invstd * invstd * sums[1] / count
        params[3] = sums[0] / count
    else:
        params[2] = k1
    params[4] = k1
    return params


def update_running(running_mean, running_var, mean, var, count, momentum) -> None:
    """r = (1 - momentum) * r + momentum * batch value, the variance unbiased (host arrays)."""
    unbiased = var * (count / (count - 1))
    for r, value in ((running_mean, mean), (running_var, unbiased)):
        r[...] = (1.0 - momentum) * r.astype(np.float64) + momentum * value
