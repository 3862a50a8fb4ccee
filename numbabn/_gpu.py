"""GPU backend: runs the kernels of ``_gpu_kernels`` on CUDA arrays. Twin of ``_cpu``.

Arguments arrive validated (``_validate``). This module views tensors as the kernels
want them (strided 3-D or 2-D views of the caller's memory, never a copy), sizes the
grids, allocates outputs on the device and returns them as the caller's kind of array
(CuPy in, CuPy out; a PyTorch tensor in, a tensor out; numba device arrays otherwise).
Nothing is copied to the host. Train forward and backward are two launches each;
eval forward is two (a C-thread kernel for the constants, then the elementwise pass).
"""

from __future__ import annotations

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
    return cuda.as_cuda_array(a)


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
    geometry = _view_geometry(describe(a, name), layout)
    if geometry is None:
        raise ValueError(
            f"{name}'s strides cannot be walked as (N, C, L) or (M, C) without a copy; "
            "pass a contiguous CUDA array"
        )
    return _strided(a, *geometry)


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
    """Per-stream scratch: zeroed int32 counters (kernels leave them zero) and partials."""
    key = (id(stream), "scratch")
    with _lock:
        counters, part = _scratch.get(key, (None, None))
        if counters is None or counters.shape[0] < c:
            counters = cuda.to_device(np.zeros(max(c, 64), np.int32), stream=stream)
        if part is None or part.size < c * nblocks * 2:
            part = cuda.device_array(max(c * nblocks * 2, 1024), np.float64, stream=stream)
        _scratch[key] = (counters, part)
    return counters, part[: c * nblocks * 2].reshape(c, nblocks, 2)


def _sm_count():
    dev = cuda.get_current_device()
    return getattr(dev, "MULTIPROCESSOR_COUNT", 1) or 1


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


def _constants(c, st_rows, dtype, stream, st_dtype=None):
    """Per-channel outputs of a finishing step: ``st`` (statistics, in ``st_dtype``) and
    ``pc`` (elementwise constants), by default both in the statistics dtype of ``dtype``."""
    sd = stats_dtype(dtype)
    st = cuda.device_array((st_rows, c), st_dtype or sd, stream=stream)
    return st, cuda.device_array((5, c), sd, stream=stream)


def _stats(x, chk: Checked, weight, bias, running_mean, running_var, stream, st_dtype=None):
    """Launch the statistics kernel; returns (st rows mean/var/invstd, pc constants, view)."""
    layout = chk.layout
    stream = _stream(stream)
    xv = _view(x, "x", layout)
    grid, block = _reduce_grid(layout)
    counters, part = _counters_and_partials(layout.c, grid[1], stream)
    st, pc = _constants(layout.c, 3, xv.dtype, stream, st_dtype)
    flags = _flags(weight, bias, update=running_mean is not None)
    kernel = K.stats_ncl if layout.kind == "ncl" else K.stats_mc
    # batch_stats has no eps (0); any positive value keeps its unused invstd finite.
    eps = chk.eps if chk.eps > 0 else 1.0
    kernel[grid, block, stream](
        xv, *(_vector(a) for a in (weight, bias, running_mean, running_var)), flags, eps,
        chk.momentum, part, counters, st, pc,
    )
    return st, pc, xv, stream


def _normalize(x, xv, layout: Layout, pc, out, stream):
    if out is not None:
        yv = _view(out, "out", layout)
        result = out
    else:
        y = _empty(layout, xv.dtype, stream)
        yv = _view(y, "y", layout)
        result = _like(x, y)
    grid, block = _elementwise_grid(layout)
    kernel = K.normalize_ncl if layout.kind == "ncl" else K.normalize_mc
    kernel[grid, block, stream](xv, pc, pc.dtype.type(0), yv)
    return result


def batch_stats(x, chk: Checked, stream=None):
    """Per-channel mean and biased variance."""
    st, _, _, _ = _stats(x, chk, None, None, None, None, stream)
    return _like(x, st[0]), _like(x, st[1])


def forward_train(x, chk: Checked, weight, bias, running_mean, running_var, out, stream=None):
    """Normalize with batch statistics; update running statistics if given."""
    st, pc, xv, stream = _stats(x, chk, weight, bias, running_mean, running_var, stream)
    y = _normalize(x, xv, chk.layout, pc, out, stream)
    return y, _like(x, st[0]), _like(x, st[2])


def forward_eval(x, chk: Checked, running_mean, running_var, weight, bias, out, stream=None):
    """Normalize with the running statistics."""
    layout = chk.layout
    stream = _stream(stream)
    if layout.count * layout.c == 0:
        return out if out is not None else _like(x, _empty(layout, describe(x, "x").dtype, stream))
    xv = _view(x, "x", layout)
    st, pc = _eval_constants(running_mean, running_var, weight, bias, chk.eps, xv.dtype, stream)
    return _normalize(x, xv, layout, pc, out, stream)


