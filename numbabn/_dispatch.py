"""Choose the backend from where the arrays live.

Validation (``_validate``) has already established that all arrays of a call are on
one side. Host arrays go to the CPU backend; CUDA arrays go to the GPU backend,
which is imported on first use so that a CPU-only install never imports numba-cuda.
"""

from __future__ import annotations

from types import ModuleType

from ._validate import DEVICE, HOST

_loaded: dict[str, ModuleType] = {}


def backend(side: str) -> ModuleType:
    """The module implementing the operations for arrays on ``side``."""
    module = _loaded.get(side)
    if module is None:
        module = _loaded[side] = _load(side)
    return module


def _load(side: str) -> ModuleType:
    if side == HOST:
        from . import _cpu

        return _cpu
    if side == DEVICE:
        try:
            from . import _gpu
        except ImportError as exc:
            raise TypeError(
                "CUDA arrays need the GPU backend, which needs numba-cuda: "
                "pip install 'numbabn[cuda]'"
            ) from exc
        return _gpu
    raise AssertionError(f"unknown side {side!r}")
