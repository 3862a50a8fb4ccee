"""NumPy arrays as the CPU kernels take them: canonical views, outputs, float16 bits.

The kernels see an (N, C, L) view (``ncl``) or an (M, C) view (``mc``) of each tensor
(``_validate.Layout``), float16 as its uint16 bits. Outputs keep the input's memory
order (channels-last stays channels-last); those large enough to be streamed start on
a cache line.
"""

from __future__ import annotations

import math

import numpy as np

from .._alias import same_view
from .._dtypes import is_bf16
from .._validate import Layout
from . import tuning
from .plan import address

_F16 = np.dtype(np.float16)


def kernel_array(a: np.ndarray) -> np.ndarray:
    """The array as the kernels take it: float16 as its uint16 bits, bfloat16 as its
    int16 bits (``_half``)."""
    if a.dtype == _F16:
        return a.view(np.uint16)
    return a.view(np.int16) if is_bf16(a.dtype) else a


def operand(fn, a):
    """``fn`` of an array, or of each array in an operand tuple (``formulas``: masked
    gradients, the epilogue); None and scalars as they are."""
    if type(a) is tuple:
        return tuple(operand(fn, m) for m in a)
    return fn(a) if isinstance(a, np.ndarray) else a


def channel_last(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.moveaxis(a, axis, -1)`` (a view) at a fraction of its cost (8 us a call)."""
    if axis == a.ndim - 1:
        return a
    return a.transpose(tuple(range(axis)) + tuple(range(axis + 1, a.ndim)) + (axis,))


def channel_back(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.moveaxis(a, -1, axis)``: undoes :func:`_channel_last`."""
    if axis == a.ndim - 1:
        return a
    return a.transpose(tuple(range(axis)) + (a.ndim - 1,) + tuple(range(axis, a.ndim - 1)))


def canonical(a: np.ndarray, layout: Layout) -> np.ndarray | None:
    """The (N, C, L) or (M, C) view of ``a``, or None if that needs a copy."""
    if layout.kind == "ncl":
        if not a.flags.c_contiguous:
            return None
        return a.reshape(layout.n, layout.c, layout.l)
    if layout.axis != a.ndim - 1:
        a = channel_last(a, layout.axis)
    if not a.flags.c_contiguous:
        return None
    return a.reshape(layout.n, layout.c)


def view(a: np.ndarray, layout: Layout) -> np.ndarray:
    """The canonical view of ``a``, copying it into canonical order if it must."""
    return ordered(a, layout)[1]


def ordered(a: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """``a`` itself if its canonical view needs no copy, else a copy (same shape) in
    canonical memory order, so that a multi-pass operation copies a strided input
    once; and the canonical view of what it returns."""
    v = canonical(a, layout)
    if v is not None:
        return a, v
    if layout.kind == "ncl":
        a = np.ascontiguousarray(a)
    else:
        a = channel_back(np.ascontiguousarray(channel_last(a, layout.axis)), layout.axis)
    return a, canonical(a, layout)


def aligned_empty(
    shape: tuple[int, ...], dtype: np.dtype, nbytes: int | None = None
) -> np.ndarray:
    """``np.empty`` on a cache-line boundary when the kernels may stream into it
    (large ``malloc`` blocks start 16 bytes past a page boundary); ``nbytes``: its size
    in bytes, if the caller knows it."""
    if nbytes is None:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < tuning.TUNING.stream_min_bytes:
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + tuning.TUNING.align, np.uint8)
    # one array constructor, not slice-view-reshape: with ``address``, 42-60 us per
    # 25.7 MB output right after a pass had flushed the caches, against 55-117 us
    # (np.empty alone: 14-34 us)
    return np.ndarray(shape, dtype, raw, -address(raw) % tuning.TUNING.align)


def empty(layout: Layout, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A new array of the shape and dtype of ``like``, in the memory order of the layout
    (channels-last stays channels-last), and its canonical view."""
    if layout.kind == "ncl":
        y = aligned_empty(layout.shape, like.dtype, like.nbytes)
        return y, y.reshape(layout.n, layout.c, layout.l)
    shape, axis = layout.shape, layout.axis
    if axis == len(shape) - 1:
        y = aligned_empty(shape, like.dtype, like.nbytes)
        return y, y.reshape(layout.n, layout.c)
    moved = aligned_empty(shape[:axis] + shape[axis + 1 :] + (layout.c,), like.dtype, like.nbytes)
    return channel_back(moved, axis), moved.reshape(layout.n, layout.c)


def output(out: np.ndarray | None, x: np.ndarray, layout: Layout, other=None):
    """Return (result array, its canonical view) for an elementwise pass over ``x``
    (and ``other``, an input of the same shape, or None).

    Writes go straight into ``out`` when it has the kernel's order and, for each
    input, either does not overlap it or is that input itself; otherwise into a fresh
    array that :func:`_finish_output` copies into ``out``.
    """
    if out is not None:
        v = canonical(out, layout)
        apart = all(
            a is None or not np.may_share_memory(out, a) or same_view(out, a) for a in (x, other)
        )
        if v is not None and apart:
            return out, v
    return empty(layout, x)


def nothing(x: np.ndarray, layout: Layout, out: np.ndarray | None) -> np.ndarray:
    """The result of an elementwise pass over a tensor with no values (N or C is 0)."""
    return out if out is not None else empty(layout, x)[0]


def finish_output(y: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None or y is out:
        return y if out is None else out
    out[...] = y
    return out
