"""numba-cuda kernels: the GPU twins of the CPU kernels (``_cpu``). They trust their arguments.

Views (see ``_gpu_arrays``): ``x3`` is ``(N, C, L)`` and ``x2`` is ``(M, C)``, both with any
strides, so sliced inputs need no copy. Reductions split each channel over several
blocks (grid ``(C, S)`` for NCL, ``(ceil(C / TX), S)`` for MC) so the GPU fills
whatever C is. Each thread accumulates float64 shifted sums; a block merges its
threads with a shared-memory tree (``syncthreads`` only, which the CUDA simulator
runs too) and writes one partial per channel into ``part[c, s, :]``; the block that
finishes last for a channel (an atomic counter per channel, ``counter[c]``) adds the
partials in a fixed order (its threads share them, then a tree), so results are
bitwise reproducible, and writes the per-channel results. No floating-point atomics.

Per-channel values travel packed in one array, ``chan`` of shape ``(ROWS, C)`` in
the statistics dtype (float32 for float16/float32 data, float64 for float64): rows
0-2 are what an operation returns per channel (mean, variance, invstd; or dweight,
dbias; or, for eval, mean and invstd), rows HI.. the constants of the elementwise
kernels: mean hi, mean lo (``mean = hi + lo`` in more than float32 precision),
scale, shift for normalize; mean hi, mean lo, k2, mean(dy), k1 for the gradient.

Elements are read through ``load`` and written through ``store`` (``_half``):
bfloat16 arrays arrive as int16 views of their bits. ``ct`` is a zero of the compute
dtype; ``load(x) + ct`` widens float16 data to float32 and leaves float64 data in
float64.
"""

from __future__ import annotations

from numba import cuda, float64, int32, uint64

from ._channel import grad_input, normalize, relu, relu_grad
from ._gpu_reduce import (  # noqa: F401 (launch constants, read by _gpu as K.*)
    BLOCK,
    HAS_BIAS,
    HAS_WEIGHT,
    HI,
    K1,
    LO,
    MIN_SPAN,
    ROWS,
    TRAINING,
    TX,
    TY,
    UPDATE_RUNNING,
    A,
    B,
    U,
    accumulate,
    finish_grad,
    finish_stats,
    gather,
    is_last,
    load,
    merge_block,
    store,
    tree_sum2,
)


@cuda.jit(device=True)
def _span(total):
    """[start, stop) of block blockIdx.y's share of ``total`` values (gridDim.y shares)."""
    return cuda.blockIdx.y * total // cuda.gridDim.y, (cuda.blockIdx.y + 1) * total // cuda.gridDim.y


@cuda.jit(device=True)
def _start(j, l_):
    """(n, l) of value j of a channel's N * L values, and (dn, dl), the step of BLOCK
    values: the walks below advance by additions, with no division per value."""
    if l_ == 0:  # no values: nothing is walked
        return 0, 0, 0, 0
    n = j // l_
    dn = BLOCK // l_
    return n, j - n * l_, dn, BLOCK - dn * l_


@cuda.jit(device=True)
def _offsets(s, c, n, l, dn, dl, l_):
    """For an array with element strides s = (sN, sC, sL): the offset of (n, c, l), the
    offset step of BLOCK values (dn planes and dl values on), and that step when the
    walk also wraps into the next plane."""
    step = dn * s[0] + dl * s[2]
    return n * s[0] + c * s[1] + l * s[2], step, step + s[0] - l_ * s[2]


@cuda.jit(device=True)
def _wraps(l, dl, l_):
    """(l BLOCK values on, whether that crosses into the next plane)."""
    l += dl
    if l >= l_:
        return l - l_, True
    return l, False


@cuda.jit(device=True)
def _constants(chan, c, mode):
    """Channel c's elementwise constants (hi, lo, p, q, k1): normalize (mode 0) uses
    p = scale and q = shift; the gradient (mode 1) p = k2, q = mean(dy) and k1."""
    k1 = chan[K1, c] if mode == 1 else chan[A, c]  # one type; unused in mode 0
    return chan[HI, c], chan[LO, c], chan[A, c], chan[B, c], k1


_normalize = cuda.jit(device=True)(normalize)
_grad_input = cuda.jit(device=True)(grad_input)
_relu = cuda.jit(device=True)(relu)
_relu_grad = cuda.jit(device=True)(relu_grad)

