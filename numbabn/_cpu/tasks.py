"""Parallel passes whose parallel loop compiles once per process.

numba compiles a ``prange`` loop into a function of its own, with passes of its own:
for each signature of each parallel kernel, about a second on top of the serial code
(2.2 s against 1.0 for the flat-span pass, float32). Here one loop, :func:`_launcher`,
runs every pass's tasks. A pass is a serial kernel and a task function ``task(t,
*args)``: the kernel packs ``(task, *args)`` into its own stack frame (:func:`run`) and
calls the launcher by address, which calls :func:`_entry` for ``t`` in
``prange(ntask)``; the entry, compiled once for each packed type, reads the tuple back
and calls the task by address. Task, entry and launcher each compile alone.

The kernel's first argument ``go`` (which :func:`launch` passes): the addresses of the
launcher (as this process may run it, ``_pool``), of the entry and of the task, and a
tag of the packed tuple's type, which :func:`run` checks against the tuple it packs (a
mismatch raises ``TypeError`` instead of running a task on misread memory).
"""

from __future__ import annotations

import zlib

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba._dispatcher import compute_fingerprint
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _pool

# --- addresses: a kernel that calls a compiled function directly links that function's
# IR into its own module and optimizes it again there (in a parallel kernel, twice).
# Called through its address (an argument, so the caller still caches on disk), the
# function compiles once, alone, and loads from numba's cache as any other.


_ADDRESSES: dict = {}


def address(function, args) -> int:
    """The address of njit ``function``'s machine code for ``args`` (their types as numba
    sees them, in a kernel too), compiled or loaded from the cache on first use. The
    function must return None (its callers drop results)."""
    key = (function, compute_fingerprint(tuple(args)))  # (one call: 0.5 us, not 0.2 an argument)
    found = _ADDRESSES.get(key)
    if found is None:
        found = _ADDRESSES[key] = compiled_address(function, tuple(numba.typeof(a) for a in args))
    return found


def compiled_address(function, sig) -> int:
    """The address of njit ``function``'s machine code for the types ``sig``."""
    function.compile(sig)
    compiled = function.overloads[sig]
    if compiled.signature.return_type != types.none:
        raise TypeError(f"{function.__name__} returns a value: call drops it")
    return compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)


# --- the launcher

# The entry's signature: task index, address of the packed tuple, the tuple's type.
_ENTRY_ARGS = (types.int64, types.int64, types.TypeRef(types.none))


def _tag(tuple_type) -> int:
    return zlib.crc32(str(tuple_type).encode())


def _call_at(context, builder, address, argtys, values):
    """IR: call the function at integer ``address``, numba's calling convention, on
    ``values`` of numba types ``argtys``; its result is dropped."""
    fnty = context.call_conv.get_function_type(types.none, argtys)
    callee = builder.inttoptr(address, fnty.as_pointer())
    context.call_conv.call_function(builder, callee, types.none, argtys, values)


@intrinsic
def _run(typingctx, go, ntask, args):
    """Call the launcher in ``go`` on ``ntask`` and the address of a copy of the tuple
    (task, *args) in this frame (one intrinsic, so that ``args`` lives until the tasks
    have run); True, or False without calling when the tag in ``go`` is not that of the
    tuple's type."""
    if not isinstance(args, types.BaseTuple):
        return None
    packed = types.BaseTuple.from_types([types.int64, *args.types])
    expected = _tag(packed)
    i64 = ir.IntType(64)

    def codegen(context, builder, signature, llargs):
        launcher, entry, task, tag = (builder.extract_value(llargs[0], i) for i in range(4))
        values = [task] + [builder.extract_value(llargs[2], i) for i in range(len(args))]
        slot = cgutils.alloca_once_value(builder, context.make_tuple(builder, packed, values))
        same = builder.icmp_signed("==", tag, ir.Constant(i64, expected))
        with builder.if_then(same):
            operands = [entry, builder.ptrtoint(slot, i64), llargs[1]]
            _call_at(context, builder, launcher, (types.int64,) * 3, operands)
        return same

    return types.boolean(go, types.int64, args), codegen


