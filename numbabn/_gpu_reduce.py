"""The GPU kernels' launch constants and their per-channel reduction: a block's
shared-memory tree, the merge of block partials by the channel's last block (in a fixed
order: bitwise reproducible), and the finishing steps that turn sums into what an
operation returns and the elementwise constants (see ``_gpu_kernels``), and the eval
constants' kernel."""

from __future__ import annotations

import math

from numba import config, cuda, float64

from ._channel import finite_scale, mean_lo

# Every element the kernels read goes through ``load``, every one they write through
# ``store`` (bfloat16 arrives as int16 bits; see ``_half``); the simulator runs the
# kernels as Python, on NumPy scalars.
if config.ENABLE_CUDASIM:
    from ._half import sim_load as load
    from ._half import sim_store as store
else:
    from ._half import load, store

# Threads per block. Kept small under the simulator (one Python thread per CUDA
# thread) so that tiny test inputs still span several blocks and partial blocks.
BLOCK = 16 if config.ENABLE_CUDASIM else 256
TX = 4 if config.ENABLE_CUDASIM else 32  # channels per block in the MC kernels
TY = BLOCK // TX
U = 4  # values each thread loads before it uses them (memory parallelism)
MIN_SPAN = BLOCK * U * 2  # fewest values of a channel that one block takes

# Bits of the ``flags`` argument of the finishing step.
HAS_WEIGHT, HAS_BIAS, UPDATE_RUNNING, TRAINING = 1, 2, 4, 8
# Rows of ``chan``: three returned values, then the elementwise constants.
HI, LO, A, B, K1 = 3, 4, 5, 6, 7
ROWS = 8



@cuda.jit(device=True)
def tree_sum2(sh1, sh2, tid, width, rows):
    """Add the ``rows`` rows of ``width`` values of two shared arrays into row 0."""
    step = rows // 2
    while step > 0:
        if tid < step * width:
            sh1[tid] += sh1[tid + step * width]
            sh2[tid] += sh2[tid + step * width]
        cuda.syncthreads()
        step //= 2


@cuda.jit(device=True)
def is_last(counter, c, nblocks, flag, tid):
    """True in every thread of the block that is the last to finish channel c. The
    threads that wrote partials have fenced them and the block has synchronized, so
    every partial of this block is visible before its count is."""
    if tid == 0:
        flag[0] = cuda.atomic.add(counter, c, 1) == nblocks - 1
    cuda.syncthreads()
    return flag[0] != 0


@cuda.jit(device=True)
def accumulate(s1, s2, a, b, k, mode):
    """One value into a thread's two sums; ``a`` is float64, ``b`` an element. mode 0
    (statistics): d = a - k adds (d, d^2); mode bit 1 (gradient): adds (a, a * (b - k))
    with a = dy, b = x, k = mean."""
    if mode & 1:
        return s1 + a, s2 + a * (float64(load(b)) - k)
    d = a - k
    return s1 + d, s2 + d * d


@cuda.jit(device=True)
def merge_block(s1, s2, sh1, sh2, tid, width, rows, part, c, write, counter, group, flag):
    """Merge the block's per-thread sums with a shared-memory tree, store the block's
    partial of channel c where ``write``, and return, in every thread, whether this
    block is the last of counter ``group`` (whose counter it resets for the next launch).
    """
    sh1[tid] = s1
    sh2[tid] = s2
    cuda.syncthreads()
    tree_sum2(sh1, sh2, tid, width, rows)
    if write:  # several threads of an MC block write: each fences its own writes
        part[c, cuda.blockIdx.y, 0] = sh1[tid]
        part[c, cuda.blockIdx.y, 1] = sh2[tid]
        cuda.threadfence()
    cuda.syncthreads()
    last = is_last(counter, group, cuda.gridDim.y, flag, tid)
    if last and tid == 0:
        counter[group] = 0
    return last


