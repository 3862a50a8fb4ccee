"""The fused per-channel passes (``_cpu.fused.forward_channels``,
``backward_channels`` and the small kernels built on the same loops). Each task takes
channels one at a time; the forward writes one channel while it sums the next it took
(``_cpu.vector.fused_moments_*``), so a channel's sums are taken either alone (a
task's first) or next to another channel's writes, by whichever thread took it, into
outputs that are streamed or not and lie anywhere; the backward sums a channel alone,
then writes its dx, in row order or (streamed) from the last row. The order of the
additions must not depend on any of that: the statistics, and so the outputs, must be
bitwise the same whatever the number of tasks, the streaming and the output's
alignment, and close to the float64 reference. (Where the outputs are float32 or
float16, a different order of float64 additions rarely shows in them; the float64
cases are the ones that catch it, and the forward cases' float64 statistics.)"""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import ON_DEVICE, assert_close, random_batch, tune_cpu

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels only")

if not ON_DEVICE:
    import numbabn
    from numbabn import _validate, reference
    from numbabn._cpu import fused, llvm, plan, small, tuning

# Plane lengths: whole cache lines for every dtype (1504), not (1501, 37), less than a
# line (5); a single channel, and more runs than threads.
SHAPES = [(3, 4, 1504), (3, 4, 1501), (5, 3, 37), (4, 5, 5), (2, 1, 300)]
DTYPES = [np.float16, np.float32, np.float64]


def _bits(a):
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _line_aligned(n, dtype):
    """n elements that start on a cache line (64 bytes)."""
    item = np.dtype(dtype).itemsize
    raw = np.empty(n * item + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + n * item].view(dtype)


def _outputs(shape, dtype):
    """Outputs that start on a cache line, and one and three elements past one."""
    n = int(np.prod(shape))
    for offset in (0, 1, 3):
        yield offset, _line_aligned(n + 3, dtype)[offset : offset + n].reshape(shape)


def _splits(c):
    return sorted({1, 2, 3, c, c + 2})  # c + 2: tasks that find every channel taken


def _ctype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_statistics_do_not_depend_on_split_or_output(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    c = shape[1]
    # Values near 0 span many binades: float32 sums are then not exact in float64, and a
    # different order of the additions shows in the last bits (float16 sums are exact).
    x = rng.normal(0.3, 2.0, shape).astype(dtype)
    weight, bias = rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c)
    results = []
    for ntask in _splits(c):
        for streamed in (False, True):
            for offset, y in _outputs(shape, dtype):
                params, stats = np.empty((4, c), _ctype(dtype)), np.empty((3, c))
                fused.forward_channels[streamed](
                    _bits(x), weight, bias, 1e-5, params, stats, ntask, _bits(y)
                )
                results.append(((ntask, streamed, offset), stats.copy(), y.copy()))
    params, stats = np.empty((4, c), _ctype(dtype)), np.empty((3, c))
    y = np.empty(shape, dtype)
    small.forward_ncl(_bits(x), weight, bias, 1e-5, params, stats, _bits(y))
    results.append(("small", stats, y))
    alone = np.empty((2, c))
    small.stats_ncl(_bits(x), alone)
    np.testing.assert_array_equal(alone, stats[:2], err_msg="small.stats_ncl")
    _, stats0, y0 = results[0]
    for how, st, yy in results[1:]:
        np.testing.assert_array_equal(st, stats0, err_msg=f"statistics of {how}")
        np.testing.assert_array_equal(yy, y0, err_msg=f"y of {how}")
    mean, var = reference.batch_stats(x)
    np.testing.assert_allclose(stats0[0], mean, rtol=1e-14)
    np.testing.assert_allclose(stats0[1], var, rtol=1e-11)
    assert_close(y0, reference.batch_norm_forward(x, weight, bias)[0], dtype, factor=2)


