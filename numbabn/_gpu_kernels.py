"""numba-cuda kernels: the GPU twins of ``_cpu_kernels``. They trust their arguments.

Views (see ``_gpu_arrays``): ``x3`` is ``(N, C, L)`` and ``x2`` is ``(M, C)``, both with any
strides, so sliced inputs need no copy. Reductions split each channel over several
blocks (grid ``(C, S)`` for NCL, ``(ceil(C / TX), S)`` for MC) so the GPU fills
whatever C is. Each thread accumulates float64 shifted sums; a block merges its
threads with a shared-memory tree (``syncthreads`` only, which the CUDA simulator
runs too) and writes one partial per channel into ``part[c, s, :]``; the block that
finishes last for a channel (an atomic counter per channel, ``counter[c]``) adds the
partials in block order, so results are bitwise reproducible, and writes the
per-channel results. No floating-point atomics.

Per-channel values travel packed in one array, ``chan`` of shape ``(ROWS, C)`` in
the statistics dtype (float32 for float16/float32 data, float64 for float64): rows
0-2 are what an operation returns per channel (mean, variance, invstd; or dweight,
dbias; or, for eval, mean and invstd), rows HI.. the constants of the elementwise
kernels: mean hi, mean lo (``mean = hi + lo`` in more than float32 precision),
scale, shift for normalize; mean hi, mean lo, k2, mean(dy), k1 for the gradient.

``ct`` is a zero of the compute dtype; ``x + ct`` widens float16 data to float32 and
leaves float64 data in float64.
"""

from __future__ import annotations

import math

from numba import config, cuda, float64, int32

# Threads per block. Kept small under the simulator (one Python thread per CUDA
# thread) so that tiny test inputs still span several blocks and partial blocks.
BLOCK = 16 if config.ENABLE_CUDASIM else 256
TX = 4 if config.ENABLE_CUDASIM else 32  # channels per block in the MC kernels
TY = BLOCK // TX
SEGMENT = BLOCK * 8  # NCL planes longer than this are split into segments (tasks)

# Bits of the ``flags`` argument of the finishing step.
HAS_WEIGHT, HAS_BIAS, UPDATE_RUNNING, TRAINING = 1, 2, 4, 8
# Rows of ``chan``: three returned values, then the elementwise constants.
HI, LO, A, B, K1 = 3, 4, 5, 6, 7
ROWS = 8


@cuda.jit(device=True)
def _tree_sum2(sh1, sh2, tid, width, rows):
    """Add the ``rows`` rows of ``width`` values of two shared arrays into row 0."""
    step = rows // 2
    while step > 0:
        if tid < step * width:
            sh1[tid] += sh1[tid + step * width]
            sh2[tid] += sh2[tid + step * width]
        cuda.syncthreads()
        step //= 2


@cuda.jit(device=True)
def _is_last(counter, c, nblocks, flag, tid):
    """True in every thread of the block that is the last to finish channel c."""
    if tid == 0:
        cuda.threadfence()
        flag[0] = cuda.atomic.add(counter, c, 1) == nblocks - 1
    cuda.syncthreads()
    return flag[0] != 0


@cuda.jit(device=True)
def _accumulate(s1, s2, a, b, k, mode):
    """One value into a thread's two sums. mode 0 (statistics): d = a - k adds
    (d, d^2); mode 1 (gradient): adds (a, a * (b - k)) with a = dy, b = x, k = mean."""
    if mode == 0:
        d = float64(a) - k
        return s1 + d, s2 + d * d
    g = float64(a)
    return s1 + g, s2 + g * (float64(b) - k)


