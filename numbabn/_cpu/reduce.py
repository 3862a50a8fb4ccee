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

The kernels run their task functions through ``tasks`` (each compiles once, alone, and
the parallel loop once per process); before and after, the shifts and the partials'
sum run serially on the calling thread.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._half import load, store
from . import pieces, tasks
from .formulas import EXACT, SUM, load_at, moments, plane, row


@njit(**SUM)
def _row_sums(gr, xr, k, rr):
    """A contiguous row's (sum d, sum d^2), d = x - k (``gr`` None: the moments'), or
    (sum g, sum g * (x - k)) with gradient row ``gr`` (an array, or a ReLU-masked pair,
    ``formulas.load_at``), each g also stored into ``rr`` if an array (dresidual)."""
    s1 = 0.0
    s2 = 0.0
    if gr is None:
        for i in range(xr.size):
            d = np.float64(load(xr[i])) - k
            s1 += d
            s2 += d * d
    else:
        for i in range(xr.size):
            v = load_at(gr, i)
            if rr is not None:
                rr[i] = store(v, rr)
            g = np.float64(v)
            s1 += g
            s2 += g * (np.float64(load(xr[i])) - k)
    return s1, s2


@njit(**SUM)
def rows_sums_mc(g2, x2, lo, hi, shift, s1, s2, r2):
    """Rows [lo, hi) of (M, C) ``x2`` added into per-column sums ``s1``, ``s2`` as
    :func:`_row_sums` (columns shifted by ``shift``, the gradient stored into rows of
    ``r2`` if an array), two rows at a time: the sums and the shift are then loaded and
    stored once for two values."""
    r = lo
    if g2 is None:
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
        return
    while r + 2 <= hi:
        ga, gb, xa, xb = row(g2, r), row(g2, r + 1), x2[r], x2[r + 1]
        for c in range(xa.size):
            va, vb = load_at(ga, c), load_at(gb, c)
            if r2 is not None:
                r2[r, c] = store(va, r2)
                r2[r + 1, c] = store(vb, r2)
            g1 = np.float64(va)
            g2_ = np.float64(vb)
            s1[c] += g1 + g2_
            d1 = np.float64(load(xa[c])) - shift[c]
            d2 = np.float64(load(xb[c])) - shift[c]
            s2[c] += g1 * d1 + g2_ * d2
        r += 2
    if r < hi:
        gr, xr = row(g2, r), x2[r]
        for c in range(xr.size):
            v = load_at(gr, c)
            if r2 is not None:
                r2[r, c] = store(v, r2)
            g = np.float64(v)
            s1[c] += g
            s2[c] += g * (np.float64(load(xr[c])) - shift[c])


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


@njit(**EXACT)
def _sweep_task(run, g3, x3, shift, nrun, nseg, part, r3):
    """Run ``run`` of ``nrun`` runs of samples, read in memory order (every channel's
    plane of a sample in turn): its partial row ``part[run]`` (``nseg``: 1)."""
    p = part[run]
    for k in range(2):
        for c in range(p.shape[1]):
            p[k, c] = 0.0
    n0, n1 = pieces.rows(run, nrun, x3.shape[0])
    l_ = x3.shape[2]
    for n in range(n0, n1):
        for c in range(x3.shape[1]):
            a, b = _row_sums(plane(g3, n, c, 0, l_), x3[n, c], shift[c], plane(r3, n, c, 0, l_))
            p[0, c] += a
            p[1, c] += b


@njit(**EXACT)
def _segment_task(task, g3, x3, shift, nrun, nseg, part, r3):
    """Task ``task``'s run of samples over one segment of one channel's planes
    (:func:`_sum_task`): its partial sums ``part[row, :, c]``."""
    n_, c_, l_ = x3.shape
    n0, n1, c, lo, hi, row = _sum_task(task, nrun, nseg, n_, c_, l_)
    s1 = 0.0
    s2 = 0.0
    for n in range(n0, n1):
        a, b = _row_sums(plane(g3, n, c, lo, hi), x3[n, c, lo:hi], shift[c], plane(r3, n, c, lo, hi))
        s1 += a
        s2 += b
    part[row, 0, c], part[row, 1, c] = s1, s2


