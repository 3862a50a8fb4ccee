"""CPU backend: runs the kernels of ``_cpu_kernels`` on NumPy arrays.

Arguments arrive validated (``_validate``). This module views tensors the way the
kernels want them, sizes the work split (once per geometry, ``_plan``) and allocates
outputs. The per-channel arithmetic between the passes runs in kernels too
(``channel_params``, ``grad_params``; the reductions finish their own statistics):
each Python step of a call costs microseconds, several times more right after a
pass has flushed the caches, which on small tensors is more than the passes take.

Which kernels run: small inputs (``_small``) take the single-thread "small" kernels
(one call, no thread pool); NCL tensors whose channel slabs fit in
cache take the fused per-channel passes (``_fuse``); everything else the plane- or
row-parallel passes, NCL planes too short for a loop each as flat rows of the MC
kernels (``_flat``). Elementwise passes over outputs larger than a quarter of the
last-level cache write with non-temporal stores (``_streamed``, ``_stream``); large
outputs are allocated on cache-line boundaries for them.

Operations (mirrored by the GPU backend, ``_gpu``): ``batch_stats``,
``forward_train``, ``forward_eval``, ``backward``.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import NamedTuple

import numpy as np

from . import _cpu_kernels as kernels
from . import _pool, _stream
from ._alias import same_view
from ._channel import as64
from ._pool import threads as _threads
from ._validate import Checked, Layout, stats_dtype

# Aim for this many tasks per thread so uneven tasks still balance, and keep each task
# above this many elements so the split does not cost more than it saves.
_TASKS_PER_THREAD = 4
_MIN_TASK_ELEMENTS = 4096
# Results must not depend on the thread count, so everything that decides the order of
# a reduction's additions (the single-thread kernels, fusion, the reductions' partial
# sums) is decided from the shape alone; only the elementwise passes and the tasks of
# the fused ones follow the thread count. Those decisions are made as for this many
# threads (the measured machines'): the reductions are cut into at most _SUM_TASKS
# partial sums, and fusion asks for channels that share out evenly among them.
_PLAN_THREADS = 2
_SUM_TASKS = _TASKS_PER_THREAD * _PLAN_THREADS
# The fused per-channel passes (train forward, backward) reduce one channel's slab and
# then re-read it from the core's L2 or the shared L3 instead of memory. Measured on the
# 2-core development machine (1 MiB L2, 32 MiB L3), float32:
# - backward (dy and x slabs): 1.6 MB slabs (64x128x56x56) 22-24 ms fused against
#   29 ms unfused; forward (x slab): 0.4 MB slabs 1.3x faster, 3.2 MB no gain;
# - both lose on short planes: a slab is then many short rows far apart in memory,
#   which the prefetcher does not follow, while the unfused passes walk memory in
#   order. Paired A/B, fused speed-up, train forward / backward: 784-byte rows
#   (14x14) 0.80 / 0.80 at 51 MB of x (256x256x14x14), 1.05 / 0.74 at 6.4 MB
#   (128x64x14x14), 1.43 / 1.21 at 3.2 MB (in cache from the call before); 3136-byte
#   rows (28x28) level (0.98-1.06) at 12.8 and 25.7 MB; 56x56 planes 1.08 / 1.20 at
#   25.7 MB. So rows must be long, or the bytes a pass reads small enough to sit in
#   cache anyway. (Both sides have since learnt to follow such rows: the fused loops
#   prefetch across row ends, ``_stream.PREFETCH_BLOCKS``, and the unfused reductions
#   read in memory order, ``_SWEEP``. Fused against unfused, backward at 14x14 planes
#   out of cache then measured 0.67-1.16x, so the rule stands.)
# - planes short enough for the flat elementwise passes (_FLAT_MAX_PLANE, below) are
#   not fused: with the reductions over runs of samples (``kernels.stats_ncl``), the
#   unfused passes measured 1.0-1.7x faster in train (one run at 8x8: 0.96x) and
#   1.1-1.7x in backward (paired full calls, 256x64x5x5, 256x64x6x6, 128x64x8x8; flat
#   sums beat fusion at 4x4 before). At 10x10 and 14x14 fusion still won in backward
#   (1.0-1.4x) with train mixed (0.7-1.4x), so longer planes keep the rule above.
# - since train forward interleaves (a channel written while the next is summed, see
#   ``_cpu_kernels``), it gains at any slab size when rows are long, even once two
#   threads' slabs no longer fit the L3: paired full calls, fused against the rule
#   before, x slabs of 3.2-51 MB, float32: 112x112 and 224x224 planes 1.04-1.28x,
#   64x64 1.06-1.09x, 56x56 1.00-1.05x; but 32x32 and 28x28 planes 0.74-0.85x (4 and
#   3 MB slabs of 1024 rows each); float16 and float64 1.03-1.07x. Backward keeps its
#   limit: with the cache flushed before each call, slabs of 6.4-12.8 MB ran
#   0.40-0.48x (1.08-1.15x when warm).
# - on an Intel Xeon development machine (2 MiB L2 per core, tensors of 8-64 MB served
#   by its L3 at about 40 GB/s), rows of 3-4 KB lost fused once the tensor outgrew
#   the cache. Paired full calls, float32, fused against unfused, backward / train:
#   64x128x32x32 (33.5 MB) 0.75-0.85 / 0.83, 64x64x32x32 0.80 / 0.86, 128x64x28x28
#   0.70-0.74 / 0.78, 128x128x28x28 0.81-0.86 / 0.93, 32x256x28x28 0.81-0.90 /
#   0.75-0.92, 64x128x28x28 0.81-1.0 / 0.98; 64x64x28x28 (12.8 MB) 1.03 / 0.86-0.89;
#   but 32x64x28x28 (6.4 MB) 1.29 / 1.47, and 40x40 planes (6.4 KB rows, 13 MB) 1.21 /
#   1.03-1.10. So rows of _FUSE_MIN_ROW_BYTES (of all the arrays a pass reads) fuse
#   only while x is at most a quarter of the last-level cache, and rows of
#   _FUSE_LONG_ROW_BYTES per array (40x40 float32 planes) at any size. (On the 2-core
#   AMD machine, 28x28 planes measured level either way.)
_FUSE_MAX_BYTES = {"forward": 2 << 20, "backward": 4 << 20}
_FUSE_ARRAYS = {"forward": 1, "backward": 2}  # x; dy and x
_FUSE_MIN_ROW_BYTES = 2048
_FUSE_LONG_ROW_BYTES = 6 << 10
_FUSE_ANY_SLAB_ROW_BYTES = {"forward": 12 << 10, "backward": math.inf}
# NCL planes of at most _FLAT_MAX_PLANE values are too short for a loop each (the
# loop's set-up and scalar remainder cost more than its vector body): the elementwise
# passes then run the MC kernels over each sample's C * L values as one row, with the
# constants expanded to one per value (``_flat``) or, for planes of 16 values or more,
# chosen per channel as they go (``_cpu_kernels._per_channel_planes``), while
# C * L <= _FLAT_MAX_PERIOD.
# The reductions run flat only for shorter planes and fewer values per sample: each
# chunk of rows keeps float64 sums of all C * L columns, as large as the data itself
# when chunks have few rows. Measured, float32 kernels, planes against flat rows:
# normalize 7x7 planes 2.5x faster at 64x256 (3.2 MB) and 1.6x at 64x2048 (25.7 MB),
# 8x8 2.2x, 4x4 and 3x3 10x, 10x10 0.7x; reductions 4x4 2.7-3.1x (256x64, 256x256),
# 3x3 1.9x, 7x7 0.5-1.0x.
_FLAT_MAX_PLANE = 64
_FLAT_MAX_PERIOD = 1 << 17
_FLAT_MAX_PLANE_SUMS = 16
_FLAT_MAX_PERIOD_SUMS = 4096
# With plain stores (outputs that stay in cache), 8x8 planes go back to the NCL kernels'
# loop per plane (its row loop inlined, ``_cpu_kernels._normalize_segments``): full
# calls paired against the flat rows, float32, 64x256x8x8, eval 1.34x, backward 1.16x.
# Shorter planes lost: 7x7 0.97x / 0.98x, 6x6 0.90x / 0.93x (64x256x7x7, 128x128x6x6;
# kernels alone, the plane loop had looked 1.2-1.3x faster there), and 4x4-5x5 planes
# lost as kernels too (0.6-0.8x).
_PLANE_LOOP_MIN = 64
# The unfused NCL reductions over whole planes give each task a run of samples and
# read it in memory order, every channel's plane of a sample in turn (``_SWEEP``), when
# the runs share out evenly; else a task per run and channel, whose planes lie C * L
# values apart (the hardware prefetcher then restarts on every plane). The additions
# are the same. Paired full calls, cache flushed before each, sweep against tasks per
# channel: batch_stats 2.06x at 256x256x14x14, 1.88x at 1024x16x28x28, 1.22x at
# 64x2048x7x7; backward (unfused there) 1.47x at 1024x16x28x28, 1.23x at 64x2048x7x7;
# train 1.07-1.39x; in cache (3-6 MB, warm) 0.98-1.38x; shapes whose passes are fused
# (no reduction pass) level, 0.94-1.05x.
_SWEEP = True
# Elements per span of the MC elementwise passes (a multiple of the kernels' grain).
_MC_SPAN = 1024
_ALIGN = 64
# NCL planes that do not start on vector boundaries are streamed only from this length
# (two part-streamed lines per plane; at 12.5 KB planes this measured 1.1-1.2x faster
# than plain stores on the development machine).
_STREAM_MIN_ROW_BYTES = 8192
# Up to this many values an operation runs on the calling thread (the "small" kernels):
# waking the pool, and the Python around each parallel pass, cost more than a second
# thread saves. Full calls on 2 threads, small kernels against the parallel passes,
# float32 (train / eval / backward): 65536 values 1.2-1.6x faster in all three for
# both layouts, except 4x16x32x32 (level); 131072 NCL values mixed (0.8-1.4x); 131072
# and 262144 channels-last values (one fused pass each, in cache) 1.1-1.7x faster in
# train and backward and level in eval. (The limits do not follow the thread count:
# see _SUM_TASKS.)
_SMALL_VALUES = {"ncl": 1 << 16, "mc": 1 << 18}

_F16 = np.dtype(np.float16)
# Below this eps, 1 / sqrt(var + eps) of a constant channel exceeds float32's range.
_TINY_EPS = 1e-76


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """The array as the kernels take it: float16 as its uint16 bits."""
    return a.view(np.uint16) if a.dtype == _F16 else a


def _channel_last(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.moveaxis(a, axis, -1)`` (a view) at a fraction of its cost (8 us a call)."""
    if axis == a.ndim - 1:
        return a
    return a.transpose(tuple(range(axis)) + tuple(range(axis + 1, a.ndim)) + (axis,))


