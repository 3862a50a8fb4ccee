"""The formulas of the CPU kernels, each written once.

Elementwise: ``normalize`` and ``grad_input`` (plain Python, in ``_channel``, shared
with the CUDA kernels) are compiled into the njit traversals (``value``) and evaluated
on LLVM vectors by the hand-written vector loops (``llvm.formula``), so every path does
the same operations in the same order (``contract`` only: bitwise the same results
streamed or not).

A traversal takes the formula from its gradient argument ``g``: None gives normalize
of ``x`` with 4 constants (hi, lo, a, b), an array gives grad_input of (``g``, ``x``)
with 5 (hi, lo, k2, mdy, k1). The choice is made when numba compiles the traversal,
never in its loops. The eval-mode backward is normalize of dy (rows (0, 0, k1, 0)).

Operands: ``x`` (and ``g``) may be a pair ``(dy, y)``, the gradient masked by a ReLU's
output (``_channel.relu_grad``); ``x`` may be a triple ``(x, z, zero)``, normalize
followed by the epilogue: ``+ z`` (a residual array, or None), then a ReLU (``zero``, 0
in the compute type; None: no activation). Every traversal takes them (the vector loops
through ``llvm.formula``); ``piece``, ``plane``, ``flat`` and ``row`` cut them member
by member.

Per channel: moments from shifted sums, the normalize and dx constants, the running
update (see ``_channel`` for the packed-constant layout and the host versions).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from .._channel import IDENTITY, finite_scale, grad_input, mean_lo, normalize, relu, relu_grad
from .._half import load, store

# No kernel is called through a C function pointer (``tasks`` calls them by address),
# so none compiles numba's cfunc wrapper (about 5% of a first call's compile time).
# Reductions vectorize only with reassociation. Elementwise rows must not reassociate
# (x - hi) - lo into x - (hi + lo); each row helper is compiled with its own flags.
SUM = {"cache": True, "fastmath": {"reassoc", "contract"}, "no_cfunc_wrapper": True}
ELEM = {"cache": True, "fastmath": {"contract"}, "no_cfunc_wrapper": True}
# A function compiled without flags of its own inherits its first caller's, and the disk
# cache then keeps that version for every caller: so every function that is not
# inlined states its flags. EXACT: no reassociation, no contraction.
EXACT = {"cache": True, "fastmath": False, "no_cfunc_wrapper": True}
PAR = {"parallel": True, **EXACT}
# The overloads here compile once per signature, and LLVM inlines them (``forceinline``):
# inlined by numba, each was typed again at every call site, a sixth of the compile time
# of a first call. Their arithmetic has the flags of the elementwise rows that use it.
INLINED = {"fastmath": {"contract"}, "forceinline": True, "no_cfunc_wrapper": True}


# --- the elementwise formulas (``_channel.normalize``, ``_channel.grad_input``) ---------

_normalize = njit(inline="always")(normalize)
_grad_input = njit(inline="always")(grad_input)
# (the ReLU's are one select each, ``_channel.select``: called, or as a conditional
# expression, they kept LLVM from vectorizing the loops around them)
_relu = njit(inline="always")(relu)
_relu_grad = njit(inline="always")(relu_grad)


def zero(a):
    """0 in the compute type of array ``a``'s elements (float32 or float64)."""


@overload(zero, jit_options=INLINED)
def _zero(a):
    if a.dtype in (types.uint16, types.int16, types.float32):
        return lambda a: types.float32(0.0)
    if a.dtype == types.float64:
        return lambda a: 0.0
    return None


def at(p, i):
    """``p[i]`` for a per-element constant array, ``p`` itself for a scalar."""


@overload(at, jit_options=INLINED)
def _at(p, i):
    if isinstance(p, types.Array):
        return lambda p, i: p[i]
    return lambda p, i: p


def _epilogue(x) -> bool:
    """Whether operand type ``x`` is normalize's triple (x, residual, zero)."""
    return isinstance(x, types.BaseTuple) and len(x) == 3


