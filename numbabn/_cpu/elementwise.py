"""The CPU elementwise passes: one kernel per traversal, each for both formulas.

Every kernel takes ``(g, x, params, <work>, y)`` and runs its tasks through ``tasks``:
``g`` None computes normalize of ``x`` (constant rows hi, lo, a, b), an array
grad_input of ``g`` and ``x`` (rows hi, lo, k2, mdy, k1); see ``formulas``. The plan
(``plan.route``) picks the kernel and its work; the kernels do not choose again. ``g``
and ``x`` may be operand tuples (masked gradients, the epilogue; see ``formulas``),
which every walk cuts with ``piece``, ``plane`` and ``flat``. Each kernel but
``mc_bands`` (plain stores only) is a dict by store kind (``_store_kinds``): ``[True]``
writes the aligned middle of each piece with non-temporal stores (``vector.span_nt``
and friends), the ends with plain ones, and ends each task with a fence; ``[False]``
stores plainly.

* :func:`ncl_segments`: (N, C, L) planes cut into ``N * C * nseg`` segments, dealt out
  in ``nchunk`` runs; one channel's scalar constants per segment.
* :func:`mc_spans`: an (M, C) tensor walked as flat spans of ``w`` values, constants
  tiled across a span (``pieces.tile``); with plain stores, spans of whole rows
  (``wb``) several at a time, sharing each constant load.
* :func:`mc_bands`: rows too long to block (plain stores), cut into bands of columns
  whose constants stay in L1 while the rows go by.
* :func:`mc_lines`: rows of whole cache lines, a line of columns down several rows at a
  time, its constants in registers (``vector.lines_*``).
* :func:`mc_planes`: flat rows of short NCL planes (``l`` values), each vector's
  constants chosen per channel (``vector.planes_*``) instead of tiled.

Each row loop runs over a view from 0 (from a start known only at run time the loop
did not vectorize), and the streamed and plain walks are compiled apart (one walk with a
run-time flag in its loop ran 0.77x as fast).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .._half import store
from . import llvm, pieces, tasks, vector
from .formulas import ELEM, EXACT, INLINED, consts, flat, piece, plain, plane, value
from .tuning import COMPILED


def columns(g, params, i0, i1):
    """The formula's constants as arrays: columns [i0, i1) of packed rows ``params``."""


@overload(columns, jit_options=INLINED)
def _columns(g, params, i0, i1):
    if isinstance(g, types.NoneType):
        return lambda g, params, i0, i1: (
            params[0, i0:i1], params[1, i0:i1], params[2, i0:i1], params[3, i0:i1]
        )
    return lambda g, params, i0, i1: (
        params[0, i0:i1], params[1, i0:i1], params[2, i0:i1], params[3, i0:i1],
        params[4, i0:i1],
    )


def at_column(k, i):
    """A tuple of constant arrays read at ``i``: one column's scalars."""


@overload(at_column, jit_options=INLINED)
def _at_column(k, i):
    if len(k) == 4:
        return lambda k, i: (k[0][i], k[1][i], k[2][i], k[3][i])
    return lambda k, i: (k[0][i], k[1][i], k[2][i], k[3][i], k[4][i])


_BLOCK_NORMALIZE = COMPILED["block_normalize"]
_BLOCK_GRAD = COMPILED["block_grad"]


def block_spans(g):
    """Spans of one blocked step: more for normalize, whose loop holds fewer arrays."""


@overload(block_spans, jit_options=INLINED)
def _block_spans(g):
    n = _BLOCK_NORMALIZE if isinstance(g, types.NoneType) else _BLOCK_GRAD
    return lambda g: n


def _store_kinds(factory):
    """A kernel for each store kind, ``{False: plain stores, True: streamed}``: the kind is
    a constant of the kernel's closure, so numba compiles only its own walk."""
    return {streamed: factory(streamed) for streamed in (False, True)}


@njit(**ELEM)
def span_plain(g, x, k, y):
    """The formula over a contiguous span; ``k`` scalars (one channel) or arrays indexed
    like the span (tiled constants)."""
    plain(g, x, k, y, 0, y.size)


