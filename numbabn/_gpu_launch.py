"""Kernel launches with little host overhead.

Configuring a numba kernel (``kernel[grid, block, stream]``) converts the stream and
checks the grid on every call; the configured launcher is kept per (kernel, grid,
block, stream) and reused. numba's low-occupancy warning is silenced for these
launches: numbabn sizes its grids on purpose, and tiny inputs get tiny grids.

A launch through numba's dispatcher then types every argument, picks the compiled
kernel and converts the arguments: on an H100 host that was 57 us for a kernel of
seven arguments, of which cuda.core's own launch was 16 us (later runs: 96-112 us for
numba's path, 33-35 us for this module's, side by side). So ``Launch`` lets numba
make the first launch of each kind of arguments (it compiles and types), keeps the
compiled kernel, and afterwards converts the arguments itself, exactly as numba's
``_prepare_args`` does (checked against it on that first launch; any difference, or
any numba internal that is not there, leaves that kind of arguments to numba).
"""

from __future__ import annotations

import ctypes
import threading
import warnings

import numpy as np
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
    """A callable that launches ``kernel`` on (grid, block, stream): a ``Launch``, made
    once per distinct launch (under the simulator, ``kernel[grid, block, stream]``
    every time: its kernels keep one configuration, set by indexing)."""
    if _SIM:
        return kernel[grid, block, stream]
    key = (kernel, grid, block, _handle(stream))
    launch = _launchers.get(key)
    if launch is None:
        with _lock, warnings.catch_warnings():
            for category in _performance_warnings():
                warnings.simplefilter("ignore", category)
            launch = Launch(kernel[grid, block, stream])
            if len(_launchers) >= _LIMIT:
                _launchers.clear()
            _launchers[key] = launch
    return launch


def _kind(a):
    """What decides numba's type of a kernel argument, cheaply: for a device array its
    dtype, rank and layout (C, F or A, as numba's ``_numba_type_`` decides it); for a
    tuple its items' kinds; for a scalar its Python type. None: not known here."""
    if getattr(a, "__cuda_ndarray__", False) is True:
        # A numba array's kind never changes: kept on the array (the cached views come
        # back call after call; reading ``flags`` builds a dict each time).
        kind = a.__dict__.get("_numbabn_kind")
        if kind is None:
            flags = a.flags
            broadcast = 0 in a.strides and a.size != 0
            kind = a.__dict__["_numbabn_kind"] = (
                a.dtype, a.ndim, flags["C_CONTIGUOUS"] and not broadcast,
                flags["F_CONTIGUOUS"] and not broadcast,
            )
        return kind
    if isinstance(a, tuple):
        kinds = tuple([_kind(x) for x in a])
        return None if None in kinds else (tuple, *kinds)
    t = type(a)
    return t if t in _SCALARS else None


_SCALARS = {int, float, bool, np.float16, np.float32, np.float64, np.int32, np.int64}


def _pack_array(a, out):
    """The parameters of a device array argument, as numba's ``_prepare_args`` makes
    them: meminfo, parent, size, itemsize, data pointer, shape, strides in bytes."""
    m = a._strided_memory_view_shim  # numba's own (cached) description of the array
    out.extend((0, 0, m.size, m.dtype.itemsize, m.ptr, *m.shape, *m._layout.strides_in_bytes))


def _packer(ty):
    """A function (value, params) that appends the parameters of an argument of numba
    type ``ty``; None for a type not handled here."""
    from numba.cuda import types

    if isinstance(ty, types.Array):
        return _pack_array
    if isinstance(ty, types.BaseTuple):
        items = [_packer(t) for t in ty]
        if None in items:
            return None

        def pack_tuple(v, out):
            for p, x in zip(items, v):
                p(x, out)

        return pack_tuple
    if isinstance(ty, types.Integer):
        ctype = getattr(ctypes, f"c_{ty}")
        return lambda v, out: out.append(ctype(v))
    if ty == types.float64:
        return lambda v, out: out.append(ctypes.c_double(v))
    if ty == types.float32:
        return lambda v, out: out.append(ctypes.c_float(v))
    if ty == types.float16:
        return lambda v, out: out.append(ctypes.c_uint16(np.float16(v).view(np.uint16)))
    if ty == types.boolean:
        return lambda v, out: out.append(v)
    return None