def _uncounted(builder, ty, value):
    """``value`` of numba type ``ty`` with the arrays in it detached from their memory
    owners (meminfo and parent NULL, as in numba's own parallel loops): a task's views
    then count no references (atomic additions that two threads on one array would
    make on one cache line: 1.5x the time of a flat-span pass)."""
    if isinstance(ty, types.Array):
        for field in (0, 1):  # (numba's array: meminfo, parent, then size and data)
            value = builder.insert_value(value, ir.Constant(value.type.elements[field], None), field)
    elif isinstance(ty, types.BaseTuple):
        for i, member in enumerate(ty.types):
            inner = _uncounted(builder, member, builder.extract_value(value, i))
            value = builder.insert_value(value, inner, i)
    return value


@intrinsic
def _call_packed(typingctx, t, argp, ref):
    """Call the task whose address heads the tuple of type ``ref`` at ``argp`` on
    (``t``, the rest of the tuple), its arrays borrowed from the packing kernel, which
    holds them until the tasks have run (:func:`_uncounted`)."""
    if not isinstance(ref, types.TypeRef):
        return None
    packed = ref.instance_type
    argtys = [types.int64, *packed.types[1:]]

    def codegen(context, builder, signature, llargs):
        pointer = builder.inttoptr(llargs[1], context.get_value_type(packed).as_pointer())
        value = builder.load(pointer)
        members = [
            _uncounted(builder, ty, builder.extract_value(value, i)) for i, ty in enumerate(packed)
        ]
        _call_at(context, builder, members[0], argtys, [llargs[0], *members[1:]])
        return context.get_dummy_value()

    return types.none(t, argp, ref), codegen


@intrinsic
def _call_entry(typingctx, entry, t, argp):
    """Call :func:`_entry` (its address) as task ``t`` on packed arguments."""

    def codegen(context, builder, signature, llargs):
        ref = ir.Constant(context.get_value_type(_ENTRY_ARGS[2]), None)
        _call_at(context, builder, llargs[0], _ENTRY_ARGS, [llargs[1], llargs[2], ref])
        return context.get_dummy_value()

    return types.none(entry, t, argp), codegen


@njit(parallel=True, cache=True, fastmath=False, no_cfunc_wrapper=True)
def _launcher(entry, argp, ntask):
    for t in prange(ntask):
        _call_entry(entry, np.int64(t), argp)


@njit(cache=True, fastmath=False, no_cfunc_wrapper=True)
def _entry(t, argp, ref):
    _call_packed(t, argp, ref)


@njit(inline="always")
def run(go, ntask, args):
    """Tasks 0 .. ``ntask`` - 1 of the task in ``go`` (the kernel's first argument) on
    the tuple ``args``, in parallel."""
    if not _run(go, np.int64(ntask), args):
        raise TypeError("task arguments of other types than launch() was given")


@njit(cache=True, fastmath=False, no_cfunc_wrapper=True)
def _each(go, ntask, *args):
    run(go, ntask, args)


def parallel(task, ntask, *task_args) -> None:
    """Tasks 0 .. ``ntask`` - 1 of ``task`` on ``task_args``, in parallel (a pass with
    nothing to do before or after its tasks)."""
    launch(_each, task, task_args, ntask, *task_args)


def _task(task, task_args) -> tuple:
    """(``go``, lock or None) of ``task`` for arguments of the types of ``task_args``."""
    key = (task, compute_fingerprint(tuple(task_args)))
    found = _TASKS.get(key)
    if found is None:
        where = address(task, (INT, *task_args))
        packed = types.BaseTuple.from_types([types.int64, *map(numba.typeof, task_args)])
        entry = compiled_address(_entry, (types.int64, types.int64, types.TypeRef(packed)))
        loop = _pool.serial(_launcher) if _pool.forked() else _launcher
        go = (address(loop, (INT, INT, INT)), entry, where, _tag(packed))
        lock = _pool.exclusive()  # (after the launcher's compilation: the pool has started)
        found = _TASKS[key] = go, (None if lock is _pool.NO_LOCK else lock)
    return found


_TASKS: dict = _pool.on_fork_clear({})  # (a forked child may need the serial launcher)
INT = np.int64(0)  # (an int64 argument, for typing a task's arguments by example)


def launch(kernel, task, task_args, *kernel_args) -> None:
    """Serial ``kernel`` on ``go`` (see the module's docstring) and ``kernel_args``;
    ``task_args``: arguments of the types the kernel passes the task after ``t``."""
    go, lock = _task(task, task_args)
    if lock is None:
        kernel(go, *kernel_args)
    else:
        with lock:
            kernel(go, *kernel_args)
