"""The fused per-channel passes of the CPU side, for (N, C, L) tensors whose channel
slabs the cache holds: each thread takes channels one at a time and writes a channel's
outputs from the core's cache right after reducing it, so the data comes from memory
once instead of twice.

* The train forward normalizes a channel while, in the same loop, it sums the next
  channel it took (``vector.fused_moments_*``), so that the reads overlap the writes.
* The backward sums a channel, then writes its dx; into a streamed output it walks the
  rows from the last (those summed last are the likeliest still in cache). Through a
  ReLU the gradient is the masked pair (dy, y), and dresidual (that gradient) is
  written by the loop that sums it (``written_plain``, ``written_streamed``).

Channels come from a shared counter (``_atomic``) into streamed outputs (data out of
cache: threads finish together), else from a run of each task's own (a channel's data
then stays in the cache of the core that had it on the call before). A channel's sums
are added in an order that depends on the plane length alone, whichever task takes it,
so results are the same bitwise; the single-thread kernels for (N, C, L) (``small``)
run the same loops. The run functions are compiled with the elementwise flags
(``contract``), which the row helpers they inline need.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import _atomic
from .._half import load
from . import llvm, tasks, vector
from .elementwise import span_streamed
from .formulas import (
    ELEM,
    EXACT,
    consts,
    data,
    identity,
    load_at,
    moments,
    norm_params,
    plain,
    plane,
    zero,
)
from .formulas import channel_grad_params as grad_params


@njit(inline="always")
def _block(a):
    """Values per block of the fused rows: two vectors, one cache line."""
    return llvm.LINE_BYTES // llvm.item_bytes(a)


@njit(inline="always")
def _acc_total(acc, block, t1, t2):
    """A channel's two sums: the accumulators of its rows' blocks, lane by lane in
    order, then the values past the blocks."""
    lanes = block // 2
    s1 = 0.0
    s2 = 0.0
    for j in range(lanes):
        s1 += acc[j] + acc[2 * lanes + j]
        s2 += acc[lanes + j] + acc[3 * lanes + j]
    return s1 + t1, s2 + t2


@njit(**ELEM)
def _moments_tail(zr, k, i0, t1, t2):
    for i in range(i0, zr.size):
        d = np.float64(load(zr[i])) - k
        t1 += d
        t2 = llvm.fma(d, d, t2)  # as the block loops: the same rounding everywhere
    return t1, t2


# (inlined: called, it cost more than its work on the rows of short planes)
@njit(inline="always", **ELEM)
def _grads_tail(gr, zr, mu, i0, t1, t2):
    for i in range(i0, zr.size):
        g = np.float64(load_at(gr, i))
        t1 += g
        t2 = llvm.fma(g, np.float64(load(zr[i])) - mu, t2)
    return t1, t2


@njit(inline="always", **ELEM)
def _row_moments(xr, yr, k, streamed, zr, shift, acc, t1, t2, pn):
    """Normalize row ``xr`` into ``yr`` (constants ``k``) and, in the same loop, add the
    shifted sums of row ``zr`` (the next channel's; may be empty) into ``acc``; the
    values past its last block go into (t1, t2), which are returned. ``pn``: elements
    from ``zr`` to the next row to be summed (prefetched near the row's end). The stores
    write whole cache lines from the row's first line boundary when streaming, else
    blocks from its start."""
    block = _block(yr)
    nsum = zr.size // block
    if streamed:
        s, nstore = llvm.line_blocks(yr)
        vector.fused_moments_nt(xr, yr, s, nstore, k, zr, shift, nsum, acc, pn)
    else:
        s, nstore = 0, yr.size // block
        vector.fused_moments_plain(xr, yr, s, nstore, k, zr, shift, nsum, acc, pn)
    plain(None, xr, k, yr, 0, s)
    plain(None, xr, k, yr, s + nstore * block, yr.size)
    return _moments_tail(zr, shift, nsum * block, t1, t2)


@njit(inline="always", **ELEM)
def _row_grads(xr, yr, k, streamed, gr, zr, shift, acc, t1, t2, pn):
    """:func:`_row_moments` for the gradient sums of row ``gr`` (g and g * (z - shift),
    ``zr`` the row of x), in the same loop as the stores (``xr`` is ``gr``: dresidual)."""
    block = _block(yr)
    nsum = zr.size // block
    if streamed:
        s, nstore = llvm.line_blocks(yr)
        vector.fused_grads_nt(xr, yr, s, nstore, k, gr, zr, shift, nsum, acc, pn)
    else:
        s, nstore = 0, yr.size // block
        vector.fused_grads_plain(xr, yr, s, nstore, k, gr, zr, shift, nsum, acc, pn)
    plain(None, xr, k, yr, 0, s)
    plain(None, xr, k, yr, s + nstore * block, yr.size)
    return _grads_tail(gr, zr, shift, nsum * block, t1, t2)


@njit(inline="always")
def _pnext(x3, n):
    """Elements from row (n, c) of C-contiguous ``x3`` to row (n + 1, c); 0 for the last n."""
    return x3.shape[1] * x3.shape[2] if n + 1 < x3.shape[0] else 0


@njit(**ELEM)
def _channel_sums(g3, x3, c, shift, acc):
    """Channel c's sums in the order of the fused rows, nothing written: ``g3`` None,
    the moments' (d and d^2, d = x - shift); else the gradient sums (g and g * d)."""
    acc.fill(0.0)
    t1 = 0.0
    t2 = 0.0
    z, block = zero(x3), _block(x3)
    k = (z, z, z, z)  # (no output row: the loops only sum)
    for n in range(x3.shape[0]):
        row, none, pn = x3[n, c], x3[n, c, :0], _pnext(x3, n)
        nsum = row.size // block
        if g3 is None:
            vector.fused_moments_plain(none, none, 0, 0, k, row, shift, nsum, acc, pn)
            t1, t2 = _moments_tail(row, shift, nsum * block, t1, t2)
        else:
            g = plane(g3, n, c, 0, row.size)
            vector.fused_grads_plain(none, none, 0, 0, k, g, row, shift, nsum, acc, pn)
            t1, t2 = _grads_tail(g, row, shift, nsum * block, t1, t2)
    return _acc_total(acc, block, t1, t2)


def _written_sums(streamed):
    @njit(**ELEM)
    def written_sums(g3, x3, c, shift, acc, r3):
        """The gradient sums of ``_channel_sums``, and the gradient written into ``r3``
        from the same loads (dresidual)."""
        acc.fill(0.0)
        t1 = 0.0
        t2 = 0.0
        for n in range(x3.shape[0]):
            row, g = x3[n, c], plane(g3, n, c, 0, x3.shape[2])
            t1, t2 = _row_grads(g, r3[n, c], identity(x3), streamed, g, row, shift, acc, t1, t2,
                                _pnext(x3, n))
        return _acc_total(acc, _block(x3), t1, t2)

    return written_sums


# By store kind, as module globals: held in a kernel's closure, a dispatcher would key
# numba's disk cache on its identity in this process, so the kernel compiled again in each.
written_plain, written_streamed = _written_sums(False), _written_sums(True)


@njit(**EXACT)
def channel_moments(x3, c):
    """float64 mean and biased variance of channel c, shifted by its first value."""
    n_, _, l_ = x3.shape
    shift = np.float64(load(x3[0, c, 0]))
    s1, s2 = _channel_sums(None, x3, c, shift, np.empty(vector.ACC_SIZE))
    return moments(s1, s2, shift, n_ * l_)


@njit(inline="always")
def _take(counters, slot, limit):
    """The next channel from counter ``slot`` of ``counters``, or -1 once it reaches
    ``limit``."""
    c = _atomic.take(counters, slot)
    return c if c < limit else -1


def _forward_run(streamed):
    @njit(**ELEM)
    def forward_run(t, x3, claims, ntask, weight, bias, eps, params, stats, y3):
        """Train forward of the channels task ``t`` of ``ntask`` takes from ``claims``
        (``_source``): each channel is normalized while the next one taken is summed.
        ``x3`` may be normalize's epilogue triple (``formulas``)."""
        xd = data(x3)
        n_, c_, l_ = xd.shape
        slot, limit = _source(t, ntask, c_, streamed)
        c = _take(claims, slot, limit)
        if c < 0:
            return
        acc = np.empty(vector.ACC_SIZE)
        shift = np.float64(load(xd[0, c, 0]))
        s1, s2 = _channel_sums(None, xd, c, shift, acc)
        while c >= 0:
            mean, var = moments(s1, s2, shift, n_ * l_)
            norm_params(c, mean, var, weight, bias, eps, params, stats)
            k = consts(None, params, c)
            nxt = _take(claims, slot, limit)
            # the channel summed while c is written: the next one taken, or none
            src, width = (nxt, l_) if nxt >= 0 else (c, 0)
            shift = np.float64(load(xd[0, src, 0]))
            acc.fill(0.0)
            t1 = 0.0
            t2 = 0.0
            for n in range(n_):
                t1, t2 = _row_moments(
                    plane(x3, n, c, 0, l_), y3[n, c], k, streamed, xd[n, src, :width], shift,
                    acc, t1, t2, _pnext(xd, n),
                )
            s1, s2 = _acc_total(acc, _block(xd), t1, t2)
            c = nxt
        if streamed:
            llvm.fence()

    return forward_run


forward_plain, forward_streamed = _forward_run(False), _forward_run(True)


def _backward_run(streamed, training):
    @njit(**ELEM)
    def backward_run(t, dy3, x3, claims, ntask, mean, invstd, weight, params, grads, r3, dx3):
        """Backward of the channels task ``t`` takes: each channel's gradient sums, its
        rows in order (dresidual written in the same loops if ``r3`` is an array), then
        its dx (eval: normalize of dy with rows (0, 0, k1, 0)); streamed, the rows in
        reverse order: those summed last are the likeliest to be in the core's cache
        still. ``dy3`` may be a masked pair (a ReLU's gradient)."""
        n_, c_, l_ = x3.shape
        slot, limit = _source(t, ntask, c_, streamed)
        acc = np.empty(vector.ACC_SIZE)
        c = _take(claims, slot, limit)
        while c >= 0:
            if r3 is None:
                s1, s2 = _channel_sums(dy3, x3, c, mean[c], acc)
            elif streamed:
                s1, s2 = written_streamed(dy3, x3, c, mean[c], acc, r3)
            else:
                s1, s2 = written_plain(dy3, x3, c, mean[c], acc, r3)
            grad_params(c, s1, s2, n_ * l_, mean, invstd, weight, training, params, grads)
            kg, kn = consts(dy3, params, c), consts(None, params, c)
            for i in range(n_):  # (the row loops inlined: called, short rows cost more)
                n = n_ - 1 - i if streamed else i
                g = plane(dy3, n, c, 0, l_)
                if streamed:
                    if training:
                        span_streamed(g, x3[n, c], kg, dx3[n, c])
                    else:
                        span_streamed(None, g, kn, dx3[n, c])
                elif training:
                    plain(g, x3[n, c], kg, dx3[n, c], 0, l_)
                else:
                    plain(None, g, kn, dx3[n, c], 0, l_)
            c = _take(claims, slot, limit)
        if streamed:
            llvm.fence()

    return backward_run


backward_plain_eval, backward_plain_train = _backward_run(False, False), _backward_run(False, True)
backward_streamed_eval = _backward_run(True, False)
backward_streamed_train = _backward_run(True, True)


@njit(inline="always")
def _claims(ntask, c_, shared):
    """The counters: one for all tasks (``shared``), or one per task from the start of
    its run of channels."""
    counters = np.zeros(ntask, np.int64)
    if not shared:
        for t in range(ntask):
            counters[t] = t * c_ // ntask
    return counters


@njit(inline="always")
def _source(t, ntask, c_, shared):
    """(counter, limit) of task t (``_claims``)."""
    if shared:
        return np.int64(0), c_
    return t, (t + 1) * c_ // ntask


# The passes run their run functions through ``tasks`` (linked into a parallel kernel, a
# run function's IR was optimized twice more: 1.4 s of a 32x64x56x56 float32 first call).
_CLAIMS, _INT = np.zeros(1, np.int64), tasks.INT  # (for typing: claims and counts)


def _forward_channels(streamed):
    run = forward_streamed if streamed else forward_plain

    @njit(**EXACT)
    def forward_channels(go, x3, weight, bias, eps, params, stats, ntask, y3):
        claims = _claims(ntask, y3.shape[1], streamed)
        tasks.run(go, ntask, (x3, claims, np.int64(ntask), weight, bias, eps, params, stats, y3))

    def launch(x3, weight, bias, eps, params, stats, ntask, y3):
        """Fused train forward, ``ntask`` tasks: float64 weight and bias in; float64
        mean, biased variance and invstd out in ``stats``; ``params`` gets the
        constants."""
        task_args = (x3, _CLAIMS, _INT, weight, bias, eps, params, stats, y3)
        tasks.launch(forward_channels, run, task_args, x3, weight, bias, eps, params, stats, ntask, y3)

    return launch


def _backward_channels(streamed, training):
    run = {
        (False, False): backward_plain_eval, (False, True): backward_plain_train,
        (True, False): backward_streamed_eval, (True, True): backward_streamed_train,
    }[streamed, training]

    @njit(**EXACT)
    def backward_channels(go, dy3, x3, mean, invstd, weight, params, grads, ntask, r3, dx3):
        claims = _claims(ntask, x3.shape[1], streamed)
        per_channel = (mean, invstd, weight, params, grads)
        tasks.run(go, ntask, (dy3, x3, claims, np.int64(ntask), *per_channel, r3, dx3))

    def launch(dy3, x3, mean, invstd, weight, params, grads, ntask, r3, dx3):
        """Fused backward, ``ntask`` tasks: float64 per-channel inputs; ``grads`` gets
        (dweight, dbias), ``params`` the dx constants, ``r3`` (an array, or None)
        dresidual: the gradient ``dy3`` (a masked pair through a ReLU)."""
        per_channel = (mean, invstd, weight, params, grads)
        task_args = (dy3, x3, _CLAIMS, _INT, *per_channel, r3, dx3)
        tasks.launch(backward_channels, run, task_args, dy3, x3, *per_channel, ntask, r3, dx3)

    return launch


# By store kind (streamed: channels from a shared counter) and, for the backward, by
# (streamed, training).
forward_channels = {streamed: _forward_channels(streamed) for streamed in (False, True)}
backward_channels = {(s, t): _backward_channels(s, t) for s in (False, True) for t in (False, True)}