@njit(**ELEM)
def span_streamed(g, x, k, y):
    """:func:`span_plain` with the aligned whole vectors streamed."""
    i0, i1 = llvm.bounds(y)
    plain(g, x, k, y, 0, i0)
    vector.span_nt(g, x, y, i0, i1, k)
    plain(g, x, k, y, i1, y.size)


# --- NCL planes ------------------------------------------------------------------------


@njit(**ELEM)
def _segments_plain(t, g3, x3, params, nseg, nchunk, y3):
    """Chunk ``t`` of :func:`ncl_segments` with plain stores (the row loops inlined: a
    call per segment cost more than the work of a short plane)."""
    n_, c_, l_ = y3.shape
    first, end = pieces.rows(t, nchunk, np.int64(n_ * c_ * nseg))
    n, c, s, i0, i1 = pieces.segment(first, nseg, c_, l_)
    for _ in range(first, end):
        k = consts(g3, params, c)
        plain(plane(g3, n, c, i0, i1), plane(x3, n, c, i0, i1), k, y3[n, c, i0:i1], 0, i1 - i0)
        n, c, s, i0, i1 = pieces.next_segment(n, c, s, nseg, c_, l_)


@njit(**ELEM)
def _segments_streamed(t, g3, x3, params, nseg, nchunk, y3):
    """Chunk ``t`` of :func:`ncl_segments` into a streamed output, then a fence."""
    n_, c_, l_ = y3.shape
    first, end = pieces.rows(t, nchunk, np.int64(n_ * c_ * nseg))
    n, c, s, i0, i1 = pieces.segment(first, nseg, c_, l_)
    for _ in range(first, end):
        k = consts(g3, params, c)
        span_streamed(plane(g3, n, c, i0, i1), plane(x3, n, c, i0, i1), k, y3[n, c, i0:i1])
        n, c, s, i0, i1 = pieces.next_segment(n, c, s, nseg, c_, l_)
    llvm.fence()


def _ncl_segments(streamed):
    task = _segments_streamed if streamed else _segments_plain

    def ncl_segments(g3, x3, params, nseg, nchunk, y3):
        """(N, C, L) planes cut into ``N * C * nseg`` segments, in ``nchunk`` runs."""
        tasks.parallel(task, nchunk, g3, x3, params, nseg, nchunk, y3)

    return ncl_segments


ncl_segments = _store_kinds(_ncl_segments)


# --- flat spans --------------------------------------------------------------------------


@njit(**ELEM)
def _block(gf, xf, yf, k, p, w):
    """The formula over ``block_spans`` spans of ``w`` values from p, whose constants
    ``k`` (arrays of ``w``) are the same: each constant loaded serves them all."""
    nb = block_spans(gf)
    e = p + nb * w
    g, x, y = piece(gf, p, e), piece(xf, p, e), yf[p:e]
    for i in range(w):
        c = at_column(k, i)
        for s in range(nb):  # (a constant count: unrolled)
            y[s * w + i] = store(value(g, x, c, s * w + i, 0), y)


def _mc_spans(streamed):
    @njit(**EXACT)
    def spans_task(t, g2, x2, tiled, h, w, wb, nchunk, y2):
        """Chunk ``t`` of :func:`mc_spans` (after its first ``h`` values)."""
        c_ = y2.shape[1]
        gf, xf, yf = flat(g2), flat(x2), flat(y2)
        end = h + pieces.cut(t + 1, nchunk, yf.size - h)
        start = h + pieces.cut(t, nchunk, yf.size - h)
        if wb:
            ph = start % c_
            kb = columns(gf, tiled, ph, ph + wb)
            while start + block_spans(gf) * wb <= end:
                _block(gf, xf, yf, kb, start, wb)
                start += block_spans(gf) * wb
        for p in range(start, end, w):
            q = min(p + w, end)
            ph = p % c_
            k = columns(gf, tiled, ph, ph + q - p)
            if streamed:
                span_streamed(piece(gf, p, q), piece(xf, p, q), k, yf[p:q])
            else:
                span_plain(piece(gf, p, q), piece(xf, p, q), k, yf[p:q])
        if streamed:
            llvm.fence()

    @njit(**EXACT)
    def mc_spans(go, g2, x2, params, l, w, wb, nchunk, y2):
        """Flat spans of ``w`` values (``wb`` > 0: whole-row spans of ``wb`` values,
        blocked, plain stores); streamed pieces start on vector boundaries of the output
        (the few values before the first are written first). ``l`` > 1: NCL planes as
        flat rows."""
        gf, xf, yf = flat(g2), flat(x2), flat(y2)
        w = max(w, wb)
        tiled = pieces.tile(params, l, w + y2.shape[1] - 1)
        h = pieces.head(yf, streamed)
        span_plain(piece(gf, 0, h), piece(xf, 0, h), columns(gf, tiled, 0, h), yf[:h])
        args = (g2, x2, tiled, np.int64(h), np.int64(w), np.int64(wb), np.int64(nchunk), y2)
        tasks.run(go, nchunk, args)

    def launch(g2, x2, params, l, w, wb, nchunk, y2):
        task_args = (g2, x2, _tiled(params), 0, 0, 0, 0, y2)
        tasks.launch(mc_spans, spans_task, task_args, g2, x2, params, l, w, wb, nchunk, y2)

    return launch