# Bits of a mode above the formula's (0 normalize or statistics, 1 grad_input or the
# gradient's sums): the epilogue of normalize, ``+ e`` then the ReLU; the operand of
# either formula masked by e > 0 (the gradient through a ReLU whose output is e); and,
# in the sums, that operand stored into a fourth array (dresidual).
RESIDUAL = 2
RELU = 4
MASKED = 8
WRITE = 16


@cuda.jit(device=True)
def _value(mode, g, v, e, ct, k, o):
    """One output value for array ``o`` (``_channel``'s formulas; ``ct``, a zero of the
    compute type, widens float16): grad_input of g and v (mode bit 1), else normalize
    of v (g unused), with the bits above (MASKED: of g, or v, through the ReLU).
    k: ``_constants``."""
    hi, lo, p, q, k1 = k
    u = load(g) + ct if mode & 1 else load(v) + ct
    if mode & MASKED:
        u = _relu_grad(u, load(e) + ct, ct)
    if mode & 1:
        r = _grad_input(u, load(v) + ct, hi, lo, p, q, k1)
    else:
        r = _normalize(u, hi, lo, p, q)
    if mode & RESIDUAL:
        r = r + (load(e) + ct)
    if mode & RELU:
        r = _relu(r, ct)
    return store(r, o)


@cuda.jit(device=True)
def _next(o, step, wrap_step, wrapped):
    """An offset BLOCK values on (``_offsets`` steps; ``wrapped`` from ``_wraps``)."""
    return o + (wrap_step if wrapped else step)


@cuda.jit(device=True)
def _at(o):
    """An offset as an unsigned index (no negative-index wraparound code)."""
    return uint64(o)


# --- NCL ----------------------------------------------------------------------------
# NCL kernels take each array as a flat 1-D view from its element (0, 0, 0) plus its
# element strides (sN, sC, sL), and ``nl`` = (N, L). A channel's N * L values are
# walked as one flat range, whatever L is, so a block's threads stay busy on short
# planes; each block takes a contiguous share (``_span``); each thread keeps one
# offset per array, advanced by additions, and issues U loads before it uses any.


@cuda.jit(device=True)
def _operand(a, e, mode):
    """An element of the summed operand in float64: a, or (mode bit MASKED) the gradient
    a through the ReLU whose output is e."""
    g = float64(load(a))
    if mode & MASKED:
        g = _relu_grad(g, float64(load(e)), 0.0)
    return g


@cuda.jit(device=True)
def _ncl_sums(a1, sa, b1, sb, e1, se, o1, so, nl, c, k, mode, tid):
    """This thread's two sums over its block's share of channel c, of g = ``_operand``
    (a, or a through the ReLU whose output is e) and b: mode 0, (sum d, sum d^2) with
    d = g - k; mode bit 1, (sum g, sum g * (b - k)); bit WRITE also stores g into o.
    Arrays the mode does not use (e, o) may be any of the shape (dead code)."""
    n_, l_ = nl
    j0, j1 = _span(n_ * l_)
    j = j0 + tid
    n, l, dn, dl = _start(j, l_)
    oa, da, wa = _offsets(sa, c, n, l, dn, dl, l_)
    ob, db, wb = _offsets(sb, c, n, l, dn, dl, l_)
    oe, de, we = _offsets(se, c, n, l, dn, dl, l_)
    oz, dz, wz = _offsets(so, c, n, l, dn, dl, l_)
    s1 = 0.0
    s2 = 0.0
    while j + (U - 1) * BLOCK < j1:
        l, w = _wraps(l, dl, l_)
        oa1, ob1 = _next(oa, da, wa, w), _next(ob, db, wb, w)
        oe1, oz1 = _next(oe, de, we, w), _next(oz, dz, wz, w)
        l, w = _wraps(l, dl, l_)
        oa2, ob2 = _next(oa1, da, wa, w), _next(ob1, db, wb, w)
        oe2, oz2 = _next(oe1, de, we, w), _next(oz1, dz, wz, w)
        l, w = _wraps(l, dl, l_)
        oa3, ob3 = _next(oa2, da, wa, w), _next(ob2, db, wb, w)
        oe3, oz3 = _next(oe2, de, we, w), _next(oz2, dz, wz, w)
        a0, a1_, a2, a3 = a1[_at(oa)], a1[_at(oa1)], a1[_at(oa2)], a1[_at(oa3)]
        b0, b1_, b2, b3 = b1[_at(ob)], b1[_at(ob1)], b1[_at(ob2)], b1[_at(ob3)]
        e0, e1_, e2, e3 = e1[_at(oe)], e1[_at(oe1)], e1[_at(oe2)], e1[_at(oe3)]
        g0, g1 = _operand(a0, e0, mode), _operand(a1_, e1_, mode)
        g2, g3 = _operand(a2, e2, mode), _operand(a3, e3, mode)
        if mode & WRITE:
            o1[_at(oz)], o1[_at(oz1)] = store(g0, o1), store(g1, o1)
            o1[_at(oz2)], o1[_at(oz3)] = store(g2, o1), store(g3, o1)
        s1, s2 = accumulate(s1, s2, g0, b0, k, mode)
        s1, s2 = accumulate(s1, s2, g1, b1_, k, mode)
        s1, s2 = accumulate(s1, s2, g2, b2, k, mode)
        s1, s2 = accumulate(s1, s2, g3, b3, k, mode)
        l, w = _wraps(l, dl, l_)
        oa, ob = _next(oa3, da, wa, w), _next(ob3, db, wb, w)
        oe, oz = _next(oe3, de, we, w), _next(oz3, dz, wz, w)
        j += U * BLOCK
    while j < j1:
        g = _operand(a1[_at(oa)], e1[_at(oe)], mode)
        if mode & WRITE:
            o1[_at(oz)] = store(g, o1)
        s1, s2 = accumulate(s1, s2, g, b1[_at(ob)], k, mode)
        l, w = _wraps(l, dl, l_)
        oa, ob = _next(oa, da, wa, w), _next(ob, db, wb, w)
        oe, oz = _next(oe, de, we, w), _next(oz, dz, wz, w)
        j += BLOCK
    return s1, s2


