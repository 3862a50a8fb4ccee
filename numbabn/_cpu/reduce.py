"""The CPU reductions: per-channel sums of x (the statistics) and of the gradients.

Sums are float64 of values shifted by a per-channel constant close to the data (the
channel's first value, or the mean), which keeps the variance free of cancellation.
Each task writes one partial row ``part[t, k, c]`` (``k``: which sum); the partials are
then added on the calling thread in task order, so a result depends on the plan (the
shape) alone, never on the threads. Reassociation lets the row loops vectorize; NaN
and Inf handling is untouched (no ``nnan``/``ninf``).

* ``ncl`` (x3 of shape (N, C, L)): tasks are runs of samples x channels x segments of
  a plane; with whole planes and enough runs a task instead sweeps its run of samples
  in memory order (``sweep``), every channel of a sample in turn.
* ``mc`` (x2 of shape (M, C), channels contiguous): chunks of rows, two rows at a time
  (the sums and the constant then load and store once for two values); ``l`` > 1 for
  NCL planes viewed as flat rows (a channel is ``l`` adjacent columns).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._half import load
from . import pieces
from .formulas import PAR, SUM, moments


@njit(**SUM)
def _sums_row(xr, k):
    s1 = 0.0
    s2 = 0.0
    for i in range(xr.size):
        d = np.float64(load(xr[i])) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(**SUM)
def _grad_sums_row(gr, xr, mu):
    s1 = 0.0
    s2 = 0.0
    for i in range(xr.size):
        g = np.float64(load(gr[i]))
        s1 += g
        s2 += g * (np.float64(load(xr[i])) - mu)
    return s1, s2


@njit(**SUM)
def sums_rows_mc(x2, lo, hi, shift, s1, s2):
    r = lo
    while r + 2 <= hi:
        xa, xb = x2[r], x2[r + 1]
        for c in range(xa.size):
            da = np.float64(load(xa[c])) - shift[c]
            db = np.float64(load(xb[c])) - shift[c]
            s1[c] += da + db
            s2[c] += da * da + db * db
        r += 2
    if r < hi:
        xr = x2[r]
        for c in range(xr.size):
            d = np.float64(load(xr[c])) - shift[c]
            s1[c] += d
            s2[c] += d * d


@njit(**SUM)
def grad_sums_rows_mc(dy2, x2, lo, hi, mean, s1, s2):
    r = lo
    while r + 2 <= hi:
        ga, gb, xa, xb = dy2[r], dy2[r + 1], x2[r], x2[r + 1]
        for c in range(xa.size):
            g1 = np.float64(load(ga[c]))
            g2 = np.float64(load(gb[c]))
            s1[c] += g1 + g2
            d1 = np.float64(load(xa[c])) - mean[c]
            d2 = np.float64(load(xb[c])) - mean[c]
            s2[c] += g1 * d1 + g2 * d2
        r += 2
    if r < hi:
        gr, xr = dy2[r], x2[r]
        for c in range(xr.size):
            g = np.float64(load(gr[c]))
            s1[c] += g
            s2[c] += g * (np.float64(load(xr[c])) - mean[c])


@njit(inline="always")
def _add_partials(part, l, out):
    """``out[k, c]``: the partial rows ``part[t, k, :]`` added over the tasks t, in
    task order, and over the ``l`` columns of channel c. (Loops rather than array
    expressions: in a parallel kernel, numba turns those into parallel regions.)"""
    for k in range(2):
        for c in range(out.shape[1]):
            out[k, c] = 0.0
    for t in range(part.shape[0]):
        for k in range(2):
            for c in range(out.shape[1]):
                s = 0.0
                for i in range(c * l, (c + 1) * l):
                    s += part[t, k, i]
                out[k, c] += s


@njit(inline="always")
def _finish_moments(out, shift, count):
    """Sums shifted by ``shift`` (one per channel) in ``out`` to (mean, biased
    variance), in place."""
    for c in range(out.shape[1]):
        out[0, c], out[1, c] = moments(out[0, c], out[1, c], shift[c], count)


@njit(inline="always")
def _keep(p, s1, s2):
    """p[0], p[1] = s1, s2, as a loop: numba's array assignment compiles a shape check
    whose error message (string formatting) took 3-4 s to compile."""
    for j in range(s1.size):
        p[0, j] = s1[j]
        p[1, j] = s2[j]


@njit(inline="always")
def _sum_task(task, nrun, nseg, n_, c_, l_):
    """(samples [n0, n1), channel, segment [lo, hi), partial row) of reduction task
    ``task``: runs of samples, then channels, then segments of a plane."""
    run, c, s, lo, hi = pieces.segment(task, nseg, c_, l_)  # runs in place of samples
    n0, n1 = pieces.rows(run, nrun, n_)
    return n0, n1, c, lo, hi, run * nseg + s


@njit(inline="always")
def _sweep_run(dy3, x3, per_channel, run, nrun, grads, part):
    """Run ``run`` of ``nrun`` runs of samples, read in memory order (every channel's
    plane of a sample in turn): its partial row ``part[run]``, the moments of x3
    shifted by ``per_channel`` or (``grads``) the gradient sums about it (dy3)."""
    p = part[run]
    for k in range(2):
        for c in range(p.shape[1]):
            p[k, c] = 0.0
    n0, n1 = pieces.rows(run, nrun, x3.shape[0])
    for n in range(n0, n1):
        for c in range(x3.shape[1]):
            if grads:
                a, b = _grad_sums_row(dy3[n, c], x3[n, c], per_channel[c])
            else:
                a, b = _sums_row(x3[n, c], per_channel[c])
            p[0, c] += a
            p[1, c] += b


@njit(**PAR)
def stats_ncl(x3, nrun, nseg, sweep, part, out):
    """Mean and biased variance of each channel into ``out`` (2, C), from sums shifted by
    the channel's first value, d = x - shift[c]: task partials
    part[r * nseg + s, :, c] = (sum d, sum d^2) over segment s of the planes of channel
    c in run r of the ``nrun`` runs of samples, then added in task order. ``sweep``
    (whole planes, nseg 1): one task per run, which reads its samples in memory order,
    all channels of a sample before the next; else a task per run, channel and
    segment. The additions are the same either way."""
    n_, c_, l_ = x3.shape
    shift = pieces.firsts(x3[0, :, 0], 1)
    if sweep:
        for run in prange(np.int64(nrun)):
            _sweep_run(x3, x3, shift, np.int64(run), nrun, False, part)
        _add_partials(part, 1, out)
        _finish_moments(out, shift, n_ * l_)
        return
    for task in prange(np.int64(nrun * c_ * nseg)):
        n0, n1, c, lo, hi, row = _sum_task(np.int64(task), nrun, nseg, n_, c_, l_)
        s1 = 0.0
        s2 = 0.0
        for n in range(n0, n1):
            a, b = _sums_row(x3[n, c, lo:hi], shift[c])
            s1 += a
            s2 += b
        part[row, 0, c], part[row, 1, c] = s1, s2
    _add_partials(part, 1, out)
    _finish_moments(out, shift, n_ * l_)


@njit(**PAR)
def grad_sums_ncl(dy3, x3, mean, nrun, nseg, sweep, part, out):
    """(sum dy, sum dy * (x - mean[c])) of each channel into ``out`` (2, C): task
    partials in ``part`` as in ``stats_ncl``, then added in task order."""
    n_, c_, l_ = x3.shape
    if sweep:
        for run in prange(np.int64(nrun)):
            _sweep_run(dy3, x3, mean, np.int64(run), nrun, True, part)
        _add_partials(part, 1, out)
        return
    for task in prange(np.int64(nrun * c_ * nseg)):
        n0, n1, c, lo, hi, row = _sum_task(np.int64(task), nrun, nseg, n_, c_, l_)
        s1 = 0.0
        s2 = 0.0
        for n in range(n0, n1):
            a, b = _grad_sums_row(dy3[n, c, lo:hi], x3[n, c, lo:hi], mean[c])
            s1 += a
            s2 += b
        part[row, 0, c], part[row, 1, c] = s1, s2
    _add_partials(part, 1, out)


@njit(**PAR)
def stats_mc(x2, l, nchunk, part, out):
    """Mean and biased variance of each channel into ``out`` (2, C), from sums shifted by
    the channel's first value: part[t, :, j] = (sum d, sum d^2) over row chunk t of
    column j, then added in chunk order and over the ``l`` columns of each channel
    (flat rows of NCL samples; ``l == 1`` for true channels). Each chunk adds into its
    own fresh arrays: adding into ``part`` itself, two chunks' sums can share a cache
    line (``part`` is 16-byte aligned), which two threads then pass back and forth on
    every row (1.9x slower with 2 chunks on 2 threads)."""
    m, cols = x2.shape
    first = pieces.firsts(x2[0], l)
    shift = pieces.columns(first, l)
    for t in prange(np.int64(nchunk)):
        lo, hi = pieces.rows(np.int64(t), nchunk, m)
        s1, s2 = np.zeros(cols), np.zeros(cols)
        sums_rows_mc(x2, lo, hi, shift, s1, s2)
        _keep(part[t], s1, s2)
    _add_partials(part, l, out)
    _finish_moments(out, first, m * l)


@njit(**PAR)
def grad_sums_mc(dy2, x2, mean, l, nchunk, part, out):
    """(sum dy, sum dy * (x - mean[c])) of each channel into ``out`` (2, C): chunk
    partials of each column as in ``stats_mc``, then added over chunks and columns."""
    m, cols = x2.shape
    centre = pieces.columns(mean, l)
    for t in prange(np.int64(nchunk)):
        lo, hi = pieces.rows(np.int64(t), nchunk, m)
        s1, s2 = np.zeros(cols), np.zeros(cols)
        grad_sums_rows_mc(dy2, x2, lo, hi, centre, s1, s2)
        _keep(part[t], s1, s2)
    _add_partials(part, l, out)