@cuda.jit(device=True)
def gather(part, c, sh1, sh2, tid, width, rows, row, active):
    """In the last block: channel c's sums over its gridDim.y partials, returned in
    row 0 of c's column. The ``rows`` threads of the column (this one is ``row``) each
    add the partials row, row + rows, ... with U of them loaded at a time, then the
    shared-memory tree adds the threads: a fixed order for a given grid. One thread
    adding hundreds of partials serially took tens of microseconds (H100).
    Every thread of the block calls it (it synchronizes)."""
    nblocks = cuda.gridDim.y
    s1 = 0.0
    s2 = 0.0
    if active:
        s = row
        while s + (U - 1) * rows < nblocks:
            p0, q0 = part[c, s, 0], part[c, s, 1]
            p1, q1 = part[c, s + rows, 0], part[c, s + rows, 1]
            p2, q2 = part[c, s + 2 * rows, 0], part[c, s + 2 * rows, 1]
            p3, q3 = part[c, s + 3 * rows, 0], part[c, s + 3 * rows, 1]
            s1 = s1 + p0 + p1 + p2 + p3
            s2 = s2 + q0 + q1 + q2 + q3
            s += U * rows
        while s < nblocks:
            s1 += part[c, s, 0]
            s2 += part[c, s, 1]
            s += rows
    sh1[tid] = s1
    sh2[tid] = s2
    cuda.syncthreads()
    tree_sum2(sh1, sh2, tid, width, rows)
    return sh1[tid], sh2[tid]


@cuda.jit(device=True)
def norm_constants(chan, c, mean, invstd, w, b, flags):
    """Channel c's normalize constants (rows HI, LO, A, B of ``chan``) from its mean
    and invstd (float64), weight and bias (when ``flags`` has them)."""
    scale = invstd
    if flags & HAS_WEIGHT:
        scale *= float64(load(w[c]))
    chan[HI, c] = mean
    chan[LO, c] = mean_lo(mean, float64(chan[HI, c]))
    chan[A, c] = finite_scale(scale, chan)
    chan[B, c] = float64(load(b[c])) if flags & HAS_BIAS else 0.0


@cuda.jit(device=True)
def finish_stats(s1, s2, c, shift, count, w, b, rm, rv, flags, eps, momentum, chan):
    """Channel c's mean, variance, invstd, running statistics and normalize constants
    from its shifted sums (s1, s2)."""
    delta = s1 / count
    mean = shift + delta
    var = s2 / count - delta * delta
    if var < 0.0:
        var = 0.0
    invstd = 1.0 / math.sqrt(var + eps)
    chan[0, c] = mean
    chan[1, c] = var
    chan[2, c] = invstd
    norm_constants(chan, c, mean, invstd, w, b, flags)
    if flags & UPDATE_RUNNING:
        rm[c] = store((1.0 - momentum) * float64(load(rm[c])) + momentum * mean, rm)
        unbiased = var * (count / (count - 1.0))
        rv[c] = store((1.0 - momentum) * float64(load(rv[c])) + momentum * unbiased, rv)


@cuda.jit(device=True)
def finish_grad(s1, s2, c, count, mean, invstd, w, flags, chan):
    """Channel c's dweight, dbias and the constants of the dx kernel from its sums
    (sum dy, sum dy * (x - mean))."""
    inv = float64(load(invstd[c]))
    chan[0, c] = s2 * inv
    chan[1, c] = s1
    k1 = inv
    if flags & HAS_WEIGHT:
        k1 *= float64(load(w[c]))
    mu = float64(load(mean[c]))
    if flags & TRAINING:
        chan[HI, c] = mu
        chan[LO, c] = mean_lo(mu, float64(chan[HI, c]))
        chan[A, c] = inv * inv * s2 / count
        chan[B, c] = s1 / count
    else:  # dx = dy * k1: the constants of "normalize" with mean 0 and no shift
        chan[HI, c] = 0.0
        chan[LO, c] = 0.0
        chan[A, c] = k1
        chan[B, c] = 0.0
    chan[K1, c] = k1


@cuda.jit
def eval_params(rm, rv, w, b, flags, eps, chan):
    """Normalize constants from the running statistics (one thread per channel); rows
    0 and 1 receive the mean and invstd."""
    c = cuda.grid(1)
    if c >= rm.shape[0]:
        return
    mean = float64(load(rm[c]))
    invstd = 1.0 / math.sqrt(float64(load(rv[c])) + eps)
    chan[0, c] = mean
    chan[1, c] = invstd
    norm_constants(chan, c, mean, invstd, w, b, flags)
