"""Non-temporal (streaming) stores for the CPU kernels' elementwise passes.

A plain store to memory that is not in cache first reads the line it writes into
(write-allocate), so an elementwise pass over a tensor larger than the last-level
cache moves its output twice. Streaming stores write whole lines without reading
them. LLVM's loop vectorizer does not emit them for unaligned data, so the vector
loops here are written in LLVM IR: 32-byte aligned ``!nontemporal`` vector stores of
the same arithmetic as the scalar row helpers of ``_cpu_kernels`` (same operation
order, ``contract`` only, so results are bitwise the same as the plain path).

Per-channel parameters are either scalars (one channel's constants, NCL rows) or
arrays indexed like the data (MC spans with constants tiled across the span).
Element types as in ``_half``: float16 arrives as its uint16 bits.

Numba's on-disk cache keys a kernel on its own source file only: after editing this
module (or ``_half``), delete ``numbabn/__pycache__/*.nb[ci]`` so the kernels that
use it are compiled again.

Callers: :func:`bounds` gives the part of a row that the vector loop may write
(aligned start, whole vectors); the caller does the rest with plain stores and calls
:func:`fence` once per task so that the streamed data is ordered before the task
ends.
"""

from __future__ import annotations

import os

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

VECTOR_BYTES = 32


def _llc_bytes(default: int = 32 << 20) -> int:
    """Size of the last-level cache of CPU 0 (Linux sysfs), or ``default``."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KM")) * scale)
    except (OSError, ValueError):
        return default
    return best or default


# Streaming pays once a pass's output cannot stay in cache anyway. On the 2-core
# development machine (32 MiB L3, shared with other tenants: a repeated read pass drops
# from 43 GB/s at 8 MB to 17 GB/s at 16 MB), float32 NCHW train forward, eval forward
# and backward, streamed against plain stores: 6.4 MB outputs 0.8-0.95x when the calls
# repeat on cache-warm data and 1.04-1.16x after a cache flush; 12.8 MB 1.1-1.3x warm,
# 1.0-1.2x flushed; 19 MB 1.3-1.5x warm.
LLC_BYTES = _llc_bytes()
MIN_BYTES = LLC_BYTES // 4


@njit(inline="always")
def bounds(y):
    """(start, stop): the aligned whole-vector part of 1-D contiguous array ``y``;
    (0, 0) for an array whose address is not a multiple of its item size."""
    if y.ctypes.data % y.itemsize:
        return 0, 0
    per = VECTOR_BYTES // y.itemsize
    start = (-(y.ctypes.data // y.itemsize)) % per
    if start > y.size:
        start = y.size
    return start, start + (y.size - start) // per * per


@intrinsic
def fence(typingctx):
    """Order this thread's streamed stores before anything it does next."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


# --- IR helpers ------------------------------------------------------------------------


def _is_half(dtype) -> bool:
    return dtype == types.uint16


class _Vectors:
    """Vector loads, conversions and stores of ``lanes`` elements at index ``i``."""

    def __init__(self, context, builder, lanes, compute):
        self.context, self.builder, self.lanes = context, builder, lanes
        self.ct = context.get_value_type(compute)
        self.vct = ir.VectorType(self.ct, lanes)
        self.compute = compute

    def _pointer(self, aty, arr, i):
        elem = ir.HalfType() if _is_half(aty.dtype) else self.context.get_value_type(aty.dtype)
        data = self.context.make_array(aty)(self.context, self.builder, arr).data
        vec = ir.VectorType(elem, self.lanes)
        return self.builder.bitcast(self.builder.gep(data, [i]), vec.as_pointer()), vec

    def load(self, aty, arr, i):
        ptr, vec = self._pointer(aty, arr, i)
        align = self.context.get_abi_sizeof(self.context.get_value_type(aty.dtype))
        v = self.builder.load(ptr, align=align)
        if vec.element != self.ct:
            v = self.builder.fpext(v, self.vct)
        return v

    def param(self, pty, value, i):
        """A per-channel parameter: a splatted scalar or a vector load of an array."""
        if isinstance(pty, types.Array):
            return self.load(pty, value, i)
        scalar = self.context.cast(self.builder, value, pty, self.compute)
        v = ir.Constant(self.vct, ir.Undefined)
        for k in range(self.lanes):
            v = self.builder.insert_element(v, scalar, ir.Constant(ir.IntType(32), k))
        return v

    def store_nt(self, aty, arr, i, v):
        ptr, vec = self._pointer(aty, arr, i)
        if vec.element != self.ct:
            v = self.builder.fptrunc(v, vec)
        st = self.builder.store(v, ptr, align=VECTOR_BYTES)
        st.set_metadata("nontemporal", self.builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))

    def sub(self, a, b):
        return self.builder.fsub(a, b, flags=("contract",))

    def mul(self, a, b):
        return self.builder.fmul(a, b, flags=("contract",))

    def add(self, a, b):
        return self.builder.fadd(a, b, flags=("contract",))


