"""GPU backend: runs the kernels of ``_gpu_kernels`` on CUDA arrays. Twin of ``_cpu``.

Arguments arrive validated (``_validate``). This module sizes the grids, keeps the
per-stream scratch, launches the kernels on the views ``_gpu_arrays`` makes, and
returns results as the caller's kind of array (CuPy in, CuPy out; a PyTorch tensor
in, a tensor out; numba device arrays otherwise). Nothing is copied to the host.
Train forward and backward are two launches each; eval forward is two (a C-thread
kernel for the constants, then the elementwise pass).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from numba import cuda

from . import _channel
from . import _gpu_kernels as K
from ._alias import overlaps, same_view
from ._channel import grad_constants
from ._gpu_arrays import (
    allocate,
    as_kind_of,
    as_result,
    copy_strided,
    empty,
    input_view,
    kernel_args,
    kernel_view,
    numba_array,
    operands,
    output_view,
)
from ._gpu_launch import launcher, numba_stream
from ._gpu_reduce import eval_params
from ._validate import Checked, Layout, describe, stats_dtype

# Reduction blocks per SM. H100, float32, 32x64x56x56 and 256x256x14x14, both layouts:
# 4 gave the fastest forward (41-69 us) and a backward within 10% of the best; 8 was
# 10-25% slower, 16 slower still (more partials, more blocks contending).
_BLOCKS_PER_SM = 4
# Streams whose reduction scratch is kept (the least recently used one's is dropped).
_SCRATCH_STREAMS = 8
_lock = threading.Lock()
_scratch: dict = {}
_per_stream: OrderedDict = OrderedDict()


def _vector(a):
    """A per-channel argument for a kernel; an absent one becomes a placeholder (its
    flag bit tells the kernel not to read it)."""
    if a is not None:
        return numba_array(a)
    with _lock:
        if "placeholder" not in _scratch:
            _scratch["placeholder"] = cuda.device_array(1, np.float32)
        return _scratch["placeholder"]


def _stream_key(stream):
    """A stream's CUDA handle (not the Python object's id, which a new object may reuse
    while the old stream lives on in CUDA)."""
    try:
        return int(stream)
    except TypeError:  # the simulator's streams
        return id(stream)


def _counters_and_partials(c, nblocks, stream):
    """Per-stream scratch: zeroed int32 counters (kernels leave them zero) and a
    (c, nblocks, 2) partials view; views are kept, as making one costs a few tens of
    microseconds. Kept for the ``_SCRATCH_STREAMS`` streams used last."""
    key = _stream_key(stream)
    with _lock:
        counters, part, views = _per_stream.pop(key, (None, None, {}))
        if counters is None or counters.shape[0] < c:
            counters = cuda.to_device(np.zeros(max(c, 64), np.int32), stream=stream)
        if part is None or part.size < c * nblocks * 2:
            part = cuda.device_array(max(c * nblocks * 2, 1024), np.float64, stream=stream)
            views = {}
        view = views.get((c, nblocks))
        if view is None:
            view = views[(c, nblocks)] = part[: c * nblocks * 2].reshape(c, nblocks, 2)
        _per_stream[key] = (counters, part, views)
        while len(_per_stream) > _SCRATCH_STREAMS:
            _per_stream.popitem(last=False)
    return counters, view


def _sm_count():
    """Multiprocessors of the device, read once (it only sizes grids)."""
    count = _scratch.get("sm_count")
    if count is None:
        dev = cuda.get_current_device()
        count = _scratch["sm_count"] = getattr(dev, "MULTIPROCESSOR_COUNT", 1) or 1
    return count


# --- grids ----------------------------------------------------------------------------


def _reduce_grid(layout: Layout):
    """(grid, block) of a reduction: S blocks per channel (or per channel tile), enough
    to fill the GPU, none with less than a few loads per thread."""
    target = _BLOCKS_PER_SM * _sm_count()
    if layout.kind == "ncl":
        work = max(1, layout.n * layout.l // K.MIN_SPAN)
        s = max(1, min(-(-target // layout.c), work, 65535))
        return (layout.c, s), K.BLOCK
    tiles = -(-layout.c // K.TX)
    s = max(1, min(-(-target // tiles), -(-layout.n // (K.TY * K.U)), 65535))
    return (tiles, s), (K.TX, K.TY)


def _elementwise_grid(layout: Layout):
    """(grid, block) of an elementwise pass: NCL blocks take MIN_SPAN values of a
    channel, MC blocks chunks of TY * U rows."""
    if layout.kind == "ncl":
        s = max(1, min(-(-layout.n * layout.l // K.MIN_SPAN), 65535))
        return (layout.c, s), K.BLOCK
    tiles = -(-layout.c // K.TX)
    s = max(1, min(-(-layout.n // (K.TY * K.U)), 65535))
    return (tiles, s), (K.TX, K.TY)


# --- operations -----------------------------------------------------------------------


def _flags(weight=None, bias=None, update=False, training=False):
    return (
        (K.HAS_WEIGHT if weight is not None else 0)
        | (K.HAS_BIAS if bias is not None else 0)
        | (K.UPDATE_RUNNING if update else 0)
        | (K.TRAINING if training else 0)
    )


def _chan(c, dtype, stream, like=None, chan_dtype=None):
    """The packed per-channel array of an operation (rows: see ``_gpu_kernels``), by
    default in the statistics dtype of data of ``dtype``, as (an array of ``like``'s
    kind whose rows are returned, the numba view the kernels take)."""
    sd = np.dtype(chan_dtype or stats_dtype(dtype))
    return allocate((K.ROWS, c), (c * sd.itemsize, sd.itemsize), sd, like, stream)


def _stats(x, chk: Checked, weight, bias, running_mean, running_var, stream, like=None,
           chan_dtype=None):
    """Launch the statistics kernel; returns (chan, as ``allocate`` gives it, the
    kernel view of x)."""
    layout = chk.layout
    xv = input_view(x, "x", layout, stream, chk.alias)
    grid, block = _reduce_grid(layout)
    counters, partials = _counters_and_partials(layout.c, grid[1], stream)
    fresh = _chan(layout.c, xv.dtype, stream, like, chan_dtype)
    chan = fresh[1]
    flags = _flags(weight, bias, update=running_mean is not None)
    kernel = K.stats_ncl if layout.kind == "ncl" else K.stats_mc
    # batch_stats has no eps (0); any positive value keeps its unused invstd finite.
    eps = chk.eps if chk.eps > 0 else 1.0
    vectors = (_vector(weight), _vector(bias), _vector(running_mean), _vector(running_var))
    launcher(kernel, grid, block, stream)(
        *kernel_args((xv,), layout), *vectors, flags, eps, chk.momentum, partials, counters, chan,
    )
    return fresh, xv


def _elementwise(kernel_name, inputs, layout: Layout, chan, out, like, stream, *mode):
    """Launch an elementwise kernel into ``out`` (or a fresh array, ``like``'s kind);
    ``mode``: the epilogue kernel's mode bits."""
    dtype = inputs[0].dtype
    if out is not None:
        target, tmp = output_view(out, layout, dtype, stream)
        result = out
    else:
        tmp = None
        fresh = empty(layout, dtype, stream, like)
        target = kernel_view(fresh[1], "y", layout)
        result = as_result(fresh, like)
    grid, block = _elementwise_grid(layout)
    kernel = getattr(K, f"{kernel_name}_{layout.kind}")
    launcher(kernel, grid, block, stream)(
        *kernel_args(inputs, layout), chan, chan.dtype.type(0), *operands(target, layout), *mode
    )
    if tmp is not None:
        copy_strided(tmp, numba_array(out), stream)
    return result


def _nothing(x, layout: Layout, out, stream):
    """The result of an elementwise pass over a tensor with no values (N or C is 0)."""
    return out if out is not None else as_result(empty(layout, describe(x, "x").dtype, stream, x), x)


def batch_stats(x, chk: Checked, stream=None):
    """Per-channel mean and biased variance."""
    if chk.layout.c == 0:
        fresh = _chan(0, describe(x, "x").dtype, numba_stream(stream), x)
        return as_result(fresh, x, 0), as_result(fresh, x, 1)
    fresh, _ = _stats(x, chk, None, None, None, None, numba_stream(stream), x)
    return as_result(fresh, x, 0), as_result(fresh, x, 1)


def _normalize(xv, layout, chan, out, like, stream, residual, relu):
    """The normalize pass, with the epilogue when there is one: the residual read from
    a copy when ``out`` overlaps it other than as itself."""
    if residual is None and not relu:
        return _elementwise("normalize", (xv,), layout, chan, out, like, stream)
    mode = K.RELU if relu else 0
    ev = xv
    if residual is not None:
        mode |= K.RESIDUAL
        alias = out is not None and overlaps(out, residual) and not same_view(out, residual)
        ev = input_view(residual, "residual", layout, stream, alias)
    return _elementwise("epilogue", (xv, ev), layout, chan, out, like, stream, mode)


def forward_train(x, chk: Checked, weight, bias, running_mean, running_var, out, stream=None,
                  residual=None, relu=False):
    """Normalize with batch statistics, then the epilogue; update running statistics
    if given."""
    stream = numba_stream(stream)
    if chk.layout.c == 0:  # (training needs 2 values in each channel there is)
        fresh = _chan(0, describe(x, "x").dtype, stream, x)
        return _nothing(x, chk.layout, out, stream), as_result(fresh, x, 0), as_result(fresh, x, 2)
    fresh, xv = _stats(x, chk, weight, bias, running_mean, running_var, stream, x)
    y = _normalize(xv, chk.layout, fresh[1], out, x, stream, residual, relu)
    return y, as_result(fresh, x, 0), as_result(fresh, x, 2)


def forward_eval(x, chk: Checked, running_mean, running_var, weight, bias, out, stream=None,
                 residual=None, relu=False):
    """Normalize with the running statistics, then the epilogue."""
    layout = chk.layout
    stream = numba_stream(stream)
    if layout.count * layout.c == 0:
        return _nothing(x, layout, out, stream)
    xv = input_view(x, "x", layout, stream, chk.alias)
    chan = _eval_constants(running_mean, running_var, weight, bias, chk.eps, xv.dtype, stream, x)[1]
    return _normalize(xv, layout, chan, out, x, stream, residual, relu)


def _eval_constants(running_mean, running_var, weight, bias, eps, dtype, stream, like):
    c = describe(running_mean, "running_mean").shape[0]
    fresh = _chan(c, dtype, stream, like)
    chan = fresh[1]
    blocks = -(-c // K.BLOCK)
    launcher(eval_params, blocks, K.BLOCK, stream)(
        *[_vector(a) for a in (running_mean, running_var, weight, bias)], _flags(weight, bias),
        eps, chan,
    )
    return fresh


def running_invstd(running_var, eps: float, stream=None):
    """1 / sqrt(running_var + eps) on the device (stats dtype of running_var)."""
    rv = numba_array(running_var)
    fresh = _eval_constants(rv, rv, None, None, eps, rv.dtype, numba_stream(stream), running_var)
    return as_result(fresh, running_var, 1)


def _grad_sums(dyv, xv, layout: Layout, mean, invstd, weight, training, stream, like=None,
               chan_dtype=None, yv=None, drv=None):
    """Launch the gradient reduction over the kernel views of dy and x; returns chan, as
    ``allocate`` gives it (rows dweight, dbias and the dx constants). With ``yv``, of
    the gradient through the ReLU whose output it is; ``drv`` receives that gradient
    (dy itself without ``yv``)."""
    grid, block = _reduce_grid(layout)
    counters, partials = _counters_and_partials(layout.c, grid[1], stream)
    fresh = _chan(layout.c, xv.dtype, stream, like, chan_dtype)
    tail = (*[_vector(a) for a in (mean, invstd, weight)], _flags(weight, training=training),
            partials, counters, fresh[1])
    if yv is None and drv is None:
        kernel = K.grad_sums_ncl if layout.kind == "ncl" else K.grad_sums_mc
        launcher(kernel, grid, block, stream)(*kernel_args((dyv, xv), layout), *tail)
        return fresh
    mode = (0 if yv is None else K.MASKED) | (0 if drv is None else K.WRITE)
    views = (dyv, xv, dyv if yv is None else yv, dyv if drv is None else drv)
    kernel = K.grad_sums_relu_ncl if layout.kind == "ncl" else K.grad_sums_relu_mc
    launcher(kernel, grid, block, stream)(*kernel_args(views, layout), *tail, mode)
    return fresh


def _grad_elementwise(dyv, xv, layout: Layout, chan, training, like, stream, yv=None):
    """dx from the packed constants: the gradient kernel, or in eval mode dy * k1; of
    the gradient through the ReLU whose output ``yv`` is, if given."""
    if yv is not None:
        if training:
            return _elementwise("grad_input_relu", (dyv, xv, yv), layout, chan, None, like, stream)
        return _elementwise("epilogue", (dyv, yv), layout, chan, None, like, stream, K.MASKED)
    if training:
        return _elementwise("grad_input", (dyv, xv), layout, chan, None, like, stream)
    return _elementwise("normalize", (dyv,), layout, chan, None, like, stream)


def backward(dy, x, chk: Checked, mean, invstd, weight, training: bool, stream=None,
             y=None, residual_grad=False):
    """Gradients (dx, dweight, dbias), through the ReLU whose output is ``y`` if given;
    ``residual_grad``: and dresidual, the gradient through the ReLU, which the reduction
    stores as it sums it and the dx pass reads (without it the dx pass masks dy again:
    no array of the tensor's size is written but dx)."""
    stream = numba_stream(stream)
    layout = chk.layout
    if layout.count * layout.c == 0:  # eval with N = 0, or no channels
        zeros = np.zeros(layout.c, stats_dtype(describe(x, "x").dtype))
        grads = (_nothing(x, layout, None, stream), from_host(zeros, x), from_host(zeros, x))
        return (*grads, _nothing(dy, layout, None, stream)) if residual_grad else grads
    xv, dyv = input_view(x, "x", layout, stream), input_view(dy, "dy", layout, stream)
    yv = None if y is None else input_view(y, "y", layout, stream)
    dr = drv = None
    if residual_grad:
        fresh = empty(layout, dyv.dtype, stream, dy)
        dr, drv = as_result(fresh, dy), kernel_view(fresh[1], "dresidual", layout)
    fresh = _grad_sums(dyv, xv, layout, mean, invstd, weight, training, stream, x, None, yv, drv)
    if dr is not None:
        dyv, yv = drv, None
    dx = _grad_elementwise(dyv, xv, layout, fresh[1], training, x, stream, yv)
    grads = (dx, as_result(fresh, x, 0), as_result(fresh, x, 1))
    return (*grads, dr) if residual_grad else grads


# --- the pieces ``numbabn.distributed`` assembles around its exchanges ---------------
# Per-channel vectors are staged through host memory: they are C values each.


def _own(a):
    """The numba array over a caller's array, in its dtype (bfloat16 included)."""
    return as_kind_of(None, numba_array(a))


def _host(a):
    return None if a is None else _own(a).copy_to_host()


def to_host(a) -> np.ndarray:
    """A per-channel device vector as float64 NumPy."""
    return _host(a).astype(np.float64)


def from_host(a: np.ndarray, like):
    """A host per-channel vector on the device, as the kind of array ``like`` is."""
    return as_kind_of(like, cuda.to_device(a))


def local_moments(x, chk: Checked, stream=None):
    """float64 (mean, sum of squared deviations) of this array's values, on the host."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return np.zeros(layout.c), np.zeros(layout.c)
    fresh, _ = _stats(x, chk, None, None, None, None, numba_stream(stream), None, np.float64)
    mean, var = fresh[1].copy_to_host()[:2]
    return mean, var * layout.count


def normalize_global(x, chk: Checked, mean, var, weight, bias, out, stream=None):
    """Normalize with given float64 host statistics (those of the whole batch)."""
    return forward_eval(x, chk, cuda.to_device(mean), cuda.to_device(var), weight, bias, out, stream)


def update_running(running_mean, running_var, mean, var, count, momentum):
    """The running-statistics update of ``_channel``, staged through the host."""
    rm, rv = _host(running_mean), _host(running_var)
    _channel.update_running(rm, rv, mean, var, count, momentum)
    _own(running_mean).copy_to_device(rm)
    _own(running_var).copy_to_device(rv)


def local_grad_sums(dy, x, chk: Checked, mean, stream=None):
    """float64 (sum dy, sum dy * (x - mean)) per channel on the host, shape (2, C)."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return np.zeros((2, layout.c))
    ones = cuda.to_device(np.ones(layout.c))  # dweight = sum dy * (x - mean) * 1
    stream = numba_stream(stream)
    xv, dyv = input_view(x, "x", layout, stream), input_view(dy, "dy", layout, stream)
    fresh = _grad_sums(dyv, xv, layout, cuda.to_device(mean), ones, None, True, stream, None,
                       np.float64)
    dweight, dbias = fresh[1].copy_to_host()[:2]
    return np.stack([dbias, dweight])


def grad_input(dy, x, chk: Checked, mean, invstd, weight, sums, count, training, stream=None):
    """(dx, dweight, dbias) from host sums over ``count`` values per channel."""
    layout = chk.layout
    stream = numba_stream(stream)
    sd = stats_dtype(describe(x, "x").dtype)
    if layout.count * layout.c:
        chan = np.zeros((K.ROWS, layout.c), sd)
        chan[K.HI :] = grad_constants(mean, invstd, _host(weight), sums, count, training, sd)
        dx = _grad_elementwise(
            input_view(dy, "dy", layout, stream), input_view(x, "x", layout, stream), layout,
            cuda.to_device(chan, stream=stream), training, x, stream,
        )
    else:
        dx = _nothing(x, layout, None, stream)
    dweight = cuda.to_device((sums[1] * invstd).astype(sd), stream=stream)
    dbias = cuda.to_device(sums[0].astype(sd), stream=stream)
    return dx, as_kind_of(x, dweight), as_kind_of(x, dbias)


def copy(a):
    """A device copy of a per-channel vector."""
    src = numba_array(a)
    dst = cuda.device_array(src.shape, src.dtype)
    dst.copy_to_device(src)
    return as_kind_of(a, dst)


def from_other_side(a):
    """A device copy of a host array (used when a layer follows its input to the GPU)."""
    return cuda.to_device(np.ascontiguousarray(a))