@cuda.jit
def stats_ncl(x1, xs, nl, w, b, rm, rv, flags, eps, momentum, part, counter, chan):
    """Statistics of channel blockIdx.x; the last block also finishes the channel."""
    sh1 = cuda.shared.array(BLOCK, float64)
    sh2 = cuda.shared.array(BLOCK, float64)
    flag = cuda.shared.array(1, int32)
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    k = float64(load(x1[_at(c * xs[1])]))
    s1, s2 = _ncl_sums(x1, xs, x1, xs, x1, xs, x1, xs, nl, c, k, 0, tid)
    last = merge_block(s1, s2, sh1, sh2, tid, 1, BLOCK, part, c, tid == 0, counter, c, flag)
    if last:
        s1, s2 = gather(part, c, sh1, sh2, tid, 1, BLOCK, tid, True)
        if tid == 0:
            count = float64(nl[0] * nl[1])
            finish_stats(s1, s2, c, k, count, w, b, rm, rv, flags, eps, momentum, chan)


@cuda.jit(device=True)
def _grad_sums_ncl(dy1, dys, x1, xs, y1, ys, dr1, drs, nl, mean, invstd, w, flags, part, counter,
                   chan, mode):
    """The gradient's sums of channel blockIdx.x (``_ncl_sums`` with ``mode``); the
    last block finishes the channel."""
    sh1 = cuda.shared.array(BLOCK, float64)
    sh2 = cuda.shared.array(BLOCK, float64)
    flag = cuda.shared.array(1, int32)
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    k = float64(load(mean[c]))
    s1, s2 = _ncl_sums(dy1, dys, x1, xs, y1, ys, dr1, drs, nl, c, k, mode, tid)
    last = merge_block(s1, s2, sh1, sh2, tid, 1, BLOCK, part, c, tid == 0, counter, c, flag)
    if last:
        s1, s2 = gather(part, c, sh1, sh2, tid, 1, BLOCK, tid, True)
        if tid == 0:
            count = float64(nl[0] * nl[1])
            finish_grad(s1, s2, c, count, mean, invstd, w, flags, chan)


@cuda.jit
def grad_sums_ncl(dy1, dys, x1, xs, nl, mean, invstd, w, flags, part, counter, chan):
    """sum(dy) and sum(dy * (x - mean)) of channel blockIdx.x; the last block finishes."""
    _grad_sums_ncl(dy1, dys, x1, xs, dy1, dys, dy1, dys, nl, mean, invstd, w, flags, part, counter,
                   chan, 1)


