"""Shapes and layouts the functional tests sweep."""

from __future__ import annotations

import numpy as np

from helpers import ON_DEVICE

# (shape, channel axis): ndim 2 to 5, axis 1, -1 and a middle axis, sizes 1 and primes.
SHAPES = [
    ((2, 3), 1),
    ((7, 1), 1),
    ((3, 5, 7), 1),
    ((1, 3, 13), 1),
    ((2, 3, 5, 7), 1),
    ((3, 5, 7, 4), -1),
    ((2, 5, 3, 7), 2),
    ((2, 3, 2, 5, 3), 1),
    ((2, 3, 1, 1), 1),
]
if not ON_DEVICE:
    # Above the single-thread limit for small inputs (2**15 values in the suite, see
    # conftest.py): planes split into segments, rows into several chunks; (3, 4, 3001)
    # takes the cache-fused per-channel passes on 2 or 4 threads. (5, 41, 67) is a small channels-last case.
    # Short planes run flat (samples as rows of C * L values): (701, 7, 3, 3) in every
    # pass, (11, 97, 7, 7) in the elementwise passes (C * L too many for flat sums).
    SHAPES += [((2, 3, 9001), 1), ((20011, 3), 1), ((5, 41, 67), -1), ((3, 4, 3001), 1),
               ((701, 7, 3, 3), 1), ((11, 97, 7, 7), 1)]
else:
    # Large enough to span several blocks of the small simulator block size.
    SHAPES += [((3, 2, 67), 1), ((131, 3), 1)]

# How the tensor sits in memory. Each maker takes a C-contiguous host array and the
# channel axis and returns a view of the same values (maybe with extra data around).
HOST_LAYOUTS = ["contiguous", "channels_last", "strided", "reversed", "fortran"]
# "padded": rows with a gap after them, so the axes around the channel axis cannot be
# walked as one (the GPU backend copies such inputs and outputs on the device).
DEVICE_LAYOUTS = ["contiguous", "strided", "padded"]
LAYOUTS = DEVICE_LAYOUTS if ON_DEVICE else HOST_LAYOUTS


def in_layout(x: np.ndarray, axis: int, layout: str) -> np.ndarray:
    """Return an array equal to x whose memory layout is ``layout`` (host side)."""
    axis = axis % x.ndim
    if layout == "contiguous":
        return x.copy()
    if layout == "channels_last":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, axis, -1)), -1, axis)
    if layout == "strided":
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "reversed":
        return np.ascontiguousarray(x[::-1])[::-1]
    if layout == "fortran":
        return np.asfortranarray(x)
    raise ValueError(layout)


def on_side(x: np.ndarray, axis: int, layout: str):
    """The array under test: on the host, or on the device, in ``layout``."""
    if not ON_DEVICE:
        return in_layout(x, axis, layout)
    from numba import cuda

    if layout == "contiguous":
        return cuda.to_device(x)
    # Device arrays are sliced with explicit slices: numba's take no Ellipsis.
    lead = (slice(None),) * (x.ndim - 1)
    if layout == "padded":
        big = np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype)
        big[lead + (slice(None, -1),)] = x
        return cuda.to_device(big)[lead + (slice(None, -1),)]
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    big[lead + (slice(None, None, 2),)] = x
    return cuda.to_device(big)[lead + (slice(None, None, 2),)]