# (through a ReLU, eval mode for float32 only: each case compiles its own kernels)
GRADIENTS = [(d, t, False) for d in DTYPES for t in (True, False)] + [
    (d, t, True) for d in DTYPES for t in (True, False) if t or d == np.float32
]


@pytest.mark.parametrize(
    "dtype,training,relu", GRADIENTS,
    ids=[f"{np.dtype(d).name}-{'train' if t else 'eval'}{'-relu' if r else ''}" for d, t, r in GRADIENTS],
)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_sums_do_not_depend_on_split_or_output(shape, dtype, training, relu):
    """Also through a ReLU (the gradient a masked pair (dy, y)), where the sums' loop
    writes dresidual, the masked dy, exactly."""
    rng = np.random.default_rng(sum(shape) + training)
    c = shape[1]
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = np.maximum(rng.standard_normal(shape), 0).astype(dtype)  # a ReLU's output
    dy.reshape(-1)[::5] = -0.0  # (dresidual keeps its sign)
    _, mean, invstd = reference.batch_norm_forward(x)
    weight = rng.uniform(0.5, 1.5, c)
    ctype = _ctype(dtype)
    g = (_bits(dy), _bits(y)) if relu else _bits(dy)
    results = []
    for ntask in _splits(c):
        for streamed in (False, True):
            for offset, dx in _outputs(shape, dtype):
                params, grads = np.empty((5, c), ctype), np.empty((2, c), ctype)
                dr = np.full(shape, np.nan, dtype) if relu else None
                fused.backward_channels[streamed, training](
                    g, _bits(x), mean, invstd, weight, params, grads, ntask,
                    None if dr is None else _bits(dr), _bits(dx),
                )
                results.append(((ntask, streamed, offset), grads.copy(), dx.copy(), dr))
    params, grads = np.empty((5, c), ctype), np.empty((2, c), ctype)
    dx = np.empty(shape, dtype)
    dr = np.full(shape, np.nan, dtype) if relu else None
    small.backward_ncl(
        g, _bits(x), mean, invstd, weight, training, params, grads,
        None if dr is None else _bits(dr), _bits(dx),
    )
    results.append(("small", grads, dx, dr))
    _, grads0, dx0, _ = results[0]
    for how, gr, d, _ in results[1:]:
        np.testing.assert_array_equal(gr, grads0, err_msg=f"dweight, dbias of {how}")
        np.testing.assert_array_equal(d, dx0, err_msg=f"dx of {how}")
    gref = np.where(y > 0, dy, 0).astype(dtype) if relu else dy
    for how, _, _, r in results if relu else ():
        np.testing.assert_array_equal(
            r.view(np.uint8), gref.view(np.uint8), err_msg=f"dresidual of {how}"
        )
    dxref, dwref, dbref = reference.batch_norm_backward(gref, x, mean, invstd, weight, 1, training)
    count = shape[0] * shape[2]
    assert_close(grads0[1], dbref, ctype, scale=np.sqrt(count))
    assert_close(grads0[0], dwref, ctype, scale=np.sqrt(count))
    assert_close(dx0, dxref, dtype, factor=4)


@pytest.mark.parametrize("streamed", [False, True])
def test_fused_forward_in_place(streamed):
    """y may be x: a channel is written only after its sums, and the next channel's
    sums read only that channel."""
    shape = (3, 4, 1504)
    x = np.random.default_rng(1).normal(5.0, 3.0, shape).astype(np.float32)
    expected, stats = np.empty_like(x), np.empty((3, 4))
    args = (np.ones(4), np.zeros(4), 1e-5, np.empty((4, 4), np.float32))
    fused.forward_channels[streamed](x, *args, stats, 2, expected)
    buf = _line_aligned(x.size, np.float32).reshape(shape)
    buf[...] = x
    fused.forward_channels[streamed](buf, *args, np.empty((3, 4)), 2, buf)
    np.testing.assert_array_equal(buf, expected)


