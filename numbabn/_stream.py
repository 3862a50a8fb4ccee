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

The fused rows (the end of this module) are vector loops of the same kind that write
one channel's row (streamed, or with plain stores) and add up the next channel's row
in the same iterations, for the fused per-channel passes. The line loops after them
write one cache line of columns down several channels-last rows, with that line's
per-channel constants loaded once.
"""

from __future__ import annotations

import math
import os
import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

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
#
# A virtual machine's sysfs shows the whole socket's cache, which the host shares among
# its guests: 300 MiB on an Intel Xeon development machine with 2 vCPUs, where a
# repeated 2-thread read pass ran about 40 GB/s over 8-64 MB and 16 GB/s from 128 MB.
# Taken at its word, no output there was ever streamed, and the fused passes' "fits
# in cache" rule (``_cpu._fuse``) admitted 75 MB tensors. So at most _LLC_PER_CPU
# bytes per CPU of the machine are counted. Paired full calls there, float32, 2
# threads, streamed against plain stores, train / eval / backward: 12.8-25.7 MB
# outputs 0.97-1.09x; 6.4 MB 0.88 / 0.98 / 0.97 (below the limit this gives, 8 MB).
_LLC_PER_CPU = 16 << 20


def _cache_share(llc: int, cpus: int) -> int:
    """The last-level cache the thresholds count on: ``llc`` bytes, at most
    _LLC_PER_CPU for each of the ``cpus`` this process may use."""
    return min(llc, _LLC_PER_CPU * cpus)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup (v2) CPU
    quota (a container's ``--cpus``), not the machine's count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _bytes_setting(name: str, default: int) -> int:
    """A size in bytes from environment variable ``name`` (if set), else ``default``."""
    text = os.environ.get(name, "").strip()
    return int(float(text)) if text else default


# NUMBABN_LLC_BYTES overrides what the thresholds count on (the cache share).
LLC_BYTES = _bytes_setting("NUMBABN_LLC_BYTES", _cache_share(_llc_bytes(), usable_cpus()))
MIN_BYTES = LLC_BYTES // 4
# Streaming stores are measured on x86-64 only (AVX2 and AVX-512 machines); elsewhere
# (ARM's non-temporal stores are hints with other costs) every store is plain.
STREAMING = platform.machine().lower() in ("x86_64", "amd64")


def item_bytes(a):
    """The size of array ``a``'s elements, as a compile-time constant (``a.itemsize`` is
    read at run time, and dividing by it costs a division instruction per use)."""


@overload(item_bytes, inline="always")
def _item_bytes(a):
    size = a.dtype.bitwidth // 8
    return lambda a: size


@njit(inline="always")
def _boundary(y, nbytes):
    """(index of the first multiple of ``nbytes`` in 1-D contiguous array ``y``, at most
    its size; values per ``nbytes``), or (0, 0) for an array whose address is not a
    multiple of its item size."""
    item = item_bytes(y)
    if y.ctypes.data % item:
        return 0, 0
    per = nbytes // item
    return min((-(y.ctypes.data // item)) % per, y.size), per


@njit(inline="always")
def bounds(y):
    """(start, stop): the aligned whole-vector part of 1-D contiguous array ``y``;
    (0, 0) for an array whose address is not a multiple of its item size."""
    start, per = _boundary(y, VECTOR_BYTES)
    if per == 0:
        return 0, 0
    return start, start + (y.size - start) // per * per


LINE_BYTES = 64


@njit(inline="always")
def line_blocks(y):
    """(start, blocks): the index of the first cache-line boundary of 1-D contiguous
    array ``y`` and the number of whole lines from there, for loops that stream a line
    at a time; (0, 0) for an array whose address is not a multiple of its item size.
    Lines written whole by consecutive stores leave the write-combining buffers at
    once; with a row that starts mid-line, each line took the end of one block and
    the start of the next, and the fused rows (below) ran 1.3x slower."""
    start, per = _boundary(y, LINE_BYTES)
    if per == 0:
        return 0, 0
    return start, (y.size - start) // per


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (float64), whatever the fast-math flags of the caller."""
    if not all(t == types.float64 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return _fma(builder, *args)

    return types.float64(types.float64, types.float64, types.float64), codegen


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
        """A per-channel parameter: a splatted scalar, a vector load of an array, or
        (``pty`` None) a vector loaded before the loop."""
        if pty is None:
            return value
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


def _loop(builder, start, stop, step, inits, body):
    """for (i = start; i < stop; i += step) values = body(i, values), with ``inits``
    the values before the loop; returns the values after it."""
    i64 = ir.IntType(64)
    entry = builder.block
    cond = builder.append_basic_block("loop.cond")
    loop = builder.append_basic_block("loop.body")
    done = builder.append_basic_block("loop.done")
    builder.branch(cond)
    builder.position_at_end(cond)
    i = builder.phi(i64)
    i.add_incoming(start, entry)
    phis = []
    for value in inits:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        phis.append(phi)
    builder.cbranch(builder.icmp_signed("<", i, stop), loop, done)
    builder.position_at_end(loop)
    new = body(i, phis)
    end = builder.block
    i.add_incoming(builder.add(i, ir.Constant(i64, step)), end)
    for phi, value in zip(phis, new):
        phi.add_incoming(value, end)
    builder.branch(cond)
    builder.position_at_end(done)
    return phis


def _vector_loop(builder, start, stop, step, body):
    """for (i = start; i < stop; i += step) body(i)"""
    _loop(builder, start, stop, step, [], lambda i, _: body(i) or [])


def _compute_type(param):
    return param.dtype if isinstance(param, types.Array) else param


def _contiguous(*args) -> bool:
    """The vector loops index raw data pointers: every array must be C-contiguous."""
    return all(a.layout == "C" for a in args if isinstance(a, types.Array))


def _lanes(context, out):
    return VECTOR_BYTES // context.get_abi_sizeof(context.get_value_type(out.dtype))


# --- the two elementwise formulas ----------------------------------------------------------


def _normalized(vec, x, params, i):
    """((x[i] - hi) - lo) * a + b for the vector at i; ``x`` and each of ``params``
    (hi, lo, a, b) a (numba type, value) pair."""
    hi, lo, a, b = (vec.param(t, v, i) for t, v in params)
    return vec.add(vec.mul(vec.sub(vec.sub(vec.load(*x, i), hi), lo), a), b)


def _gradient(vec, g, x, params, i):
    """(g[i] - mdy - ((x[i] - hi) - lo) * k2) * k1 for the vector at i; ``params``
    (hi, lo, k2, mdy, k1) as in :func:`_normalized`."""
    hi, lo, k2, mdy, k1 = (vec.param(t, v, i) for t, v in params)
    xmu = vec.sub(vec.sub(vec.load(*x, i), hi), lo)
    return vec.mul(vec.sub(vec.sub(vec.load(*g, i), mdy), vec.mul(xmu, k2)), k1)


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
            params = ((hty, hv), (lty, lv), (aty, av), (bty, bv))
            vec.store_nt(yty, yv, i, _normalized(vec, (xty, xv), params, i))

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
            params = ((hty, hv), (lty, lv), (k2ty, k2v), (mty, mv), (k1ty, k1v))
            vec.store_nt(dty, dv, i, _gradient(vec, (gty, gv), (xty, xv), params, i))

        _vector_loop(builder, i0, i1, vec.lanes, body)
        return context.get_dummy_value()

    return types.none(dy, x, dx, types.int64, types.int64, hi, lo, k2, mdy, k1), codegen


# --- fused rows: one channel's elementwise pass with the next channel's sums -----------
# The fused per-channel passes (``_cpu_kernels.forward_channels``) reduce a channel,
# then write its outputs. Done one after the other, a core first only reads memory,
# then only writes it, and the pass took as long as a read pass plus a write pass
# (2-core development machine: 3.1 ms against 1.5 + 1.7 ms at 25.7 MB). The loops
# below write one row of a channel and, in the same iterations, add up the row of the
# next channel, so the loads and the stores overlap as in a plain elementwise pass.
#
# The two sides index their rows independently: the stores start at ``s`` (the first
# cache-line boundary of the output row when streaming, 0 otherwise) and do
# ``nstore`` blocks; the sums start at 0 and do ``nsum`` blocks. A block is two
# vectors, one cache line, of the output's element type. Each of a block's two vectors
# adds into its own float64 accumulators (one lane per element), which live in the
# caller's array ``acc`` between rows: (sum 1 of the first vector, sum 2 of the first,
# sum 1 of the second, sum 2 of the second), ``lanes`` values each. So the order of
# the additions, and thereby the sums to the last bit, depend on the row lengths
# alone, not on where the output lies or whether it is streamed. The caller adds the
# values past the last whole block, and the lanes at the end (``_cpu_kernels``).


def _store_plain(vec, aty, arr, i, v):
    ptr, vtype = vec._pointer(aty, arr, i)
    if vtype.element != vec.ct:
        v = vec.builder.fptrunc(v, vtype)
    align = vec.context.get_abi_sizeof(vec.context.get_value_type(aty.dtype))
    vec.builder.store(v, ptr, align=align)


def _fma(builder, a, b, c):
    """a * b + c rounded once (LLVM's fma, scalars or vectors)."""
    t = a.type
    suffix = f"v{t.count}f64" if isinstance(t, ir.VectorType) else "f64"  # float64 only
    fnty = ir.FunctionType(t, [t, t, t])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.{suffix}")
    return builder.call(fn, [a, b, c])


def _prefetch(vec, aty, arr, i):
    """Ask for the cache line holding element ``i`` of contiguous array ``arr`` (type
    ``aty``), for reading, into L2 (x86 ``prefetcht1``). A hint: an address outside
    the array is allowed and never faults."""
    builder = vec.builder
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    ptr = builder.bitcast(vec._pointer(aty, arr, i)[0], i8p)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    # (read, locality 2 of 0-3, data cache)
    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])


