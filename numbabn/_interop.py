"""CPU arrays of other libraries (PyTorch CPU tensors, DLPack exporters): viewed as NumPy
arrays for the CPU backend; results come back as tensors for PyTorch callers, as NumPy
arrays for the others.

The views share memory with the caller's arrays (no copies), so running statistics and
``out`` are written in the caller's memory; arrays a library keeps read-only (JAX's) are
refused where numbabn would write them, as read-only NumPy arrays are.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._dtypes import is_bf16, of_torch

_DLPACK_CPU = 1  # kDLCPU


def is_foreign_host(a: Any) -> bool:
    """Whether ``a`` is a CPU array of another library that numbabn can view."""
    if a is None or isinstance(a, (np.ndarray, np.generic)):  # NumPy's own kinds stay as they are
        return False
    if type(a).__module__.startswith("torch"):
        return getattr(a, "device", None) is not None and a.device.type == "cpu"
    if getattr(a, "__cuda_ndarray__", False) is True or hasattr(a, "__cuda_array_interface__"):
        return False  # device arrays (the CUDA simulator's pass NumPy's attributes through)
    if hasattr(a, "__dlpack__"):
        try:
            return a.__dlpack_device__()[0] == _DLPACK_CPU
        except Exception:  # noqa: BLE001 - not a DLPack exporter after all
            return False
    return hasattr(a, "__array_interface__")


def tensor_numpy(t: Any) -> np.ndarray:
    """The zero-copy NumPy view of a CPU tensor: bfloat16 as ml_dtypes' bfloat16 (a view
    of its bits), other dtypes NumPy lacks refused (TypeError)."""
    import torch

    if t.requires_grad:  # (detach costs a third of the call: only where numpy() needs it)
        t = t.detach()
    if t.dtype is torch.bfloat16 and (bfloat16 := of_torch(t.dtype)) is not None:
        return t.view(torch.int16).numpy().view(bfloat16)
    return t.numpy()


def numpy_tensor(a: np.ndarray) -> Any:
    """The tensor sharing a NumPy array's memory (bfloat16 too)."""
    import torch

    if is_bf16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def host_view(a: Any) -> Any:
    """The NumPy view of a foreign CPU array (``a`` itself for anything else)."""
    if not is_foreign_host(a):
        return a
    if type(a).__module__.startswith("torch"):
        return tensor_numpy(a)
    if hasattr(a, "__dlpack__"):
        return np.from_dlpack(a)
    return np.asarray(a)


def _back(result: Any, like: Any, originals: dict) -> Any:
    """A NumPy result as ``like``'s kind; a view of a caller's array as that array."""
    if isinstance(result, tuple):
        return tuple(_back(r, like, originals) for r in result)
    if not isinstance(result, np.ndarray):
        return result
    original = originals.get(id(result))
    if original is not None:
        return original
    if type(like).__module__.startswith("torch"):
        return numpy_tensor(result)
    return result  # other libraries' arrays: NumPy results


def on_host(f: Callable, *args: Any, **kwargs: Any) -> Any:
    """``f`` (a public function) on NumPy views of the foreign CPU arrays among its
    arguments; its results as tensors when the first argument is a PyTorch tensor (the
    caller's own arrays where a result is one, ``out``)."""
    originals: dict = {}

    def view(a):
        v = host_view(a)
        if v is not a:
            originals[id(v)] = a
        return v

    args = [view(a) for a in args]  # (alive until the results are matched by id)
    kwargs = {k: view(v) for k, v in kwargs.items()}
    return _back(f(*args, **kwargs), originals.get(id(args[0])), originals)
