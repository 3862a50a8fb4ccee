"""An atomic counter for the CPU kernels' parallel tasks.

The fused per-channel passes (``_cpu.fused.forward_channels``,
``backward_channels``) over data out of cache let their tasks take channels one at a
time from a shared counter, so that a thread slowed down by the machine takes fewer
channels instead of holding up the whole call. Numba's CPU target has no atomics of
its own; this is LLVM's ``atomicrmw add``.

Like ``_cpu.llvm``, kernels that use this compile it into their own code, and numba's
on-disk cache keys a kernel on its own source file only: after editing this module,
delete ``numbabn/__pycache__/*.nb[ci]``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def take(typingctx, counters, i):
    """Add 1 to ``counters[i]`` (a 1-D int64 array) atomically; the value before.

    Ordering is "monotonic" (relaxed): the counter only hands out distinct numbers;
    what the tasks write is published by the end of the parallel region.
    """
    if not (
        isinstance(counters, types.Array) and counters.dtype == types.int64
        and counters.ndim == 1 and isinstance(i, types.Integer)
    ):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        index = context.cast(builder, args[1], sig.args[1], types.int64)
        ptr = builder.gep(data, [index])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counters, i), codegen
