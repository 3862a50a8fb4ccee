"""CPU backend: runs the kernels of ``_cpu_kernels`` on NumPy arrays.

Arguments arrive validated (``_validate``). This module views tensors the way the
kernels want them, sizes the work split, allocates outputs and does the per-channel
arithmetic between the passes, in float64 on C-length vectors.

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

import math

import numba
import numpy as np

from . import _cpu_kernels as kernels
from . import _stream
from ._channel import as64, grad_constants
from ._validate import Checked, Layout, stats_dtype

# Aim for this many tasks per thread so uneven tasks still balance, and keep each task
# above this many elements so the split does not cost more than it saves.
_TASKS_PER_THREAD = 4
_MIN_TASK_ELEMENTS = 4096
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
#   cache anyway.
# - planes short enough for the flat elementwise passes (_FLAT_MAX_PLANE, below) are
#   not fused: with the reductions over runs of samples (``kernels.stats_ncl``), the
#   unfused passes measured 1.0-1.7x faster in train (one run at 8x8: 0.96x) and
#   1.1-1.7x in backward (paired full calls, 256x64x5x5, 256x64x6x6, 128x64x8x8; flat
#   sums beat fusion at 4x4 before). At 10x10 and 14x14 fusion still won in backward
#   (1.0-1.4x) with train mixed (0.7-1.4x), so longer planes keep the rule above.
_FUSE_MAX_BYTES = {"forward": 2 << 20, "backward": 4 << 20}
_FUSE_MIN_ROW_BYTES = 2048
# NCL planes of at most _FLAT_MAX_PLANE values are too short for a loop each (the
# loop's set-up and scalar remainder cost more than its vector body): the elementwise
# passes then run the MC kernels over each sample's C * L values as one row, with the
# constants expanded to one per value (``_flat``), while C * L <= _FLAT_MAX_PERIOD.
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
# train and backward and level in eval. With more threads the parallel passes gain
# more, so the limits shrink in proportion (not measured: this machine has 2 cores),
# down to ``_SMALL_VALUES_MIN``.
_SMALL_VALUES = {"ncl": 1 << 16, "mc": 1 << 18}
_SMALL_VALUES_MIN = 1 << 15

_F16 = np.dtype(np.float16)


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
    moved = _channel_last(a, layout.axis)
    if not moved.flags.c_contiguous:
        return None
    return moved.reshape(layout.n, layout.c)


def _view(a: np.ndarray, layout: Layout) -> np.ndarray:
    """The canonical view of ``a``, copying it into canonical order if it must."""
    v = _canonical(a, layout)
    if v is not None:
        return v
    if layout.kind == "ncl":
        return np.ascontiguousarray(a).reshape(layout.n, layout.c, layout.l)
    return np.ascontiguousarray(_channel_last(a, layout.axis)).reshape(layout.n, layout.c)


def _in_order(a: np.ndarray, layout: Layout) -> np.ndarray:
    """``a`` itself if its canonical view needs no copy, else a copy (same shape) in
    canonical memory order, so that a multi-pass operation copies a strided input once."""
    if _canonical(a, layout) is not None:
        return a
    if layout.kind == "ncl":
        return np.ascontiguousarray(a)
    return _channel_back(np.ascontiguousarray(_channel_last(a, layout.axis)), layout.axis)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` on a cache-line boundary when the kernels may stream into it
    (large ``malloc`` blocks start 16 bytes past a page boundary)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _stream.MIN_BYTES:
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _empty(layout: Layout, dtype: np.dtype) -> np.ndarray:
    """An output in the memory order of the layout (channels-last stays channels-last)."""
    if layout.kind == "ncl":
        return _aligned_empty(layout.shape, dtype)
    shape = layout.shape
    moved = shape[: layout.axis] + shape[layout.axis + 1 :] + (shape[layout.axis],)
    return _channel_back(_aligned_empty(moved, dtype), layout.axis)


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
    )


def _output(out: np.ndarray | None, x: np.ndarray, layout: Layout):
    """Return (result array, its canonical view) for an elementwise pass over ``x``.

    Writes go straight into ``out`` when it has the kernel's order and either does
    not overlap ``x`` or is ``x`` itself; otherwise into a fresh array that
    :func:`_finish_output` copies into ``out``.
    """
    if out is not None:
        v = _canonical(out, layout)
        if v is not None and (not np.may_share_memory(out, x) or _same_view(out, x)):
            return out, v
    y = _empty(layout, x.dtype)
    return y, _canonical(y, layout)


def _finish_output(y: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None or y is out:
        return y if out is None else out
    out[...] = y
    return out


def _threads() -> int:
    """The calling thread's numba thread count (``numba.set_num_threads`` sets it per
    Python thread). Read once per operation and passed down. ``numba.get_num_threads``
    takes two locks on every call (to start the pool on the first): 1.2-2.5 us in a
    loop and 51 us right after a 25.7 MB train call here, where the count reader it
    then calls took 0.5 and 14 us (full calls 1.01-1.09x faster, paired). So after
    the first read this calls that reader directly, and falls back to the public
    function should numba's internals change."""
    n = (_count_reader or _find_count_reader())()
    return n if n > 0 else numba.get_num_threads()