_TILED = {np.dtype(t): np.empty((0, 0), t) for t in (np.float32, np.float64)}


def _tiled(params):
    """An array of the type of ``pieces.tile(params, ...)`` (for typing a task)."""
    return _TILED[params.dtype]


mc_spans = _store_kinds(_mc_spans)


@njit(inline="always")
def band_task(task, nb, nrc, m, c_):
    """(first row, end row, first column, end column) of a band task."""
    run = task // nb
    b = task - run * nb
    r0, r1 = pieces.rows(run, nrc, m)
    return r0, r1, pieces.cut(b, nb, c_), pieces.cut(b + 1, nb, c_)


@njit(**EXACT)
def _band_task(t, g2, x2, params, l, nb, nrc, y2):
    """Band and run ``t`` of :func:`mc_bands`."""
    m, c_ = y2.shape
    gf, xf, yf = flat(g2), flat(x2), flat(y2)
    r0, r1, c0, c1 = band_task(t, nb, nrc, m, c_)
    wp = c1 - c0
    k = columns(gf, pieces.band(params, l, c0, c1), 0, wp)
    for p in range(r0 * c_ + c0, r1 * c_ + c0, c_):
        span_plain(piece(gf, p, p + wp), piece(xf, p, p + wp), k, yf[p : p + wp])


def mc_bands(g2, x2, params, l, nb, nrc, y2):
    """Rows cut into ``nb`` bands of columns and ``nrc`` runs of rows, a task per band
    and run, which builds its band's constants once (plain stores)."""
    tasks.parallel(_band_task, nb * nrc, g2, x2, params, l, nb, nrc, y2)


# --- lines of columns ----------------------------------------------------------------------


@njit(inline="always")
def _line_task(gf, xf, yf, k, s, per, rows, r0, r1, c_, streamed):
    """Shifted rows [r0, r1) (shift ``s``, ``per`` values a line, ``rows`` a sweep), a
    sweep at a time, each line of columns down it."""
    for r in range(r0, r1, rows):
        nr = min(rows, r1 - r)
        for j in range(s, s + c_, per):
            if streamed:
                vector.lines_nt(gf, xf, yf, r * c_ + j, nr, c_, k, j)
            else:
                vector.lines_plain(gf, xf, yf, r * c_ + j, nr, c_, k, j)
    if streamed:
        llvm.fence()


