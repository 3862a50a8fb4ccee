"""Per-channel arithmetic on the host, in float64 on C-length NumPy vectors.

Shared by the CPU backend (between its passes), the GPU backend (where constants are
computed on the host, as in the distributed path) and ``numbabn.distributed``. The
constants are packed as rows of one array in the compute dtype, the layout the
elementwise kernels of both backends read:

* normalize: ``(mean hi, mean lo, scale, shift)``, ``y = ((x - hi) - lo) * scale + shift``
  (on the CPU computed by the kernels, ``_cpu.formulas.norm_params``);
* gradient: ``(mean hi, mean lo, k2, mean(dy), k1)``,
  ``dx = (dy - mean(dy) - ((x - hi) - lo) * k2) * k1``; in eval mode the rows are
  ``(0, 0, k1, 0, k1)`` so that the normalize kernel gives ``dx = dy * k1``.

``hi + lo`` carries the mean in more than float32 precision.
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import intrinsic, overload, register_jitable

_F64 = np.dtype(np.float64)
_F32_MAX = float(np.finfo(np.float32).max)


# --- the elementwise formulas, one source for the CPU kernels (njit code and the LLVM
# vector loops, ``_cpu.formulas``) and the CUDA kernels (``_gpu_kernels``) -----------


def normalize(x, hi, lo, a, b):
    """y = ((x - hi) - lo) * a + b: the mean as hi + lo, subtracted in two steps."""
    return ((x - hi) - lo) * a + b


def grad_input(g, x, hi, lo, k2, mdy, k1):
    """dx = (dy - mean(dy) - (x - mean) * k2) * k1."""
    return (g - mdy - ((x - hi) - lo) * k2) * k1


# Normalize's constants (hi, lo, a, b) that give each value back exactly (a -0.0 too:
# adding -0.0 changes no value, adding 0.0 turns -0.0 into 0.0): the fused CPU passes write
# dresidual with them from the row loops that sum the gradient.
IDENTITY = (0.0, 0.0, 1.0, -0.0)


# The epilogues y = relu(bn(x) + residual): the residual is a plain addition after the
# affine step; ``zero`` is 0 in the compute type.


def relu(v, zero):
    """max(v, 0), NaN kept (as torch.relu)."""
    return select(v < zero, zero, v)


def relu_grad(g, y, zero):
    """The gradient through a ReLU from its output y: g where y > 0, else 0."""
    return select(y > zero, g, zero)


def select(cond, a, b):
    """``a if cond else b``; compiled (njit and CUDA), one LLVM ``select``: the branch of
    a conditional expression, called from the CPU kernels' loops, kept LLVM from
    vectorizing them."""
    return a if cond else b


@intrinsic
def _select_ir(typingctx, cond, a, b):
    if not isinstance(cond, types.Boolean):
        return None
    common = typingctx.unify_pairs(a, b)
    if common is None:
        return None

    def codegen(context, builder, sig, args):
        c, x, y = args
        x = context.cast(builder, x, sig.args[1], common)
        y = context.cast(builder, y, sig.args[2], common)
        return builder.select(c, x, y)

    return common(cond, a, b), codegen


@overload(select, inline="always")
def _select(cond, a, b):
    return lambda cond, a, b: _select_ir(cond, a, b)


# --- scalar formulas, one source for host code, CPU kernels and CUDA kernels ----------
# (``register_jitable`` and ``overload`` compile them into njit and cuda.jit code; the
# CUDA simulator runs the Python bodies.)


@register_jitable
def mean_lo(mean, hi):
    """The part of ``mean`` (float64) below the precision of ``hi``, its value in the
    compute type: ``mean = hi + lo``. 0 for an infinite or NaN mean, which ``hi``
    carries alone (inf - inf would turn an infinite mean into NaN outputs)."""
    return mean - hi if math.isfinite(mean) else 0.0


def finite_scale(scale, like):
    """``scale`` (float64) clamped to the finite range of the compute type of array
    ``like`` (float32 for float32 arrays and float16 data as bits): with a tiny eps the
    scale of a constant channel can exceed float32, and inf * 0 would make its outputs
    NaN instead of 0."""
    if np.dtype(like.dtype) == _F64:
        return scale
    return min(max(scale, -_F32_MAX), _F32_MAX)


@overload(finite_scale, inline="always")
def _finite_scale(scale, like):
    if like.dtype == types.float64:
        return lambda scale, like: scale
    return lambda scale, like: min(max(scale, -_F32_MAX), _F32_MAX)



def as64(a, c: int, default: float) -> np.ndarray:
    """A host per-channel vector as float64 (``default`` everywhere when None)."""
    if a is not None:
        return np.asarray(a, dtype=_F64)
    v = np.empty(c)  # empty and fill: a quarter of np.full's cost (2 us), paid every call
    v.fill(default)
    return v


def split_mean(mean: np.ndarray, ctype) -> tuple[np.ndarray, np.ndarray]:
    """mean = hi + lo with hi, lo in the compute type (lo = 0 for float64); ``mean_lo``
    over a vector."""
    with np.errstate(over="ignore", invalid="ignore"):
        hi = mean.astype(ctype)
        lo = np.where(np.isfinite(mean), mean - hi, 0.0)
    return hi, lo.astype(ctype)


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