def load_at(a, i):
    """Element ``i`` of an operand in the compute type: of an array, or of a pair
    (dy, y), the gradient through the ReLU whose output is y."""


@overload(load_at, jit_options=INLINED)
def _load_at(a, i):
    if isinstance(a, types.BaseTuple):
        return lambda a, i: _relu_grad(load(a[0][i]), load(a[1][i]), zero(a[0]))
    return lambda a, i: load(a[i])


def plus(v, z, i):
    """``v + z[i]``; ``v`` itself when there is no residual (z None)."""


@overload(plus, jit_options=INLINED)
def _plus(v, z, i):
    if isinstance(z, types.NoneType):
        return lambda v, z, i: v
    return lambda v, z, i: v + load(z[i])


def finish(v, z, floor, i):
    """The epilogue of value ``v`` at element ``i``: :func:`plus`, then the ReLU
    (``floor`` its zero; None: none)."""


@overload(finish, jit_options=INLINED)
def _finish(v, z, floor, i):
    if isinstance(floor, types.NoneType):
        return lambda v, z, floor, i: plus(v, z, i)
    return lambda v, z, floor, i: _relu(plus(v, z, i), floor)


def value(g, x, k, i, j):
    """The formula (see the module) at element ``i`` of the data, constants ``k`` (a
    tuple of scalars or of arrays) read at ``j``, in the compute type."""


@overload(value, jit_options=INLINED)
def _value(g, x, k, i, j):
    if _epilogue(x):
        return lambda g, x, k, i, j: finish(value(g, x[0], k, i, j), x[1], x[2], i)
    if isinstance(g, types.NoneType):
        return lambda g, x, k, i, j: _normalize(
            load_at(x, i), at(k[0], j), at(k[1], j), at(k[2], j), at(k[3], j)
        )
    return lambda g, x, k, i, j: _grad_input(
        load_at(g, i), load_at(x, i), at(k[0], j), at(k[1], j), at(k[2], j), at(k[3], j),
        at(k[4], j),
    )


def identity(a):
    """``_channel.IDENTITY`` in the compute type of array ``a``'s elements."""


@overload(identity, jit_options=INLINED)
def _identity(a):
    ct = np.float64 if a.dtype == types.float64 else np.float32
    k = tuple(ct(v) for v in IDENTITY)
    return lambda a: k


def consts(g, params, j):
    """The formula's constants from packed rows ``params``: column ``j`` (an index: one
    channel's scalars; a slice: arrays)."""


@overload(consts, jit_options=INLINED)
def _consts(g, params, j):
    if isinstance(g, types.NoneType):
        return lambda g, params, j: (params[0, j], params[1, j], params[2, j], params[3, j])
    return lambda g, params, j: (
        params[0, j], params[1, j], params[2, j], params[3, j], params[4, j]
    )


def cut(a, s):
    """A part of operand ``a`` (None and scalars as they are, tuples member by member):
    by the length of index tuple ``s``, ``a.reshape(-1)`` (``llvm.flat_view``), ``a[r]``,
    ``a[i0:i1]`` or ``a[n, c, i0:i1]``."""


@overload(cut, jit_options=INLINED)
def _cut(a, s):
    if isinstance(a, (types.NoneType, types.Number)):
        return lambda a, s: a
    if isinstance(a, types.BaseTuple) and len(a) == 2:
        return lambda a, s: (cut(a[0], s), cut(a[1], s))
    if isinstance(a, types.BaseTuple):
        return lambda a, s: (cut(a[0], s), cut(a[1], s), cut(a[2], s))
    if len(s) == 0:
        from .llvm import flat_view  # (llvm imports this module)

        return lambda a, s: flat_view(a)
    return {
        1: lambda a, s: a[s[0]],
        2: lambda a, s: a[s[0] : s[1]],
        4: lambda a, s: a[s[0], s[1], s[2] : s[3]],
    }[len(s)]


def data(a):
    """An operand's data array: x of (x, z, zero), dy of (dy, y), an array itself."""