def _mc_lines(streamed):
    @njit(**EXACT)
    def lines_task(t, g2, x2, tiled, s, rows, full, nchunk, y2):
        """Chunk ``t`` of the shifted rows of :func:`mc_lines`."""
        c_ = y2.shape[1]
        gf, xf, yf = flat(g2), flat(x2), flat(y2)
        per = llvm.LINE_BYTES // llvm.item_bytes(yf)
        k = columns(gf, tiled, 0, c_ + per)
        r0, r1 = pieces.rows(t, nchunk, full)
        _line_task(gf, xf, yf, k, s, per, rows, r0, r1, c_, streamed)

    @njit(**EXACT)
    def mc_lines(go, g2, x2, params, l, sweep_bytes, nchunk, y2):
        """Rows of whole cache lines, a line of columns at a time down ``sweep_bytes``
        of rows. An output that does not start on a line is walked in rows shifted to
        start on one (wrapping into the next row, constants tiled a line past the row);
        the values outside the shifted rows get plain stores."""
        m, c_ = y2.shape
        gf, xf, yf = flat(g2), flat(x2), flat(y2)
        item = llvm.item_bytes(yf)
        s = llvm.line_blocks(yf)[0]
        per = llvm.LINE_BYTES // item
        rows = max(1, sweep_bytes // (c_ * item))
        full = m - (s > 0)
        tiled = pieces.tile(params, l, c_ + per)
        args = (g2, x2, tiled, np.int64(s), np.int64(rows), np.int64(full), np.int64(nchunk), y2)
        tasks.run(go, nchunk, args)
        e = full * c_ + s
        span_plain(piece(gf, 0, s), piece(xf, 0, s), columns(gf, tiled, 0, s), yf[:s])
        size = yf.size
        h = s + size - e
        span_plain(piece(gf, e, size), piece(xf, e, size), columns(gf, tiled, s, h), yf[e:])

    def launch(g2, x2, params, l, sweep_bytes, nchunk, y2):
        task_args = (g2, x2, _tiled(params), 0, 0, 0, 0, y2)
        tasks.launch(mc_lines, lines_task, task_args, g2, x2, params, l, sweep_bytes, nchunk, y2)

    return launch


mc_lines = _store_kinds(_mc_lines)


# --- short NCL planes, per-channel constants -----------------------------------------------


@njit(inline="always")
def plane_at(p, cl, l):
    """(channel, values of its plane from p on) of flat index p of rows of ``cl``
    values, planes of ``l``."""
    q = p % cl
    return q // l, l - q % l


@njit(inline="always")
def _by_channel(gf, xf, yf, k, l, cl, i0, i1):
    """The formula over flat values [i0, i1), each with its channel's constants."""
    for i in range(i0, i1):
        yf[i] = store(value(gf, xf, k, i, (i % cl) // l), yf)


@njit(**ELEM)
def planes(gf, xf, yf, params, l, i0, i1, streamed):
    """The formula over flat values [i0, i1) of rows of C planes of ``l`` values:
    vectors from the first boundary the stores need, the values before and after them
    with plain stores."""
    lanes = llvm.VECTOR_BYTES // llvm.item_bytes(yf)
    if streamed:
        s, e = llvm.bounds(yf[i0:i1])
    else:
        s, e = 0, (i1 - i0) // lanes * lanes
    cl = params.shape[1] * l
    c, r = plane_at(i0 + s, cl, l)
    a, e, nvec = i0 + s, i0 + e, (e - s) // lanes
    k = columns(gf, params, 0, params.shape[1])
    if streamed:
        vector.planes_nt(gf, xf, yf, a, nvec, c, r, l, k)
    else:
        vector.planes_plain(gf, xf, yf, a, nvec, c, r, l, k)
    _by_channel(gf, xf, yf, k, l, cl, i0, a)
    _by_channel(gf, xf, yf, k, l, cl, e, i1)


_planes_inline = njit(inline="always")(planes.py_func)  # (compiled into each task)


def _mc_planes(streamed):
    @njit(**ELEM)
    def planes_task(t, g2, x2, params, l, nchunk, y2):
        """Chunk ``t`` of :func:`mc_planes`."""
        gf, xf, yf = flat(g2), flat(x2), flat(y2)
        i0, i1 = pieces.cut(t, nchunk, y2.size), pieces.cut(t + 1, nchunk, y2.size)
        _planes_inline(gf, xf, yf, params, l, i0, i1, streamed)
        if streamed:
            llvm.fence()

    def mc_planes(g2, x2, params, l, nchunk, y2):
        """Flat rows of short NCL planes, ``nchunk`` chunks (:func:`planes`)."""
        tasks.parallel(planes_task, nchunk, g2, x2, params, l, nchunk, y2)

    return mc_planes


mc_planes = _store_kinds(_mc_planes)