def test_line_blocks():
    raw = _line_aligned(200, np.float32)
    for offset in range(17):
        for size in (0, 3, 16, 17, 40, 100):
            y = raw[offset : offset + size]
            start, blocks = llvm.line_blocks(y)
            first = (-offset) % 16
            assert start == min(first, size)
            assert blocks == (size - start) // 16
            assert (y[start:].ctypes.data % 64 == 0) or start == size
    odd = np.frombuffer(np.zeros(100, np.uint8).data, np.float32, 20, offset=1)
    assert llvm.line_blocks(odd) == (0, 0)


def test_train_forward_fuses_long_rows_past_the_slab_limit(monkeypatch):
    """``plan.fuse``: train forward takes the fused pass for rows of 12 KB or more
    whatever a channel's slab (here 3 MB, past the 2 MB limit); backward keeps its
    limit, and so do shorter rows (28x28 planes). Through that path, on 2 threads, a
    call gives the float64 reference's result."""

    def plan_of(shape):  # on 2 threads (np.empty does not touch the memory)
        info = _validate.describe(np.empty(shape, np.float32), "x")
        return plan.make(_validate.plan_layout(info, 1), 2, 4)

    long_rows = (3, 2, 64, 4096)  # x slab 3 MB, rows 1 MB
    assert plan_of(long_rows).fuse_forward and not plan_of(long_rows).fuse_backward
    assert not plan_of((1024, 8, 28, 28)).fuse_forward  # 3.2 MB slab of 3 KB rows
    assert plan_of((64, 8, 112, 112)).fuse_forward  # 3.2 MB slab of 49 KB rows

    tune_cpu(monkeypatch, threads=lambda: 2)
    x = random_batch(long_rows, np.float32, seed=3, per_channel_axis=1)
    y, mean, invstd = numbabn.batch_norm_forward(x)
    yr, meanr, invstdr = reference.batch_norm_forward(x)
    assert_close(y, yr, np.float32)
    assert_close(mean, meanr, np.float32)
    assert_close(invstd, invstdr, np.float32)


@pytest.mark.parametrize(
    "shape, forward, backward",
    [
        ((32, 64, 28, 28), True, True),  # x 6.4 MB: fits a quarter of 32 MiB
        ((64, 64, 28, 28), False, False),  # 12.8 MB of 3 KB rows
        ((64, 128, 32, 32), False, False),  # 33.5 MB of 4 KB rows
        ((32, 64, 40, 40), True, True),  # 13 MB of 6.4 KB rows: long enough at any size
        ((128, 64, 14, 14), True, False),  # 6.4 MB of 784-byte rows: backward reads 12.8 MB
    ],
)
def test_fuse_rule_for_short_rows(monkeypatch, shape, forward, backward):
    """``plan.fuse`` with a 32 MiB last-level cache: rows shorter than
    ``fuse_long_row_bytes`` per array fuse only while x fits a quarter of the cache
    (and, for rows under ``fuse_min_row_bytes`` of all arrays, all the pass reads)."""
    tune_cpu(monkeypatch, llc_bytes=32 << 20)
    info = _validate.describe(np.empty(shape, np.float32), "x")
    layout = _validate.plan_layout(info, 1)
    assert plan.fuse(layout, 4, "forward") is forward
    assert plan.fuse(layout, 4, "backward") is backward


def test_cache_share():
    """A virtual machine's sysfs may give the whole host socket's cache (300 MiB on a
    2-vCPU guest): at most 16 MiB per CPU count."""
    per_cpu = tuning.LLC_PER_CPU
    assert tuning.cache_share(300 << 20, 2, per_cpu) == 32 << 20
    assert tuning.cache_share(32 << 20, 2, per_cpu) == 32 << 20
    assert tuning.cache_share(300 << 20, 64, per_cpu) == 300 << 20
    assert tuning.TUNING.llc_bytes <= per_cpu * (os.cpu_count() or 1)
