"""The float dtypes numbabn takes, and how it knows bfloat16 without importing ml_dtypes.

float16, float32 and float64 are NumPy's; bfloat16 is ``ml_dtypes.bfloat16`` (JAX's, an
optional dependency), joined to the tuple and set below once it is seen.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# The same, for membership tests on the hot path (a set lookup by hash is twice as fast
# as comparing with each dtype; a non-native byte order hashes differently and misses).
FLOAT_SET = frozenset(FLOAT_DTYPES)
_BF16: list = []  # ml_dtypes' bfloat16 once known (FLOAT_DTYPES and FLOAT_SET then hold it)
_JOIN = threading.Lock()


def bf16(load: bool = False) -> np.dtype | None:
    """NumPy's bfloat16 (``ml_dtypes.bfloat16``, JAX's; an optional dependency), or None.

    Importing ml_dtypes takes 0.7-0.9 s, so numbabn does not: an array of bfloat16 can
    only exist once something has imported it, and this finds it then; ``load``
    imports it (for a dtype named by string or a torch bfloat16 tensor)."""
    global FLOAT_DTYPES, FLOAT_SET
    if _BF16:
        return _BF16[0]
    module = sys.modules.get("ml_dtypes")
    if module is None and load:
        try:
            import ml_dtypes as module
        except ImportError:
            return None
    if module is None:
        return None
    with _JOIN:  # (two threads meeting bfloat16 at once join it once)
        if not _BF16:
            _BF16.append(np.dtype(module.bfloat16))
            FLOAT_DTYPES += (_BF16[0],)
            FLOAT_SET = frozenset(FLOAT_DTYPES)
    return _BF16[0]


def is_bf16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is bfloat16. (Not ``dtype == bf16()``: NumPy reads None as
    float64, so that holds for float64 while ml_dtypes is not imported.)"""
    known = bf16()
    return known is not None and dtype == known


def taken(dtype: np.dtype) -> bool:
    """Whether numbabn takes ``dtype``: native float16, float32, float64, or bfloat16
    (joined to FLOAT_SET here when first met)."""
    if dtype.name == "bfloat16":
        bf16()
    return dtype in FLOAT_SET and dtype.isnative


def as_dtype(dtype: Any) -> np.dtype:
    """``np.dtype(dtype)``, which also knows "bfloat16" (importing ml_dtypes for it)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        bf16(load=True)
    return np.dtype(dtype)


_TORCH_DTYPES: dict = {}  # torch dtype -> NumPy dtype, for the float dtypes numbabn takes
_TORCH_OF: dict = {}  # and back, by NumPy dtype character


def torch_dtypes() -> dict:
    """torch dtype -> NumPy dtype, for the float dtypes numbabn takes (bfloat16 once known)."""
    bf16()
    if len(_TORCH_DTYPES) < len(FLOAT_DTYPES):
        import torch

        for d in FLOAT_DTYPES:
            _TORCH_OF[d.char] = getattr(torch, d.name)
            _TORCH_DTYPES[_TORCH_OF[d.char]] = d
    return _TORCH_DTYPES


def of_torch(dtype) -> np.dtype | None:
    """The NumPy dtype of PyTorch dtype ``dtype`` if numbabn takes it, else None;
    ``torch.bfloat16`` imports ml_dtypes (such a tensor may be the first bfloat16 seen)."""
    found = torch_dtypes().get(dtype)
    if found is None and dtype is sys.modules["torch"].bfloat16 and bf16(load=True) is not None:
        found = torch_dtypes().get(dtype)
    return found


def torch_dtype(dtype) -> Any:
    """The PyTorch dtype of a NumPy float dtype numbabn supports."""
    dtype = as_dtype(dtype)
    torch_dtypes()
    return _TORCH_OF[dtype.char]
