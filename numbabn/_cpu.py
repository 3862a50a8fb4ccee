"""CPU backend: runs the kernels of ``_cpu_kernels`` on NumPy arrays.

Arguments arrive validated (``_validate``). This module views tensors the way the
kernels want them, sizes the work split, allocates outputs and does the per-channel
arithmetic between the passes, in float64 on C-length vectors.

Operations (mirrored by the GPU backend, ``_gpu``): ``batch_stats``,
``forward_train``, ``forward_eval``, ``backward``.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _cpu_kernels as kernels
from ._validate import Checked, Layout, stats_dtype

# Aim for this many tasks per thread so uneven tasks still balance, and keep each task
# above this many elements so the split does not cost more than it saves.
_TASKS_PER_THREAD = 4
_MIN_TASK_ELEMENTS = 4096
# The fused per-channel kernels keep one channel's slab (of every tensor they read) in
# the core's cache between their two passes; above this many bytes it would spill.
_FUSE_MAX_BYTES = 1 << 20



def _kernel_array(a: np.ndarray) -> np.ndarray:
    """The array as the kernels take it: float16 as its uint16 bits."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _canonical(a: np.ndarray, layout: Layout) -> np.ndarray | None:
    """The (N, C, L) or (M, C) view of ``a``, or None if that needs a copy."""
    if layout.kind == "ncl":
        if not a.flags.c_contiguous:
            return None
        return a.reshape(layout.n, layout.c, layout.l)
    moved = np.moveaxis(a, layout.axis, -1)
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
    return np.ascontiguousarray(np.moveaxis(a, layout.axis, -1)).reshape(layout.n, layout.c)


def _empty(layout: Layout, dtype: np.dtype) -> np.ndarray:
    """An output in the memory order of the layout (channels-last stays channels-last)."""
    if layout.kind == "ncl":
        return np.empty(layout.shape, dtype)
    shape = layout.shape
    moved = shape[: layout.axis] + shape[layout.axis + 1 :] + (shape[layout.axis],)
    return np.moveaxis(np.empty(moved, dtype), -1, layout.axis)


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