def _eval_constants(running_mean, running_var, weight, bias, eps, dtype, stream):
    c = describe(running_mean, "running_mean").shape[0]
    st, pc = _constants(c, 2, dtype, stream)
    blocks = -(-c // K.BLOCK)
    K.eval_params[blocks, K.BLOCK, stream](
        *(_vector(a) for a in (running_mean, running_var, weight, bias)), _flags(weight, bias),
        eps, st, pc,
    )
    return st, pc


def running_invstd(running_var, eps: float, stream=None):
    """1 / sqrt(running_var + eps) on the device (stats dtype of running_var)."""
    rv = _numba_array(running_var)
    st, _ = _eval_constants(rv, rv, None, None, eps, rv.dtype, _stream(stream))
    return _like(running_var, st[1])


def _grad_sums(dy, x, chk: Checked, mean, invstd, weight, training, stream, st_dtype=None):
    """Launch the gradient reduction; st rows (dweight, dbias), pc the dx constants."""
    layout = chk.layout
    xv = _view(x, "x", layout)
    dyv = _view(dy, "dy", layout)
    grid, block = _reduce_grid(layout)
    counters, part = _counters_and_partials(layout.c, grid[1], stream)
    st, pc = _constants(layout.c, 2, xv.dtype, stream, st_dtype)
    kernel = K.grad_sums_ncl if layout.kind == "ncl" else K.grad_sums_mc
    kernel[grid, block, stream](
        dyv, xv, *(_vector(a) for a in (mean, invstd, weight)), _flags(weight, training=training),
        part, counters, st, pc,
    )
    return st, pc, dyv, xv


def _grad_elementwise(dyv, xv, layout: Layout, pc, training, stream):
    dx = _empty(layout, xv.dtype, stream)
    dxv = _view(dx, "dx", layout)
    egrid, eblock = _elementwise_grid(layout)
    ct = pc.dtype.type(0)
    if training:
        kernel = K.grad_input_ncl if layout.kind == "ncl" else K.grad_input_mc
        kernel[egrid, eblock, stream](dyv, xv, pc, ct, dxv)
    else:
        kernel = K.normalize_ncl if layout.kind == "ncl" else K.normalize_mc
        kernel[egrid, eblock, stream](dyv, pc, ct, dxv)
    return dx


def backward(dy, x, chk: Checked, mean, invstd, weight, training: bool, stream=None):
    """Gradients (dx, dweight, dbias)."""
    stream = _stream(stream)
    st, pc, dyv, xv = _grad_sums(dy, x, chk, mean, invstd, weight, training, stream)
    dx = _grad_elementwise(dyv, xv, chk.layout, pc, training, stream)
    return _like(x, dx), _like(x, st[0]), _like(x, st[1])


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
    st, _, _, _ = _stats(x, chk, None, None, None, None, _stream(stream), np.float64)
    mean, var, _ = st.copy_to_host()
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
    st, _, _, _ = _grad_sums(dy, x, chk, cuda.to_device(mean), ones, None, True, _stream(stream), np.float64)
    dweight, dbias = st.copy_to_host()
    return np.stack([dbias, dweight])


def grad_input(dy, x, chk: Checked, mean, invstd, weight, sums, count, training, stream=None):
    """(dx, dweight, dbias) from host sums over ``count`` values per channel."""
    layout = chk.layout
    stream = _stream(stream)
    sd = stats_dtype(describe(x, "x").dtype)
    if layout.count * layout.c:
        pc = grad_constants(mean, invstd, _host(weight), sums, count, training, sd)
        dx = _grad_elementwise(_view(dy, "dy", layout), _view(x, "x", layout), layout,
                               cuda.to_device(pc, stream=stream), training, stream)
    else:
        dx = _empty(layout, describe(x, "x").dtype, stream)
    dweight = cuda.to_device((sums[1] * invstd).astype(sd), stream=stream)
    dbias = cuda.to_device(sums[0].astype(sd), stream=stream)
    return _like(x, dx), _like(x, dweight), _like(x, dbias)


def copy(a):
    """A device copy of a per-channel vector."""
    src = _numba_array(a)
    dst = cuda.device_array(src.shape, src.dtype)
    dst.copy_to_device(src)
    return _like(a, dst)


def from_other_side(a):
    """A device copy of a host array (used when a layer follows its input to the GPU)."""
    return cuda.to_device(np.ascontiguousarray(a))