def _splat(builder, value, vtype):
    v = ir.Constant(vtype, ir.Undefined)
    for k in range(vtype.count):
        v = builder.insert_element(v, value, ir.Constant(ir.IntType(32), k))
    return v


# The accumulators hold one lane per element of a vector: at most 32 bytes of float16.
ACC_SIZE = 4 * (VECTOR_BYTES // 2)

# The sum rows come from memory, one row of a channel after another, and consecutive
# rows of a channel lie C * L values apart: the hardware prefetcher loses the stream at
# every row end and learns it again on the next row. So the sums side prefetches the
# block PREFETCH_BLOCKS ahead of the one it adds into L2, and from the end of a row on,
# the start of the next row (``pnext`` elements further on, given by the caller; never
# more than one row ahead). Results are bitwise the same. Measured on the 2-core
# development machine, cache flushed before each call, float32 unless said:
# - against no prefetch, paired in one process (train / backward), into every cache
#   level (prefetcht0) 24 blocks ahead: 32x64x56x56 1.03-1.17x / 1.01-1.11x,
#   64x128x56x56 1.11-1.13x / 0.96-1.03x, 128x64x28x28 1.20-1.24x / 1.19-1.21x,
#   50 KB rows level;
# - into L2 (prefetcht1), paired against that: 48-128 blocks ahead alike; train /
#   backward 32x64x56x56 1.07-1.19x / 1.19-1.31x, 64x128x56x56 1.01-1.08x /
#   1.13-1.18x, 128x64x28x28 1.07-1.18x / 1.03-1.09x; float64 16x64x56x56 1.05x /
#   1.19x; float16 0.87-1.01x / 0.98-1.04x (level); 14x14 planes (one row ahead)
#   backward 0.93-0.96x; 24 blocks ahead into L2 0.95-1.12x; prefetching the rows
#   being re-read too (from L2 or L3) gained nothing. Our guess at why L2 is better
#   (not measured directly): a prefetch into L1 holds one of the core's few L1 miss
#   buffers until its line arrives from memory, as the loop's loads and streamed
#   stores do.
PREFETCH_BLOCKS = 64


def _fused_row(sums, nt):
    """An intrinsic that normalizes (the arithmetic of :func:`normalize`) ``nstore``
    blocks of one row from ``s``, with non-temporal stores if ``nt`` (else plain ones),
    and adds float64 ``sums`` of the next channel's row over its first ``nsum`` blocks
    into ``acc``:
    "moments", d and d^2 with d = z - k; "grads", g and g * (z - k) (rows g, z).
    The last argument, ``pnext``, is how many elements after the start of the sum
    rows the next rows to be summed start (prefetched near this row's end; any value
    is safe, 0 when there is no next row)."""
    n_store = 8  # x, y, s, nstore, hi, lo, a, b
    n_sums = 4 if sums == "moments" else 5  # arrays, k, nsum, acc

    def signature(args):
        store_arrays, consts = args[:2], args[4:n_store]
        rows = args[n_store : n_store + n_sums - 3]
        acc = args[n_store + n_sums - 1]
        if not _contiguous(*store_arrays, *rows, acc, *consts):
            return None
        compute = _compute_type(consts[-1])

        def codegen(context, builder, sig, vals):
            tys = sig.args
            lanes = _lanes(context, tys[1])
            vec = _Vectors(context, builder, lanes, compute)
            wide = _Vectors(context, builder, lanes, types.float64)
            i64 = ir.IntType(64)
            ins = list(zip(tys, vals))
            ins, pnext = ins[:-1], ins[-1][1]
            (xt, xv), (yt, yv), (_, s), (_, nstore) = ins[:4]
            params = ins[4:8]
            rows = ins[n_store : n_store + n_sums - 3]
            k = _splat(builder, ins[-3][1], wide.vct)
            nsum = ins[-2][1]
            blk = ir.Constant(i64, 2 * lanes)
            # the prefetch distance, at most a row (short rows prefetch the next row),
            # and the sum rows' end, past which it continues on the next rows
            most = ir.Constant(i64, PREFETCH_BLOCKS)
            dist = builder.select(builder.icmp_signed("<", nsum, most), nsum, most)
            to_next = builder.sub(pnext, builder.mul(nsum, blk))
            acc_ty, acc_v = ins[-1]

            def store(i):
                r = _normalized(vec, (xt, xv), params, i)
                if nt:
                    vec.store_nt(yt, yv, i, r)
                else:
                    _store_plain(vec, yt, yv, i, r)

            def add(i, accs):
                # explicit fused multiply-adds: the rounding is then the same whatever
                # the flags of the function this is compiled into (and 1.5x the
                # throughput of a multiply and an add)
                if sums == "moments":
                    (zt, zv), = rows
                    d = builder.fsub(wide.load(zt, zv, i), k)
                    return [builder.fadd(accs[0], d), _fma(builder, d, d, accs[1])]
                (gzt, gzv), (zt, zv) = rows
                g = wide.load(gzt, gzv, i)
                d = builder.fsub(wide.load(zt, zv, i), k)
                return [builder.fadd(accs[0], g), _fma(builder, g, d, accs[1])]

            def store_block(m):
                base = builder.add(s, builder.mul(m, ir.Constant(i64, 2 * lanes)))
                store(base)
                store(builder.add(base, ir.Constant(i64, lanes)))

            def ahead(m, arrays):
                # the block ``dist`` ahead on the sum rows, or past their end that far
                # into the next ones
                off = builder.add(m, dist)
                idx = builder.mul(off, blk)
                past = builder.icmp_signed(">=", off, nsum)
                idx = builder.select(past, builder.add(idx, to_next), idx)
                for aty, arr in arrays:
                    _prefetch(vec, aty, arr, idx)

            def sum_block(m, accs):
                ahead(m, rows)
                base = builder.mul(m, ir.Constant(i64, 2 * lanes))
                first = add(base, accs[0:2])
                second = add(builder.add(base, ir.Constant(i64, lanes)), accs[2:4])
                return first + second

            def both(m, accs):
                store_block(m)
                return sum_block(m, accs)

            def store_only(m, accs):
                store_block(m)
                return accs

            acc_data = context.make_array(acc_ty)(context, builder, acc_v).data
            slots = [
                builder.bitcast(
                    builder.gep(acc_data, [ir.Constant(i64, j * lanes)]), wide.vct.as_pointer()
                )
                for j in range(4)
            ]
            accs = [builder.load(p, align=8) for p in slots]
            both_end = builder.select(builder.icmp_signed("<", nstore, nsum), nstore, nsum)
            accs = _loop(builder, ir.Constant(i64, 0), both_end, 1, accs, both)
            accs = _loop(builder, both_end, nsum, 1, accs, sum_block)
            _loop(builder, both_end, nstore, 1, [], store_only)
            for p, v in zip(slots, accs):
                builder.store(v, p, align=8)
            return context.get_dummy_value()

        return types.none(*args[:-1], types.int64), codegen

    # numba's intrinsics take no *args: one explicit parameter list per combination
    if sums == "moments":

        def fused(typingctx, x, y, s, nstore, hi, lo, a, b, z, k, nsum, acc, pn):
            return signature((x, y, s, nstore, hi, lo, a, b, z, k, nsum, acc, pn))

    else:

        def fused(typingctx, x, y, s, nstore, hi, lo, a, b, g, z, k, nsum, acc, pn):
            return signature((x, y, s, nstore, hi, lo, a, b, g, z, k, nsum, acc, pn))

    return intrinsic(fused)


# normalize_moments(x, y, s, nstore, hi, lo, a, b, z, k, nsum, acc, pn): train forward.
# normalize_grads(x, y, s, nstore, hi, lo, a, b, g, z, k, nsum, acc, pn): the backward
# takes a channel's gradient sums with it alone (empty x and y, nstore 0), so that they
# are added in the order of the fused rows.
normalize_moments_nt = _fused_row("moments", True)
normalize_moments_plain = _fused_row("moments", False)
normalize_grads_plain = _fused_row("grads", False)


# --- lines down the rows: channels-last passes with their constants in registers ------
# The MC passes above index their constants like the data (arrays tiled over a span):
# 5 or 4 constant loads for every vector of data. The loops below take one cache line
# of columns at a time down ``nrows`` rows (``stride`` apart): the constants of those
# columns are loaded once, before the loop, and each row costs the loads and the store
# of its line alone.


def _write(vec, formula, arrays, params, i, nt):
    """Store ``formula`` ("normalize" or "grad_input") of the vector at ``i`` into the
    last of ``arrays`` ((type, value) pairs: the inputs, then the output), streamed if
    ``nt``; ``params`` as in :func:`_normalized`."""
    if formula == "normalize":
        v = _normalized(vec, arrays[0], params, i)
    else:
        v = _gradient(vec, arrays[0], arrays[1], params, i)
    out_ty, out_v = arrays[-1]
    if nt:
        vec.store_nt(out_ty, out_v, i, v)
    else:
        _store_plain(vec, out_ty, out_v, i, v)


def _lines(formula, nt=True):
    """An intrinsic that writes ``formula`` ("normalize" or "grad_input") of one line of
    columns, from flat index ``start`` down ``nrows`` rows ``stride`` apart, with
    non-temporal stores if ``nt`` (every line then 64-byte aligned), else plain ones;
    the constants are 1-D arrays of the row's columns, read at ``j`` (the line's first
    column)."""
    n_arrays = 2 if formula == "normalize" else 3

    def signature(args):
        arrays, consts = args[:n_arrays], args[n_arrays + 3 : -1]
        if not _contiguous(*arrays, *consts):
            return None
        compute = _compute_type(consts[-1])

        def codegen(context, builder, sig, vals):
            ins = list(zip(sig.args, vals))
            arrays, (_, start), (_, nrows), (_, stride) = ins[:n_arrays], *ins[n_arrays : n_arrays + 3]
            consts, (_, j) = ins[n_arrays + 3 : -1], ins[-1]
            out_ty = arrays[-1][0]
            vec = _Vectors(context, builder, _lanes(context, out_ty), compute)
            i64 = ir.IntType(64)
            step = ir.Constant(i64, vec.lanes)
            halves = [[(None, vec.load(t, v, at)) for t, v in consts] for at in (j, builder.add(j, step))]

            def body(r):
                base = builder.add(start, builder.mul(r, stride))
                for half, params in enumerate(halves):
                    i = builder.add(base, step) if half else base
                    _write(vec, formula, arrays, params, i, nt)

            _vector_loop(builder, ir.Constant(i64, 0), nrows, 1, body)
            return context.get_dummy_value()

        index = types.int64  # start, nrows, stride, j: cast to the IR's i64
        return types.none(*arrays, index, index, index, *consts, index), codegen

    if formula == "normalize":

        def lines(typingctx, x, y, start, nrows, stride, hi, lo, a, b, j):
            return signature((x, y, start, nrows, stride, hi, lo, a, b, j))

    else:

        def lines(typingctx, dy, x, dx, start, nrows, stride, hi, lo, k2, mdy, k1, j):
            return signature((dy, x, dx, start, nrows, stride, hi, lo, k2, mdy, k1, j))

    return intrinsic(lines)


# normalize_lines(x, y, start, nrows, stride, hi, lo, a, b, j);
# grad_input_lines(dy, x, dx, start, nrows, stride, hi, lo, k2, mdy, k1, j)
normalize_lines = _lines("normalize")
grad_input_lines = _lines("grad_input")
normalize_lines_plain = _lines("normalize", False)
grad_input_lines_plain = _lines("grad_input", False)


# --- short planes: constants chosen per lane -----------------------------------------
# NCL planes of up to 64 values (``_cpu._flat``) are walked as flat rows of a sample's
# C * L values. Expanding the constants to one per value (``_cpu_kernels.tile``) reads
# 4-5 constants for every value, from a table as large as four samples (1.6 MB at
# 2048 channels of 7x7). The loops below keep, instead, the channel of the vector's
# first value and how many of its values are left (``c``, ``r``), and build each
# constant vector from two scalars: channel c's for the lanes before ``r``, the next
# channel's after. A vector then spans at most two channels: planes must hold at
# least a vector's values. Same arithmetic as the loops above.


def _planes(formula, nt=True):
    """An intrinsic that writes ``formula`` ("normalize" or "grad_input") over ``nvec``
    vectors from flat index ``start`` of flat rows of ``nc`` channels of ``l`` values
    (the first vector's first value in channel ``c``, ``r`` values of it left); the
    constants are 1-D arrays of the ``nc`` channels. Non-temporal stores if ``nt``
    (``y[start]`` then 32-byte aligned), else plain ones."""
    n_arrays = 2 if formula == "normalize" else 3

    def signature(args):
        arrays, consts = args[:n_arrays], args[n_arrays + 5 :]
        if not _contiguous(*arrays, *consts):
            return None
        compute = _compute_type(consts[-1])

        def codegen(context, builder, sig, vals):
            ins = list(zip(sig.args, vals))
            arrays = ins[:n_arrays]
            start, nvec, c0, r0, l = (v for _, v in ins[n_arrays : n_arrays + 5])
            consts = ins[n_arrays + 5 :]
            out_ty = arrays[-1][0]
            vec = _Vectors(context, builder, _lanes(context, out_ty), compute)
            i64 = ir.IntType(64)
            lanes = ir.Constant(i64, vec.lanes)
            first = context.make_array(consts[0][0])(context, builder, consts[0][1])
            nch = builder.extract_value(first.shape, 0)
            # each constant's element type and data pointer, read once before the loop
            tables = [
                (aty.dtype, context.make_array(aty)(context, builder, arr).data)
                for aty, arr in consts
            ]
            lane = [ir.Constant(i64, k) for k in range(vec.lanes)]
            iota = ir.Constant(ir.VectorType(i64, vec.lanes), lane)
            zero = ir.Constant(i64, 0)
            one = ir.Constant(i64, 1)

            def body(k, state):
                c, r = state
                i = builder.add(start, builder.mul(k, lanes))
                after = builder.add(c, one)
                nxt = builder.select(builder.icmp_signed("==", after, nch), zero, after)
                mask = builder.icmp_signed("<", iota, _splat(builder, r, iota.type))
                params = []
                for dtype, data in tables:
                    here = builder.load(builder.gep(data, [c]))
                    there = builder.load(builder.gep(data, [nxt]))
                    here = context.cast(builder, here, dtype, compute)
                    there = context.cast(builder, there, dtype, compute)
                    here, there = (_splat(builder, v, vec.vct) for v in (here, there))
                    v = builder.select(mask, here, there)
                    params.append((None, v))
                _write(vec, formula, arrays, params, i, nt)
                left = builder.sub(r, lanes)
                step = builder.icmp_signed("<=", left, zero)
                wrapped = builder.add(left, l)
                return [builder.select(step, nxt, c), builder.select(step, wrapped, left)]

            _loop(builder, zero, nvec, 1, [c0, r0], body)
            return context.get_dummy_value()

        index = types.int64  # start, nvec, c, r, l
        return types.none(*arrays, index, index, index, index, index, *consts), codegen

    if formula == "normalize":

        def planes(typingctx, x, y, start, nvec, c, r, l, hi, lo, a, b):
            return signature((x, y, start, nvec, c, r, l, hi, lo, a, b))

    else:

        def planes(typingctx, dy, x, dx, start, nvec, c, r, l, hi, lo, k2, mdy, k1):
            return signature((dy, x, dx, start, nvec, c, r, l, hi, lo, k2, mdy, k1))

    return intrinsic(planes)


# normalize_planes(x, y, start, nvec, c, r, l, hi, lo, a, b);
# grad_input_planes(dy, x, dx, start, nvec, c, r, l, hi, lo, k2, mdy, k1)
normalize_planes = _planes("normalize")
grad_input_planes = _planes("grad_input")
normalize_planes_plain = _planes("normalize", False)
grad_input_planes_plain = _planes("grad_input", False)