def _split(layout: Layout) -> int:
    """Segments per plane (ncl) or row chunks (mc) for the current thread count."""
    threads = numba.get_num_threads()
    size = layout.n * layout.c * layout.l
    if layout.kind == "ncl":
        planes = layout.n * layout.c
        want = -(-_TASKS_PER_THREAD * threads // planes) if threads > 1 else 1
        return max(1, min(want, layout.l // _MIN_TASK_ELEMENTS))
    want = _TASKS_PER_THREAD * threads if threads > 1 else 1
    return max(1, min(want, size // _MIN_TASK_ELEMENTS, layout.n))


def _reduce(kernel, arrays, per_channel: np.ndarray, layout: Layout) -> np.ndarray:
    """Run a two-sum reduction kernel and add its partials: (2, C) float64."""
    split = _split(layout)
    tasks = layout.n * split if layout.kind == "ncl" else split
    part = np.empty((tasks, 2, layout.c), np.float64)
    kernel(*(_kernel_array(a) for a in arrays), per_channel, split, part)
    return part.sum(axis=0)


def _elementwise(kernel, arrays, params: np.ndarray, result: np.ndarray, layout: Layout) -> None:
    kernel(*(_kernel_array(a) for a in arrays), params, _split(layout), _kernel_array(result))


def _kernel(name: str, layout: Layout):
    return getattr(kernels, f"{name}_{layout.kind}")


def _shift(v: np.ndarray, layout: Layout) -> np.ndarray:
    """A value of each channel, the shift that keeps the shifted sums small."""
    first = v[0, :, 0] if layout.kind == "ncl" else v[0, :]
    return first.astype(np.float64)


def _moments(v: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and biased variance of each channel of a canonical view."""
    shift = _shift(v, layout)
    sums = _reduce(_kernel("stats", layout), (v,), shift, layout)
    mean, var = np.empty(layout.c), np.empty(layout.c)
    kernels.finish_moments(sums, shift, layout.count, mean, var)
    return mean, var


def _fuse(layout: Layout, slab_bytes: int) -> bool:
    """Use the per-channel fused backward: NCL, enough channels to share out evenly,
    and a channel's data (``slab_bytes`` per value) small enough to stay in cache."""
    threads = numba.get_num_threads()
    balanced = layout.c % threads == 0 or layout.c >= _TASKS_PER_THREAD * threads
    return (
        layout.kind == "ncl"
        and threads > 1
        and balanced
        and layout.n * layout.l * slab_bytes <= _FUSE_MAX_BYTES
        and layout.n * layout.l >= _MIN_TASK_ELEMENTS
    )


def _as64(a: np.ndarray | None, c: int, default: float) -> np.ndarray:
    return np.full(c, default) if a is None else np.asarray(a, dtype=np.float64)


def _split_mean(mean: np.ndarray, ctype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """mean = hi + lo with hi, lo in the compute type (lo = 0 for float64)."""
    hi = mean.astype(ctype)
    return hi, (mean - hi).astype(ctype)


def _normalize(v, layout, mean, invstd, weight, bias, out, x):
    ctype = stats_dtype(x.dtype)
    params = np.empty((4, layout.c), ctype)
    params[0], params[1] = _split_mean(mean, ctype)
    params[2] = invstd * _as64(weight, layout.c, 1.0)
    params[3] = _as64(bias, layout.c, 0.0)
    y, yv = _output(out, x, layout)
    _elementwise(_kernel("normalize", layout), (v,), params, yv, layout)
    return _finish_output(y, out)


def batch_stats(x: np.ndarray, chk: Checked) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance."""
    mean, var = _moments(_view(x, chk.layout), chk.layout)
    sd = stats_dtype(x.dtype)
    return mean.astype(sd), var.astype(sd)


def update_running(running_mean, running_var, mean, var, count, momentum) -> None:
    """r = (1 - momentum) * r + momentum * batch value; the variance unbiased."""
    unbiased = var * (count / (count - 1))
    for r, value in ((running_mean, mean), (running_var, unbiased)):
        r[...] = (1.0 - momentum) * r.astype(np.float64) + momentum * value


def forward_train(x, chk: Checked, weight, bias, running_mean, running_var, out):
    """Normalize with batch statistics; update running statistics if given.

    Returns ``(y, mean, invstd)`` with the statistics in :func:`stats_dtype`.
    """
    layout = chk.layout
    v = _view(x, layout)
    mean, var = _moments(v, layout)
    invstd = 1.0 / np.sqrt(var + chk.eps)
    y = _normalize(v, layout, mean, invstd, weight, bias, out, x)
    if running_mean is not None:
        update_running(running_mean, running_var, mean, var, layout.count, chk.momentum)
    sd = stats_dtype(x.dtype)
    return y, mean.astype(sd), invstd.astype(sd)


def running_invstd(running_var: np.ndarray, eps: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(running_var.astype(np.float64) + eps)


def forward_eval(x, chk: Checked, running_mean, running_var, weight, bias, out):
    """Normalize with the running statistics."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return _finish_output(_empty(layout, x.dtype), out)
    mean = running_mean.astype(np.float64)
    invstd = running_invstd(running_var, chk.eps)
    return _normalize(_view(x, layout), layout, mean, invstd, weight, bias, out, x)


def backward(dy, x, chk: Checked, mean, invstd, weight, training: bool):
    """Gradients (dx, dweight, dbias); see the API contract for the formulas."""
    layout = chk.layout
    c = layout.c
    mean64 = mean.astype(np.float64)
    invstd64 = invstd.astype(np.float64)
    w = _as64(weight, c, 1.0)
    xv = _view(x, layout)
    dyv = _view(dy, layout)
    ctype = stats_dtype(x.dtype)  # also the dtype of dweight and dbias
    dx, dxv = _output(None, x, layout)
    if _fuse(layout, 2 * x.itemsize):
        sums = np.empty((2, c))
        kernels.backward_channels(
            _kernel_array(dyv), _kernel_array(xv), mean64, invstd64, w, training,
            np.empty((5, c), ctype), sums, _kernel_array(dxv),
        )
    else:
        sums = _reduce(_kernel("grad_sums", layout), (dyv, xv), mean64, layout)
        if training:
            count = layout.count
            params = np.empty((5, c), ctype)
            params[0], params[1] = _split_mean(mean64, ctype)
            params[2] = invstd64 * invstd64 * sums[1] / count
            params[3] = sums[0] / count
            params[4] = invstd64 * w
            _elementwise(_kernel("grad_input", layout), (dyv, xv), params, dxv, layout)
        else:
            params = np.zeros((4, c), ctype)
            params[2] = invstd64 * w
            _elementwise(_kernel("normalize", layout), (dyv,), params, dxv, layout)
    return dx, (sums[1] * invstd64).astype(ctype), sums[0].astype(ctype)


def copy(a: np.ndarray) -> np.ndarray:
    return a.copy()


def from_other_side(a) -> np.ndarray:
    """A host copy of a CUDA array (used when a layer follows its input to the CPU)."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    from numba import cuda

    return cuda.as_cuda_array(a).copy_to_host()
