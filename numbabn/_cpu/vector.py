"""The hand-written vector loops of the CPU kernels (LLVM IR, built with ``llvm``).

Each loop takes the elementwise formula from its gradient argument ``g`` (None:
normalize of ``x``; an array: grad_input of ``g`` and ``x``, see ``formulas``) and
its constants as one tuple ``k``: scalars (one channel's), or 1-D arrays.

* :data:`span_nt`: one contiguous span with non-temporal stores (a plain store to a
  line not in cache first reads it: an output larger than the cache would move twice).
* ``fused_*``: a channel's row written while the next channel's row is summed in the
  same iterations (the fused per-channel passes, ``fused``), so loads and stores
  overlap as in a plain pass.
* ``lines_*``: one cache line of columns down several channels-last rows, the line's
  constants loaded once before the loop.
* ``planes_*``: flat rows of short NCL planes, each lane's constants chosen from two
  channels' (a vector spans at most two planes).

``_nt`` loops store non-temporally (their stores must start on a vector boundary,
``llvm.bounds``; the fused and line loops on a cache line), ``_plain`` ones do not.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import llvm
from .llvm import Vectors, contiguous, formula, lanes_of, splat, store_plain, unpack
from .tuning import COMPILED

# The accumulators hold one lane per element of a vector: at most 32 bytes of float16.
ACC_SIZE = 4 * (llvm.VECTOR_BYTES // 2)
PREFETCH_BLOCKS = COMPILED["prefetch_blocks"]


def _gradient(gty, gv):
    """The ``g`` of :func:`llvm.formula`: None for normalize."""
    return None if isinstance(gty, types.NoneType) else (gty, gv)


def _write(vec, g, x, params, out, i, nt):
    """Store the formula of the vector at ``i`` into ``out`` ((type, value)), streamed
    if ``nt``."""
    v = formula(vec, g, x, params, i)
    if nt:
        vec.store_nt(*out, i, v)
    else:
        store_plain(vec, *out, i, v)


@intrinsic
def span_nt(typingctx, g, x, y, start, stop, k):
    """y[i] = the formula at i for i in [start, stop), streamed: ``y[start]`` on a
    32-byte boundary and whole vectors (``llvm.bounds``); ``k`` scalars or arrays
    indexed like ``x``."""
    if not contiguous(g, x, y, k):
        return None
    compute = llvm.compute_type(k)

    def codegen(context, builder, sig, args):
        gty, xty, yty, _, _, kty = sig.args
        gv, xv, yv, i0, i1, kv = args
        vec = Vectors(context, builder, lanes_of(context, yty), compute)
        consts, grad = unpack(builder, kty, kv), _gradient(gty, gv)

        def body(i):
            _write(vec, grad, (xty, xv), consts, (yty, yv), i, True)

        llvm.vector_loop(builder, i0, i1, vec.lanes, body)
        return context.get_dummy_value()

    return types.none(g, x, y, types.int64, types.int64, k), codegen


# --- fused rows: one channel's row written, the next channel's row summed ----------------
# The stores start at ``s`` (the output row's first cache-line boundary when streaming,
# else 0) and do ``nstore`` blocks; the sums start at 0 and do ``nsum`` blocks. A block is
# two vectors, one cache line, of the output's element type. Each of a block's vectors
# adds into its own float64 accumulators (one lane per element), kept in the caller's
# ``acc`` between rows: (sum 1, sum 2) of the first vector, then of the second, ``lanes``
# values each. The order of the additions thus follows the row lengths alone, not the
# output's address or store kind; the caller adds the values past the last block and
# the lanes. The sums side prefetches PREFETCH_BLOCKS blocks ahead into L2, across the
# row's end into the next row to be summed (``pnext`` elements on; 0: none).


# (_fused_row is long: numba's intrinsics build their IR in nested closures over the
# typing results, and the loop's pieces share the builder and the vectors' state.)
def _fused_row(sums, nt):
    """A fused-row intrinsic: normalize ``nstore`` blocks of ``x`` into ``y`` from ``s``
    (constants ``k``), and add into ``acc`` float64 ``sums`` over ``nsum`` blocks of
    rows: "moments", d and d^2 with d = z - kshift; "grads", g and g * (z - kshift)
    (rows g, z; g may be a masked pair). ``x`` may be any operand of ``formulas``."""
    nrows = 1 if sums == "moments" else 2

    def signature(args):
        k, rows, acc = args[4], args[5 : 5 + nrows], args[-2]
        if not contiguous(*args[:2], *rows, acc, k):
            return None
        compute = llvm.compute_type(k)

        def codegen(context, builder, sig, vals):
            ins = list(zip(sig.args, vals))
            (xt, xv), (yt, yv), (_, s), (_, nstore), (kt, kv) = ins[:5]
            params = unpack(builder, kt, kv)
            rows = ins[5 : 5 + nrows]
            lanes = lanes_of(context, yt)
            vec = Vectors(context, builder, lanes, compute)
            wide = Vectors(context, builder, lanes, types.float64)
            i64 = ir.IntType(64)
            kshift = splat(builder, ins[-4][1], wide.vct)
            nsum, (acc_ty, acc_v), pnext = ins[-3][1], ins[-2], ins[-1][1]
            blk = ir.Constant(i64, 2 * lanes)
            # the prefetch distance, at most a row (short rows prefetch the next row)
            most = ir.Constant(i64, PREFETCH_BLOCKS)
            dist = builder.select(builder.icmp_signed("<", nsum, most), nsum, most)
            to_next = builder.sub(pnext, builder.mul(nsum, blk))

            def add(i, accs):
                # explicit fused multiply-adds: the same rounding whatever the flags of
                # the function this is compiled into
                if sums == "moments":
                    ((zt, zv),) = rows
                    d = builder.fsub(wide.load(zt, zv, i), kshift)
                    return [builder.fadd(accs[0], d), llvm.fma_ir(builder, d, d, accs[1])]
                (gt, gv), (zt, zv) = rows
                g = llvm.load_operand(vec, gt, gv, i)  # (masked in the compute type)
                if vec.ct != wide.ct:
                    g = builder.fpext(g, wide.vct)
                d = builder.fsub(wide.load(zt, zv, i), kshift)
                return [builder.fadd(accs[0], g), llvm.fma_ir(builder, g, d, accs[1])]

            def store_block(m):
                base = builder.add(s, builder.mul(m, blk))
                for i in (base, builder.add(base, ir.Constant(i64, lanes))):
                    _write(vec, None, (xt, xv), params, (yt, yv), i, nt)

            def ahead(m):
                # the block ``dist`` ahead on the sum rows, or past their end that far
                # into the next ones
                off = builder.add(m, dist)
                idx = builder.mul(off, blk)
                past = builder.icmp_signed(">=", off, nsum)
                idx = builder.select(past, builder.add(idx, to_next), idx)
                for aty, arr in rows:
                    for mty, m in llvm.arrays_of(builder, aty, arr):
                        llvm.prefetch(vec, mty, m, idx)

            def sum_block(m, accs):
                ahead(m)
                base = builder.mul(m, blk)
                first = add(base, accs[0:2])
                return first + add(builder.add(base, ir.Constant(i64, lanes)), accs[2:4])

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
            accs = llvm.loop(builder, ir.Constant(i64, 0), both_end, 1, accs, both)
            accs = llvm.loop(builder, both_end, nsum, 1, accs, sum_block)
            llvm.loop(builder, both_end, nstore, 1, [], store_only)
            for p, v in zip(slots, accs):
                builder.store(v, p, align=8)
            return context.get_dummy_value()

        return types.none(*args[:-1], types.int64), codegen

    # numba's intrinsics take no *args: one parameter list per kind of sums
    if sums == "moments":

        def fused(typingctx, x, y, s, nstore, k, z, kshift, nsum, acc, pn):
            return signature((x, y, s, nstore, k, z, kshift, nsum, acc, pn))

    else:

        def fused(typingctx, x, y, s, nstore, k, g, z, kshift, nsum, acc, pn):
            return signature((x, y, s, nstore, k, g, z, kshift, nsum, acc, pn))

    return intrinsic(fused)


# fused_moments_*(x, y, s, nstore, k, z, kshift, nsum, acc, pn): the train forward.
# fused_grads_*(x, y, s, nstore, k, g, z, kshift, nsum, acc, pn): the backward's gradient
# sums of a channel's row, in the order of the fused rows; the stores write nothing
# (empty x and y) or dresidual, the gradient g itself, from the same row (x is g).
fused_moments_nt = _fused_row("moments", True)
fused_moments_plain = _fused_row("moments", False)
fused_grads_nt = _fused_row("grads", True)
fused_grads_plain = _fused_row("grads", False)


def _lines(nt):
    """lines(g, x, y, start, nrows, stride, k, j): the formula over one line of columns,
    from flat index ``start`` down ``nrows`` rows ``stride`` apart; ``k`` 1-D arrays of
    the row's columns, read at ``j`` (the line's first column)."""

    def lines(typingctx, g, x, y, start, nrows, stride, k, j):
        if not contiguous(g, x, y, k):
            return None
        compute = llvm.compute_type(k)

        def codegen(context, builder, sig, vals):
            gty, xty, yty, kty = sig.args[0], sig.args[1], sig.args[2], sig.args[6]
            gv, xv, yv, start, nrows, stride, kv, j = vals
            vec = Vectors(context, builder, lanes_of(context, yty), compute)
            step = ir.Constant(ir.IntType(64), vec.lanes)
            consts, grad = unpack(builder, kty, kv), _gradient(gty, gv)
            halves = [
                [(None, vec.load(t, v, at)) for t, v in consts] for at in (j, builder.add(j, step))
            ]

            def body(r):
                base = builder.add(start, builder.mul(r, stride))
                for half, params in enumerate(halves):
                    i = builder.add(base, step) if half else base
                    _write(vec, grad, (xty, xv), params, (yty, yv), i, nt)

            llvm.vector_loop(builder, ir.Constant(ir.IntType(64), 0), nrows, 1, body)
            return context.get_dummy_value()

        index = types.int64
        return types.none(g, x, y, index, index, index, k, index), codegen

    return intrinsic(lines)


lines_nt = _lines(True)
lines_plain = _lines(False)


def _planes(nt):
    """planes(g, x, y, start, nvec, c, r, l, k): the formula over ``nvec`` vectors from
    flat index ``start`` of rows of channels of ``l`` values (the first vector's first
    value in channel ``c``, ``r`` values of it left); ``k`` 1-D arrays of the channels.
    Each constant vector takes channel c's value for the lanes before ``r``, the next
    channel's after (planes hold at least a vector's values)."""

    def planes(typingctx, g, x, y, start, nvec, c, r, l, k):
        if not contiguous(g, x, y, k):
            return None
        compute = llvm.compute_type(k)

        def codegen(context, builder, sig, vals):
            gty, xty, yty, kty = sig.args[0], sig.args[1], sig.args[2], sig.args[8]
            gv, xv, yv, start, nvec, c0, r0, l, kv = vals
            vec = Vectors(context, builder, lanes_of(context, yty), compute)
            i64 = ir.IntType(64)
            lanes = ir.Constant(i64, vec.lanes)
            consts, grad = unpack(builder, kty, kv), _gradient(gty, gv)
            first = context.make_array(consts[0][0])(context, builder, consts[0][1])
            nch = builder.extract_value(first.shape, 0)
            # each constant's element type and data pointer, read once before the loop
            tables = [
                (aty.dtype, context.make_array(aty)(context, builder, arr).data)
                for aty, arr in consts
            ]
            iota = ir.Constant(ir.VectorType(i64, vec.lanes), [ir.Constant(i64, n) for n in range(vec.lanes)])
            zero, one = ir.Constant(i64, 0), ir.Constant(i64, 1)

            def body(m, state):
                ch, left = state
                i = builder.add(start, builder.mul(m, lanes))
                after = builder.add(ch, one)
                nxt = builder.select(builder.icmp_signed("==", after, nch), zero, after)
                mask = builder.icmp_signed("<", iota, splat(builder, left, iota.type))
                params = []
                for dtype, data in tables:
                    here = context.cast(builder, builder.load(builder.gep(data, [ch])), dtype, compute)
                    there = context.cast(builder, builder.load(builder.gep(data, [nxt])), dtype, compute)
                    here, there = (splat(builder, v, vec.vct) for v in (here, there))
                    params.append((None, builder.select(mask, here, there)))
                _write(vec, grad, (xty, xv), params, (yty, yv), i, nt)
                rest = builder.sub(left, lanes)
                moved = builder.icmp_signed("<=", rest, zero)
                wrapped = builder.add(rest, l)
                return [builder.select(moved, nxt, ch), builder.select(moved, wrapped, rest)]

            llvm.loop(builder, zero, nvec, 1, [c0, r0], body)
            return context.get_dummy_value()

        index = types.int64
        return types.none(g, x, y, index, index, index, index, index, k), codegen

    return intrinsic(planes)


planes_nt = _planes(True)
planes_plain = _planes(False)