@cuda.jit
def grad_sums_relu_ncl(dy1, dys, x1, xs, y1, ys, dr1, drs, nl, mean, invstd, w, flags, part,
                       counter, chan, mode):
    """``grad_sums_ncl`` of the gradient dr through the ReLU whose output is y (mode bit
    MASKED; without it dr = dy), storing dr (bit WRITE)."""
    _grad_sums_ncl(dy1, dys, x1, xs, y1, ys, dr1, drs, nl, mean, invstd, w, flags, part, counter,
                   chan, 1 | mode)


@cuda.jit(device=True)
def _elementwise_ncl(g1, sg, x1, sx, e1, se, o1, so, nl, chan, ct, mode):
    """The elementwise pass (``_value``) over this block's share of channel blockIdx.x.
    All U values are loaded before any is stored, so the output may be an input. An
    operand the mode does not read (g without bit 1, e without RESIDUAL or MASKED) is
    any array of the shape: its loads are dead code where the mode is a constant."""
    n_, l_ = nl
    c = cuda.blockIdx.x
    k = _constants(chan, c, mode & 1)
    j0, j1 = _span(n_ * l_)
    j = j0 + cuda.threadIdx.x
    n, l, dn, dl = _start(j, l_)
    og, dg, wg = _offsets(sg, c, n, l, dn, dl, l_)
    ox, dx, wx = _offsets(sx, c, n, l, dn, dl, l_)
    oe, de, we = _offsets(se, c, n, l, dn, dl, l_)
    oz, dz, wz = _offsets(so, c, n, l, dn, dl, l_)
    while j + (U - 1) * BLOCK < j1:
        l, w = _wraps(l, dl, l_)
        og1, ox1, oz1 = _next(og, dg, wg, w), _next(ox, dx, wx, w), _next(oz, dz, wz, w)
        oe1 = _next(oe, de, we, w)
        l, w = _wraps(l, dl, l_)
        og2, ox2, oz2 = _next(og1, dg, wg, w), _next(ox1, dx, wx, w), _next(oz1, dz, wz, w)
        oe2 = _next(oe1, de, we, w)
        l, w = _wraps(l, dl, l_)
        og3, ox3, oz3 = _next(og2, dg, wg, w), _next(ox2, dx, wx, w), _next(oz2, dz, wz, w)
        oe3 = _next(oe2, de, we, w)
        g0, g1_, g2, g3 = g1[_at(og)], g1[_at(og1)], g1[_at(og2)], g1[_at(og3)]
        v0, v1, v2, v3 = x1[_at(ox)], x1[_at(ox1)], x1[_at(ox2)], x1[_at(ox3)]
        e0, e1_, e2, e3 = e1[_at(oe)], e1[_at(oe1)], e1[_at(oe2)], e1[_at(oe3)]
        o1[_at(oz)] = _value(mode, g0, v0, e0, ct, k, o1)
        o1[_at(oz1)] = _value(mode, g1_, v1, e1_, ct, k, o1)
        o1[_at(oz2)] = _value(mode, g2, v2, e2, ct, k, o1)
        o1[_at(oz3)] = _value(mode, g3, v3, e3, ct, k, o1)
        l, w = _wraps(l, dl, l_)
        og, ox, oz = _next(og3, dg, wg, w), _next(ox3, dx, wx, w), _next(oz3, dz, wz, w)
        oe = _next(oe3, de, we, w)
        j += U * BLOCK
    while j < j1:
        o1[_at(oz)] = _value(mode, g1[_at(og)], x1[_at(ox)], e1[_at(oe)], ct, k, o1)
        l, w = _wraps(l, dl, l_)
        og, ox, oz = _next(og, dg, wg, w), _next(ox, dx, wx, w), _next(oz, dz, wz, w)
        oe = _next(oe, de, we, w)
        j += BLOCK


@cuda.jit
def normalize_ncl(x1, xs, nl, chan, ct, y1, ys):
    """y = ((x - hi) - lo) * scale + shift over this block's share of channel blockIdx.x."""
    _elementwise_ncl(x1, xs, x1, xs, x1, xs, y1, ys, nl, chan, ct, 0)


@cuda.jit
def grad_input_ncl(dy1, dys, x1, xs, nl, chan, ct, dx1, dxs):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 over this block's share of a channel."""
    _elementwise_ncl(dy1, dys, x1, xs, x1, xs, dx1, dxs, nl, chan, ct, 1)


