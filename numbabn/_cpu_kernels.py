"""Numba CPU kernels. Small, and they trust their arguments (see ``_validate``).

Two views of a tensor (see ``_validate.Layout``):

* ``ncl``: ``x3`` of shape ``(N, C, L)``, C-contiguous. Work is split into
  ``N * C * nseg`` equal tasks, each one segment of one ``(n, c)`` plane, so a batch
  with fewer channels than threads still keeps every core busy.
* ``mc``: ``x2`` of shape ``(M, C)``, C-contiguous. Work is split into ``nchunk``
  chunks of rows; the inner loop runs along the contiguous channels.

Reductions write one partial per task into ``part[t, k, c]`` (``k`` = which sum);
the caller adds the partials over ``t`` in a fixed order, so results are
deterministic for a given thread count. Sums are float64 of values shifted by a
per-channel constant close to the data (its first value, or the mean), which keeps
the variance free of cancellation. Reassociation lets the reductions vectorize;
NaN/Inf handling is untouched (no ``nnan``/``ninf``).

Per-channel constants come packed as rows of one ``params`` array in the compute
type (float32 for float16/float32 data, float64 for float64). The mean is passed as
an unevaluated sum ``hi + lo`` so that ``(x - hi) - lo`` subtracts it with more than
float32 precision: a channel with mean 1e4 and std 1e-2 keeps its digits.

``backward_channels`` is the cache-fused backward for ``ncl``: one task per channel
reduces the channel's slab of dy and x, then computes dx from it while it is still in
the core's cache, so dy and x come from memory once instead of twice. (The same
fusion for the training forward measured slower than the two plane-parallel passes
on the 2-core development machine, so it is not used.)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._half import load, store

# Reductions vectorize only with reassociation. Elementwise rows must not reassociate
# (x - hi) - lo into x - (hi + lo); each row helper is compiled with its own flags.
_SUM = {"cache": True, "fastmath": {"reassoc", "contract"}}
_ELEM = {"cache": True, "fastmath": {"contract"}}
_PAR = {"parallel": True, "cache": True}


# --- one contiguous row ------------------------------------------------------------


@njit(**_SUM)
def _sums_row(xr, k):
    s1 = 0.0
    s2 = 0.0
    for i in range(xr.size):
        d = np.float64(load(xr[i])) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(**_SUM)
def _grad_sums_row(gr, xr, mu):
    s1 = 0.0
    s2 = 0.0
    for i in range(xr.size):
        g = np.float64(load(gr[i]))
        s1 += g
        s2 += g * (np.float64(load(xr[i])) - mu)
    return s1, s2


@njit(**_ELEM)
def _normalize_row(xr, m_hi, m_lo, a, b, yr):
    for i in range(xr.size):
        yr[i] = store(((load(xr[i]) - m_hi) - m_lo) * a + b, yr)


@njit(**_ELEM)
def _grad_input_row(gr, xr, m_hi, m_lo, k2, mdy, k1, dr):
    for i in range(xr.size):
        xmu = (load(xr[i]) - m_hi) - m_lo
        dr[i] = store((load(gr[i]) - mdy - xmu * k2) * k1, dr)


@njit(**_SUM)
def _sums_rows_mc(x2, lo, hi, shift, s1, s2):
    for r in range(lo, hi):
        xr = x2[r]
        for c in range(xr.size):
            d = np.float64(load(xr[c])) - shift[c]
            s1[c] += d
            s2[c] += d * d


@njit(**_SUM)
def _grad_sums_rows_mc(dy2, x2, lo, hi, mean, s1, s2):
    for r in range(lo, hi):
        gr = dy2[r]
        xr = x2[r]
        for c in range(xr.size):
            g = np.float64(load(gr[c]))
            s1[c] += g
            s2[c] += g * (np.float64(load(xr[c])) - mean[c])


@njit(**_ELEM)
def _normalize_rows_mc(x2, lo, hi, m_hi, m_lo, a, b, y2):
    for r in range(lo, hi):
        xr = x2[r]
        yr = y2[r]
        for c in range(xr.size):
            yr[c] = store(((load(xr[c]) - m_hi[c]) - m_lo[c]) * a[c] + b[c], yr)


@njit(**_ELEM)
def _grad_input_rows_mc(dy2, x2, lo, hi, m_hi, m_lo, k2, mdy, k1, dx2):
    for r in range(lo, hi):
        gr = dy2[r]
        xr = x2[r]
        dr = dx2[r]
        for c in range(xr.size):
            xmu = (load(xr[c]) - m_hi[c]) - m_lo[c]
            dr[c] = store((load(gr[c]) - mdy[c] - xmu * k2[c]) * k1[c], dr)


# --- per-channel arithmetic shared by the drivers and the fused kernels -------------


@njit(cache=True)
def moments(s1, s2, k, count):
    """Mean and biased variance from shifted sums (s1, s2) of ``count`` values."""
    delta = s1 / count
    var = s2 / count - delta * delta
    return k + delta, var if not var < 0.0 else 0.0


@njit(cache=True)
def finish_moments(sums, shift, count, mean, var):
    for c in range(shift.size):
        mean[c], var[c] = moments(sums[0, c], sums[1, c], shift[c], count)


# --- work splitting ------------------------------------------------------------------


@njit(inline="always")
def _segment(task, nseg, c, length):
    """Split a task number into (n, c, segment, start, stop) of one plane segment."""
    plane = task // nseg
    seg = task - plane * nseg
    n = plane // c
    ch = plane - n * c
    return n, ch, seg, seg * length // nseg, (seg + 1) * length // nseg


@njit(inline="always")
def _rows(chunk, nchunk, m):
    return chunk * m // nchunk, (chunk + 1) * m // nchunk


# --- ncl kernels ---------------------------------------------------------------------


@njit(**_PAR)
def stats_ncl(x3, shift, nseg, part):
    """part[n * nseg + s, :, c] = (sum d, sum d^2), d = x - shift[c], over one segment."""
    n_, c_, l_ = x3.shape
    for task in prange(np.int64(n_ * c_ * nseg)):
        n, c, s, lo, hi = _segment(np.int64(task), nseg, c_, l_)
        part[n * nseg + s, 0, c], part[n * nseg + s, 1, c] = _sums_row(x3[n, c, lo:hi], shift[c])


@njit(**_PAR)
def normalize_ncl(x3, params, nseg, y3):
    """y = ((x - hi) - lo) * a + b with params rows (hi, lo, a, b)."""
    n_, c_, l_ = x3.shape
    for task in prange(np.int64(n_ * c_ * nseg)):
        n, c, s, lo, hi = _segment(np.int64(task), nseg, c_, l_)
        _normalize_row(
            x3[n, c, lo:hi], params[0, c], params[1, c], params[2, c], params[3, c], y3[n, c, lo:hi]
        )


@njit(**_PAR)
def grad_sums_ncl(dy3, x3, mean, nseg, part):
    """part[n * nseg + s, :, c] = (sum dy, sum dy * (x - mean[c])) over one segment."""
    n_, c_, l_ = x3.shape
    for task in prange(np.int64(n_ * c_ * nseg)):
        n, c, s, lo, hi = _segment(np.int64(task), nseg, c_, l_)
        part[n * nseg + s, 0, c], part[n * nseg + s, 1, c] = _grad_sums_row(
            dy3[n, c, lo:hi], x3[n, c, lo:hi], mean[c]
        )


@njit(**_PAR)
def grad_input_ncl(dy3, x3, params, nseg, dx3):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 with params rows (hi, lo, k2, mdy, k1)."""
    n_, c_, l_ = x3.shape
    for task in prange(np.int64(n_ * c_ * nseg)):
        n, c, s, lo, hi = _segment(np.int64(task), nseg, c_, l_)
        _grad_input_row(
            dy3[n, c, lo:hi], x3[n, c, lo:hi], params[0, c], params[1, c], params[2, c],
            params[3, c], params[4, c], dx3[n, c, lo:hi],
        )