def _same_params(mine, numbas) -> bool:
    """Whether two parameter lists are equal (ctypes values compared by type and value)."""
    if len(mine) != len(numbas):
        return False
    for a, b in zip(mine, numbas):
        if type(a) is not type(b):
            return False
        if isinstance(a, ctypes._SimpleCData) and a.value != b.value:
            return False
        if not isinstance(a, ctypes._SimpleCData) and a != b:
            return False
    return True


class Launch:
    """A configured kernel launch that skips numba's per-call dispatch once numba has
    launched the same kinds of arguments (see the module docstring)."""

    __slots__ = ("configured", "_direct")

    def __init__(self, configured):
        self.configured = configured
        # (context, kinds of the arguments) -> (launch, config, kernel, packers) or None
        self._direct = {}

    def __call__(self, *args):
        try:
            kinds = (_current_context(), *[_kind(a) for a in args])
            direct = self._direct.get(kinds, False)
        except TypeError:  # an unhashable kind: numba decides
            return self.configured(*args)
        if direct is False:  # first launch of this kind: numba's, then look
            self.configured(*args)
            if None not in kinds:
                self._direct[kinds] = self._direct_launch(args)
            return None
        if direct is None:
            return self.configured(*args)
        launch, config, kernel, packers = direct
        params = []
        for pack, a in zip(packers, args):
            pack(a, params)
        launch(self.configured.stream, config, kernel, *params)
        return None

    def _direct_launch(self, args):
        """(cuda.core's launch, launch config, kernel, packers) for launching these kinds
        of arguments without numba's dispatch, or None where that cannot be done exactly
        as numba does it."""
        try:
            configured = self.configured
            dispatcher = configured.dispatcher
            if (dispatcher.specialized or dispatcher.extensions or configured.pre_launch_callbacks
                    or dispatcher._launch_config_sensitive
                    or configured._is_kernel_launch_config_sensitive()):
                return None
            types = tuple(dispatcher.typeof_pyval(a) for a in args)
            compiled = dispatcher.overloads.get(types)
            if compiled is None or compiled.debug or compiled.cooperative:
                return None
            packers = [_packer(t) for t in compiled.argument_types]
            if None in packers or len(packers) != len(args):
                return None
            mine, numbas = [], []
            for pack, t, a in zip(packers, compiled.argument_types, args):
                pack(a, mine)
                compiled._prepare_args(t, a, self.configured.stream, [], numbas)
            if not _same_params(mine, numbas):
                return None
            kernel = compiled._codelibrary.get_cufunc().kernel
            return _core_launch(), _launch_config(configured), kernel, packers
        except Exception:  # a numba-cuda whose internals differ: numba launches
            return None


_GET_CONTEXT: list = []


def _current_context() -> int:
    """The handle of the current CUDA context (compiled kernels belong to one)."""
    if not _GET_CONTEXT:
        from cuda.bindings import driver

        _GET_CONTEXT.append(driver.cuCtxGetCurrent)
    _, ctx = _GET_CONTEXT[0]()
    return int(ctx)


_CORE: list = []


def _core_launch():
    """cuda.core's ``launch``, as numba-cuda imports it."""
    if not _CORE:
        from numba.cuda import dispatcher

        _CORE.append(dispatcher.launch)
    return _CORE[0]


def _launch_config(configured):
    """cuda.core's launch configuration of a numba configuration, built as numba does."""
    from numba.cuda import dispatcher as nd

    grid, block = configured.griddim, configured.blockdim  # numba's 3-tuples
    if nd.CUDA_CORE_GE_1_0:
        return nd.LaunchConfig(grid=grid, block=block, shmem_size=configured.sharedmem,
                               is_cooperative=False)
    return nd.LaunchConfig(grid=grid, block=block, shmem_size=configured.sharedmem,
                           cooperative_launch=False)