@cuda.jit(device=True)
def _merge_block(s1, s2, sh1, sh2, tid, width, rows, part, c, write, counter, group, flag):
    """Merge the block's per-thread sums with a shared-memory tree, store the block's
    partial of channel c where ``write``, and return, in every thread, whether this
    block is the last of counter ``group`` (whose counter it resets for the next launch).
    """
    sh1[tid] = s1
    sh2[tid] = s2
    cuda.syncthreads()
    _tree_sum2(sh1, sh2, tid, width, rows)
    if write:
        part[c, cuda.blockIdx.y, 0] = sh1[tid]
        part[c, cuda.blockIdx.y, 1] = sh2[tid]
    last = _is_last(counter, group, cuda.gridDim.y, flag, tid)
    if last and tid == 0:
        counter[group] = 0
    return last


@cuda.jit(device=True)
def _add_partials(part, c, nblocks):
    s1 = 0.0
    s2 = 0.0
    for s in range(nblocks):
        s1 += part[c, s, 0]
        s2 += part[c, s, 1]
    return s1, s2


@cuda.jit(device=True)
def _finish_stats(part, c, nblocks, shift, count, w, b, rm, rv, flags, eps, momentum, chan):
    """Channel c's mean, variance, invstd, running statistics and normalize constants."""
    s1, s2 = _add_partials(part, c, nblocks)
    delta = s1 / count
    mean = shift + delta
    var = s2 / count - delta * delta
    if var < 0.0:
        var = 0.0
    invstd = 1.0 / math.sqrt(var + eps)
    chan[0, c] = mean
    chan[1, c] = var
    chan[2, c] = invstd
    scale = invstd
    if flags & HAS_WEIGHT:
        scale *= float64(w[c])
    chan[HI, c] = mean
    chan[LO, c] = mean - float64(chan[HI, c])
    chan[A, c] = scale
    chan[B, c] = float64(b[c]) if flags & HAS_BIAS else 0.0
    if flags & UPDATE_RUNNING:
        rm[c] = (1.0 - momentum) * float64(rm[c]) + momentum * mean
        rv[c] = (1.0 - momentum) * float64(rv[c]) + momentum * var * (count / (count - 1.0))


@cuda.jit(device=True)
def _finish_grad(part, c, nblocks, count, mean, invstd, w, flags, chan):
    """Channel c's dweight, dbias and the constants of the dx kernel."""
    s1, s2 = _add_partials(part, c, nblocks)
    inv = float64(invstd[c])
    chan[0, c] = s2 * inv
    chan[1, c] = s1
    k1 = inv
    if flags & HAS_WEIGHT:
        k1 *= float64(w[c])
    mu = float64(mean[c])
    if flags & TRAINING:
        chan[HI, c] = mu
        chan[LO, c] = mu - float64(chan[HI, c])
        chan[A, c] = inv * inv * s2 / count
        chan[B, c] = s1 / count
    else:  # dx = dy * k1: the constants of "normalize" with mean 0 and no shift
        chan[HI, c] = 0.0
        chan[LO, c] = 0.0
        chan[A, c] = k1
        chan[B, c] = 0.0
    chan[K1, c] = k1


@cuda.jit(device=True)
def _task_range(n_, l_):
    """(segments per plane, first task, end task) of this block's share of a channel.

    The NCL work of one channel is N * segs tasks (plane, segment); block
    blockIdx.y of gridDim.y takes a contiguous range of them.
    """
    segs = (l_ + SEGMENT - 1) // SEGMENT
    ntasks = n_ * segs
    return segs, cuda.blockIdx.y * ntasks // cuda.gridDim.y, (cuda.blockIdx.y + 1) * ntasks // cuda.gridDim.y


@cuda.jit(device=True)
def _segment(t, segs, l_):
    """(plane, start, stop) of NCL task t."""
    n = t // segs
    seg = t - n * segs
    return n, seg * l_ // segs, (seg + 1) * l_ // segs


# --- NCL ----------------------------------------------------------------------------


