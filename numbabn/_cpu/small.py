"""The single-thread kernels of the CPU side: a whole operation in one call on the
calling thread, for tensors too small to pay for waking the thread pool. The (N, C, L)
ones run the fused passes' loops (``fused``), so their statistics agree bitwise with
the parallel fused passes; the (M, C) ones walk the rows once per pass."""

from __future__ import annotations

import numpy as np
from numba import njit

from .._half import load
from . import fused
from .elementwise import columns
from .formulas import (
    ELEM,
    EXACT,
    channel_grad_params,
    channel_params,
    consts,
    data,
    moments,
    plain,
    plane,
    row,
)
from .fused import channel_moments
from .reduce import rows_sums_mc

# Task 0 of 1 as int64 variables: literals would compile run functions of their own,
# beside those the parallel passes call (by address, with int64 values).
_TASK, _ONE = np.int64(0), np.int64(1)


@njit(**EXACT)
def forward_ncl(x3, weight, bias, eps, params, stats, y3):
    claims = np.zeros(1, np.int64)  # one task: it takes the channels in order
    fused.forward_plain(_TASK, x3, claims, _ONE, weight, bias, eps, params, stats, y3)


@njit(**EXACT)
def backward_ncl(dy3, x3, mean, invstd, weight, training, params, grads, r3, dx3):
    claims = np.zeros(1, np.int64)
    args = (_TASK, dy3, x3, claims, _ONE, mean, invstd, weight, params, grads, r3, dx3)
    if training:
        fused.backward_plain_train(*args)
    else:
        fused.backward_plain_eval(*args)


@njit(**EXACT)
def stats_ncl(x3, stats):
    for c in range(x3.shape[1]):
        stats[0, c], stats[1, c] = channel_moments(x3, c)


@njit(**ELEM)
def elementwise_ncl(g3, x3, params, y3):
    """The formula of ``formulas`` (normalize when ``g3`` is None) over every plane."""
    n_, c_, l_ = y3.shape
    for n in range(n_):
        for c in range(c_):
            k = consts(g3, params, c)
            plain(plane(g3, n, c, 0, l_), plane(x3, n, c, 0, l_), k, y3[n, c], 0, l_)


@njit(**EXACT)
def stats_mc(x2, stats):
    m, c_ = x2.shape
    shift = np.empty(c_)
    for c in range(c_):
        shift[c] = load(x2[0, c])
    s1 = np.zeros(c_)
    s2 = np.zeros(c_)
    rows_sums_mc(None, x2, 0, m, shift, s1, s2, None)
    for c in range(c_):
        stats[0, c], stats[1, c] = moments(s1[c], s2[c], shift[c], m)


@njit(**ELEM)
def elementwise_mc(g2, x2, params, y2):
    """The formula over every row (constants: the rows of ``params``)."""
    c_ = y2.shape[1]
    k = columns(g2, params, 0, c_)
    for r in range(y2.shape[0]):
        plain(row(g2, r), row(x2, r), k, y2[r], 0, c_)


@njit(**ELEM)
def forward_mc(x2, weight, bias, eps, params, stats, y2):
    stats_mc(data(x2), stats)
    channel_params(stats[0], stats[1], weight, bias, eps, params, stats)
    elementwise_mc(None, x2, params, y2)


@njit(**ELEM)
def backward_mc(dy2, x2, mean, invstd, weight, training, params, grads, r2, dx2):
    """``dy2`` may be a masked pair; dresidual (that gradient) into ``r2`` if an array,
    as it is summed."""
    m, c_ = x2.shape
    s1 = np.zeros(c_)
    s2 = np.zeros(c_)
    rows_sums_mc(dy2, x2, 0, m, mean, s1, s2, r2)
    for c in range(c_):
        channel_grad_params(c, s1[c], s2[c], m, mean, invstd, weight, training, params, grads)
    if training:
        elementwise_mc(dy2, x2, params, dx2)
    else:
        elementwise_mc(None, dy2, params, dx2)