def _vector_loop(builder, start, stop, step, body):
    """for (i = start; i < stop; i += step) body(i)"""
    i64 = ir.IntType(64)
    entry = builder.block
    cond = builder.append_basic_block("stream.cond")
    loop = builder.append_basic_block("stream.body")
    done = builder.append_basic_block("stream.done")
    builder.branch(cond)
    builder.position_at_end(cond)
    i = builder.phi(i64)
    i.add_incoming(start, entry)
    builder.cbranch(builder.icmp_signed("<", i, stop), loop, done)
    builder.position_at_end(loop)
    body(i)
    i.add_incoming(builder.add(i, ir.Constant(i64, step)), builder.block)
    builder.branch(cond)
    builder.position_at_end(done)


def _compute_type(param):
    return param.dtype if isinstance(param, types.Array) else param


def _contiguous(*args) -> bool:
    """The vector loops index raw data pointers: every array must be C-contiguous."""
    return all(a.layout == "C" for a in args if isinstance(a, types.Array))


def _lanes(context, out):
    return VECTOR_BYTES // context.get_abi_sizeof(context.get_value_type(out.dtype))


# --- the two elementwise formulas ----------------------------------------------------------


@intrinsic
def normalize(typingctx, x, y, start, stop, hi, lo, a, b):
    """y[i] = ((x[i] - hi) - lo) * a + b for i in [start, stop), streamed.

    ``y[start]`` must be 32-byte aligned and ``stop - start`` whole vectors
    (:func:`bounds`). hi, lo, a, b: scalars or arrays indexed like x; their
    (element) type is the compute type.
    """
    if not _contiguous(x, y, hi, lo, a, b):
        return None
    compute = _compute_type(a)

    def codegen(context, builder, sig, args):
        xty, yty, _, _, hty, lty, aty, bty = sig.args
        xv, yv, i0, i1, hv, lv, av, bv = args
        vec = _Vectors(context, builder, _lanes(context, yty), compute)

        def body(i):
            d = vec.sub(vec.sub(vec.load(xty, xv, i), vec.param(hty, hv, i)), vec.param(lty, lv, i))
            vec.store_nt(yty, yv, i, vec.add(vec.mul(d, vec.param(aty, av, i)), vec.param(bty, bv, i)))

        _vector_loop(builder, i0, i1, vec.lanes, body)
        return context.get_dummy_value()

    return types.none(x, y, types.int64, types.int64, hi, lo, a, b), codegen


@intrinsic
def grad_input(typingctx, dy, x, dx, start, stop, hi, lo, k2, mdy, k1):
    """dx[i] = (dy[i] - mdy - ((x[i] - hi) - lo) * k2) * k1 for i in [start, stop),
    streamed; the same conditions as :func:`normalize`."""
    if not _contiguous(dy, x, dx, hi, lo, k2, mdy, k1):
        return None
    compute = _compute_type(k1)

    def codegen(context, builder, sig, args):
        gty, xty, dty, _, _, hty, lty, k2ty, mty, k1ty = sig.args
        gv, xv, dv, i0, i1, hv, lv, k2v, mv, k1v = args
        vec = _Vectors(context, builder, _lanes(context, dty), compute)

        def body(i):
            xmu = vec.sub(vec.sub(vec.load(xty, xv, i), vec.param(hty, hv, i)), vec.param(lty, lv, i))
            g = vec.sub(vec.load(gty, gv, i), vec.param(mty, mv, i))
            r = vec.mul(vec.sub(g, vec.mul(xmu, vec.param(k2ty, k2v, i))), vec.param(k1ty, k1v, i))
            vec.store_nt(dty, dv, i, r)

        _vector_loop(builder, i0, i1, vec.lanes, body)
        return context.get_dummy_value()

    return types.none(dy, x, dx, types.int64, types.int64, hi, lo, k2, mdy, k1), codegen
