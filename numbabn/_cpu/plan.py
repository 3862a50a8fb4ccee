"""The one place that decides how the CPU side runs an operation.

For a geometry (``Layout``) and a thread count, :func:`make` picks, once (cached):
single-thread kernels or the thread pool (``small``), fused per-channel passes
(``fuse_forward``, ``fuse_backward``), the view and work split of the reductions and of
the elementwise passes. At call time :func:`streamed` picks the store kind from the
output, and :func:`route` the elementwise kernel and its arguments. The njit
kernels only follow what they are given. Thresholds come from ``tuning.TUNING``.

Views: ``ncl`` is (N, C, L) with planes contiguous, ``mc`` is (M, C) with channels
contiguous. NCL planes too short for a loop each are viewed as flat ``mc`` rows of a
sample's C * L values ("flat"), with the constants spread over each plane's ``l``
values.

Everything that fixes the order of a reduction's additions (single-thread kernels,
fusion, the reductions' partial sums) follows the shape alone, as for
``plan_threads`` threads, so results do not depend on the thread count; only the
elementwise passes and the fused passes' tasks follow it.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import numpy as np

from .. import _validate
from . import elementwise, llvm, tuning
from .tuning import STREAMING

Layout = _validate.Layout


def _t() -> tuning.Tunables:
    return tuning.TUNING


def tasks(threads: int) -> int:
    """Tasks to deal out to a pool of ``threads`` threads (1 when it has one)."""
    return _t().tasks_per_thread * threads if threads > 1 else 1


def sum_tasks() -> int:
    """Partial sums a reduction is cut into at most (from the shape alone)."""
    return _t().tasks_per_thread * _t().plan_threads


def split(layout: Layout, want: int) -> int:
    """Segments per plane (ncl) or row chunks (mc), for about ``want`` tasks."""
    least = _t().min_task_elements
    if layout.kind == "ncl":
        per_plane = -(-want // max(1, layout.n * layout.c))
        return max(1, min(per_plane, layout.l // least))
    size = layout.n * layout.c * layout.l
    return max(1, min(want, size // least, layout.n))


def flat_fits(layout: Layout, max_plane: int, max_period: int) -> bool:
    """Whether NCL planes are short enough to view as flat rows."""
    return layout.kind == "ncl" and layout.l <= max_plane and layout.c * layout.l <= max_period


def flat(layout: Layout, max_plane: int, max_period: int) -> Layout | None:
    """The flat view (an MC layout of C * L "channels") of short NCL planes, or None."""
    if not flat_fits(layout, max_plane, max_period):
        return None
    return layout._replace(kind="mc", c=layout.c * layout.l, l=1)


def small(layout: Layout) -> bool:
    """Few enough values that the calling thread alone is faster than the pool."""
    return 0 < layout.n * layout.l * layout.c <= _t().small_values(layout.kind)


def fuse(layout: Layout, itemsize: int, which: str) -> bool:
    """Use the fused per-channel pass ``which`` ("forward", "backward", "backward_relu":
    through a ReLU, y read too): NCL planes too long for the flat passes, channels that
    share out evenly among ``plan_threads``, a channel's slab (of every array the pass
    reads) that stays in cache (train forward: or rows long enough), and either long
    rows or a tensor the cache holds."""
    t = _t()
    balanced = layout.c % t.plan_threads == 0 or layout.c >= sum_tasks()
    arrays = {"forward": 1, "backward": 2, "backward_relu": 3}[which]  # x; dy, x; dy, y, x
    row = layout.l * itemsize  # of one array
    wide = row * arrays  # of all the arrays the pass reads
    x_bytes = layout.c * layout.n * row
    cache = t.llc_bytes // 4
    return (
        layout.kind == "ncl"
        and not flat_fits(layout, t.flat_max_plane, t.flat_max_period)
        and balanced
        and (
            layout.n * wide <= t.fuse_max_bytes(which)
            or wide >= t.fuse_any_slab_row_bytes(which)
        )
        and layout.n * layout.l >= t.min_task_elements
        and (
            row >= t.fuse_long_row_bytes
            or x_bytes * arrays <= cache
            or (wide >= t.fuse_min_row_bytes and x_bytes <= cache)
        )
    )


class Plan(NamedTuple):
    """How the passes over one layout run on a given thread count (:func:`make`)."""

    small: bool  # the single-thread kernels
    fuse_forward: bool  # the fused per-channel passes
    fuse_backward: bool
    fuse_backward_relu: bool
    runs: int  # tasks of the fused passes
    elem: Layout  # the view of the elementwise passes: the layout, or its flat rows
    elem_work: tuple  # ncl: (segments per plane, runs); mc: (l, span, chunks)
    plane_work: tuple  # flat planes with plain stores that loop per plane: ncl work; or ()
    sums: Layout  # the view of the reductions
    sums_work: tuple  # ncl: (runs, segments, sweep); mc: (l, chunks)
    sums_tasks: int  # partial rows the reduction writes
    mc: tuple  # (kernel, work) of the mc elementwise pass, plain and streamed stores
    mc_lines: tuple  # the same where the output allows lines (None: no other route)


def _ncl_work(layout: Layout, threads: int, nseg: int) -> tuple:
    """(segments per plane, runs of tasks dealt to the threads)."""
    return nseg, max(1, min(layout.n * layout.c * nseg, tasks(threads)))


def _wide_grid(nchunk: int, m: int, c: int) -> tuple[int, int]:
    """(bands per row, row runs) of the band pass: bands are added until the tasks
    divide evenly into ``nchunk`` runs, or number 4 * ``nchunk``."""
    nb = -(-c // _t().wide_band)
    nrc = max(1, min(m, -(-nchunk // nb)))
    while nb * nrc % nchunk and nb * nrc < 4 * nchunk:
        nb += 1
    return nb, nrc


def _mc_route(elem, work: tuple, itemsize: int, streamed: bool, whole_lines: bool) -> tuple:
    """(kernel, work) of the mc elementwise pass: per-channel constants for flat planes
    long enough, bands for long rows with plain stores, lines for rows of whole cache
    lines (``whole_lines``: the output allows them, :func:`_whole_lines`), else spans."""
    t = _t()
    l, w, nchunk = work
    c = elem.c
    if l >= t.plane_min_values and (streamed or (c > t.block_max_c and itemsize >= 4)):
        return elementwise.mc_planes[streamed], (l, nchunk)  # per-channel constants
    if c > t.block_max_c and not streamed:
        return elementwise.mc_bands, (l, *_wide_grid(nchunk, elem.n, c))
    if whole_lines and _lines_fit(c, itemsize, streamed):
        return elementwise.mc_lines[streamed], _lines_work(work, streamed)
    blocked = 0 if streamed or c > t.block_max_c else c * max(1, w // c)
    return elementwise.mc_spans[streamed], (l, w, blocked, nchunk)


@functools.lru_cache(maxsize=256)
def make(layout: Layout, threads: int, itemsize: int) -> Plan:
    """The plan of ``layout`` (values of ``itemsize`` bytes) on ``threads`` threads. A
    training loop repeats a few geometries, and working this out on each call cost
    more Python than the kernels of a small call take."""
    t = _t()
    elem = flat(layout, t.flat_max_plane, t.flat_max_period)
    plane_work = ()
    if elem is not None:
        elem_work = (layout.l, t.mc_span, split(elem, tasks(threads)))
        if layout.l >= t.plane_loop_min:  # whole planes
            plane_work = _ncl_work(layout, threads, 1)
    elif layout.kind == "mc":
        elem, elem_work = layout, (1, t.mc_span, split(layout, tasks(threads)))
    else:
        elem, elem_work = layout, _ncl_work(layout, threads, split(layout, tasks(threads)))
    sums = flat(layout, t.flat_max_plane_sums, t.flat_max_period_sums) or layout
    nsplit = split(sums, sum_tasks())
    if sums.kind == "ncl":  # runs of samples, each cut into ``nsplit`` segments
        runs = sums.n if nsplit > 1 else min(sums.n, sum_tasks())
        sweep = t.sweep and nsplit == 1 and (runs >= tasks(threads) or runs % threads == 0)
        sums_work, sums_tasks = (runs, nsplit, sweep), runs * nsplit
    else:
        sums_work, sums_tasks = (layout.l, nsplit), nsplit  # l == 1 unless flat
    mc = elem.kind == "mc"
    routes = [_mc_route(elem, elem_work, itemsize, s, False) if mc else () for s in (False, True)]
    lines = [_mc_route(elem, elem_work, itemsize, s, True) if mc else () for s in (False, True)]
    return Plan(
        small(layout),
        fuse(layout, itemsize, "forward"),
        fuse(layout, itemsize, "backward"),
        fuse(layout, itemsize, "backward_relu"),
        max(1, min(threads, layout.c)),
        elem, elem_work, plane_work, sums, sums_work, sums_tasks,
        tuple(routes),
        tuple(b if b != a else None for a, b in zip(routes, lines)),
    )


def address(a: np.ndarray) -> int:
    """The address of ``a``'s data. ``a.ctypes`` builds a Python helper object, several
    times slower when the caches are cold; ctypes' view of the buffer is taken in C
    (for writable C-contiguous arrays, the outputs here)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):
        return a.ctypes.data