@cuda.jit(device=True)
def _ncl_sums(a3, b3, c, k, mode, tid):
    """This thread's two sums over its share of channel c (block s of gridDim.y).

    mode 0: (sum d, sum d^2) with d = a - k; mode 1: (sum a, sum a * (b - k)).
    Tasks are (n, segment) pairs; each block takes a contiguous range of tasks.
    """
    n_, _, l_ = a3.shape
    segs, t0, t1 = _task_range(n_, l_)
    s1 = 0.0
    s2 = 0.0
    for t in range(t0, t1):
        n, lo, hi = _segment(t, segs, l_)
        for i in range(lo + tid, hi, BLOCK):
            s1, s2 = _accumulate(s1, s2, a3[n, c, i], b3[n, c, i], k, mode)
    return s1, s2


@cuda.jit
def stats_ncl(x3, w, b, rm, rv, flags, eps, momentum, part, counter, chan):
    """Statistics of channel blockIdx.x; the last block also finishes the channel."""
    sh1 = cuda.shared.array(BLOCK, float64)
    sh2 = cuda.shared.array(BLOCK, float64)
    flag = cuda.shared.array(1, int32)
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    k = float64(x3[0, c, 0])
    s1, s2 = _ncl_sums(x3, x3, c, k, 0, tid)
    last = _merge_block(s1, s2, sh1, sh2, tid, 1, BLOCK, part, c, tid == 0, counter, c, flag)
    if last and tid == 0:
        count = float64(x3.shape[0] * x3.shape[2])
        _finish_stats(part, c, cuda.gridDim.y, k, count, w, b, rm, rv, flags, eps, momentum, chan)


@cuda.jit
def grad_sums_ncl(dy3, x3, mean, invstd, w, flags, part, counter, chan):
    """sum(dy) and sum(dy * (x - mean)) of channel blockIdx.x; the last block finishes."""
    sh1 = cuda.shared.array(BLOCK, float64)
    sh2 = cuda.shared.array(BLOCK, float64)
    flag = cuda.shared.array(1, int32)
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    s1, s2 = _ncl_sums(dy3, x3, c, float64(mean[c]), 1, tid)
    last = _merge_block(s1, s2, sh1, sh2, tid, 1, BLOCK, part, c, tid == 0, counter, c, flag)
    if last and tid == 0:
        count = float64(x3.shape[0] * x3.shape[2])
        _finish_grad(part, c, cuda.gridDim.y, count, mean, invstd, w, flags, chan)


@cuda.jit
def normalize_ncl(x3, chan, ct, y3):
    """y = ((x - hi) - lo) * scale + shift over this block's share of channel blockIdx.x."""
    n_, _, l_ = x3.shape
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    m_hi = chan[HI, c]
    m_lo = chan[LO, c]
    a = chan[A, c]
    b = chan[B, c]
    segs, t0, t1 = _task_range(n_, l_)
    for t in range(t0, t1):
        n, lo, hi = _segment(t, segs, l_)
        for i in range(lo + tid, hi, BLOCK):
            y3[n, c, i] = ((x3[n, c, i] + ct - m_hi) - m_lo) * a + b


@cuda.jit
def grad_input_ncl(dy3, x3, chan, ct, dx3):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 over this block's share of a channel."""
    n_, _, l_ = x3.shape
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    m_hi = chan[HI, c]
    m_lo = chan[LO, c]
    k2 = chan[A, c]
    mdy = chan[B, c]
    k1 = chan[K1, c]
    segs, t0, t1 = _task_range(n_, l_)
    for t in range(t0, t1):
        n, lo, hi = _segment(t, segs, l_)
        for i in range(lo + tid, hi, BLOCK):
            xmu = (x3[n, c, i] + ct - m_hi) - m_lo
            dx3[n, c, i] = (dy3[n, c, i] + ct - mdy - xmu * k2) * k1


# --- MC -----------------------------------------------------------------------------