def _channel_back(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.moveaxis(a, -1, axis)``: undoes :func:`_channel_last`."""
    if axis == a.ndim - 1:
        return a
    return a.transpose(tuple(range(axis)) + (a.ndim - 1,) + tuple(range(axis, a.ndim - 1)))


def _canonical(a: np.ndarray, layout: Layout) -> np.ndarray | None:
    """The (N, C, L) or (M, C) view of ``a``, or None if that needs a copy."""
    if layout.kind == "ncl":
        if not a.flags.c_contiguous:
            return None
        return a.reshape(layout.n, layout.c, layout.l)
    if layout.axis != a.ndim - 1:
        a = _channel_last(a, layout.axis)
    if not a.flags.c_contiguous:
        return None
    return a.reshape(layout.n, layout.c)


def _view(a: np.ndarray, layout: Layout) -> np.ndarray:
    """The canonical view of ``a``, copying it into canonical order if it must."""
    return _ordered(a, layout)[1]


def _ordered(a: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """``a`` itself if its canonical view needs no copy, else a copy (same shape) in
    canonical memory order, so that a multi-pass operation copies a strided input
    once; and the canonical view of what it returns."""
    v = _canonical(a, layout)
    if v is not None:
        return a, v
    if layout.kind == "ncl":
        a = np.ascontiguousarray(a)
    else:
        a = _channel_back(np.ascontiguousarray(_channel_last(a, layout.axis)), layout.axis)
    return a, _canonical(a, layout)


def _aligned_empty(
    shape: tuple[int, ...], dtype: np.dtype, nbytes: int | None = None
) -> np.ndarray:
    """``np.empty`` on a cache-line boundary when the kernels may stream into it
    (large ``malloc`` blocks start 16 bytes past a page boundary); ``nbytes``: its size
    in bytes, if the caller knows it."""
    if nbytes is None:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _stream.MIN_BYTES:
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    # one array constructor, not slice-view-reshape: with _address, 42-60 us per
    # 25.7 MB output right after a pass had flushed the caches, against 55-117 us
    # (np.empty alone: 14-34 us)
    return np.ndarray(shape, dtype, raw, -_address(raw) % _ALIGN)


def _address(a: np.ndarray) -> int:
    """The address of ``a``'s data. ``a.ctypes`` builds a Python helper object, several
    times slower when the caches are cold; ctypes' view of the buffer is taken in C
    (for writable C-contiguous arrays, the outputs here)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):
        return a.ctypes.data


