"""Two repairs to numba-cuda's CUDA simulator, for the device-side tests.

The simulator runs a Python thread per CUDA thread of a block, and the launching thread
polls them until all have ended or wait at a barrier.

1. ``cuda.shared.array`` is not thread-safe there: each thread looks the array up by its
   call site and, finding none, makes one, so two threads of a block that both miss make
   two arrays, and the block's "shared" memory splits between them. A reduction then
   loses part of its block's values: with the yield of 2 and without this lock, two of
   three runs of reduction tests on a loaded 2-core machine had wrong results; with
   it, none of five. The array is now made under a lock, found by the caller's frame
   (the simulator's own lookup formats the whole stack on every call).
2. The poll loop asks each thread ``is_alive`` and otherwise runs without releasing the
   interpreter, so the threads it waits for wait for it. With both repairs the device
   tests of three files (functional, numerics, epilogue) ran in 110 s, against 150 s
   and 160 s without them.

Both keep the simulator's semantics (an array per call site and block, the same
barrier), and are skipped if the simulator's internals have changed.
"""

from __future__ import annotations

import sys
import threading
import time


def repair() -> None:
    import numpy as np
    from numba.cuda.simulator import kernel, kernelapi

    shared = getattr(kernelapi, "FakeCUDAShared", None)
    if shared is not None:
        lock = threading.Lock()
        original = shared.array

        def array(self, shape, dtype, alignment=None):
            if shape == 0 or alignment is not None:  # dynamic or aligned: as before
                return original(self, shape, dtype, alignment)
            if isinstance(dtype, kernelapi.types.Type):
                dtype = kernelapi.numpy_support.as_dtype(dtype)
            frame = sys._getframe(1)
            site = (frame.f_code.co_filename, frame.f_lineno)
            with lock:
                found = self._allocations.get(site)
                if found is None:
                    found = self._allocations[site] = np.empty(shape, dtype)
            return found

        shared.array = array

    thread = getattr(kernel, "BlockThread", None)
    if thread is not None:
        alive = thread.is_alive

        def is_alive(self):
            time.sleep(0)
            return alive(self)

        thread.is_alive = is_alive