@njit(**_PAR)
def backward_channels(dy3, x3, mean, invstd, weight, training, params, sums, dx3):
    """Fused backward: per channel, the two sums then dx (float64 per-channel inputs)."""
    n_, c_, l_ = x3.shape
    count = n_ * l_
    for c in prange(c_):
        s1 = 0.0
        s2 = 0.0
        for n in range(n_):
            a1, a2 = _grad_sums_row(dy3[n, c], x3[n, c], mean[c])
            s1 += a1
            s2 += a2
        sums[0, c] = s1
        sums[1, c] = s2
        params[4, c] = invstd[c] * weight[c]
        if training:
            params[0, c] = mean[c]
            params[1, c] = mean[c] - params[0, c]
            params[2, c] = invstd[c] * invstd[c] * s2 / count
            params[3, c] = s1 / count
            for n in range(n_):
                _grad_input_row(
                    dy3[n, c], x3[n, c], params[0, c], params[1, c], params[2, c],
                    params[3, c], params[4, c], dx3[n, c],
                )
        else:
            for n in range(n_):
                _normalize_row(dy3[n, c], 0.0, 0.0, params[4, c], 0.0, dx3[n, c])


# --- mc kernels ----------------------------------------------------------------------


@njit(**_PAR)
def stats_mc(x2, shift, nchunk, part):
    """part[t, :, c] = (sum d, sum d^2), d = x - shift[c], over row chunk t."""
    m = x2.shape[0]
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        part[t] = 0.0
        _sums_rows_mc(x2, lo, hi, shift, part[t, 0], part[t, 1])


@njit(**_PAR)
def normalize_mc(x2, params, nchunk, y2):
    """y = ((x - hi) - lo) * a + b with params rows (hi, lo, a, b)."""
    m = x2.shape[0]
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        _normalize_rows_mc(x2, lo, hi, params[0], params[1], params[2], params[3], y2)


@njit(**_PAR)
def grad_sums_mc(dy2, x2, mean, nchunk, part):
    """part[t, :, c] = (sum dy, sum dy * (x - mean[c])) over row chunk t."""
    m = x2.shape[0]
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        part[t] = 0.0
        _grad_sums_rows_mc(dy2, x2, lo, hi, mean, part[t, 0], part[t, 1])


@njit(**_PAR)
def grad_input_mc(dy2, x2, params, nchunk, dx2):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 with params rows (hi, lo, k2, mdy, k1)."""
    m = x2.shape[0]
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        _grad_input_rows_mc(
            dy2, x2, lo, hi, params[0], params[1], params[2], params[3], params[4], dx2
        )
