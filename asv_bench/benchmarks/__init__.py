"""Shared helpers of the numbabn asv suite: seeded inputs, size cases, skips."""

from __future__ import annotations

import numpy as np

# (name, logical N, C, H, W). "tiny" and "small" take the CPU's single-thread path for
# small inputs; "mid" (3.2 MB of float32) the parallel passes with plain stores, its
# output staying in cache; "late" has 7x7 planes (a late ResNet stage), which the NCHW
# passes walk as flat rows; "resnet" and "llc" stream their outputs, and "llc" is larger
# than the last-level cache of the machines we run on (103 MB against 32 MB of L3).
SHAPES = {
    "tiny": (2, 3, 4, 5),  # the fixed cost of a call
    "small": (8, 16, 8, 8),
    "mid": (32, 32, 28, 28),
    "late": (64, 256, 7, 7),
    "resnet": (32, 64, 56, 56),
    "llc": (64, 128, 56, 56),
}
LAYOUTS = ["nchw", "nhwc"]
DTYPES = ["float16", "float32", "float64"]
try:  # bfloat16 where ml_dtypes is installed (numbabn's "bfloat16" extra)
    import ml_dtypes  # noqa: F401

    DTYPES.append("bfloat16")
except ImportError:
    pass


def batch(shape_name, layout, dtype, seed=0):
    """Seeded random batch (never zeros) and its channel axis."""
    n, c, h, w = SHAPES[shape_name]
    shape, axis = ((n, c, h, w), 1) if layout == "nchw" else ((n, h, w, c), -1)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dtype)
    return x, axis


def requires_cuda():
    """asv skips a benchmark whose setup raises NotImplementedError."""
    try:
        from numba import cuda

        if cuda.is_available():
            return cuda
    except Exception:
        pass
    raise NotImplementedError("no CUDA device")