def _empty(layout: Layout, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A new array of the shape and dtype of ``like``, in the memory order of the layout
    (channels-last stays channels-last), and its canonical view."""
    if layout.kind == "ncl":
        y = _aligned_empty(layout.shape, like.dtype, like.nbytes)
        return y, y.reshape(layout.n, layout.c, layout.l)
    shape, axis = layout.shape, layout.axis
    if axis == len(shape) - 1:
        y = _aligned_empty(shape, like.dtype, like.nbytes)
        return y, y.reshape(layout.n, layout.c)
    moved = _aligned_empty(shape[:axis] + shape[axis + 1 :] + (layout.c,), like.dtype, like.nbytes)
    return _channel_back(moved, axis), moved.reshape(layout.n, layout.c)


def _output(out: np.ndarray | None, x: np.ndarray, layout: Layout):
    """Return (result array, its canonical view) for an elementwise pass over ``x``.

    Writes go straight into ``out`` when it has the kernel's order and either does
    not overlap ``x`` or is ``x`` itself; otherwise into a fresh array that
    :func:`_finish_output` copies into ``out``.
    """
    if out is not None:
        v = _canonical(out, layout)
        if v is not None and (not np.may_share_memory(out, x) or same_view(out, x)):
            return out, v
    return _empty(layout, x)


def _nothing(x: np.ndarray, layout: Layout, out: np.ndarray | None) -> np.ndarray:
    """The result of an elementwise pass over a tensor with no values (N or C is 0)."""
    return out if out is not None else _empty(layout, x)[0]


def _finish_output(y: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None or y is out:
        return y if out is None else out
    out[...] = y
    return out


def _tasks(threads: int) -> int:
    """Tasks to deal out to a pool of ``threads`` threads (1 when it has one)."""
    return _TASKS_PER_THREAD * threads if threads > 1 else 1


def _split(layout: Layout, want: int) -> int:
    """Segments per plane (ncl) or row chunks (mc), for about ``want`` tasks."""
    if layout.kind == "ncl":
        per_plane = -(-want // max(1, layout.n * layout.c))
        return max(1, min(per_plane, layout.l // _MIN_TASK_ELEMENTS))
    size = layout.n * layout.c * layout.l
    return max(1, min(want, size // _MIN_TASK_ELEMENTS, layout.n))


def _flat(layout: Layout, max_plane: int, max_period: int) -> Layout | None:
    """For NCL planes too short for a loop each: the layout that views each sample's
    C * L values as one row of an MC tensor with C * L "channels", whose per-channel
    vectors then hold one value per element of a sample (``_cpu_kernels.expand``).
    None for other tensors, planes of more than ``max_plane`` values or more than
    ``max_period`` values per sample."""
    if not _flat_fits(layout, max_plane, max_period):
        return None
    return layout._replace(kind="mc", c=layout.c * layout.l, l=1)


def _flat_fits(layout: Layout, max_plane: int, max_period: int) -> bool:
    """Whether ``_flat`` views this layout flat (without building the flat layout)."""
    return (
        layout.kind == "ncl" and layout.l <= max_plane and layout.c * layout.l <= max_period
    )


class _Plan(NamedTuple):
    """How the passes over one layout split their work on a given thread count
    (:func:`_plan`)."""

    small: bool  # the single-thread kernels (``_small``)
    fuse_forward: bool  # the fused per-channel passes (``_fuse``)
    fuse_backward: bool
    runs: int  # tasks of the fused passes (``_cpu_kernels._claims``)
    elem: Layout  # the view the elementwise kernels take: the layout, or its flat rows
    elem_work: tuple  # their work arguments
    plane_work: tuple  # the NCL kernels' work arguments for flat ``elem`` planes with
    #                    plain stores, or () if those stay flat (``_PLANE_LOOP_MIN``)
    sums: Layout  # the same for the reductions
    sums_work: tuple
    sums_tasks: int  # partial rows the reduction writes


@functools.lru_cache(maxsize=256)
def _plan(layout: Layout, threads: int, itemsize: int) -> _Plan:
    """The work split of ``layout`` (values of ``itemsize`` bytes) on ``threads``
    threads. A training loop repeats a few geometries, and working this out on each
    call cost more Python than the kernels of a small call take."""
    def ncl_work(split):  # segments per plane, and the runs of tasks dealt to the threads
        return split, max(1, min(layout.n * layout.c * split, _tasks(threads)))

    elem = _flat(layout, _FLAT_MAX_PLANE, _FLAT_MAX_PERIOD)
    plane_work = ()
    if elem is not None:
        elem_work = (layout.l, _MC_SPAN, _split(elem, _tasks(threads)))
        if layout.l >= _PLANE_LOOP_MIN:  # whole planes
            plane_work = ncl_work(1)
    elif layout.kind == "mc":
        elem, elem_work = layout, (1, _MC_SPAN, _split(layout, _tasks(threads)))
    else:
        elem, elem_work = layout, ncl_work(_split(layout, _tasks(threads)))
    sums = _flat(layout, _FLAT_MAX_PLANE_SUMS, _FLAT_MAX_PERIOD_SUMS) or layout
    split = _split(sums, _SUM_TASKS)
    if sums.kind == "ncl":  # runs of samples, each cut into ``split`` segments
        runs = sums.n if split > 1 else min(sums.n, _SUM_TASKS)
        sweep = _SWEEP and split == 1 and (runs >= _tasks(threads) or runs % threads == 0)
        # (whole planes; enough runs, or as many for each thread; the same additions)
        sums_work, sums_tasks = (runs, split, sweep), runs * split
    else:
        sums_work, sums_tasks = (layout.l, split), split  # l == 1 unless flat
    return _Plan(
        _small(layout),
        _fuse(layout, itemsize, "forward"),
        _fuse(layout, itemsize, "backward"),
        max(1, min(threads, layout.c)),
        elem, elem_work, plane_work, sums, sums_work, sums_tasks,
    )


def _reduce(name: str, arrays, extra: tuple, layout: Layout, plan: _Plan) -> np.ndarray:
    """Run a reduction kernel (``extra``: its per-channel inputs); its (2, C) float64
    result."""
    view = plan.sums
    if view is not layout:  # flat rows: one column per value of a sample
        arrays = [a.reshape(view.n, view.c) for a in arrays]
    part = np.empty((plan.sums_tasks, 2, view.c))
    out = np.empty((2, layout.c))
    _kernel(name, view.kind)(*map(_kernel_array, arrays), *extra, *plan.sums_work, part, out)
    return out


def _streamed(result: np.ndarray, layout: Layout) -> bool:
    """Write with non-temporal stores: the output is too large to stay in cache, and
    few cache lines would be written partly streamed, partly not (which is slow): the
    MC passes start their pieces on vector boundaries; NCL planes do when the output is
    aligned and a plane is whole vectors, and otherwise must be long."""
    vector = _stream.VECTOR_BYTES
    row = layout.l * result.itemsize
    return _stream.STREAMING and result.nbytes >= _stream.MIN_BYTES and result.flags.aligned and (
        layout.kind == "mc"
        or (_address(result) % vector == 0 and row % vector == 0)
        or row >= _STREAM_MIN_ROW_BYTES
    )


def _elementwise(
    name: str, arrays, params: np.ndarray, result: np.ndarray, layout: Layout, plan: _Plan
) -> None:
    """Run an elementwise kernel with per-channel constants ``params`` (rows of C).
    NCL planes short enough run as flat rows of the MC kernel (``_flat``), which
    spreads the constants over the planes (``l``), except with plain stores for
    planes of ``_PLANE_LOOP_MIN`` values or more (``_Plan.plane_work``)."""
    elem = plan.elem
    if elem is not layout:
        flat = result.reshape(elem.n, elem.c)
        streamed = _streamed(flat, elem)
        if plan.plane_work and not streamed:
            _kernel(name, "ncl")(
                *map(_kernel_array, arrays), params, *plan.plane_work, False,
                _kernel_array(result),
            )
            return
        arrays, result = [a.reshape(elem.n, elem.c) for a in arrays], flat
    else:
        streamed = _streamed(result, elem)
    _kernel(name, elem.kind)(
        *map(_kernel_array, arrays), params, *plan.elem_work, streamed, _kernel_array(result)
    )


_KERNELS: dict = _pool.on_fork_clear({})


def _kernel(name: str, kind: str):
    """The kernel ``name`` for views of ``kind`` ("ncl", "mc"; "channels" for the fused
    passes), as this process can run it (``_pool.runnable``)."""
    kernel = _KERNELS.get((name, kind))
    if kernel is None:
        kernel = _KERNELS[name, kind] = _pool.runnable(getattr(kernels, f"{name}_{kind}"))
    return kernel


def _small(layout: Layout) -> bool:
    """Few enough values that the calling thread alone is faster than a pool."""
    return 0 < layout.n * layout.l * layout.c <= _SMALL_VALUES[layout.kind]


def _moments(v: np.ndarray, layout: Layout, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and biased variance of each channel of a canonical view."""
    if plan.small:
        stats = np.empty((2, layout.c))
        _kernel("stats_small", layout.kind)(_kernel_array(v), stats)
        return stats[0], stats[1]
    moments = _reduce("stats", (v,), (), layout, plan)
    return moments[0], moments[1]


def _fuse(layout: Layout, itemsize: int, which: str) -> bool:
    """Use a per-channel fused pass (``which``: "forward" or "backward"): NCL, enough
    channels to share out evenly (among _PLAN_THREADS: the choice must not follow the
    thread count), planes too long for the flat elementwise passes
    (``_flat``), a channel's data (its slab, of every array the pass reads) small
    enough to stay in cache (train forward: or rows long enough), and either rows of
    ``_FUSE_LONG_ROW_BYTES`` or a tensor that fits the cache (x, if rows are not too
    short; else all the pass reads)."""
    balanced = layout.c % _PLAN_THREADS == 0 or layout.c >= _SUM_TASKS
    arrays = _FUSE_ARRAYS[which]
    row = layout.l * itemsize  # of one array
    wide = row * arrays  # of all the arrays the pass reads
    slab = layout.n * wide
    x_bytes = layout.c * layout.n * row
    cache = _stream.LLC_BYTES // 4
    return (
        layout.kind == "ncl"
        and not _flat_fits(layout, _FLAT_MAX_PLANE, _FLAT_MAX_PERIOD)
        and balanced
        and (
            slab <= _FUSE_MAX_BYTES[which]
            or wide >= _FUSE_ANY_SLAB_ROW_BYTES[which]
        )
        and layout.n * layout.l >= _MIN_TASK_ELEMENTS
        and (
            row >= _FUSE_LONG_ROW_BYTES
            or x_bytes * arrays <= cache
            or (wide >= _FUSE_MIN_ROW_BYTES and x_bytes <= cache)
        )
    )


def _normalize(x, xv, layout, mean, var, eps, weight, bias, out, plan):
    """y from ``x`` (canonical view ``xv``) normalized with the given mean and biased
    variance (float64, or running statistics as stored); any count, even 0. Returns
    (y, float64 invstd)."""
    y, yv = _output(out, x, layout)
    c = layout.c
    params, stats = np.empty((4, c), stats_dtype(x.dtype)), np.empty((3, c))
    kernels.channel_params(
        _kernel_array(mean), _kernel_array(var), as64(weight, c, 1.0), as64(bias, c, 0.0),
        eps, params, stats,
    )
    if plan.small:
        _kernel("normalize_small", layout.kind)(_kernel_array(xv), params, _kernel_array(yv))
    elif layout.count * c:
        _elementwise("normalize", (xv,), params, yv, layout, plan)
    return _finish_output(y, out), stats[2]


def batch_stats(x: np.ndarray, chk: Checked) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance."""
    layout = chk.layout
    if layout.c == 0:
        none = np.empty(0, stats_dtype(x.dtype))
        return none, none.copy()
    mean, var = _moments(_view(x, layout), layout, _plan(layout, _threads(), x.itemsize))
    sd = stats_dtype(x.dtype)
    return mean.astype(sd, copy=False), var.astype(sd, copy=False)


def forward_train(x, chk: Checked, weight, bias, running_mean, running_var, out):
    """Normalize with batch statistics; update running statistics if given.

    Returns ``(y, mean, invstd)`` with the statistics in :func:`stats_dtype`.
    """
    layout = chk.layout
    if layout.c == 0:  # (training needs 2 values in each channel there is)
        none = np.empty(0, stats_dtype(x.dtype))
        return _nothing(x, layout, out), none, none.copy()
    x, xv = _ordered(x, layout)
    plan = _plan(layout, _threads(), x.itemsize)
    if plan.small or plan.fuse_forward:
        y, yv = _output(out, x, layout)
        c = layout.c
        stats = np.empty((3, c))
        args = (
            _kernel_array(xv), as64(weight, c, 1.0), as64(bias, c, 0.0), chk.eps,
            np.empty((4, c), stats_dtype(x.dtype)), stats,
        )
        if plan.small:
            _kernel("forward_small", layout.kind)(*args, _kernel_array(yv))
        else:
            fused = _kernel("forward", "channels")
            fused(*args, plan.runs, _streamed(yv, layout), _kernel_array(yv))
        y = _finish_output(y, out)
        mean, var, invstd = stats
    else:
        mean, var = _moments(xv, layout, plan)
        y, invstd = _normalize(x, xv, layout, mean, var, chk.eps, weight, bias, out, plan)
    if running_mean is not None:
        update_running(running_mean, running_var, mean, var, layout.count, chk.momentum)
    sd = stats_dtype(x.dtype)
    if chk.eps >= _TINY_EPS:
        return y, mean.astype(sd, copy=False), invstd.astype(sd, copy=False)
    # invstd past float32's range becomes inf, quietly (np.errstate costs 1.4 us a call,
    # so only where that can happen)
    with np.errstate(over="ignore"):
        return y, mean.astype(sd), invstd.astype(sd)


def update_running(running_mean, running_var, mean, var, count, momentum) -> None:
    """The running-statistics update from float64 batch mean and biased variance."""
    kernels.update_running(
        _kernel_array(running_mean), _kernel_array(running_var), mean, var, count, momentum
    )


def running_invstd(running_var: np.ndarray, eps: float) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        return 1.0 / np.sqrt(running_var.astype(np.float64) + eps)


def forward_eval(x, chk: Checked, running_mean, running_var, weight, bias, out):
    """Normalize with the running statistics."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return _nothing(x, layout, out)
    x, xv = _ordered(x, layout)
    plan = _plan(layout, _threads(), x.itemsize)
    return _normalize(x, xv, layout, running_mean, running_var, chk.eps, weight, bias, out, plan)[0]


def backward(dy, x, chk: Checked, mean, invstd, weight, training: bool):
    """Gradients (dx, dweight, dbias); see the API contract for the formulas."""
    layout = chk.layout
    if layout.count * layout.c == 0:  # eval with N = 0, or no channels
        zeros = np.zeros(layout.c, stats_dtype(x.dtype))
        return _nothing(x, layout, None), zeros, zeros.copy()
    mean64, invstd64 = np.asarray(mean, dtype=np.float64), np.asarray(invstd, dtype=np.float64)
    (dy, dyv), (x, xv) = _ordered(dy, layout), _ordered(x, layout)
    plan = _plan(layout, _threads(), x.itemsize)
    if not (plan.small or plan.fuse_backward):
        sums = local_grad_sums(dy, x, chk, mean64, plan)
        return grad_input(
            dy, x, chk, mean64, invstd64, weight, sums, layout.count, training, plan
        )
    c = layout.c
    ctype = stats_dtype(x.dtype)  # also the dtype of dweight and dbias
    dx, dxv = _output(None, x, layout)
    grads = np.empty((2, c), ctype)
    args = (
        _kernel_array(dyv), _kernel_array(xv), mean64, invstd64, as64(weight, c, 1.0),
        training, np.empty((5, c), ctype), grads,
    )
    if plan.small:
        _kernel("backward_small", layout.kind)(*args, _kernel_array(dxv))
    else:
        fused = _kernel("backward", "channels")
        fused(*args, plan.runs, _streamed(dxv, layout), _kernel_array(dxv))
    return dx, grads[0], grads[1]


# --- the pieces ``numbabn.distributed`` assembles around its exchanges ---------------


def local_moments(x, chk: Checked) -> tuple[np.ndarray, np.ndarray]:
    """float64 (mean, sum of squared deviations) of this array's values (zeros if none)."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return np.zeros(layout.c), np.zeros(layout.c)
    mean, var = _moments(_view(x, layout), layout, _plan(layout, _threads(), x.itemsize))
    return mean, var * layout.count


def normalize_global(x, chk: Checked, mean, var, weight, bias, out):
    """Normalize with given float64 statistics (those of the whole distributed batch)."""
    layout = chk.layout
    x, xv = _ordered(x, layout)
    plan = _plan(layout, _threads(), x.itemsize)
    return _normalize(x, xv, layout, mean, var, chk.eps, weight, bias, out, plan)[0]


def local_grad_sums(dy, x, chk: Checked, mean, plan: _Plan | None = None) -> np.ndarray:
    """float64 (sum dy, sum dy * (x - mean)) per channel, shape (2, C) (``plan``: the
    caller's :func:`_plan`, made here if not given)."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return np.zeros((2, layout.c))
    views = (_view(dy, layout), _view(x, layout))
    plan = plan or _plan(layout, _threads(), x.itemsize)
    return _reduce("grad_sums", views, (mean,), layout, plan)


def grad_input(dy, x, chk: Checked, mean, invstd, weight, sums, count, training, plan=None):
    """(dx, dweight, dbias) from the sums over ``count`` values per channel
    (``plan``: the caller's :func:`_plan`, made here if not given)."""
    layout = chk.layout
    c = layout.c
    ctype = stats_dtype(x.dtype)
    dx, dxv = _output(None, x, layout)
    params, grads = np.empty((5, c), ctype), np.empty((2, c), ctype)
    kernels.grad_params(sums, count, mean, invstd, as64(weight, c, 1.0), training, params, grads)
    if layout.count * c:
        dyv = _view(dy, layout)
        plan = plan or _plan(layout, _threads(), x.itemsize)
        if training:
            _elementwise("grad_input", (dyv, _view(x, layout)), params, dxv, layout, plan)
        else:
            _elementwise("normalize", (dyv,), params, dxv, layout, plan)
    return dx, grads[0], grads[1]


def to_host(a) -> np.ndarray:
    """A per-channel vector as float64 NumPy."""
    return np.asarray(a, dtype=np.float64)


def from_host(a: np.ndarray, like) -> np.ndarray:
    """A host per-channel vector on this side (as the kind of array ``like`` is)."""
    return a


def copy(a: np.ndarray) -> np.ndarray:
    return a.copy()


def from_other_side(a) -> np.ndarray:
    """A host copy of a CUDA array (used when a layer follows its input to the CPU)."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    from numba import cuda

    return cuda.as_cuda_array(a).copy_to_host()