@cuda.jit(device=True)
def _mc_sums(a2, b2, c, k, mode, ty):
    """This thread's sums over rows ty, ty + TY * S, ... of its block's row range."""
    m = a2.shape[0]
    s1 = 0.0
    s2 = 0.0
    for r in range(cuda.blockIdx.y * TY + ty, m, TY * cuda.gridDim.y):
        s1, s2 = _accumulate(s1, s2, a2[r, c], b2[r, c], k, mode)
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
    k = float64(x2[0, c]) if active else 0.0
    s1 = 0.0
    s2 = 0.0
    if active:
        s1, s2 = _mc_sums(x2, x2, c, k, 0, ty)
    write = ty == 0 and active
    last = _merge_block(s1, s2, sh1, sh2, tid, TX, TY, part, c, write, counter, cuda.blockIdx.x, flag)
    if last and write:
        _finish_stats(part, c, cuda.gridDim.y, k, float64(x2.shape[0]), w, b, rm, rv,
                      flags, eps, momentum, chan)


@cuda.jit
def grad_sums_mc(dy2, x2, mean, invstd, w, flags, part, counter, chan):
    """sum(dy) and sum(dy * (x - mean)) for TX channels; the last block finishes them."""
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
        s1, s2 = _mc_sums(dy2, x2, c, float64(mean[c]), 1, ty)
    write = ty == 0 and active
    last = _merge_block(s1, s2, sh1, sh2, tid, TX, TY, part, c, write, counter, cuda.blockIdx.x, flag)
    if last and write:
        _finish_grad(part, c, cuda.gridDim.y, float64(x2.shape[0]), mean, invstd, w, flags, chan)


@cuda.jit
def normalize_mc(x2, chan, ct, y2):
    """y = ((x - hi) - lo) * scale + shift for TX channels per block column."""
    c = cuda.blockIdx.x * TX + cuda.threadIdx.x
    if c >= x2.shape[1]:
        return
    m_hi = chan[HI, c]
    m_lo = chan[LO, c]
    a = chan[A, c]
    b = chan[B, c]
    for r in range(cuda.blockIdx.y * TY + cuda.threadIdx.y, x2.shape[0], TY * cuda.gridDim.y):
        y2[r, c] = ((x2[r, c] + ct - m_hi) - m_lo) * a + b


@cuda.jit
def grad_input_mc(dy2, x2, chan, ct, dx2):
    """dx = (dy - mdy - ((x - hi) - lo) * k2) * k1 for TX channels per block column."""
    c = cuda.blockIdx.x * TX + cuda.threadIdx.x
    if c >= x2.shape[1]:
        return
    m_hi = chan[HI, c]
    m_lo = chan[LO, c]
    k2 = chan[A, c]
    mdy = chan[B, c]
    k1 = chan[K1, c]
    for r in range(cuda.blockIdx.y * TY + cuda.threadIdx.y, x2.shape[0], TY * cuda.gridDim.y):
        xmu = (x2[r, c] + ct - m_hi) - m_lo
        dx2[r, c] = (dy2[r, c] + ct - mdy - xmu * k2) * k1


# --- eval constants -----------------------------------------------------------------


@cuda.jit
def eval_params(rm, rv, w, b, flags, eps, chan):
    """Normalize constants from the running statistics (one thread per channel); rows
    0 and 1 receive the mean and invstd."""
    c = cuda.grid(1)
    if c >= rm.shape[0]:
        return
    mean = float64(rm[c])
    invstd = 1.0 / math.sqrt(float64(rv[c]) + eps)
    chan[0, c] = mean
    chan[1, c] = invstd
    scale = invstd
    if flags & HAS_WEIGHT:
        scale *= float64(w[c])
    chan[HI, c] = mean
    chan[LO, c] = mean - float64(chan[HI, c])
    chan[A, c] = scale
    chan[B, c] = float64(b[c]) if flags & HAS_BIAS else 0.0


# --- copies ---------------------------------------------------------------------------


@cuda.jit
def copy_4d(src, dst):
    """dst[...] = src[...] for two 4-D arrays of one shape and any strides."""
    n0, n1, n2, n3 = dst.shape
    total = n0 * n1 * n2 * n3
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        i3 = i % n3
        r = i // n3
        i2 = r % n2
        r //= n2
        i1 = r % n1
        dst[r // n1, i1, i2, i3] = src[r // n1, i1, i2, i3]
