"""Kernel launches with little host overhead.

Configuring a numba kernel (``kernel[grid, block, stream]``) converts the stream and
checks the grid on every call; the configured launcher is kept per (kernel, grid,
block, stream) and reused. numba's low-occupancy warning is silenced for these
launches: numbabn sizes its grids on purpose, and tiny inputs get tiny grids.
"""

from __future__ import annotations

import threading
import warnings

from numba import config, cuda

_SIM = bool(config.ENABLE_CUDASIM)
_LIMIT = 4096
_launchers: dict = {}
_lock = threading.Lock()
_default: list = []


def default_stream():
    """numba's default stream, made once."""
    if not _default:
        _default.append(cuda.default_stream())
    return _default[0]


def _handle(stream):
    """What identifies a stream in the launcher cache: its handle, else the object."""
    try:
        return int(stream.handle)
    except (AttributeError, TypeError, ValueError):
        return stream


_external: dict = {}


def numba_stream(stream):
    """The numba stream to launch on: the default stream for None, a numba stream as
    it is, another library's stream (PyTorch: ``cuda_stream``; CuPy: ``ptr``; or the
    ``__cuda_stream__`` protocol) wrapped once per handle."""
    if stream is None:
        return default_stream()
    if _SIM:
        return stream
    handle = _foreign_handle(stream)
    if handle is None:
        return stream
    wrapped = _external.get(handle)
    if wrapped is None:
        wrapped = _external[handle] = cuda.external_stream(handle)
    return wrapped


def _foreign_handle(stream):
    """The raw handle of a stream of another library, None for a numba stream."""
    from numba.cuda.cudadrv.driver import Stream

    if isinstance(stream, Stream):
        return None
    if hasattr(stream, "cuda_stream"):  # PyTorch
        return int(stream.cuda_stream)
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        return int(protocol()[1])
    if type(stream).__module__.startswith("cupy") and hasattr(stream, "ptr"):
        return int(stream.ptr)
    return None


def _performance_warnings():
    """numba-cuda's performance-warning class (it has its own copy of numba's)."""
    from numba.core.errors import NumbaPerformanceWarning

    found = [NumbaPerformanceWarning]
    try:
        from numba.cuda.core.errors import NumbaPerformanceWarning as cuda_warning
    except ImportError:  # older numba-cuda: numba's own class
        return found
    return found + [cuda_warning]


def launcher(kernel, grid, block, stream):
    """``kernel[grid, block, stream]``, configured once per distinct launch (under the
    simulator, every time: its kernels keep one configuration, set by indexing)."""
    if _SIM:
        return kernel[grid, block, stream]
    key = (kernel, grid, block, _handle(stream))
    configured = _launchers.get(key)
    if configured is None:
        with _lock, warnings.catch_warnings():
            for category in _performance_warnings():
                warnings.simplefilter("ignore", category)
            configured = kernel[grid, block, stream]
            if len(_launchers) >= _LIMIT:
                _launchers.clear()
            _launchers[key] = configured
    return configured
