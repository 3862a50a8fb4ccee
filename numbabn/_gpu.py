"""GPU backend: runs the kernels of ``_gpu_kernels`` on CUDA arrays. Twin of ``_cpu``.

Arguments arrive validated (``_validate``). This module views tensors as the kernels
want them (strided 3-D or 2-D views of the caller's memory, never a copy), sizes the
grids, allocates outputs on the device and returns them as the caller's kind of array
(CuPy in, CuPy out; a PyTorch tensor in, a tensor out; numba device arrays otherwise).
Nothing is copied to the host. Train forward and backward are two launches each;
eval forward is two (a C-thread kernel for the constants, then the elementwise pass).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
from numba import config, cuda

from . import _channel
from . import _gpu_kernels as K
from ._channel import grad_constants
from ._validate import Checked, Layout, describe, stats_dtype

_SIM = bool(config.ENABLE_CUDASIM)
_BLOCKS_PER_SM = 4
_lock = threading.Lock()
_scratch: dict = {}



# --- arrays ---------------------------------------------------------------------------


def _numba_array(a):
    """A numba device array over the same memory (no copy)."""
    if getattr(a, "__cuda_ndarray__", False) is True:
        return a
    if _SIM:
        return _simulator_array(a)
    return cuda.as_cuda_array(a)


def _simulator_array(a):
    """Under the CUDA simulator, "device" memory is host memory and there is no
    ``as_cuda_array``: wrap the memory that ``__cuda_array_interface__`` points to."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    info = describe(a, "array")
    pointer = a.__cuda_array_interface__["data"][0]
    extents = [(e - 1) * s for e, s in zip(info.shape, info.strides) if e > 0]
    low = sum(min(0, x) for x in extents)
    size = sum(max(0, x) for x in extents) - low + info.dtype.itemsize
    if len(extents) < len(info.shape):  # an empty array
        return FakeCUDAArray(np.empty(info.shape, info.dtype))
    memory = (ctypes.c_char * size).from_address(pointer + low)
    return FakeCUDAArray(
        np.ndarray(info.shape, info.dtype, buffer=memory, offset=-low, strides=info.strides)
    )


def _strided(a, shape, strides):
    """A view of ``a``'s memory with the given shape and byte strides."""
    base = _numba_array(a)
    if _SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = np.lib.stride_tricks.as_strided(base._ary, shape, strides)
        return FakeCUDAArray(host)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, strides, base.dtype, gpu_data=base.gpu_data)


def _merge(shape, strides):
    """(extent, stride) of several axes walked as one, or None if they cannot be."""
    extent, stride = 1, 0
    for e, s in reversed(list(zip(shape, strides))):
        if e == 1:
            continue
        if extent == 1:
            extent, stride = e, s
        elif s == stride * extent:
            extent *= e
        else:
            return None
    return extent, stride


def _view_geometry(info, layout: Layout):
    """(shape, strides) of the kernel view of an array, or None if it has none."""
    ax = layout.axis
    c_stride = info.strides[ax]
    if layout.kind == "ncl":
        pre = _merge(info.shape[:ax], info.strides[:ax])
        post = _merge(info.shape[ax + 1 :], info.strides[ax + 1 :])
        if pre is None or post is None:
            return None
        return (layout.n, layout.c, layout.l), (pre[1], c_stride, post[1])
    rest = _merge(info.shape[:ax] + info.shape[ax + 1 :], info.strides[:ax] + info.strides[ax + 1 :])
    if rest is None:
        return None
    return (layout.n, layout.c), (rest[1], c_stride)


def _view(a, name, layout: Layout):
    """The kernel view of an array whose strides allow one (see ``_view_geometry``)."""
    return _strided(a, *_view_geometry(describe(a, name), layout))


def _input_view(a, name, layout: Layout, stream):
    """The kernel view of an input; if its strides cannot be walked as (N, C, L) or
    (M, C), the view of a device copy in the layout's memory order."""
    geometry = _view_geometry(describe(a, name), layout)
    if geometry is not None:
        return _strided(a, *geometry)
    tmp = _empty(layout, describe(a, name).dtype, stream)
    _copy(_numba_array(a), tmp, stream)
    return _view(tmp, name, layout)


def _output_view(out, layout: Layout, dtype, stream):
    """(kernel view to write, array to copy it into afterwards or None) for ``out``."""
    geometry = _view_geometry(describe(out, "out"), layout)
    if geometry is not None:
        return _strided(out, *geometry), None
    tmp = _empty(layout, dtype, stream)
    return _view(tmp, "out", layout), tmp