@cuda.jit
def grad_input_relu_ncl(dy1, dys, x1, xs, y1, ys, nl, chan, ct, dx1, dxs):
    """``grad_input_ncl`` of the gradient through the ReLU whose output is y."""
    _elementwise_ncl(dy1, dys, x1, xs, y1, ys, dx1, dxs, nl, chan, ct, 1 | MASKED)


@cuda.jit
def epilogue_ncl(x1, xs, e1, es, nl, chan, ct, y1, ys, mode):
    """Normalize with the bits of ``mode`` (RESIDUAL and RELU: y = relu(bn(x) + e);
    MASKED: normalize of x where e > 0, else of 0)."""
    _elementwise_ncl(x1, xs, x1, xs, e1, es, y1, ys, nl, chan, ct, mode)


# --- MC -----------------------------------------------------------------------------


@cuda.jit(device=True)
def _mc_sums(a2, b2, e2, o2, c, k, mode, ty):
    """This thread's sums (``_ncl_sums``'s) over rows ty, ty + R, ... of its block's
    rows (R = TY * S), U rows loaded at a time."""
    m = a2.shape[0]
    step = TY * cuda.gridDim.y
    r = cuda.blockIdx.y * TY + ty
    s1 = 0.0
    s2 = 0.0
    while r + (U - 1) * step < m:
        r0, r1, r2, r3 = _at(r), _at(r + step), _at(r + 2 * step), _at(r + 3 * step)
        a0, a1, a2_, a3 = a2[r0, _at(c)], a2[r1, _at(c)], a2[r2, _at(c)], a2[r3, _at(c)]
        b0, b1, b2_, b3 = b2[r0, _at(c)], b2[r1, _at(c)], b2[r2, _at(c)], b2[r3, _at(c)]
        e0, e1, e2_, e3 = e2[r0, _at(c)], e2[r1, _at(c)], e2[r2, _at(c)], e2[r3, _at(c)]
        g0, g1 = _operand(a0, e0, mode), _operand(a1, e1, mode)
        g2, g3 = _operand(a2_, e2_, mode), _operand(a3, e3, mode)
        if mode & WRITE:
            o2[r0, _at(c)], o2[r1, _at(c)] = store(g0, o2), store(g1, o2)
            o2[r2, _at(c)], o2[r3, _at(c)] = store(g2, o2), store(g3, o2)
        s1, s2 = accumulate(s1, s2, g0, b0, k, mode)
        s1, s2 = accumulate(s1, s2, g1, b1, k, mode)
        s1, s2 = accumulate(s1, s2, g2, b2_, k, mode)
        s1, s2 = accumulate(s1, s2, g3, b3, k, mode)
        r += U * step
    while r < m:
        g = _operand(a2[_at(r), _at(c)], e2[_at(r), _at(c)], mode)
        if mode & WRITE:
            o2[_at(r), _at(c)] = store(g, o2)
        s1, s2 = accumulate(s1, s2, g, b2[_at(r), _at(c)], k, mode)
        r += step
    return s1, s2


