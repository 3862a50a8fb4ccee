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
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._half import load, store

_REDUCE = {"parallel": True, "cache": True, "fastmath": {"reassoc", "contract"}}
# Elementwise loops vectorize without reassociation, and must not reassociate
# (x - hi) - lo into x - (hi + lo).
_ELEMENTWISE = {"parallel": True, "cache": True, "fastmath": {"contract"}}


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


@njit(**_REDUCE)
def stats_ncl(x3, shift, nseg, part):
    """part[n * nseg + s, :, c] = (sum d, sum d^2), d = x - shift[c], over one segment."""
    n_, c_, l_ = x3.shape
    for task in prange(np.int64(n_ * c_ * nseg)):
        n, c, s, lo, hi = _segment(np.int64(task), nseg, c_, l_)
        k = shift[c]
        xr = x3[n, c, lo:hi]
        s1 = 0.0
        s2 = 0.0
        for i in range(hi - lo):
            d = np.float64(load(xr[i])) - k
            s1 += d
            s2 += d * d
        part[n * nseg + s, 0, c] = s1
        part[n * nseg + s, 1, c] = s2


@njit(**_REDUCE)
def stats_mc(x2, shift, nchunk, part):
    """part[t, :, c] = (sum d, sum d^2), d = x - shift[c], over row chunk t."""
    m, c_ = x2.shape
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        s1 = part[t, 0]
        s2 = part[t, 1]
        s1[:] = 0.0
        s2[:] = 0.0
        for r in range(lo, hi):
            xr = x2[r]
            for c in range(c_):
                d = np.float64(load(xr[c])) - shift[c]
                s1[c] += d
                s2[c] += d * d


@njit(**_ELEMENTWISE)
def normalize_ncl(x3, params, nseg, y3):
    """y = ((x - hi) - lo) * a + b with params rows (hi, lo, a, b)."""
    n_, c_, l_ = x3.shape
    for task in prange(np.int64(n_ * c_ * nseg)):
        n, c, s, lo, hi = _segment(np.int64(task), nseg, c_, l_)
        m_hi = params[0, c]
        m_lo = params[1, c]
        a = params[2, c]
        b = params[3, c]
        xr = x3[n, c, lo:hi]
        yr = y3[n, c, lo:hi]
        for i in range(hi - lo):
            yr[i] = store(((load(xr[i]) - m_hi) - m_lo) * a + b, yr)


@njit(**_ELEMENTWISE)
def normalize_mc(x2, params, nchunk, y2):
    """y = ((x - hi) - lo) * a + b with params rows (hi, lo, a, b)."""
    m, c_ = x2.shape
    m_hi = params[0]
    m_lo = params[1]
    a = params[2]
    b = params[3]
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        for r in range(lo, hi):
            xr = x2[r]
            yr = y2[r]
            for c in range(c_):
                yr[c] = store(((load(xr[c]) - m_hi[c]) - m_lo[c]) * a[c] + b[c], yr)


@njit(**_REDUCE)
def grad_sums_ncl(dy3, x3, mean, nseg, part):
    """part[n * nseg + s, :, c] = (sum dy, sum dy * (x - mean[c])) over one segment."""
    n_, c_, l_ = x3.shape
    for task in prange(np.int64(n_ * c_ * nseg)):
        n, c, s, lo, hi = _segment(np.int64(task), nseg, c_, l_)
        mu = mean[c]
        gr = dy3[n, c, lo:hi]
        xr = x3[n, c, lo:hi]
        s1 = 0.0
        s2 = 0.0
        for i in range(hi - lo):
            g = np.float64(load(gr[i]))
            s1 += g
            s2 += g * (np.float64(load(xr[i])) - mu)
        part[n * nseg + s, 0, c] = s1
        part[n * nseg + s, 1, c] = s2


@njit(**_REDUCE)
def grad_sums_mc(dy2, x2, mean, nchunk, part):
    """part[t, :, c] = (sum dy, sum dy * (x - mean[c])) over row chunk t."""
    m, c_ = x2.shape
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        s1 = part[t, 0]
        s2 = part[t, 1]
        s1[:] = 0.0
        s2[:] = 0.0
        for r in range(lo, hi):
            gr = dy2[r]
            xr = x2[r]
            for c in range(c_):
                g = np.float64(load(gr[c]))
                s1[c] += g
                s2[c] += g * (np.float64(load(xr[c])) - mean[c])


@njit(**_ELEMENTWISE)
def grad_input_ncl(dy3, x3, params, nseg, dx3):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 with params rows (hi, lo, k2, mdy, k1)."""
    n_, c_, l_ = x3.shape
    for task in prange(np.int64(n_ * c_ * nseg)):
        n, c, s, lo, hi = _segment(np.int64(task), nseg, c_, l_)
        m_hi = params[0, c]
        m_lo = params[1, c]
        k2 = params[2, c]
        mdy = params[3, c]
        k1 = params[4, c]
        gr = dy3[n, c, lo:hi]
        xr = x3[n, c, lo:hi]
        dr = dx3[n, c, lo:hi]
        for i in range(hi - lo):
            xmu = (load(xr[i]) - m_hi) - m_lo
            dr[i] = store((load(gr[i]) - mdy - xmu * k2) * k1, dr)


@njit(**_ELEMENTWISE)
def grad_input_mc(dy2, x2, params, nchunk, dx2):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 with params rows (hi, lo, k2, mdy, k1)."""
    m, c_ = x2.shape
    m_hi = params[0]
    m_lo = params[1]
    k2 = params[2]
    mdy = params[3]
    k1 = params[4]
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        for r in range(lo, hi):
            gr = dy2[r]
            xr = x2[r]
            dr = dx2[r]
            for c in range(c_):
                xmu = (load(xr[c]) - m_hi[c]) - m_lo[c]
                dr[c] = store((load(gr[c]) - mdy[c] - xmu * k2[c]) * k1[c], dr)
