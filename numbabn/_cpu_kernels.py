"""Numba CPU kernels. Small, and they trust their arguments (see ``_validate``).

Two views of a tensor (see ``_validate.Layout``):

* ``ncl``: ``x3`` of shape ``(N, C, L)``, C-contiguous. The elementwise passes split
  the work into ``N * C * nseg`` equal tasks, each one segment of one ``(n, c)``
  plane, so a batch with fewer channels than threads still keeps every core busy. The
  reductions take a run of samples per task instead of one plane when planes are
  short: ``nrun * C * nseg`` tasks (a task per 7x7 plane cost twice its sum).
* ``mc``: ``x2`` of shape ``(M, C)``, C-contiguous. Work is split into ``nchunk``
  chunks of rows. The reductions run along the contiguous channels of each row. The
  elementwise passes walk the tensor as flat spans of ``w`` elements, whatever C is,
  so the inner loop is long and contiguous even for a small C: the kernel first tiles
  the per-channel constants (``tiled[k, j]`` is channel ``j % C``'s, ``w + C - 1``
  columns), and a span starting at flat index p reads them from column ``p % C``.
  When streaming, the spans start on vector boundaries of the output, whatever its
  alignment (the few elements before the first boundary are written first).

Reductions write one partial per task into ``part[t, k, c]`` (``k`` = which sum),
then, on the calling thread, add the partials over ``t`` in a fixed order into
their (2, C) result, so results are deterministic for a given thread count. Sums
are float64 of values shifted by a per-channel constant close to the data (its
first value, or the mean), which keeps the variance free of cancellation; the
statistics kernels turn them into mean and biased variance themselves.
Reassociation lets the reductions vectorize; NaN/Inf handling is untouched (no
``nnan``/``ninf``).

Per-channel constants come packed as rows of one ``params`` array in the compute
type (float32 for float16/float32 data, float64 for float64). The mean is passed as
an unevaluated sum ``hi + lo`` so that ``(x - hi) - lo`` subtracts it with more than
float32 precision: a channel with mean 1e4 and std 1e-2 keeps its digits.

Elementwise passes over tensors larger than the cache take ``streamed=True``: the
aligned middle of each span is written with non-temporal stores (``_stream``), which
skip reading the destination lines before writing them.

``forward_channels`` and ``backward_channels`` are the cache-fused passes for
``ncl``: each thread takes channels one at a time (from a shared counter, ``_atomic``,
when the data is out of cache; else in a run of its own) and writes each channel from
the core's cache after reducing it, so a slab comes from memory once instead of twice.
The forward normalizes a channel while, in the same loop, it reduces the next channel
it took (``_stream._fused_row``), so that the reads overlap the writes; the backward
reduces a channel, then computes its dx.
Their sums are added in an order that depends on the plane length alone (not on
which thread takes a channel, the output's address or streaming); the small kernels
for ``ncl`` run the same loops on one thread, so all per-channel statistics agree
bitwise. ``_cpu._fuse`` decides when the fused passes run.

The elementwise helpers branch on ``streamed`` once, before their loops: with the
plain loop sharing its bounds with the streamed one, LLVM left it scalar, 5-13x slower
on cache-resident rows.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import _atomic, _stream
from ._channel import finite_scale, mean_lo
from ._half import load, store, zero

# Reductions vectorize only with reassociation. Elementwise rows must not reassociate
# (x - hi) - lo into x - (hi + lo); each row helper is compiled with its own flags.
_SUM = {"cache": True, "fastmath": {"reassoc", "contract"}}
_ELEM = {"cache": True, "fastmath": {"contract"}}
# A function compiled without fastmath flags of its own inherits its caller's (numba
# compiles a callee with the flags of the call that first needs it), and numba's disk
# cache then keeps that version for every caller and every later process: moments
# called first from a contracting pass fused its variance into an FMA, so results
# differed in the last bits with the order in which a process first ran the kernels.
# So every function that is not inlined into its caller states its flags; "_EXACT":
# no reassociation, no contraction.
_EXACT = {"cache": True, "fastmath": False}
_PAR = {"parallel": True, **_EXACT}


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


def at(p, i):
    """``p[i]`` for a per-element parameter array, ``p`` itself for a scalar."""


@overload(at, inline="always")
def _at(p, i):
    if isinstance(p, types.Array):
        return lambda p, i: p[i]
    return lambda p, i: p


@njit(inline="always", **_ELEM)
def _normalize_plain(xr, hi, lo, a, b, yr, i0, i1):
    for i in range(i0, i1):
        yr[i] = store(((load(xr[i]) - at(hi, i)) - at(lo, i)) * at(a, i) + at(b, i), yr)


@njit(inline="always", **_ELEM)
def _grad_input_plain(gr, xr, hi, lo, k2, mdy, k1, dr, i0, i1):
    for i in range(i0, i1):
        xmu = (load(xr[i]) - at(hi, i)) - at(lo, i)
        dr[i] = store((load(gr[i]) - at(mdy, i) - xmu * at(k2, i)) * at(k1, i), dr)


@njit(**_ELEM)
def _normalize_span(xr, hi, lo, a, b, yr, streamed):
    """y = ((x - hi) - lo) * a + b over a contiguous span; hi, lo, a, b scalars (one
    channel) or arrays indexed like the span (tiled channels). ``streamed``: write the
    aligned middle with non-temporal stores (``_stream``)."""
    if not streamed:
        _normalize_plain(xr, hi, lo, a, b, yr, 0, yr.size)
        return
    i0, i1 = _stream.bounds(yr)
    _normalize_plain(xr, hi, lo, a, b, yr, 0, i0)
    _stream.normalize(xr, yr, i0, i1, hi, lo, a, b)
    _normalize_plain(xr, hi, lo, a, b, yr, i1, yr.size)


@njit(**_ELEM)
def _grad_input_span(gr, xr, hi, lo, k2, mdy, k1, dr, streamed):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 over a span, as ``_normalize_span``."""
    if not streamed:
        _grad_input_plain(gr, xr, hi, lo, k2, mdy, k1, dr, 0, dr.size)
        return
    i0, i1 = _stream.bounds(dr)
    _grad_input_plain(gr, xr, hi, lo, k2, mdy, k1, dr, 0, i0)
    _stream.grad_input(gr, xr, dr, i0, i1, hi, lo, k2, mdy, k1)
    _grad_input_plain(gr, xr, hi, lo, k2, mdy, k1, dr, i1, dr.size)


# The MC reductions add rows [lo, hi) into per-channel sums s1, s2, two rows at a time:
# the sums and the per-channel constant are then loaded and stored once for two values.
# Kernel times against a row at a time, float32, 8 chunks on 2 threads: stats_mc
# 1.15-1.54x at 0.3-6.4 MB and 1.06x at 25.7 MB; grad_sums_mc 0.87-1.25x in one run and
# 1.0-1.2x in the next. (Four rows at a time was faster still in cache, but 1.8x slower
# than one row at 25.7 MB.)


@njit(**_SUM)
def _sums_rows_mc(x2, lo, hi, shift, s1, s2):
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


@njit(**_SUM)
def _grad_sums_rows_mc(dy2, x2, lo, hi, mean, s1, s2):
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


# --- per-channel arithmetic shared by the drivers and the fused kernels -------------


@njit(**_EXACT)
def moments(s1, s2, k, count):
    """Mean and biased variance from shifted sums (s1, s2) of ``count`` values."""
    delta = s1 / count
    var = s2 / count - delta * delta
    return k + delta, var if not var < 0.0 else 0.0


