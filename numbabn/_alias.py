"""Which arrays of a call share memory: the aliasing rules of the contract.

``out`` may be x itself; an ``out`` overlapping x otherwise is filled from a copy of x;
``out`` overlapping running statistics, weight or bias is refused. Two arrays overlap
when their address ranges meet (``numpy.may_share_memory``'s test), on either side.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _validate  # (validation imports this module; only its functions are used)


def _describe(a: Any):
    return _validate.describe(a, "array")


def _pointer(a: Any) -> int:
    """The address of element 0 of a host or device array."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    if getattr(a, "__cuda_ndarray__", False) is True:
        host = getattr(a, "_ary", None)  # the CUDA simulator's arrays wrap host memory
        if isinstance(host, np.ndarray):
            return host.__array_interface__["data"][0]
        return a.device_ctypes_pointer.value or 0
    if type(a).__module__.startswith("torch"):
        return a.data_ptr()
    return _validate.cuda_interface(a)["data"][0]


def _extent(a: Any) -> tuple[int, int] | None:
    """[first, last + 1) of the bytes ``a`` spans; None when it is empty."""
    if isinstance(a, np.ndarray):
        shape, strides, item = a.shape, a.strides, a.itemsize
    else:
        info = _describe(a)
        shape, strides, item = info.shape, info.strides, info.dtype.itemsize
    if 0 in shape:
        return None
    low = high = _pointer(a)
    for e, s in zip(shape, strides):  # (loops: the GPU host path counts its Python calls)
        if s < 0:
            low += (e - 1) * s
        else:
            high += (e - 1) * s
    return low, high + item


def overlaps(a: Any, b: Any) -> bool:
    """Whether two arrays of one side span common bytes (their address ranges meet,
    as ``np.may_share_memory`` has it: interleaved arrays count as overlapping)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.may_share_memory(a, b))
    ea, eb = _extent(a), _extent(b)
    return ea is not None and eb is not None and ea[0] < eb[1] and eb[0] < ea[1]


def same_view(a: Any, b: Any) -> bool:
    """Whether two arrays of one shape are the same elements (same address, strides)."""
    return _pointer(a) == _pointer(b) and (
        a.strides == b.strides
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        else _describe(a).strides == _describe(b).strides
    )


def check(x, out, vectors: dict, training: bool, on_device: bool) -> bool:
    """ValueError when ``out`` overlaps a per-channel argument (``vectors``, by name):
    its values would change while the call reads or writes them. Returns whether x must
    be read from a copy (``Checked.alias``): ``out`` overlaps x other than as x itself,
    or, on the device (whose running-statistics update precedes the normalize pass),
    running statistics updated in training overlap x."""
    alias = False
    if out is not None:
        for name, v in vectors.items():
            if v is not None and overlaps(out, v):
                raise ValueError(f"out overlaps {name}; give out its own memory (or x itself)")
        alias = overlaps(out, x) and not same_view(out, x)
    if on_device and training and not alias:
        for k in ("running_mean", "running_var"):
            alias = alias or (vectors[k] is not None and overlaps(vectors[k], x))
    return alias