@overload(data, jit_options=INLINED)
def _data(a):
    if isinstance(a, types.BaseTuple):
        return lambda a: a[0]
    return lambda a: a


@njit(inline="always")
def piece(a, i0, i1):
    """``a[i0:i1]`` of an operand."""
    return cut(a, (i0, i1))


@njit(inline="always")
def plane(a, n, c, i0, i1):
    """``a[n, c, i0:i1]`` of an operand."""
    return cut(a, (n, c, i0, i1))


@njit(inline="always")
def row(a, r):
    """``a[r]`` of an operand."""
    return cut(a, (r,))


@njit(inline="always")
def flat(a):
    """``a.reshape(-1)`` of an operand."""
    return cut(a, ())


@njit(inline="always")
def plain(g, x, k, y, i0, i1):
    """y[i] = the formula at i, for i in [i0, i1), plain stores (inlined: a call per
    short row cost more than its work)."""
    for i in range(i0, i1):
        y[i] = store(value(g, x, k, i, i), y)


# --- per channel ----------------------------------------------------------------------


@njit(**EXACT)
def moments(s1, s2, k, count):
    """Mean and biased variance from shifted sums (s1, s2) of ``count`` values."""
    delta = s1 / count
    var = s2 / count - delta * delta
    return k + delta, var if not var < 0.0 else 0.0


@njit(**EXACT, error_model="numpy")
def norm_params(c, mean, var, weight, bias, eps, params, stats):
    """Channel c's mean, variance and invstd into ``stats`` and normalize constants
    into ``params`` (invstd inf for var + eps == 0, which eval allows)."""
    invstd = 1.0 / math.sqrt(var + eps)
    stats[0, c] = mean
    stats[1, c] = var
    stats[2, c] = invstd
    params[0, c] = mean
    params[1, c] = mean_lo(mean, np.float64(params[0, c]))
    params[2, c] = finite_scale(invstd * weight[c], params)
    params[3, c] = bias[c]


@njit(**EXACT)
def channel_params(mean, var, weight, bias, eps, params, stats):
    """``norm_params`` of every channel, from float64 statistics, weight and bias."""
    for c in range(mean.size):
        norm_params(c, mean[c], var[c], weight, bias, eps, params, stats)


@njit(**EXACT)
def update_running(rm, rv, mean, var, count, momentum):
    """r = (1 - momentum) * r + momentum * batch value, in place, the variance unbiased
    (float64 batch mean and biased variance; the arithmetic of ``_channel``)."""
    for c in range(rm.size):
        rm[c] = store((1.0 - momentum) * np.float64(load(rm[c])) + momentum * mean[c], rm)
        unbiased = var[c] * (count / (count - 1))
        rv[c] = store((1.0 - momentum) * np.float64(load(rv[c])) + momentum * unbiased, rv)


@njit(**EXACT)
def channel_grad_params(c, s1, s2, count, mean, invstd, weight, training, params, grads):
    """Channel c's dx constants into ``params`` from its gradient sums (eval mode:
    (0, 0, k1, 0, k1), so that normalize gives dx = dy * k1), and its (dweight, dbias)
    into ``grads``."""
    grads[0, c] = s2 * invstd[c]
    grads[1, c] = s1
    params[4, c] = invstd[c] * weight[c]
    params[0, c] = mean[c] if training else 0.0
    params[1, c] = mean_lo(mean[c], np.float64(params[0, c])) if training else 0.0
    params[2, c] = invstd[c] * invstd[c] * s2 / count if training else params[4, c]
    params[3, c] = s1 / count if training else 0.0


@njit(**EXACT)
def grad_params(sums, count, mean, invstd, weight, training, params, grads):
    """``channel_grad_params`` of every channel, from float64 sums."""
    for c in range(mean.size):
        s1, s2 = sums[0, c], sums[1, c]
        channel_grad_params(c, s1, s2, count, mean, invstd, weight, training, params, grads)