_count_reader = None


def _find_count_reader():
    global _count_reader
    from numba.np.ufunc import parallel

    numba.get_num_threads()  # starts the pool, which sets the reader
    reader = getattr(parallel, "_get_num_threads", None)
    _count_reader = reader if callable(reader) else numba.get_num_threads
    return _count_reader


def _tasks(threads: int) -> int:
    """Tasks to deal out to a pool of ``threads`` threads (1 when it has one)."""
    return _TASKS_PER_THREAD * threads if threads > 1 else 1


def _split(layout: Layout, threads: int) -> int:
    """Segments per plane (ncl) or row chunks (mc)."""
    want = _tasks(threads)
    if layout.kind == "ncl":
        per_plane = -(-want // (layout.n * layout.c))
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


def _reduce(
    name: str, arrays, per_channel: np.ndarray, layout: Layout, threads: int
) -> np.ndarray:
    """Run a two-sum reduction kernel and add its partials: (2, C) float64."""
    flat = _flat(layout, _FLAT_MAX_PLANE_SUMS, _FLAT_MAX_PERIOD_SUMS)
    if flat is not None:
        rows = tuple(a.reshape(flat.n, flat.c) for a in arrays)
        spread = kernels.tile(per_channel.reshape(1, -1), layout.l, flat.c)[0]
        sums = _reduce(name, rows, spread, flat, threads)
        return sums.reshape(2, layout.c, layout.l).sum(axis=2)
    split = _split(layout, threads)
    if layout.kind == "ncl":  # runs of samples, each cut into ``split`` segments
        runs = layout.n if split > 1 else min(layout.n, _tasks(threads))
        work, tasks = (runs, split), runs * split
    else:
        work, tasks = (split,), split
    part = np.empty((tasks, 2, layout.c), np.float64)
    _kernel(name, layout)(*(_kernel_array(a) for a in arrays), per_channel, *work, part)
    return part.sum(axis=0)


def _streamed(result: np.ndarray, layout: Layout) -> bool:
    """Write with non-temporal stores: the output is too large to stay in cache, and
    few cache lines would be written partly streamed, partly not (which is slow): the
    MC passes start their pieces on vector boundaries; NCL planes do when the output is
    aligned and a plane is whole vectors, and otherwise must be long."""
    vector = _stream.VECTOR_BYTES
    row = layout.l * result.itemsize
    return result.nbytes >= _stream.MIN_BYTES and result.flags.aligned and (
        layout.kind == "mc"
        or (result.ctypes.data % vector == 0 and row % vector == 0)
        or row >= _STREAM_MIN_ROW_BYTES
    )


def _elementwise(
    name: str, arrays, params: np.ndarray, result: np.ndarray, layout: Layout, threads: int
) -> None:
    """Run an elementwise kernel with per-channel constants ``params`` (rows of C).
    NCL planes short enough run as flat rows of the MC kernel (``_flat``), which
    spreads the constants over the planes (``l``)."""
    flat = _flat(layout, _FLAT_MAX_PLANE, _FLAT_MAX_PERIOD)
    if flat is not None:
        arrays = tuple(a.reshape(flat.n, flat.c) for a in arrays)
        result = result.reshape(flat.n, flat.c)
        work = (layout.l, _MC_SPAN, _split(flat, threads))
        layout = flat
    elif layout.kind == "mc":
        work = (1, _MC_SPAN, _split(layout, threads))
    else:  # segments per plane, and the contiguous runs of tasks dealt to the threads
        split = _split(layout, threads)
        work = (split, max(1, min(layout.n * layout.c * split, _tasks(threads))))
    _kernel(name, layout)(
        *(_kernel_array(a) for a in arrays), params, *work,
        _streamed(result, layout), _kernel_array(result),
    )


def _kernel(name: str, layout: Layout):
    return getattr(kernels, f"{name}_{layout.kind}")


def _shift(v: np.ndarray, layout: Layout) -> np.ndarray:
    """A value of each channel, the shift that keeps the shifted sums small."""
    first = v[0, :, 0] if layout.kind == "ncl" else v[0, :]
    return first.astype(np.float64)


def _small(layout: Layout, threads: int) -> bool:
    """Few enough values that the calling thread alone is faster than ``threads``."""
    limit = _SMALL_VALUES[layout.kind] * 2 // max(threads, 2)
    return 0 < layout.n * layout.l * layout.c <= max(limit, _SMALL_VALUES_MIN)


def _moments(v: np.ndarray, layout: Layout, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and biased variance of each channel of a canonical view."""
    if _small(layout, threads):
        stats = np.empty((2, layout.c))
        _kernel("stats_small", layout)(_kernel_array(v), stats)
        return stats[0], stats[1]
    shift = _shift(v, layout)
    sums = _reduce("stats", (v,), shift, layout, threads)
    mean, var = np.empty(layout.c), np.empty(layout.c)
    kernels.finish_moments(sums, shift, layout.count, mean, var)
    return mean, var


def _fuse(layout: Layout, value_bytes: int, which: str, threads: int) -> bool:
    """Use a per-channel fused pass (``which``: "forward" or "backward"): NCL, enough
    channels to share out evenly, a channel's data (``value_bytes`` per value) small
    enough to stay in cache, long rows or a tensor that fits the cache, and planes
    too long for the flat elementwise passes (``_flat``)."""
    balanced = layout.c % threads == 0 or layout.c >= _TASKS_PER_THREAD * threads
    slab = layout.n * layout.l * value_bytes
    return (
        layout.kind == "ncl"
        and not _flat_fits(layout, _FLAT_MAX_PLANE, _FLAT_MAX_PERIOD)
        and threads > 1
        and balanced
        and slab <= _FUSE_MAX_BYTES[which]
        and layout.n * layout.l >= _MIN_TASK_ELEMENTS
        and (layout.l * value_bytes >= _FUSE_MIN_ROW_BYTES or slab * layout.c <= _stream.LLC_BYTES // 4)
    )


def _normalize(x, layout, mean, var, eps, weight, bias, out, threads):
    """y from ``x`` normalized with the given mean and biased variance (float64, or
    running statistics as stored); any count, even 0. Returns (y, float64 invstd)."""
    y, yv = _output(out, x, layout)
    c = layout.c
    params, stats = np.empty((4, c), stats_dtype(x.dtype)), np.empty((3, c))
    kernels.channel_params(
        _kernel_array(mean), _kernel_array(var), as64(weight, c, 1.0), as64(bias, c, 0.0),
        eps, params, stats,
    )
    if layout.count * c:
        if _small(layout, threads):
            _kernel("normalize_small", layout)(_kernel_array(_view(x, layout)), params, _kernel_array(yv))
        else:
            _elementwise("normalize", (_view(x, layout),), params, yv, layout, threads)
    return _finish_output(y, out), stats[2]


def batch_stats(x: np.ndarray, chk: Checked) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance."""
    mean, var = _moments(_view(x, chk.layout), chk.layout, _threads())
    sd = stats_dtype(x.dtype)
    return mean.astype(sd), var.astype(sd)


def forward_train(x, chk: Checked, weight, bias, running_mean, running_var, out):
    """Normalize with batch statistics; update running statistics if given.

    Returns ``(y, mean, invstd)`` with the statistics in :func:`stats_dtype`.
    """
    layout = chk.layout
    xo = _in_order(x, layout)
    threads = _threads()
    small = _small(layout, threads)
    if small or _fuse(layout, xo.itemsize, "forward", threads):
        y, yv = _output(out, xo, layout)
        stats = np.empty((3, layout.c))
        args = (
            _kernel_array(_view(xo, layout)), as64(weight, layout.c, 1.0),
            as64(bias, layout.c, 0.0), chk.eps, np.empty((4, layout.c), stats_dtype(x.dtype)),
            stats,
        )
        if small:
            _kernel("forward_small", layout)(*args, _kernel_array(yv))
        else:
            kernels.forward_channels(*args, _streamed(yv, layout), _kernel_array(yv))
        y = _finish_output(y, out)
        mean, var, invstd = stats
    else:
        mean, var = _moments(_view(xo, layout), layout, threads)
        y, invstd = _normalize(xo, layout, mean, var, chk.eps, weight, bias, out, threads)
    if running_mean is not None:
        update_running(running_mean, running_var, mean, var, layout.count, chk.momentum)
    sd = stats_dtype(x.dtype)
    return y, mean.astype(sd), invstd.astype(sd)


def update_running(running_mean, running_var, mean, var, count, momentum) -> None:
    """The running-statistics update from float64 batch mean and biased variance."""
    kernels.update_running(
        _kernel_array(running_mean), _kernel_array(running_var), mean, var, count, momentum
    )


def running_invstd(running_var: np.ndarray, eps: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(running_var.astype(np.float64) + eps)


def forward_eval(x, chk: Checked, running_mean, running_var, weight, bias, out):
    """Normalize with the running statistics."""
    return _normalize(
        x, chk.layout, running_mean, running_var, chk.eps, weight, bias, out, _threads()
    )[0]


def backward(dy, x, chk: Checked, mean, invstd, weight, training: bool):
    """Gradients (dx, dweight, dbias); see the API contract for the formulas."""
    layout = chk.layout
    mean64 = mean.astype(np.float64)
    invstd64 = invstd.astype(np.float64)
    dy, x = _in_order(dy, layout), _in_order(x, layout)
    threads = _threads()
    small = _small(layout, threads)
    if not (small or _fuse(layout, 2 * x.itemsize, "backward", threads)):
        sums = local_grad_sums(dy, x, chk, mean64, threads)
        return grad_input(
            dy, x, chk, mean64, invstd64, weight, sums, layout.count, training, threads
        )
    c = layout.c
    ctype = stats_dtype(x.dtype)  # also the dtype of dweight and dbias
    dx, dxv = _output(None, x, layout)
    sums = np.empty((2, c))
    args = (
        _kernel_array(_view(dy, layout)), _kernel_array(_view(x, layout)), mean64, invstd64,
        as64(weight, c, 1.0), training, np.empty((5, c), ctype), sums,
    )
    if small:
        _kernel("backward_small", layout)(*args, _kernel_array(dxv))
    else:
        kernels.backward_channels(*args, _streamed(dxv, layout), _kernel_array(dxv))
    return dx, (sums[1] * invstd64).astype(ctype), sums[0].astype(ctype)


# --- the pieces ``numbabn.distributed`` assembles around its exchanges ---------------


def local_moments(x, chk: Checked) -> tuple[np.ndarray, np.ndarray]:
    """float64 (mean, sum of squared deviations) of this array's values (zeros if none)."""
    layout = chk.layout
    if layout.count == 0:
        return np.zeros(layout.c), np.zeros(layout.c)
    mean, var = _moments(_view(x, layout), layout, _threads())
    return mean, var * layout.count


def normalize_global(x, chk: Checked, mean, var, weight, bias, out):
    """Normalize with given float64 statistics (those of the whole distributed batch)."""
    return _normalize(x, chk.layout, mean, var, chk.eps, weight, bias, out, _threads())[0]


def local_grad_sums(dy, x, chk: Checked, mean, threads: int | None = None) -> np.ndarray:
    """float64 (sum dy, sum dy * (x - mean)) per channel, shape (2, C)."""
    layout = chk.layout
    if layout.count == 0:
        return np.zeros((2, layout.c))
    views = (_view(dy, layout), _view(x, layout))
    return _reduce("grad_sums", views, mean, layout, threads or _threads())


def grad_input(dy, x, chk: Checked, mean, invstd, weight, sums, count, training, threads=None):
    """(dx, dweight, dbias) from the sums over ``count`` values per channel
    (``threads``: the caller's :func:`_threads`, read here if not given)."""
    layout = chk.layout
    ctype = stats_dtype(x.dtype)
    dx, dxv = _output(None, x, layout)
    if layout.count * layout.c:
        params = grad_constants(mean, invstd, weight, sums, count, training, ctype)
        dyv = _view(dy, layout)
        threads = threads or _threads()
        if training:
            _elementwise("grad_input", (dyv, _view(x, layout)), params, dxv, layout, threads)
        else:
            _elementwise("normalize", (dyv,), params, dxv, layout, threads)
    return dx, (sums[1] * invstd).astype(ctype), sums[0].astype(ctype)


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