@cuda.jit
def stats_mc(x2, w, b, rm, rv, flags, eps, momentum, part, counter, chan):
    """Statistics of TX channels per block column; the last block finishes them."""
    sh1 = cuda.shared.array(BLOCK, float64)
    sh2 = cuda.shared.array(BLOCK, float64)
    flag = cuda.shared.array(1, int32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * TX + tx
    c = cuda.blockIdx.x * TX + tx
    active = c < x2.shape[1]
    k = float64(load(x2[0, c])) if active else 0.0
    s1 = 0.0
    s2 = 0.0
    if active:
        s1, s2 = _mc_sums(x2, x2, x2, x2, c, k, 0, ty)
    write = ty == 0 and active
    last = merge_block(s1, s2, sh1, sh2, tid, TX, TY, part, c, write, counter, cuda.blockIdx.x, flag)
    if last:
        s1, s2 = gather(part, c, sh1, sh2, tid, TX, TY, ty, active)
        if write:
            finish_stats(s1, s2, c, k, float64(x2.shape[0]), w, b, rm, rv, flags, eps, momentum, chan)


@cuda.jit(device=True)
def _grad_sums_mc(dy2, x2, y2, dr2, mean, invstd, w, flags, part, counter, chan, mode):
    """The gradient's sums (``_mc_sums`` with ``mode``) for TX channels; the last block
    finishes them."""
    sh1 = cuda.shared.array(BLOCK, float64)
    sh2 = cuda.shared.array(BLOCK, float64)
    flag = cuda.shared.array(1, int32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * TX + tx
    c = cuda.blockIdx.x * TX + tx
    active = c < x2.shape[1]
    s1 = 0.0
    s2 = 0.0
    if active:
        s1, s2 = _mc_sums(dy2, x2, y2, dr2, c, float64(load(mean[c])), mode, ty)
    write = ty == 0 and active
    last = merge_block(s1, s2, sh1, sh2, tid, TX, TY, part, c, write, counter, cuda.blockIdx.x, flag)
    if last:
        s1, s2 = gather(part, c, sh1, sh2, tid, TX, TY, ty, active)
        if write:
            finish_grad(s1, s2, c, float64(x2.shape[0]), mean, invstd, w, flags, chan)


@cuda.jit
def grad_sums_mc(dy2, x2, mean, invstd, w, flags, part, counter, chan):
    """sum(dy) and sum(dy * (x - mean)) for TX channels; the last block finishes them."""
    _grad_sums_mc(dy2, x2, dy2, dy2, mean, invstd, w, flags, part, counter, chan, 1)


@cuda.jit
def grad_sums_relu_mc(dy2, x2, y2, dr2, mean, invstd, w, flags, part, counter, chan, mode):
    """``grad_sums_relu_ncl`` for TX channels per block column."""
    _grad_sums_mc(dy2, x2, y2, dr2, mean, invstd, w, flags, part, counter, chan, 1 | mode)


@cuda.jit(device=True)
def _elementwise_mc(g2, x2, e2, o2, chan, ct, mode):
    """The elementwise pass (``_value``) for TX channels per block column; a block takes
    chunks of TY * U rows, each thread U of them, all loaded before any store. Operands
    the mode does not read: as for ``_elementwise_ncl``."""
    c = cuda.blockIdx.x * TX + cuda.threadIdx.x
    if c >= x2.shape[1]:
        return
    m = x2.shape[0]
    k = _constants(chan, c, mode & 1)
    r = cuda.blockIdx.y * TY * U + cuda.threadIdx.y
    while r + (U - 1) * TY < m:
        g0, g1 = g2[_at(r), _at(c)], g2[_at(r + TY), _at(c)]
        g2_, g3 = g2[_at(r + 2 * TY), _at(c)], g2[_at(r + 3 * TY), _at(c)]
        v0, v1 = x2[_at(r), _at(c)], x2[_at(r + TY), _at(c)]
        v2, v3 = x2[_at(r + 2 * TY), _at(c)], x2[_at(r + 3 * TY), _at(c)]
        e0, e1 = e2[_at(r), _at(c)], e2[_at(r + TY), _at(c)]
        e2_, e3 = e2[_at(r + 2 * TY), _at(c)], e2[_at(r + 3 * TY), _at(c)]
        o2[_at(r), _at(c)] = _value(mode, g0, v0, e0, ct, k, o2)
        o2[_at(r + TY), _at(c)] = _value(mode, g1, v1, e1, ct, k, o2)
        o2[_at(r + 2 * TY), _at(c)] = _value(mode, g2_, v2, e2_, ct, k, o2)
        o2[_at(r + 3 * TY), _at(c)] = _value(mode, g3, v3, e3, ct, k, o2)
        r += TY * U * cuda.gridDim.y
    while r < m:  # the last, partial chunk
        g, v, e = g2[_at(r), _at(c)], x2[_at(r), _at(c)], e2[_at(r), _at(c)]
        o2[_at(r), _at(c)] = _value(mode, g, v, e, ct, k, o2)
        r += TY


@cuda.jit
def normalize_mc(x2, chan, ct, y2):
    """y = ((x - hi) - lo) * scale + shift for TX channels per block column."""
    _elementwise_mc(x2, x2, x2, y2, chan, ct, 0)


@cuda.jit
def grad_input_mc(dy2, x2, chan, ct, dx2):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 for TX channels per block column."""
    _elementwise_mc(dy2, x2, x2, dx2, chan, ct, 1)


@cuda.jit
def grad_input_relu_mc(dy2, x2, y2, chan, ct, dx2):
    """``grad_input_relu_ncl`` for TX channels per block column."""
    _elementwise_mc(dy2, x2, y2, dx2, chan, ct, 1 | MASKED)


@cuda.jit
def epilogue_mc(x2, e2, chan, ct, y2, mode):
    """``epilogue_ncl`` for TX channels per block column."""
    _elementwise_mc(x2, x2, e2, y2, chan, ct, mode)
