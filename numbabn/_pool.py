"""How this process may run numba's parallel CPU kernels.

numba's threading layers each fail one way: GNU OpenMP (``omp``, numba's choice where
no TBB is installed) kills a child process forked after a parallel call as soon as
the child runs one (PyTorch DataLoader workers and ``multiprocessing`` fork), and the
``workqueue`` layer aborts when two Python threads run parallel kernels at once. So the
CPU passes' one parallel loop (``_cpu.tasks``) runs in the form that is safe here: in a
child forked from a process whose GNU OpenMP pool had started, a serial twin compiled
from the same source (the same loops and additions, so the same results, bitwise);
under ``workqueue``, behind a process-wide lock (``exclusive``); else as it is. TBB
(``NUMBA_THREADING_LAYER=tbb``, with the ``tbb`` package) is safe both ways.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types

import numba

_forked = False  # this process is a child forked after the OpenMP pool started
_lock = threading.Lock()
_serial_twins: dict = {}
_resets = []  # caches to empty in a forked child (``on_fork_clear``)


def _layer() -> str | None:
    """numba's threading layer, None before its pool has started."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _gnu_openmp() -> bool:
    if _layer() != "omp":
        return False
    from numba.np.ufunc import omppool

    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _after_fork_in_child() -> None:
    global _forked
    if _forked or _gnu_openmp():
        _forked = True
        for cache in _resets:
            cache.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def start() -> None:
    """Start numba's thread pool. Under OpenMP the start can reset the thread count of a
    library sharing the runtime (PyTorch's, set with ``torch.set_num_threads``): it is
    put back as it was."""
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    before = get() if get is not None else None
    numba.get_num_threads()
    if before is not None and get() != before:
        torch.set_num_threads(before)


def forked() -> bool:
    """Whether this process runs serial twins (see the module's docstring)."""
    return _forked


def on_fork_clear(cache: dict) -> dict:
    """Register a cache (of what a child forked after a parallel call must choose again)
    to be emptied in that child."""
    _resets.append(cache)
    return cache


NO_LOCK = contextlib.nullcontext()


def exclusive():
    """The context to run a parallel loop in: under ``workqueue``, the process-wide lock
    (see the module's docstring)."""
    return _lock if _layer() == "workqueue" else NO_LOCK


def serial(kernel):
    """A twin of parallel ``kernel`` compiled without ``parallel`` (``prange`` runs as
    ``range``), cached on disk under a name of its own."""
    twin = _serial_twins.get(kernel)
    if twin is None:
        f = kernel.py_func
        g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        g.__qualname__ = f.__qualname__ + "_serial"
        g.__module__, g.__doc__ = f.__module__, f.__doc__
        options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}
        twin = numba.njit(**{**options, "parallel": False, "cache": True})(g)
        _serial_twins[kernel] = twin
    return twin


def threads() -> int:
    """The calling thread's numba thread count (``numba.set_num_threads`` sets it per
    Python thread). Read once per operation and passed down. ``numba.get_num_threads``
    takes two locks on every call (to start the pool on the first): 1.2-2.5 us in a
    loop and 51 us right after a 25.7 MB train call here, where the count reader it
    then calls took 0.5 and 14 us (full calls 1.01-1.09x faster, paired). So after
    the first read this calls that reader directly, and falls back to the public
    function should numba's internals change."""
    n = (_count_reader or _find_count_reader())()
    return n if n > 0 else numba.get_num_threads()


_count_reader = None


def _find_count_reader():
    global _count_reader
    from numba.np.ufunc import parallel

    start()  # starts the pool, which sets the reader
    reader = getattr(parallel, "_get_num_threads", None)
    _count_reader = reader if callable(reader) else numba.get_num_threads
    return _count_reader