def streamed(result: np.ndarray, layout: Layout) -> bool:
    """Write with non-temporal stores: the output is too large to stay in cache, and
    few cache lines would be written partly streamed, partly not (which is slow): the
    MC passes start their pieces on vector boundaries; NCL planes do when the output is
    aligned and a plane is whole vectors, and otherwise must be long."""
    t = _t()
    vector = llvm.VECTOR_BYTES
    row = layout.l * result.itemsize
    return STREAMING and result.nbytes >= t.stream_min_bytes and result.flags.aligned and (
        layout.kind == "mc"
        or (address(result) % vector == 0 and row % vector == 0)
        or row >= t.stream_min_row_bytes
    )


def _lines_fit(c: int, itemsize: int, streamed: bool) -> bool:
    """Rows of ``c`` values are whole cache lines, short enough for the line loops."""
    row = c * itemsize
    limit = _t().line_max_row_bytes if streamed else _t().line_max_row_bytes_plain
    return row % llvm.LINE_BYTES == 0 and row <= limit


def _lines_work(work: tuple, streamed: bool) -> tuple:
    """The line pass's work from the mc plan work (l, span, chunks)."""
    sweep = _t().line_row_bytes if streamed else _t().line_row_bytes_plain
    return work[0], sweep, work[2]


def _whole_lines(result: np.ndarray) -> bool:
    """The flat output lies on its item size and holds a whole cache line after its
    first line boundary (the line loops' condition on the address)."""
    item = result.itemsize
    addr = address(result)
    if addr % item:
        return False
    per = llvm.LINE_BYTES // item
    return result.size - min(-(addr // item) % per, result.size) >= per


def route(plan: Plan, layout: Layout, result: np.ndarray) -> tuple:
    """(kernel, view of the data, work arguments) of an elementwise pass into ``result``
    (canonical view). The kernel takes (g, x, params, *work, y) in the view."""
    elem = plan.elem
    if elem != layout:  # (equal layouts of two dtypes of one size are two objects)
        view = result.reshape(elem.n, elem.c)
        is_streamed = streamed(view, elem)
        if plan.plane_work and not is_streamed:  # short planes loop per plane again
            return elementwise.ncl_segments[False], layout, plan.plane_work
    else:
        view, is_streamed = result, streamed(result, elem)
    if elem.kind == "ncl":
        return elementwise.ncl_segments[is_streamed], elem, plan.elem_work
    lines = plan.mc_lines[is_streamed]
    kernel, work = lines if lines and _whole_lines(view) else plan.mc[is_streamed]
    return kernel, elem, work