@njit(inline="always")
def _firsts(row, l):
    """The first value of each channel of ``row``, whose channels are ``l`` adjacent
    entries: the reductions' shifts."""
    first = np.empty(row.size // l)
    for c in range(first.size):
        first[c] = load(row[c * l])
    return first


@njit(inline="always")
def _columns(values, l):
    """``values[j // l]`` for each column j of a flat row whose channels are ``l``
    columns wide. (A loop, not slice assignments: in a parallel kernel numba may run
    those as parallel regions of their own.)"""
    out = np.empty(values.size * l)
    for j in range(out.size):
        out[j] = values[j // l]
    return out


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


@njit(**_EXACT)
def tile(per_channel, l, columns):
    """A new array of ``columns`` columns with :func:`expand` of ``per_channel``: the
    MC elementwise kernels' tiled constants."""
    out = np.empty((per_channel.shape[0], columns), per_channel.dtype)
    expand(per_channel, l, out)
    return out


# The fills and copies below are loops over a view rather than slice assignments:
# numba's slice assignment cost about 1 ns a value here, and tiling the constants of
# a 32x64x7x7 batch took 8.5 us against 4.3 us (2-core development machine).


@njit(inline="always")
def _spread(values, l, c0, c1, row):
    """row[j - c0] = values[j // l] for the flat positions j in [c0, c1) of a sample
    whose planes hold ``l`` values each: a fill per plane (one loop with a branch per
    value was 4-6x slower)."""
    if l == 1:
        src = values[c0:c1]
        for i in range(c1 - c0):
            row[i] = src[i]
        return
    for ch in range(c0 // l, (c1 - 1) // l + 1):
        start, stop = max(ch * l, c0) - c0, min((ch + 1) * l, c1) - c0
        v, dst = values[ch], row[start:stop]
        for i in range(stop - start):
            dst[i] = v


@njit(**_EXACT)
def expand(per_channel, l, out):
    """out[k, j] = per_channel[k, j % (C * l) // l]: per-channel values spread over the
    flat positions of a sample whose planes hold ``l`` values each (``_cpu._flat``)."""
    columns = out.shape[1]
    period = min(per_channel.shape[1] * l, columns)
    for k in range(out.shape[0]):
        row = out[k]
        _spread(per_channel[k], l, 0, period, row)
        j = period
        while j < columns:  # then the filled part copied onward, doubling each time
            n = min(j, columns - j)  # (j stays a whole number of periods)
            dst = row[j : j + n]
            for i in range(n):
                dst[i] = row[i]
            j += n


# --- work splitting ------------------------------------------------------------------


# Cuts between work pieces fall on multiples of this many elements (64 bytes or more),
# so that when the output is aligned every piece starts on a vector boundary.
_GRAIN = 16


@njit(inline="always")
def _cut(k, parts, total):
    """Start of piece k of ``parts`` near-equal pieces of ``total`` elements."""
    if k >= parts:
        return total
    if k == 0:  # no division for the first piece (every plane of a one-segment split)
        return 0
    return k * total // parts // _GRAIN * _GRAIN


@njit(inline="always")
def _segment(task, nseg, c, length):
    """Split a task number into (n, c, segment, start, stop) of one plane segment."""
    plane = task // nseg
    seg = task - plane * nseg
    n = plane // c
    ch = plane - n * c
    return n, ch, seg, _cut(seg, nseg, length), _cut(seg + 1, nseg, length)


@njit(inline="always")
def _next_segment(n, c, s, nseg, c_, l_):
    """``_segment`` of the task after (n, c, s), counted on instead of divided out
    (two integer divisions a task cost 10% at 14x14 planes)."""
    s += 1
    if s == nseg:
        s = 0
        c += 1
        if c == c_:
            c = 0
            n += 1
    return n, c, s, _cut(s, nseg, l_), _cut(s + 1, nseg, l_)


@njit(inline="always")
def _head(yf, streamed):
    """Elements of flat ``yf`` before its first vector boundary when streaming (fewer
    than a vector), so that the MC passes cut the rest into pieces that start on vector
    boundaries; 0 when not streaming or when ``yf`` has no such boundaries."""
    return _stream.bounds(yf)[0] if streamed else 0


@njit(inline="always")
def _rows(chunk, nchunk, m):
    """[first, end) of chunk ``chunk`` of ``nchunk`` near-equal chunks of ``m`` items."""
    return chunk * m // nchunk, (chunk + 1) * m // nchunk


# --- ncl kernels ---------------------------------------------------------------------


@njit(inline="always")
def _sum_task(task, nrun, nseg, n_, c_, l_):
    """(samples [n0, n1), channel, segment [lo, hi), partial row) of reduction task
    ``task``: runs of samples, then channels, then segments of a plane."""
    run, c, s, lo, hi = _segment(task, nseg, c_, l_)  # runs in place of samples
    n0, n1 = _rows(run, nrun, n_)
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
    n0, n1 = _rows(run, nrun, x3.shape[0])
    for n in range(n0, n1):
        for c in range(x3.shape[1]):
            if grads:
                a, b = _grad_sums_row(dy3[n, c], x3[n, c], per_channel[c])
            else:
                a, b = _sums_row(x3[n, c], per_channel[c])
            p[0, c] += a
            p[1, c] += b


@njit(**_PAR)
def stats_ncl(x3, nrun, nseg, sweep, part, out):
    """Mean and biased variance of each channel into ``out`` (2, C), from sums shifted by
    the channel's first value, d = x - shift[c]: task partials
    part[r * nseg + s, :, c] = (sum d, sum d^2) over segment s of the planes of channel
    c in run r of the ``nrun`` runs of samples, then added in task order. ``sweep``
    (whole planes, nseg 1): one task per run, which reads its samples in memory order,
    all channels of a sample before the next; else a task per run, channel and
    segment. The additions are the same either way."""
    n_, c_, l_ = x3.shape
    shift = _firsts(x3[0, :, 0], 1)
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


# With plain stores the segment loops below are compiled into one function with the
# row loops inlined: a call per segment cost more than the work of a short plane
# (kernels alone: 14x14 and 28x28 planes 1.02-1.07x, 8x8 planes, which the plain
# passes now take here, ``_cpu._PLANE_LOOP_MIN``, 1.35x normalize and 1.46x
# grad_input against the flat rows; full calls below 8x8 lost, 0.9-0.98x, and keep the
# flat rows). Each row loop runs over a view from 0: from a start known only at run
# time the loop did not vectorize (2.9x slower). The streamed walks are functions of
# their own: one walk for both, with a run-time flag choosing the row loop or the span
# call, ran 8x8 planes 0.77-0.78x as fast.


@njit(**_ELEM)
def _normalize_segments(x3, params, first, end, nseg, y3):
    """``normalize_ncl``'s tasks [first, end) with plain stores."""
    n_, c_, l_ = x3.shape
    n, c, s, i0, i1 = _segment(first, nseg, c_, l_)
    for _ in range(first, end):
        hi, lo, a, b = params[0, c], params[1, c], params[2, c], params[3, c]
        _normalize_plain(x3[n, c, i0:i1], hi, lo, a, b, y3[n, c, i0:i1], 0, i1 - i0)
        n, c, s, i0, i1 = _next_segment(n, c, s, nseg, c_, l_)


@njit(**_ELEM)
def _grad_input_segments(dy3, x3, params, first, end, nseg, dx3):
    """``grad_input_ncl``'s tasks [first, end) with plain stores."""
    n_, c_, l_ = x3.shape
    n, c, s, i0, i1 = _segment(first, nseg, c_, l_)
    for _ in range(first, end):
        hi, lo, p, q, k1 = params[0, c], params[1, c], params[2, c], params[3, c], params[4, c]
        g, xr, dr = dy3[n, c, i0:i1], x3[n, c, i0:i1], dx3[n, c, i0:i1]
        _grad_input_plain(g, xr, hi, lo, p, q, k1, dr, 0, i1 - i0)
        n, c, s, i0, i1 = _next_segment(n, c, s, nseg, c_, l_)


@njit(**_ELEM)
def _normalize_streamed(x3, params, first, end, nseg, y3):
    """``normalize_ncl``'s tasks [first, end) into a streamed output, then a fence."""
    n_, c_, l_ = x3.shape
    n, c, s, i0, i1 = _segment(first, nseg, c_, l_)
    for _ in range(first, end):
        hi, lo, a, b = params[0, c], params[1, c], params[2, c], params[3, c]
        _normalize_span(x3[n, c, i0:i1], hi, lo, a, b, y3[n, c, i0:i1], True)
        n, c, s, i0, i1 = _next_segment(n, c, s, nseg, c_, l_)
    _stream.fence()


@njit(**_ELEM)
def _grad_input_streamed(dy3, x3, params, first, end, nseg, dx3):
    """``grad_input_ncl``'s tasks [first, end) into a streamed output, then a fence."""
    n_, c_, l_ = x3.shape
    n, c, s, i0, i1 = _segment(first, nseg, c_, l_)
    for _ in range(first, end):
        hi, lo, p, q, k1 = params[0, c], params[1, c], params[2, c], params[3, c], params[4, c]
        g, xr, dr = dy3[n, c, i0:i1], x3[n, c, i0:i1], dx3[n, c, i0:i1]
        _grad_input_span(g, xr, hi, lo, p, q, k1, dr, True)
        n, c, s, i0, i1 = _next_segment(n, c, s, nseg, c_, l_)
    _stream.fence()


@njit(**_PAR)
def normalize_ncl(x3, params, nseg, nchunk, streamed, y3):
    """y = ((x - hi) - lo) * a + b with params rows (hi, lo, a, b); the tasks are dealt
    out in ``nchunk`` contiguous runs (one fence per run when streamed)."""
    n_, c_, l_ = x3.shape
    ntasks = np.int64(n_ * c_ * nseg)
    for t in prange(np.int64(nchunk)):
        first, end = _rows(np.int64(t), nchunk, ntasks)
        if streamed:
            _normalize_streamed(x3, params, first, end, nseg, y3)
        else:
            _normalize_segments(x3, params, first, end, nseg, y3)


@njit(**_PAR)
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


@njit(**_PAR)
def grad_input_ncl(dy3, x3, params, nseg, nchunk, streamed, dx3):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 with params rows (hi, lo, k2, mdy, k1);
    tasks dealt out as in ``normalize_ncl``."""
    n_, c_, l_ = x3.shape
    ntasks = np.int64(n_ * c_ * nseg)
    for t in prange(np.int64(nchunk)):
        first, end = _rows(np.int64(t), nchunk, ntasks)
        if streamed:
            _grad_input_streamed(dy3, x3, params, first, end, nseg, dx3)
        else:
            _grad_input_segments(dy3, x3, params, first, end, nseg, dx3)


# --- per-channel fused passes ----------------------------------------------------------
# Runs of channels: each channel's elementwise pass from cache. The forward writes a
# channel in the same loop as the next channel's reduction. The backward reduces a
# channel, then computes its dx. The interleaved loop measured 0.8-0.9x into outputs
# that stay in cache (28x28 and 14x14 planes); into streamed outputs it ran until it
# lost on an AMD Zen 5 machine (1 MiB L2 per core), reduce-then-dx against it, paired
# full calls, float32: 32x64x56x56 1.14-1.31x, 32x64x40x40 1.07-1.19x, 64x128x56x56
# 1.0-1.02x, 32x64x112x112 0.95-1.03x, 16x64x56x56 0.95-1.0x, 64x64x56x56 0.95-0.99x;
# there a channel and the next (1.6 MB of dy and x) did not fit the L2 together. On
# the Intel machine (2 MiB L2) reduce-then-dx had measured 1.07x and 0.99x. Streamed,
# the dx walks a channel's rows from the last: the rows summed last are the likeliest
# still in cache (1.05-1.10x at 32x64x56x56, 0.98-1.02x elsewhere). The parallel
# kernels deal one run to each thread. The "small" kernels run on the calling thread,
# for inputs too small to pay for waking the thread pool. The run functions are
# compiled with the elementwise flags (``contract``), which the row helpers they
# inline need.


@njit(**_EXACT, error_model="numpy")
def _norm_params(c, mean, var, weight, bias, eps, params, stats):
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


@njit(**_EXACT)
def channel_params(mean, var, weight, bias, eps, params, stats):
    """``_norm_params`` of every channel, from float64 statistics or running ones as
    stored (float16 as bits); float64 weight and bias."""
    for c in range(mean.size):
        m, v = np.float64(load(mean[c])), np.float64(load(var[c]))
        _norm_params(c, m, v, weight, bias, eps, params, stats)


@njit(**_EXACT)
def update_running(rm, rv, mean, var, count, momentum):
    """r = (1 - momentum) * r + momentum * batch value, in place, the variance unbiased
    (float64 batch mean and biased variance; the arithmetic of ``_channel``)."""
    for c in range(rm.size):
        rm[c] = store((1.0 - momentum) * np.float64(load(rm[c])) + momentum * mean[c], rm)
        unbiased = var[c] * (count / (count - 1))
        rv[c] = store((1.0 - momentum) * np.float64(load(rv[c])) + momentum * unbiased, rv)


@njit(**_EXACT)
def _grad_params(c, s1, s2, count, mean, invstd, weight, training, params, grads):
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


@njit(**_EXACT)
def grad_params(sums, count, mean, invstd, weight, training, params, grads):
    """``_grad_params`` of every channel, from float64 sums and per-channel inputs."""
    for c in range(mean.size):
        s1, s2 = sums[0, c], sums[1, c]
        _grad_params(c, s1, s2, count, mean, invstd, weight, training, params, grads)


@njit(inline="always")
def _block(a):
    """Values per block of the fused row loops (``_stream._fused_row``): two vectors,
    one cache line."""
    return _stream.LINE_BYTES // _stream.item_bytes(a)


@njit(inline="always")
def _store_blocks(yr, streamed, block):
    """(first index, blocks) that a fused row loop writes of output row ``yr``: whole
    cache lines from its first line boundary when streaming (a block is a line), else
    from its start."""
    if streamed:
        return _stream.line_blocks(yr)
    return 0, yr.size // block


@njit(inline="always")
def _acc_total(acc, block, t1, t2):
    """A channel's two sums: the accumulators of its rows' blocks (``acc``, see
    ``_stream._fused_row``), lane by lane in order, then the values past the blocks."""
    lanes = block // 2
    s1 = 0.0
    s2 = 0.0
    for j in range(lanes):
        s1 += acc[j] + acc[2 * lanes + j]
        s2 += acc[lanes + j] + acc[3 * lanes + j]
    return s1 + t1, s2 + t2


@njit(**_ELEM)
def _moments_tail(zr, k, i0, t1, t2):
    for i in range(i0, zr.size):
        d = np.float64(load(zr[i])) - k
        t1 += d
        t2 = _stream.fma(d, d, t2)  # as the block loops: the same rounding everywhere
    return t1, t2


# (inlined: called, it cost more than its work on the rows of short planes; the
# forward's tail above measured level or slower inlined)
@njit(inline="always", **_ELEM)
def _grads_tail(gr, zr, mu, i0, t1, t2):
    for i in range(i0, zr.size):
        g = np.float64(load(gr[i]))
        t1 += g
        t2 = _stream.fma(g, np.float64(load(zr[i])) - mu, t2)
    return t1, t2


@njit(inline="always", **_ELEM)
def _normalize_row_moments(xr, yr, hi, lo, a, b, streamed, zr, k, acc, t1, t2, pn):
    """Normalize row ``xr`` into ``yr`` (its channel's constants) and, in the same loop
    (``_stream._fused_row``), add the shifted sums (d, d^2), d = z - k, of row ``zr``
    (the next channel's; may be empty) into ``acc``; the values past its last block
    go into (t1, t2), which are returned. ``pn``: elements from ``zr`` to the next
    row to be summed (``_pnext``), which the loop prefetches near the row's end."""
    block = _block(yr)
    s, nstore = _store_blocks(yr, streamed, block)
    nsum = zr.size // block
    if streamed:
        _stream.normalize_moments_nt(xr, yr, s, nstore, hi, lo, a, b, zr, k, nsum, acc, pn)
    else:
        _stream.normalize_moments_plain(xr, yr, s, nstore, hi, lo, a, b, zr, k, nsum, acc, pn)
    _normalize_plain(xr, hi, lo, a, b, yr, 0, s)
    _normalize_plain(xr, hi, lo, a, b, yr, s + nstore * block, yr.size)
    return _moments_tail(zr, k, nsum * block, t1, t2)


@njit(inline="always")
def _pnext(x3, n):
    """Elements from row (n, c) of C-contiguous ``x3`` to row (n + 1, c); 0 for the last n."""
    return x3.shape[1] * x3.shape[2] if n + 1 < x3.shape[0] else 0


@njit(**_ELEM)
def _channel_sums(x3, c, k, acc):
    """Channel c's shifted sums, in the order of the fused rows, nothing written."""
    acc.fill(0.0)
    t1 = 0.0
    t2 = 0.0
    z, block = zero(x3), _block(x3)
    for n in range(x3.shape[0]):
        row, none = x3[n, c], x3[n, c, :0]  # no output row: the loop only sums
        nsum = row.size // block
        pn = _pnext(x3, n)
        _stream.normalize_moments_plain(none, none, 0, 0, z, z, z, z, row, k, nsum, acc, pn)
        t1, t2 = _moments_tail(row, k, nsum * block, t1, t2)
    return _acc_total(acc, block, t1, t2)


@njit(**_ELEM)
def _channel_grad_sums(dy3, x3, c, mu, acc):
    """Channel c's gradient sums, in the order of the fused rows, nothing written."""
    acc.fill(0.0)
    t1 = 0.0
    t2 = 0.0
    z, block = zero(x3), _block(x3)
    for n in range(x3.shape[0]):
        g, row, none = dy3[n, c], x3[n, c], x3[n, c, :0]
        nsum = row.size // block
        pn = _pnext(x3, n)
        _stream.normalize_grads_plain(none, none, 0, 0, z, z, z, z, g, row, mu, nsum, acc, pn)
        t1, t2 = _grads_tail(g, row, mu, nsum * block, t1, t2)
    return _acc_total(acc, block, t1, t2)


@njit(**_EXACT)
def _channel_moments(x3, c):
    """float64 mean and biased variance of channel c, shifted by its first value."""
    n_, _, l_ = x3.shape
    k = np.float64(load(x3[0, c, 0]))
    s1, s2 = _channel_sums(x3, c, k, np.empty(_stream.ACC_SIZE))
    return moments(s1, s2, k, n_ * l_)


@njit(inline="always")
def _take(counters, slot, limit):
    """The next channel from counter ``slot`` of ``counters`` (``_claims``), or -1 once
    it reaches ``limit``."""
    c = _atomic.take(counters, slot)
    return c if c < limit else -1


@njit(inline="always")
def _summed_next(nxt, c, l_):
    """(the channel whose rows are summed while channel c is written, the length of
    those rows): the next one taken, or channel c itself with nothing to sum."""
    return (nxt, l_) if nxt >= 0 else (c, 0)


@njit(**_ELEM)
def _forward_run(x3, claims, slot, limit, weight, bias, eps, params, stats, streamed, y3):
    """Train forward of the channels this task takes from ``claims`` (counter ``slot``,
    up to ``limit``): each channel is normalized while the next one taken is summed, so
    that its data comes from memory once and its reads overlap the previous channel's
    writes."""
    n_, c_, l_ = x3.shape
    c = _take(claims, slot, limit)
    if c < 0:
        return
    acc = np.empty(_stream.ACC_SIZE)
    k = np.float64(load(x3[0, c, 0]))
    s1, s2 = _channel_sums(x3, c, k, acc)
    while c >= 0:
        mean, var = moments(s1, s2, k, n_ * l_)
        _norm_params(c, mean, var, weight, bias, eps, params, stats)
        hi, lo, a, b = params[0, c], params[1, c], params[2, c], params[3, c]
        nxt = _take(claims, slot, limit)
        src, width = _summed_next(nxt, c, l_)
        k = np.float64(load(x3[0, src, 0]))
        acc.fill(0.0)
        t1 = 0.0
        t2 = 0.0
        for n in range(n_):
            t1, t2 = _normalize_row_moments(
                x3[n, c], y3[n, c], hi, lo, a, b, streamed, x3[n, src, :width], k, acc, t1, t2,
                _pnext(x3, n),
            )
        s1, s2 = _acc_total(acc, _block(x3), t1, t2)
        c = nxt
    if streamed:
        _stream.fence()


@njit(inline="always")
def _channel_grads(dy3, x3, c, mean, invstd, weight, training, params, grads, acc):
    """Channel c's gradient sums, turned into its dweight and dbias (``grads``) and its
    dx constants (``params``); returns those constants (hi, lo, p, q, k1)."""
    n_, _, l_ = x3.shape
    s1, s2 = _channel_grad_sums(dy3, x3, c, mean[c], acc)
    _grad_params(c, s1, s2, n_ * l_, mean, invstd, weight, training, params, grads)
    return params[0, c], params[1, c], params[2, c], params[3, c], params[4, c]


@njit(**_ELEM)
def _backward_run_cached(
    dy3, x3, claims, slot, limit, mean, invstd, weight, training, params, grads, dx3
):
    """Backward for data in cache, of the channels this task takes from ``claims``
    (counter ``slot``, up to ``limit``): each channel's gradient sums, then its dx."""
    n_, c_, l_ = x3.shape
    acc = np.empty(_stream.ACC_SIZE)
    c = _take(claims, slot, limit)
    while c >= 0:
        hi, lo, p, q, k1 = _channel_grads(
            dy3, x3, c, mean, invstd, weight, training, params, grads, acc
        )
        for n in range(n_):  # (the row loops inlined: called, short rows cost more)
            if training:
                _grad_input_plain(dy3[n, c], x3[n, c], hi, lo, p, q, k1, dx3[n, c], 0, l_)
            else:
                _normalize_plain(dy3[n, c], hi, lo, p, q, dx3[n, c], 0, l_)
        c = _take(claims, slot, limit)


@njit(**_ELEM)
def _backward_run(
    dy3, x3, claims, slot, limit, mean, invstd, weight, training, params, grads, dx3
):
    """Backward into a streamed ``dx3`` of the channels this task takes from ``claims``
    (counter ``slot``, up to ``limit``): each channel's gradient sums, its rows in
    order, then its dx, rows in reverse order: the rows summed last are the likeliest
    to be in the core's cache still."""
    n_, c_, l_ = x3.shape
    acc = np.empty(_stream.ACC_SIZE)
    c = _take(claims, slot, limit)
    while c >= 0:
        hi, lo, p, q, k1 = _channel_grads(
            dy3, x3, c, mean, invstd, weight, training, params, grads, acc
        )
        for i in range(n_):
            n = n_ - 1 - i
            if training:
                _grad_input_span(dy3[n, c], x3[n, c], hi, lo, p, q, k1, dx3[n, c], True)
            else:
                _normalize_span(dy3[n, c], hi, lo, p, q, dx3[n, c], True)
        c = _take(claims, slot, limit)
    _stream.fence()


# The fused passes run ``ntask`` tasks (one per thread). Into streamed outputs (data out
# of cache) they take channels one at a time from one shared counter, rather than a
# fixed run of channels each: the threads of a call often finished their runs tens to
# hundreds of microseconds apart (2-core development machine, 32x64x56x56 float32
# backward: 76 us median, 123 us mean over 60 calls of a 2.24 ms parallel pass; 16 us
# median with the shared counter). Into outputs that stay in cache each task keeps its
# run (a counter of its own): taking channels in turn, a channel's data was in the
# other core's cache from the call before (paired, warm, 32x32x28x28 train 0.66x,
# backward 0.74x, 32x16x56x56 train 0.82x). A channel's sums are taken in the same
# order whichever task takes it, so results are the same bitwise.


@njit(inline="always")
def _claims(ntask, c_, shared):
    """The fused passes' counters: one for all tasks (``shared``), or one per task from
    the start of its run of channels."""
    counters = np.zeros(ntask, np.int64)
    if not shared:
        for t in range(ntask):
            counters[t] = t * c_ // ntask
    return counters


@njit(inline="always")
def _source(t, ntask, c_, shared):
    """(counter, limit) of task t (``_claims``)."""
    t = np.int64(t)  # a prange index may be unsigned: unified with 0 it became a float
    if shared:
        return np.int64(0), c_
    return t, (t + 1) * c_ // ntask


@njit(**_PAR)
def forward_channels(x3, weight, bias, eps, params, stats, ntask, streamed, y3):
    """Fused train forward, ``ntask`` tasks in parallel: float64 weight and bias in;
    float64 mean, biased variance and invstd out in ``stats``; ``params`` receives
    the normalize constants."""
    c_ = x3.shape[1]
    claims = _claims(ntask, c_, streamed)
    for t in prange(ntask):
        slot, limit = _source(t, ntask, c_, streamed)
        # constant flags: each combination compiles its own loops (a flag read at run
        # time in the row loops measured 8% slower at 25.7 MB)
        if streamed:
            _forward_run(x3, claims, slot, limit, weight, bias, eps, params, stats, True, y3)
        else:
            _forward_run(x3, claims, slot, limit, weight, bias, eps, params, stats, False, y3)


@njit(**_PAR)
def backward_channels(dy3, x3, mean, invstd, weight, training, params, grads, ntask, streamed, dx3):
    """Fused backward, ``ntask`` tasks in parallel: float64 per-channel inputs;
    ``grads`` receives (dweight, dbias) and ``params`` the dx constants."""
    c_ = x3.shape[1]
    claims = _claims(ntask, c_, streamed)
    for t in prange(ntask):
        slot, limit = _source(t, ntask, c_, streamed)
        args = (dy3, x3, claims, slot, limit, mean, invstd, weight, training, params, grads)
        if streamed:
            _backward_run(*args, dx3)
        else:
            _backward_run_cached(*args, dx3)


@njit(**_EXACT)
def forward_small_ncl(x3, weight, bias, eps, params, stats, y3):
    claims = np.zeros(1, np.int64)  # one task: it takes the channels in order
    _forward_run(x3, claims, 0, x3.shape[1], weight, bias, eps, params, stats, False, y3)


@njit(**_EXACT)
def backward_small_ncl(dy3, x3, mean, invstd, weight, training, params, grads, dx3):
    claims = np.zeros(1, np.int64)
    c_ = x3.shape[1]
    args = (dy3, x3, claims, 0, c_, mean, invstd, weight)
    _backward_run_cached(*args, training, params, grads, dx3)


@njit(**_EXACT)
def stats_small_ncl(x3, stats):
    for c in range(x3.shape[1]):
        stats[0, c], stats[1, c] = _channel_moments(x3, c)


@njit(**_ELEM)
def normalize_small_ncl(x3, params, y3):
    l_ = x3.shape[2]
    for n in range(x3.shape[0]):
        for c in range(x3.shape[1]):
            hi, lo, a, b = params[0, c], params[1, c], params[2, c], params[3, c]
            _normalize_plain(x3[n, c], hi, lo, a, b, y3[n, c], 0, l_)


@njit(**_EXACT)
def stats_small_mc(x2, stats):
    m, c_ = x2.shape
    shift = np.empty(c_)
    for c in range(c_):
        shift[c] = load(x2[0, c])
    s1 = np.zeros(c_)
    s2 = np.zeros(c_)
    _sums_rows_mc(x2, 0, m, shift, s1, s2)
    for c in range(c_):
        stats[0, c], stats[1, c] = moments(s1[c], s2[c], shift[c], m)


@njit(**_ELEM)
def normalize_small_mc(x2, params, y2):
    for r in range(x2.shape[0]):
        _normalize_plain(x2[r], params[0], params[1], params[2], params[3], y2[r], 0, x2.shape[1])


@njit(**_ELEM)
def forward_small_mc(x2, weight, bias, eps, params, stats, y2):
    stats_small_mc(x2, stats)
    channel_params(stats[0], stats[1], weight, bias, eps, params, stats)
    normalize_small_mc(x2, params, y2)


@njit(**_ELEM)
def backward_small_mc(dy2, x2, mean, invstd, weight, training, params, grads, dx2):
    m, c_ = x2.shape
    s1 = np.zeros(c_)
    s2 = np.zeros(c_)
    _grad_sums_rows_mc(dy2, x2, 0, m, mean, s1, s2)
    for c in range(c_):
        _grad_params(c, s1[c], s2[c], m, mean, invstd, weight, training, params, grads)
    for r in range(m):
        if training:
            _grad_input_plain(
                dy2[r], x2[r], params[0], params[1], params[2], params[3], params[4], dx2[r], 0, c_
            )
        else:
            _normalize_plain(dy2[r], params[0], params[1], params[2], params[3], dx2[r], 0, c_)


# --- mc kernels ----------------------------------------------------------------------


@njit(**_PAR)
def stats_mc(x2, l, nchunk, part, out):
    """Mean and biased variance of each channel into ``out`` (2, C), from sums shifted by
    the channel's first value: part[t, :, j] = (sum d, sum d^2) over row chunk t of
    column j, then added in chunk order and over the ``l`` columns of each channel
    (flat rows of NCL samples; ``l == 1`` for true channels). Each chunk adds into its
    own fresh arrays: adding into ``part`` itself, two chunks' sums can share a cache
    line (``part`` is 16-byte aligned), which two threads then pass back and forth on
    every row (1.9x slower with 2 chunks on 2 threads)."""
    m, cols = x2.shape
    first = _firsts(x2[0], l)
    shift = _columns(first, l)
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        s1, s2 = np.zeros(cols), np.zeros(cols)
        _sums_rows_mc(x2, lo, hi, shift, s1, s2)
        part[t, 0], part[t, 1] = s1, s2
    _add_partials(part, l, out)
    _finish_moments(out, first, m * l)


# The plain-store MC passes take spans a whole number of rows long (``_block_span``)
# several at a time: those spans need the same constants, so each constant loaded
# serves several values. normalize takes 4 spans (2 loads a value instead of 5),
# grad_input 2 (4.5 instead of 7: with 4, its 17 arrays were too many for LLVM to
# vectorize the loop, 0.64-0.79x). Kernel times against one span at a time, float32,
# 1 and 8 chunks on 2 threads, 0.3-6.4 MB: normalize 0.95-1.47x, grad_input 1.0-1.37x
# (C from 3 to 3136). Rows longer than _BLOCK_MAX_C are not blocked (their constants
# would have to be tiled over two rows, serially, before the pass): they go in bands.
_BLOCK_NORMALIZE = 4  # the spans _normalize_block takes (written out there)
_BLOCK_GRAD = 2  # the spans _grad_input_block takes
_BLOCK_MAX_C = 4096


@njit(inline="always")
def _block_span(w, c_):
    """Span of the blocked plain passes: whole rows, about ``w`` elements (0: none)."""
    return c_ * max(1, w // c_) if c_ <= _BLOCK_MAX_C else 0


# With plain stores, rows longer than _BLOCK_MAX_C ("wide": a flat NCL sample of many
# short planes, or thousands of channels) are cut into near-equal bands of about
# _WIDE_BAND columns, and a task is one band of a run of rows: it builds the band's
# constants once (``_band``), and they stay in L1 while the rows go by. As flat spans,
# every constant came from L2 once per row: 4 bytes of constants per byte of float32
# data. Full eval calls, paired against flat spans, float32, 2 threads: 64x256x7x7
# 1.07-1.14x, 64x128x7x7 and 32x160x7x7 1.11x, 64x96x7x7 1.02x (train and backward,
# where this is one pass of several: 0.95-1.06x, level within noise). Streamed
# (larger) outputs keep the flat spans, which read memory in order: bands measured
# 0.8-1.0x there (full calls at 64x2048x7x7, 128x512x7x7 and 256x256x7x7).
_WIDE_BAND = 2048


@njit(inline="always")
def _wide_grid(nchunk, m, c_):
    """(bands per row, row runs) for at least ``nchunk`` tasks over an (m, c_) tensor
    (as many as rows allow): bands are added until the tasks divide evenly into
    ``nchunk`` runs (a multiple of the thread count), or number 4 * ``nchunk``."""
    nb = -(-c_ // _WIDE_BAND)
    nrc = max(1, min(m, -(-nchunk // nb)))
    while nb * nrc % nchunk and nb * nrc < 4 * nchunk:
        nb += 1
    return nb, nrc


@njit(inline="always")
def _wide_task(task, nb, nrc, m, c_):
    """(first row, end row, first column, end column) of a wide task."""
    run = task // nb
    b = task - run * nb
    r0, r1 = _rows(run, nrc, m)
    return r0, r1, _cut(b, nb, c_), _cut(b + 1, nb, c_)


@njit(inline="always")
def _wide_pieces(task, nb, nrc, m, c_, params, l):
    """A wide task as (its band's constants, flat start of its first row's piece, past
    its last row's, piece length): the pieces start ``c_`` apart."""
    r0, r1, c0, c1 = _wide_task(task, nb, nrc, m, c_)
    return _band(params, l, c0, c1), r0 * c_ + c0, r1 * c_ + c0, c1 - c0


@njit(inline="always")
def _band(params, l, c0, c1):
    """A new array of the constants of columns [c0, c1) of a row: params[k, j // l]."""
    out = np.empty((params.shape[0], c1 - c0), params.dtype)
    for k in range(params.shape[0]):
        _spread(params[k], l, c0, c1, out[k])
    return out


@njit(**_ELEM)
def _normalize_block(xf, yf, hi, lo, a, b, p, w):
    """``_normalize_plain`` over _BLOCK_NORMALIZE spans of ``w`` elements from p, whose
    constants ``hi``, ``lo``, ``a``, ``b`` (``w`` of each) are the same."""
    x0, x1 = xf[p : p + w], xf[p + w : p + 2 * w]
    x2, x3 = xf[p + 2 * w : p + 3 * w], xf[p + 3 * w : p + 4 * w]
    y0, y1 = yf[p : p + w], yf[p + w : p + 2 * w]
    y2, y3 = yf[p + 2 * w : p + 3 * w], yf[p + 3 * w : p + 4 * w]
    for i in range(w):
        h_, l_, a_, b_ = hi[i], lo[i], a[i], b[i]
        y0[i] = store(((load(x0[i]) - h_) - l_) * a_ + b_, y0)
        y1[i] = store(((load(x1[i]) - h_) - l_) * a_ + b_, y1)
        y2[i] = store(((load(x2[i]) - h_) - l_) * a_ + b_, y2)
        y3[i] = store(((load(x3[i]) - h_) - l_) * a_ + b_, y3)


@njit(**_ELEM)
def _grad_input_block(gf, xf, df, hi, lo, k2, mdy, k1, p, w):
    """``_grad_input_plain`` over _BLOCK_GRAD spans of ``w`` elements from p sharing
    constants."""
    g0, g1 = gf[p : p + w], gf[p + w : p + 2 * w]
    x0, x1 = xf[p : p + w], xf[p + w : p + 2 * w]
    d0, d1 = df[p : p + w], df[p + w : p + 2 * w]
    for i in range(w):
        h_, l_, c2, m_, c1 = hi[i], lo[i], k2[i], mdy[i], k1[i]
        d0[i] = store((load(g0[i]) - m_ - ((load(x0[i]) - h_) - l_) * c2) * c1, d0)
        d1[i] = store((load(g1[i]) - m_ - ((load(x1[i]) - h_) - l_) * c2) * c1, d1)


# MC passes over rows of whole cache lines (C a multiple of 16 float32 values, 8
# float64, 32 float16), streamed (below) or not (further below), go down the rows a
# line of columns at a time
# (``_stream._lines``): a line's constants are loaded once for a few rows, and every
# store writes a whole aligned line. An output that does not start on a line boundary
# (``out=`` from ``np.empty``: 16 bytes past one) is walked in rows shifted to start on
# one, which wrap into the next row, with the constants tiled one line past the row.
# Kernels alone against the tiled spans, float32, 32x56x56x64, 2 threads, cache warm /
# flushed: grad_input 1.5x / 1.3x (the lines went _LINE_ROW_BYTES of rows at a time:
# 256-1024 bytes measured alike, 2-64 KB 0.8-1.0x, the lines then far apart in memory).
# Rows up to _LINE_MAX_ROW_BYTES long, whose constants stay in L1; full calls, paired
# against the version before: 32x56x56x64 train 1.15-1.28x, eval 1.07-1.54x, backward
# 1.12-1.35x, 12544x512 1.05-1.17x; longer rows gained nothing and lost up to 0.92x
# flushed (3136x2048, and 2048x64x7x7 as flat rows of 12.5 KB).
_LINE_ROW_BYTES = 512
_LINE_MAX_ROW_BYTES = 2048
# With plain stores (outputs that stay in cache) the loads bound the pass, and longer
# sweeps share each line's constants among more rows (4 KB: kernels alone 1.1-1.2x
# faster than 1 KB sweeps). Full calls paired against the blocked spans, rows up to
# _LINE_MAX_ROW_BYTES_PLAIN: 32x28x28x32 float32 1.34-2.14x, float64 1.07-1.30x,
# 64x14x14x128 float32 1.06-1.46x, float16 1.09-1.21x; rows of 1-2 KB went either way
# from run to run (0.74-1.46x: 32x14x14x256, 64x7x7x512, 3136x512, 2048x32x4x4 as flat
# rows, float32; 64x14x14x128 float64), and keep the blocked spans.
_LINE_ROW_BYTES_PLAIN = 4096
_LINE_MAX_ROW_BYTES_PLAIN = 512


@njit(inline="always")
def _whole_lines(yf, c_, streamed):
    """Rows of ``c_`` values of ``yf`` (flat) are whole cache lines, short enough for
    ``_stream._lines``, and ``yf`` lies on its item size."""
    row = c_ * _stream.item_bytes(yf)
    return (
        _stream.line_blocks(yf)[1] > 0
        and row % _stream.LINE_BYTES == 0
        and row <= (_LINE_MAX_ROW_BYTES if streamed else _LINE_MAX_ROW_BYTES_PLAIN)
    )


@njit(inline="always")
def _line_plan(yf, c_, m, params, l, streamed):
    """How the line loops walk ``m`` ``_whole_lines`` rows of ``c_`` columns: (shift: the
    values of ``yf`` before its first line boundary, values per line, rows per sweep,
    shifted rows walked as lines, the constants of columns 0 to ``c_`` + a line, the
    columns tiled over again)."""
    item = _stream.item_bytes(yf)
    shift = _stream.line_blocks(yf)[0]
    per = _stream.LINE_BYTES // item
    sweep = _LINE_ROW_BYTES if streamed else _LINE_ROW_BYTES_PLAIN
    rows = max(1, sweep // (c_ * item))
    return shift, per, rows, m - (shift > 0), tile(params, l, c_ + per)


def _line(gf, xf, yf, p, nr, c_, k, j, streamed):
    """One line of columns from flat index ``p`` down ``nr`` rows (``_stream._lines``):
    normalize's y when ``gf`` is None, else grad_input's dx with gradient ``gf``."""


@overload(_line, inline="always")
def _line_impl(gf, xf, yf, p, nr, c_, k, j, streamed):
    if isinstance(gf, types.NoneType):

        def normalize(gf, xf, yf, p, nr, c_, k, j, streamed):
            if streamed:
                _stream.normalize_lines(xf, yf, p, nr, c_, k[0], k[1], k[2], k[3], j)
            else:
                _stream.normalize_lines_plain(xf, yf, p, nr, c_, k[0], k[1], k[2], k[3], j)

        return normalize

    def grad_input(gf, xf, yf, p, nr, c_, k, j, streamed):
        if streamed:
            _stream.grad_input_lines(gf, xf, yf, p, nr, c_, k[0], k[1], k[2], k[3], k[4], j)
        else:
            _stream.grad_input_lines_plain(gf, xf, yf, p, nr, c_, k[0], k[1], k[2], k[3], k[4], j)

    return grad_input


def _line_ends(gf, xf, yf, k, s, e):
    """The values of a ``_line_plan``'s pass outside its shifted rows, with plain
    stores: the ``s`` before the first (columns 0 to s) and those from flat index ``e``
    on (columns s on); normalize's or grad_input's as ``_line``."""


@overload(_line_ends, inline="always")
def _line_ends_impl(gf, xf, yf, k, s, e):
    if isinstance(gf, types.NoneType):

        def normalize(gf, xf, yf, k, s, e):
            _normalize_span(xf[:s], k[0, :s], k[1, :s], k[2, :s], k[3, :s], yf[:s], False)
            h = s + xf.size - e
            _normalize_span(xf[e:], k[0, s:h], k[1, s:h], k[2, s:h], k[3, s:h], yf[e:], False)

        return normalize

    def grad_input(gf, xf, yf, k, s, e):
        _grad_input_span(
            gf[:s], xf[:s], k[0, :s], k[1, :s], k[2, :s], k[3, :s], k[4, :s], yf[:s], False
        )
        h = s + xf.size - e
        _grad_input_span(
            gf[e:], xf[e:], k[0, s:h], k[1, s:h], k[2, s:h], k[3, s:h], k[4, s:h], yf[e:], False
        )

    return grad_input


@njit(inline="always")
def _line_task(gf, xf, yf, k, s, per, rows, r0, r1, c_, streamed):
    """Shifted rows [r0, r1) of a ``_line_plan`` (shift ``s``, ``per`` values a line,
    ``rows`` a sweep), a sweep at a time, each line of columns down it (``_line``)."""
    for r in range(r0, r1, rows):
        nr = min(rows, r1 - r)
        for j in range(s, s + c_, per):
            _line(gf, xf, yf, r * c_ + j, nr, c_, k, j, streamed)
    if streamed:
        _stream.fence()


# NCL planes of _PLANE_MIN_VALUES to 64 values, viewed as flat rows (``_cpu._flat``),
# take their constants per channel (``_stream.normalize_planes``) instead of expanded
# to one per value (``tile``), which read four constants from a table of four samples
# for each value. (Shorter planes would put more than two channels in a vector.)
# Paired full calls against the tiled constants, float32, 2 threads, train / eval /
# backward: streamed outputs (8-26 MB) 64x2048x7x7 1.04x / 0.99x / 1.36x, 256x512x7x7
# 1.35x / 1.89x / 1.69x, 128x256x8x8 1.24x / 1.38x / 1.28x, 2048x64x5x5 1.03x / 1.02x /
# 1.33x, 1024x64x8x8 1.04x / 1.07x / 1.37x; plain stores, rows past _BLOCK_MAX_C
# (3-6 MB, warm) 0.95-1.11x, 1.36-1.55x with the cache flushed (32x512x7x7); but
# plain stores on short rows, whose tiled constants stay in L1, 0.68-0.95x (256x64x5x5,
# 128x64x4x4, 512x64x4x4), so those keep the blocked passes; float16, whose 16-lane
# vectors spend more on choosing constants, keeps the bands with plain stores
# (64x1024x7x7: eval 0.67-0.77x warm, 1.45x flushed; streamed 1.09-1.28x).
_PLANE_MIN_VALUES = 16


@njit(inline="always")
def _per_channel_planes(l, c_, streamed, item):
    """Whether flat rows of ``c_`` values (``item`` bytes each), planes of ``l``, take
    per-channel constants (``_normalize_planes``): planes long enough, and a streamed
    output, or rows too long for the blocked plain-store passes (whose constants, tiled
    over a few rows, stay in L1) of float32 or float64."""
    return l >= _PLANE_MIN_VALUES and (streamed or (c_ > _BLOCK_MAX_C and item >= 4))


@njit(inline="always")
def _plane_at(p, cl, l):
    """(channel, values of its plane from p on) of flat index p of rows of ``cl``
    values, planes of ``l``."""
    q = p % cl
    return q // l, l - q % l


@njit(inline="always")
def _planes_parts(yf, params, l, i0, i1, streamed):
    """How ``_normalize_planes`` splits flat values [i0, i1): (first and end index of
    the vectors, their number, the first one's channel and values of it left, values
    per row)."""
    lanes = _stream.VECTOR_BYTES // _stream.item_bytes(yf)
    if streamed:
        s, e = _stream.bounds(yf[i0:i1])
    else:
        s, e = 0, (i1 - i0) // lanes * lanes
    cl = params.shape[1] * l
    c, r = _plane_at(i0 + s, cl, l)
    return i0 + s, i0 + e, (e - s) // lanes, c, r, cl


@njit(inline="always")
def _normalize_by_channel(xf, yf, k, l, cl, i0, i1):
    """normalize's formula (``_normalize_plain``) over flat values [i0, i1), each with
    its channel's constants (rows of ``cl`` values, planes of ``l``)."""
    for i in range(i0, i1):
        ch = (i % cl) // l
        yf[i] = store(((load(xf[i]) - k[0, ch]) - k[1, ch]) * k[2, ch] + k[3, ch], yf)


@njit(inline="always")
def _grad_input_by_channel(gf, xf, df, k, l, cl, i0, i1):
    """grad_input's formula (``_grad_input_plain``), as ``_normalize_by_channel``."""
    for i in range(i0, i1):
        ch = (i % cl) // l
        xmu = (load(xf[i]) - k[0, ch]) - k[1, ch]
        df[i] = store((load(gf[i]) - k[3, ch] - xmu * k[2, ch]) * k[4, ch], df)


@njit(**_ELEM)
def _normalize_planes(xf, yf, k, l, i0, i1, streamed):
    """normalize's y over flat values [i0, i1) of rows of C planes of ``l`` values,
    constants ``k`` (rows of C): vectors from the first boundary the stores need, the
    values before and after them with plain stores."""
    a, e, nvec, c, r, cl = _planes_parts(yf, k, l, i0, i1, streamed)
    if streamed:
        _stream.normalize_planes(xf, yf, a, nvec, c, r, l, k[0], k[1], k[2], k[3])
    else:
        _stream.normalize_planes_plain(xf, yf, a, nvec, c, r, l, k[0], k[1], k[2], k[3])
    _normalize_by_channel(xf, yf, k, l, cl, i0, a)
    _normalize_by_channel(xf, yf, k, l, cl, e, i1)


@njit(**_ELEM)
def _grad_input_planes(gf, xf, df, k, l, i0, i1, streamed):
    """grad_input's dx over flat values [i0, i1), as ``_normalize_planes``."""
    a, e, nvec, c, r, cl = _planes_parts(df, k, l, i0, i1, streamed)
    if streamed:
        _stream.grad_input_planes(gf, xf, df, a, nvec, c, r, l, k[0], k[1], k[2], k[3], k[4])
    else:
        _stream.grad_input_planes_plain(gf, xf, df, a, nvec, c, r, l, k[0], k[1], k[2], k[3], k[4])
    _grad_input_by_channel(gf, xf, df, k, l, cl, i0, a)
    _grad_input_by_channel(gf, xf, df, k, l, cl, e, i1)


@njit(**_PAR)
def normalize_mc(x2, params, l, w, nchunk, streamed, y2):
    """y = ((x - hi) - lo) * a + b with per-channel params rows (hi, lo, a, b), over
    spans of ``w`` elements (with plain stores, whole rows several at a time where they
    fit, ``_block_span``, and longer rows in bands, ``_wide_task``; rows of whole cache
    lines, ``_whole_lines``, streamed or not, a line of columns at a time down the
    rows, ``_line_task``); ``l`` > 1 for NCL planes viewed as flat rows, which take
    their constants per channel where ``_per_channel_planes`` says so."""
    c_ = x2.shape[1]
    xf = x2.reshape(-1)
    yf = y2.reshape(-1)
    if _per_channel_planes(l, c_, streamed, _stream.item_bytes(yf)):
        for t in prange(np.int64(nchunk)):
            i0, i1 = _cut(t, nchunk, x2.size), _cut(t + 1, nchunk, x2.size)
            _normalize_planes(xf, yf, params, l, i0, i1, streamed)
            if streamed:
                _stream.fence()
        return
    if c_ > _BLOCK_MAX_C and not streamed:
        nb, nrc = _wide_grid(nchunk, x2.shape[0], c_)
        for task in prange(np.int64(nb * nrc)):
            kb, p0, p1, wp = _wide_pieces(np.int64(task), nb, nrc, x2.shape[0], c_, params, l)
            for p in range(p0, p1, c_):
                _normalize_span(xf[p : p + wp], kb[0], kb[1], kb[2], kb[3], yf[p : p + wp], False)
        return
    if _whole_lines(yf, c_, streamed):
        s, per, rows, full, k = _line_plan(yf, c_, x2.shape[0], params, l, streamed)
        for t in prange(np.int64(nchunk)):
            r0, r1 = _rows(np.int64(t), nchunk, full)
            _line_task(None, xf, yf, k, s, per, rows, r0, r1, c_, streamed)
        _line_ends(None, xf, yf, k, s, full * c_ + s)
        return
    total = x2.size
    wb = 0 if streamed else _block_span(w, c_)
    w = max(w, wb)
    params = tile(params, l, w + c_ - 1)
    h = _head(yf, streamed)
    _normalize_span(xf[:h], params[0, :h], params[1, :h], params[2, :h], params[3, :h], yf[:h], False)
    for t in prange(np.int64(nchunk)):
        end = h + _cut(t + 1, nchunk, total - h)
        start = h + _cut(t, nchunk, total - h)
        if wb:
            ph = start % c_
            k = ph + wb
            while start + _BLOCK_NORMALIZE * wb <= end:
                _normalize_block(
                    xf, yf, params[0, ph:k], params[1, ph:k], params[2, ph:k], params[3, ph:k],
                    start, wb,
                )
                start += _BLOCK_NORMALIZE * wb
        for p in range(start, end, w):
            q = min(p + w, end)
            ph = p % c_
            k = ph + q - p
            _normalize_span(
                xf[p:q], params[0, ph:k], params[1, ph:k], params[2, ph:k], params[3, ph:k],
                yf[p:q], streamed,
            )
        if streamed:
            _stream.fence()


@njit(**_PAR)
def grad_sums_mc(dy2, x2, mean, l, nchunk, part, out):
    """(sum dy, sum dy * (x - mean[c])) of each channel into ``out`` (2, C): chunk
    partials of each column as in ``stats_mc``, then added over chunks and columns."""
    m, cols = x2.shape
    centre = _columns(mean, l)
    for t in prange(np.int64(nchunk)):
        lo, hi = _rows(np.int64(t), nchunk, m)
        s1, s2 = np.zeros(cols), np.zeros(cols)
        _grad_sums_rows_mc(dy2, x2, lo, hi, centre, s1, s2)
        part[t, 0], part[t, 1] = s1, s2
    _add_partials(part, l, out)


@njit(**_PAR)
def grad_input_mc(dy2, x2, params, l, w, nchunk, streamed, dx2):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 with per-channel params rows
    (hi, lo, k2, mdy, k1), as ``normalize_mc``."""
    c_ = x2.shape[1]
    gf = dy2.reshape(-1)
    xf = x2.reshape(-1)
    df = dx2.reshape(-1)
    if _per_channel_planes(l, c_, streamed, _stream.item_bytes(df)):
        for t in prange(np.int64(nchunk)):
            i0, i1 = _cut(t, nchunk, x2.size), _cut(t + 1, nchunk, x2.size)
            _grad_input_planes(gf, xf, df, params, l, i0, i1, streamed)
            if streamed:
                _stream.fence()
        return
    if c_ > _BLOCK_MAX_C and not streamed:
        nb, nrc = _wide_grid(nchunk, x2.shape[0], c_)
        for task in prange(np.int64(nb * nrc)):
            kb, p0, p1, wp = _wide_pieces(np.int64(task), nb, nrc, x2.shape[0], c_, params, l)
            for p in range(p0, p1, c_):
                _grad_input_span(
                    gf[p : p + wp], xf[p : p + wp], kb[0], kb[1], kb[2], kb[3], kb[4],
                    df[p : p + wp], False,
                )
        return
    if _whole_lines(df, c_, streamed):
        s, per, rows, full, k = _line_plan(df, c_, x2.shape[0], params, l, streamed)
        for t in prange(np.int64(nchunk)):
            r0, r1 = _rows(np.int64(t), nchunk, full)
            _line_task(gf, xf, df, k, s, per, rows, r0, r1, c_, streamed)
        _line_ends(gf, xf, df, k, s, full * c_ + s)
        return
    total = x2.size
    wb = 0 if streamed else _block_span(w, c_)
    w = max(w, wb)
    params = tile(params, l, w + c_ - 1)
    h = _head(df, streamed)
    _grad_input_span(
        gf[:h], xf[:h], params[0, :h], params[1, :h], params[2, :h], params[3, :h],
        params[4, :h], df[:h], False,
    )
    for t in prange(np.int64(nchunk)):
        end = h + _cut(t + 1, nchunk, total - h)
        start = h + _cut(t, nchunk, total - h)
        if wb:
            ph = start % c_
            k = ph + wb
            while start + _BLOCK_GRAD * wb <= end:
                _grad_input_block(
                    gf, xf, df, params[0, ph:k], params[1, ph:k], params[2, ph:k],
                    params[3, ph:k], params[4, ph:k], start, wb,
                )
                start += _BLOCK_GRAD * wb
        for p in range(start, end, w):
            q = min(p + w, end)
            ph = p % c_
            k = ph + q - p
            _grad_input_span(
                gf[p:q], xf[p:q], params[0, ph:k], params[1, ph:k], params[2, ph:k],
                params[3, ph:k], params[4, ph:k], df[p:q], streamed,
            )
        if streamed:
            _stream.fence()
