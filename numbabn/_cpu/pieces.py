"""How the CPU kernels cut their work and spread per-channel constants.

Work is cut into near-equal pieces whose boundaries fall on multiples of ``GRAIN``
elements (64 bytes or more), so that when the output is aligned every piece starts on
a vector boundary. Constants are "tiled" for the flat channels-last spans: ``tiled[k, j]``
is channel ``j % C``'s (``j // l`` for NCL planes viewed as flat rows).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._half import load
from . import llvm
from .formulas import EXACT
from .tuning import COMPILED

GRAIN = COMPILED["grain"]


@njit(inline="always")
def cut(k, parts, total):
    """Start of piece k of ``parts`` near-equal pieces of ``total`` elements."""
    if k >= parts:
        return total
    if k == 0:  # no division for the first piece (every plane of a one-segment split)
        return 0
    return k * total // parts // GRAIN * GRAIN


@njit(inline="always")
def segment(task, nseg, c, length):
    """Split a task number into (n, c, segment, start, stop) of one plane segment."""
    plane = task // nseg
    seg = task - plane * nseg
    n = plane // c
    ch = plane - n * c
    return n, ch, seg, cut(seg, nseg, length), cut(seg + 1, nseg, length)


@njit(inline="always")
def next_segment(n, c, s, nseg, c_, l_):
    """``_segment`` of the task after (n, c, s), counted on instead of divided out
    (two integer divisions a task cost 10% at 14x14 planes)."""
    s += 1
    if s == nseg:
        s = 0
        c += 1
        if c == c_:
            c = 0
            n += 1
    return n, c, s, cut(s, nseg, l_), cut(s + 1, nseg, l_)


@njit(inline="always")
def rows(chunk, nchunk, m):
    """[first, end) of chunk ``chunk`` of ``nchunk`` near-equal chunks of ``m`` items."""
    return chunk * m // nchunk, (chunk + 1) * m // nchunk


@njit(inline="always")
def head(yf, streamed):
    """Elements of flat ``yf`` before its first vector boundary when streaming (fewer
    than a vector), so that the MC passes cut the rest into pieces that start on vector
    boundaries; 0 when not streaming or when ``yf`` has no such boundaries."""
    return llvm.bounds(yf)[0] if streamed else 0


@njit(inline="always")
def firsts(row, l):
    """The first value of each channel of ``row``, whose channels are ``l`` adjacent
    entries: the reductions' shifts."""
    first = np.empty(row.size // l)
    for c in range(first.size):
        first[c] = load(row[c * l])
    return first


@njit(inline="always")
def columns(values, l):
    """``values[j // l]`` for each column j of a flat row whose channels are ``l``
    columns wide. (A loop, not slice assignments: in a parallel kernel numba may run
    those as parallel regions of their own.)"""
    out = np.empty(values.size * l)
    for j in range(out.size):
        out[j] = values[j // l]
    return out


@njit(**EXACT)
def tile(per_channel, l, columns):
    """A new array of ``columns`` columns with :func:`expand` of ``per_channel``: the
    MC elementwise kernels' tiled constants."""
    out = np.empty((per_channel.shape[0], columns), per_channel.dtype)
    expand(per_channel, l, out)
    return out


@njit(inline="always")
def spread(values, l, c0, c1, row):
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


@njit(inline="always", **EXACT)
def expand(per_channel, l, out):
    """out[k, j] = per_channel[k, j % (C * l) // l]: per-channel values spread over the
    flat positions of a sample whose planes hold ``l`` values each (``plan.flat``)."""
    columns = out.shape[1]
    period = min(per_channel.shape[1] * l, columns)
    for k in range(out.shape[0]):
        row = out[k]
        spread(per_channel[k], l, 0, period, row)
        j = period
        while j < columns:  # then the filled part copied onward, doubling each time
            n = min(j, columns - j)  # (j stays a whole number of periods)
            dst = row[j : j + n]
            for i in range(n):
                dst[i] = row[i]
            j += n


@njit(inline="always")
def band(params, l, c0, c1):
    """A new array of the constants of columns [c0, c1) of a row: params[k, j // l]."""
    out = np.empty((params.shape[0], c1 - c0), params.dtype)
    for k in range(params.shape[0]):
        spread(params[k], l, c0, c1, out[k])
    return out