def _compress(shape, *strides):
    """Drop axes of extent 1 and merge neighbours that every stride set walks as one."""
    axes = [(e, *st) for e, *st in zip(shape, *strides) if e != 1]
    merged = []
    for e, *st in axes:
        if merged and all(p == q * e for p, q in zip(merged[-1][1:], st)):
            last = merged.pop()
            merged.append((last[0] * e, *st))
        else:
            merged.append((e, *st))
    return merged


def _copy(src, dst, stream) -> None:
    """dst[...] = src[...] on the device, any strides (numba device arrays)."""
    axes = _compress(src.shape, src.strides, dst.strides)
    if len(axes) > 4:  # rare: peel the leading axis
        for i in range(src.shape[0]):
            _copy(src[i], dst[i], stream)
        return
    axes = [(1, 0, 0)] * (4 - len(axes)) + axes
    shape = tuple(a[0] for a in axes)
    total = 1
    for e in shape:
        total *= e
    if total == 0:
        return
    blocks = max(1, min(-(-total // K.BLOCK), 65535))
    K.copy_4d[blocks, K.BLOCK, stream](
        _strided(src, shape, tuple(a[1] for a in axes)),
        _strided(dst, shape, tuple(a[2] for a in axes)),
    )


def _empty(layout: Layout, dtype, stream):
    """A device array in the memory order of the layout (channels-last stays so)."""
    shape = layout.shape
    if layout.kind == "ncl":
        return cuda.device_array(shape, dtype, stream=stream)
    ax = layout.axis
    moved = shape[:ax] + shape[ax + 1 :] + (shape[ax],)
    base = cuda.device_array(moved, dtype, stream=stream)
    order = list(range(len(shape) - 1))
    order.insert(ax, len(shape) - 1)
    strides = tuple(base.strides[i] for i in order)
    return _strided(base, shape, strides)


def _like(template, arr):
    """Return ``arr`` as the same kind of array as ``template`` (zero copy)."""
    module = type(template).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy.asarray(arr)
    if module == "torch":
        import torch

        return torch.as_tensor(arr, device=template.device)
    return arr


def _vector(a):
    """A per-channel argument for a kernel; an absent one becomes a placeholder (its
    flag bit tells the kernel not to read it)."""
    if a is not None:
        return _numba_array(a)
    with _lock:
        if "placeholder" not in _scratch:
            _scratch["placeholder"] = cuda.device_array(1, np.float32)
        return _scratch["placeholder"]


def _counters_and_partials(c, nblocks, stream):
    """Per-stream scratch: zeroed int32 counters (kernels leave them zero) and a
    (c, nblocks, 2) partials view; views are kept, as making one costs a few tens of
    microseconds."""
    key = (id(stream), "scratch")
    with _lock:
        counters, part, views = _scratch.get(key, (None, None, {}))
        if counters is None or counters.shape[0] < c:
            counters = cuda.to_device(np.zeros(max(c, 64), np.int32), stream=stream)
        if part is None or part.size < c * nblocks * 2:
            part = cuda.device_array(max(c * nblocks * 2, 1024), np.float64, stream=stream)
            views = {}
        view = views.get((c, nblocks))
        if view is None:
            view = views[(c, nblocks)] = part[: c * nblocks * 2].reshape(c, nblocks, 2)
        _scratch[key] = (counters, part, views)
    return counters, view


def _sm_count():
    """Multiprocessors of the device, read once (it only sizes grids)."""
    count = _scratch.get("sm_count")
    if count is None:
        dev = cuda.get_current_device()
        count = _scratch["sm_count"] = getattr(dev, "MULTIPROCESSOR_COUNT", 1) or 1
    return count


def _stream(stream):
    return cuda.default_stream() if stream is None else stream


# --- grids ----------------------------------------------------------------------------


def _reduce_grid(layout: Layout):
    """(grid, block) of a reduction: S blocks per channel (or per channel tile)."""
    target = _BLOCKS_PER_SM * _sm_count()
    if layout.kind == "ncl":
        work = max(1, layout.n * layout.l // K.SEGMENT)
        s = max(1, min(-(-target // layout.c), work, 65535))
        return (layout.c, s), K.BLOCK
    tiles = -(-layout.c // K.TX)
    s = max(1, min(-(-target // tiles), -(-layout.n // K.TY), 65535))
    return (tiles, s), (K.TX, K.TY)


def _elementwise_grid(layout: Layout):
    if layout.kind == "ncl":
        segs = -(-layout.l // K.SEGMENT)
        s = max(1, min(layout.n * segs, 65535))
        return (layout.c, s), K.BLOCK
    tiles = -(-layout.c // K.TX)
    s = max(1, min(-(-layout.n // (K.TY * 4)), 65535))
    return (tiles, s), (K.TX, K.TY)


# --- operations -----------------------------------------------------------------------


def _flags(weight=None, bias=None, update=False, training=False):
    return (
        (K.HAS_WEIGHT if weight is not None else 0)
        | (K.HAS_BIAS if bias is not None else 0)
        | (K.UPDATE_RUNNING if update else 0)
        | (K.TRAINING if training else 0)
    )


def _chan(c, dtype, stream, chan_dtype=None):
    """The packed per-channel array of an operation (rows: see ``_gpu_kernels``), by
    default in the statistics dtype of data of ``dtype``."""
    return cuda.device_array((K.ROWS, c), chan_dtype or stats_dtype(dtype), stream=stream)


def _stats(x, chk: Checked, weight, bias, running_mean, running_var, stream, chan_dtype=None):
    """Launch the statistics kernel; returns (chan, the kernel view of x)."""
    layout = chk.layout
    xv = _input_view(x, "x", layout, stream)
    grid, block = _reduce_grid(layout)
    counters, part = _counters_and_partials(layout.c, grid[1], stream)
    chan = _chan(layout.c, xv.dtype, stream, chan_dtype)
    flags = _flags(weight, bias, update=running_mean is not None)
    kernel = K.stats_ncl if layout.kind == "ncl" else K.stats_mc
    # batch_stats has no eps (0); any positive value keeps its unused invstd finite.
    eps = chk.eps if chk.eps > 0 else 1.0
    kernel[grid, block, stream](
        xv, *(_vector(a) for a in (weight, bias, running_mean, running_var)), flags, eps,
        chk.momentum, part, counters, chan,
    )
    return chan, xv


def _elementwise(kernel_name, inputs, layout: Layout, chan, out, like, stream):
    """Launch an elementwise kernel into ``out`` (or a fresh array of ``like``'s kind)."""
    dtype = inputs[0].dtype
    if out is not None:
        view, tmp = _output_view(out, layout, dtype, stream)
        result = out
    else:
        tmp = None
        y = _empty(layout, dtype, stream)
        view = _view(y, "y", layout)
        result = _like(like, y)
    grid, block = _elementwise_grid(layout)
    kernel = getattr(K, f"{kernel_name}_{layout.kind}")
    kernel[grid, block, stream](*inputs, chan, chan.dtype.type(0), view)
    if tmp is not None:
        _copy(tmp, _numba_array(out), stream)
    return result


def batch_stats(x, chk: Checked, stream=None):
    """Per-channel mean and biased variance."""
    chan, _ = _stats(x, chk, None, None, None, None, _stream(stream))
    return _like(x, chan[0]), _like(x, chan[1])


def forward_train(x, chk: Checked, weight, bias, running_mean, running_var, out, stream=None):
    """Normalize with batch statistics; update running statistics if given."""
    stream = _stream(stream)
    chan, xv = _stats(x, chk, weight, bias, running_mean, running_var, stream)
    y = _elementwise("normalize", (xv,), chk.layout, chan, out, x, stream)
    return y, _like(x, chan[0]), _like(x, chan[2])


def forward_eval(x, chk: Checked, running_mean, running_var, weight, bias, out, stream=None):
    """Normalize with the running statistics."""
    layout = chk.layout
    stream = _stream(stream)
    if layout.count * layout.c == 0:
        return out if out is not None else _like(x, _empty(layout, describe(x, "x").dtype, stream))
    xv = _input_view(x, "x", layout, stream)
    chan = _eval_constants(running_mean, running_var, weight, bias, chk.eps, xv.dtype, stream)
    return _elementwise("normalize", (xv,), layout, chan, out, x, stream)


def _eval_constants(running_mean, running_var, weight, bias, eps, dtype, stream):
    c = describe(running_mean, "running_mean").shape[0]
    chan = _chan(c, dtype, stream)
    blocks = -(-c // K.BLOCK)
    K.eval_params[blocks, K.BLOCK, stream](
        *(_vector(a) for a in (running_mean, running_var, weight, bias)), _flags(weight, bias),
        eps, chan,
    )
    return chan


def running_invstd(running_var, eps: float, stream=None):
    """1 / sqrt(running_var + eps) on the device (stats dtype of running_var)."""
    rv = _numba_array(running_var)
    chan = _eval_constants(rv, rv, None, None, eps, rv.dtype, _stream(stream))
    return _like(running_var, chan[1])


def _grad_sums(dy, x, chk: Checked, mean, invstd, weight, training, stream, chan_dtype=None):
    """Launch the gradient reduction; returns (chan: rows dweight, dbias and the dx
    constants; the kernel views of dy and x)."""
    layout = chk.layout
    xv = _input_view(x, "x", layout, stream)
    dyv = _input_view(dy, "dy", layout, stream)
    grid, block = _reduce_grid(layout)
    counters, part = _counters_and_partials(layout.c, grid[1], stream)
    chan = _chan(layout.c, xv.dtype, stream, chan_dtype)
    kernel = K.grad_sums_ncl if layout.kind == "ncl" else K.grad_sums_mc
    kernel[grid, block, stream](
        dyv, xv, *(_vector(a) for a in (mean, invstd, weight)), _flags(weight, training=training),
        part, counters, chan,
    )
    return chan, dyv, xv


def _grad_elementwise(dyv, xv, layout: Layout, chan, training, like, stream):
    """dx from the packed constants: the gradient kernel, or in eval mode dy * k1."""
    if training:
        return _elementwise("grad_input", (dyv, xv), layout, chan, None, like, stream)
    return _elementwise("normalize", (dyv,), layout, chan, None, like, stream)


def backward(dy, x, chk: Checked, mean, invstd, weight, training: bool, stream=None):
    """Gradients (dx, dweight, dbias)."""
    stream = _stream(stream)
    chan, dyv, xv = _grad_sums(dy, x, chk, mean, invstd, weight, training, stream)
    dx = _grad_elementwise(dyv, xv, chk.layout, chan, training, x, stream)
    return dx, _like(x, chan[0]), _like(x, chan[1])


# --- the pieces ``numbabn.distributed`` assembles around its exchanges ---------------
# Per-channel vectors are staged through host memory: they are C values each.


def _host(a):
    return None if a is None else _numba_array(a).copy_to_host()


def to_host(a) -> np.ndarray:
    """A per-channel device vector as float64 NumPy."""
    return _host(a).astype(np.float64)


def from_host(a: np.ndarray, like):
    """A host per-channel vector on the device, as the kind of array ``like`` is."""
    return _like(like, cuda.to_device(a))


def local_moments(x, chk: Checked, stream=None):
    """float64 (mean, sum of squared deviations) of this array's values, on the host."""
    layout = chk.layout
    if layout.count == 0:
        return np.zeros(layout.c), np.zeros(layout.c)
    chan, _ = _stats(x, chk, None, None, None, None, _stream(stream), np.float64)
    mean, var = chan.copy_to_host()[:2]
    return mean, var * layout.count


def normalize_global(x, chk: Checked, mean, var, weight, bias, out, stream=None):
    """Normalize with given float64 host statistics (those of the whole batch)."""
    return forward_eval(x, chk, cuda.to_device(mean), cuda.to_device(var), weight, bias, out, stream)


def update_running(running_mean, running_var, mean, var, count, momentum):
    """The running-statistics update of ``_channel``, staged through the host."""
    rm, rv = _host(running_mean), _host(running_var)
    _channel.update_running(rm, rv, mean, var, count, momentum)
    _numba_array(running_mean).copy_to_device(rm)
    _numba_array(running_var).copy_to_device(rv)


def local_grad_sums(dy, x, chk: Checked, mean, stream=None):
    """float64 (sum dy, sum dy * (x - mean)) per channel on the host, shape (2, C)."""
    layout = chk.layout
    if layout.count == 0:
        return np.zeros((2, layout.c))
    ones = cuda.to_device(np.ones(layout.c))  # dweight = sum dy * (x - mean) * 1
    chan, _, _ = _grad_sums(dy, x, chk, cuda.to_device(mean), ones, None, True, _stream(stream), np.float64)
    dweight, dbias = chan.copy_to_host()[:2]
    return np.stack([dbias, dweight])


def grad_input(dy, x, chk: Checked, mean, invstd, weight, sums, count, training, stream=None):
    """(dx, dweight, dbias) from host sums over ``count`` values per channel."""
    layout = chk.layout
    stream = _stream(stream)
    sd = stats_dtype(describe(x, "x").dtype)
    if layout.count * layout.c:
        chan = np.zeros((K.ROWS, layout.c), sd)
        chan[K.HI :] = grad_constants(mean, invstd, _host(weight), sums, count, training, sd)
        dx = _grad_elementwise(
            _input_view(dy, "dy", layout, stream), _input_view(x, "x", layout, stream), layout,
            cuda.to_device(chan, stream=stream), training, x, stream,
        )
    else:
        dx = _like(x, _empty(layout, describe(x, "x").dtype, stream))
    dweight = cuda.to_device((sums[1] * invstd).astype(sd), stream=stream)
    dbias = cuda.to_device(sums[0].astype(sd), stream=stream)
    return dx, _like(x, dweight), _like(x, dbias)


def copy(a):
    """A device copy of a per-channel vector."""
    src = _numba_array(a)
    dst = cuda.device_array(src.shape, src.dtype)
    dst.copy_to_device(src)
    return _like(a, dst)


def from_other_side(a):
    """A device copy of a host array (used when a layer follows its input to the GPU)."""
    return cuda.to_device(np.ascontiguousarray(a))