@njit(**EXACT)
def _sums_ncl(go, g3, x3, centre, nrun, nseg, ntask, part, out, r3):
    n_, c_, l_ = x3.shape
    if g3 is None:
        shift = pieces.firsts(x3[0, :, 0], 1)
    else:
        shift = centre
    tasks.run(go, ntask, (g3, x3, shift, np.int64(nrun), np.int64(nseg), part, r3))
    _add_partials(part, 1, out)
    if g3 is None:
        _finish_moments(out, shift, n_ * l_)


_SHIFT, _INT = np.empty(0), tasks.INT  # (for typing the tasks' shift and indices)


def sums_ncl(g3, x3, centre, nrun, nseg, sweep, part, out, r3=None):
    """Per-channel sums of (N, C, L) ``x3`` into ``out`` (2, C): ``g3`` None, the mean
    and biased variance, from sums shifted by each channel's first value; else
    (sum dy, sum dy * (x - centre[c])) with dy = ``g3``. Task partials
    part[r * nseg + s, :, c] over segment s of the planes of channel c in run r of the
    ``nrun`` runs of samples, then added in task order. ``sweep`` (whole planes, nseg
    1): one task per run, which reads its samples in memory order, all channels of a
    sample before the next; else a task per run, channel and segment. The additions are
    the same either way. ``r3`` an array: the gradient stored there as it is summed
    (dresidual). The tasks run through ``tasks``."""
    task, ntask = (_sweep_task, nrun) if sweep else (_segment_task, nrun * x3.shape[1] * nseg)
    shift = _SHIFT if g3 is None else centre
    task_args = (g3, x3, shift, _INT, _INT, part, r3)
    tasks.launch(_sums_ncl, task, task_args, g3, x3, centre, nrun, nseg, ntask, part, out, r3)


# rows_sums_mc inlined into the chunk, with the same flags (docs/performance.md: faster so)
_rows_inline = njit(inline="always")(rows_sums_mc.py_func)


@njit(**SUM)
def _mc_chunk(t, g2, x2, shift, nchunk, part, r2):
    """Row chunk t of ``nchunk`` of :func:`sums_mc` into ``part[t]``. Each chunk adds
    into its own fresh arrays: adding into ``part`` itself, two chunks' sums can share a
    cache line (``part`` is 16-byte aligned), which two threads then pass back and forth
    on every row (1.9x slower with 2 chunks on 2 threads)."""
    lo, hi = pieces.rows(t, nchunk, x2.shape[0])
    s1, s2 = np.zeros(x2.shape[1]), np.zeros(x2.shape[1])
    _rows_inline(g2, x2, lo, hi, shift, s1, s2, r2)
    _keep(part[t], s1, s2)


@njit(**EXACT)
def _sums_mc(go, g2, x2, centre, l, nchunk, part, out, r2):
    m = x2.shape[0]
    if g2 is None:
        first = pieces.firsts(x2[0], l)
    else:
        first = centre
    shift = pieces.columns(first, l)
    tasks.run(go, nchunk, (g2, x2, shift, np.int64(nchunk), part, r2))
    _add_partials(part, l, out)
    if g2 is None:
        _finish_moments(out, first, m * l)


def sums_mc(g2, x2, centre, l, nchunk, part, out, r2=None):
    """Per-channel sums of (M, C) ``x2`` into ``out`` (2, C), as :func:`sums_ncl`:
    part[t, :, j] over row chunk t of column j (:func:`_mc_chunk`, a task of
    ``tasks``), then added in chunk order and over the ``l`` columns of each channel
    (flat rows of NCL samples; ``l == 1`` for true channels); ``r2``: as for
    :func:`sums_ncl`."""
    task_args = (g2, x2, _SHIFT, _INT, part, r2)
    tasks.launch(_sums_mc, _mc_chunk, task_args, g2, x2, centre, l, nchunk, part, out, r2)
