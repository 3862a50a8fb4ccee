"""How the kernels split their work. The NCL reductions take runs of samples, each
plane cut into segments (``_cpu.reduce.sums_ncl``): each partial
row must hold exactly its own run's and segment's sums, where the functional tests
check only totals. The MC reductions fold flat columns into channels. The
elementwise passes walk plane segments in runs that may start mid-plane."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels only")

if not ON_DEVICE:
    from numbabn import _validate
    from numbabn._cpu import elementwise, plan, reduce


def _expected(a, per_channel, nrun, nseg, fn):
    """The partial rows the kernels should write, computed one by one in float64."""
    n, c, l = a[0].shape
    rows = np.empty((nrun * nseg, 2, c))
    for r in range(nrun):
        n0, n1 = r * n // nrun, (r + 1) * n // nrun
        for s in range(nseg):
            lo, hi = (min(l, k * l // nseg // 16 * 16) if k < nseg else l for k in (s, s + 1))
            rows[r * nseg + s] = fn(*(v[n0:n1, :, lo:hi].astype(np.float64) for v in a), per_channel)
    return rows


def _stats(x, shift):
    d = x - shift[None, :, None]
    return d.sum(axis=(0, 2)), (d * d).sum(axis=(0, 2))


def _grad(dy, x, mean):
    return dy.sum(axis=(0, 2)), (dy * (x - mean[None, :, None])).sum(axis=(0, 2))


@pytest.mark.parametrize(
    "shape,nrun,nseg",
    [((11, 3, 49), 8, 1), ((11, 3, 49), 11, 1), ((5, 2, 300), 1, 1), ((3, 4, 1000), 3, 3),
     ((7, 1, 97), 2, 2), ((2, 5, 17), 2, 1), ((13, 2, 4099), 4, 5)],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sweep", [False, True])
def test_reduction_rows_are_runs_and_segments(shape, nrun, nseg, dtype, sweep):
    """Each task's partial row, and the results the kernels add up from them: the
    moments (sums shifted by each channel's first value) and the gradient sums; with
    ``sweep`` (whole planes only: a task per run, all channels of a sample in turn),
    bitwise the same as with a task per run and channel."""
    if sweep and nseg > 1:
        pytest.skip("the sweep takes whole planes")
    rng = np.random.default_rng(sum(shape) + nrun + nseg)
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mean = rng.normal(3.0, 1.0, shape[1])
    k = (lambda a: a.view(np.uint16)) if dtype == np.float16 else (lambda a: a)
    part = np.full((nrun * nseg, 2, shape[1]), np.nan)
    out = np.full((2, shape[1]), np.nan)
    reduce.sums_ncl(None, k(x), None, nrun, nseg, sweep, part, out)
    if sweep:
        part_t, out_t = np.full_like(part, np.nan), np.full_like(out, np.nan)
        reduce.sums_ncl(None, k(x), None, nrun, nseg, False, part_t, out_t)
        assert np.array_equal(part, part_t) and np.array_equal(out, out_t)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    shift = x64[0, :, 0]
    np.testing.assert_allclose(part, _expected((x,), shift, nrun, nseg, _stats), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out[0], x64.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(out[1], x64.var(axis=(0, 2)), rtol=1e-10)
    part[...] = np.nan
    out[...] = np.nan
    reduce.sums_ncl(k(dy), k(x), mean, nrun, nseg, sweep, part, out)
    if sweep:
        part_t, out_t = np.full_like(part, np.nan), np.full_like(out, np.nan)
        reduce.sums_ncl(k(dy), k(x), mean, nrun, nseg, False, part_t, out_t)
        assert np.array_equal(part, part_t) and np.array_equal(out, out_t)
    expected = _expected((dy, x), mean, nrun, nseg, _grad)
    np.testing.assert_allclose(part, expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out, _grad(dy64, x64, mean), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "shape,threads,work",
    [((256, 8, 14, 14), 2, (8, 1, True)), ((4, 8, 14, 14), 2, (4, 1, True)),
     ((3, 8, 14, 14), 2, (3, 1, False)), ((6, 8, 14, 14), 4, (6, 1, False)),
     ((2, 1, 40000), 2, (2, 4, False))],
)
def test_reductions_sweep_whole_planes_when_runs_share_out(shape, threads, work):
    """``plan.make``: (runs, segments, sweep) of the NCL reductions. The sweep takes
    whole planes, in runs that cover the threads evenly (as many as the tasks wanted,
    or a multiple of the threads)."""
    info = _validate.describe(np.empty(shape, np.float32), "x")
    assert plan.make(_validate.plan_layout(info, 1), threads, 4).sums_work == work


@pytest.mark.parametrize("m,c,l,nchunk", [(9, 5, 1, 4), (7, 3, 16, 3), (12, 7, 3, 5), (2, 4, 5, 2)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_row_reductions_fold_flat_columns(m, c, l, nchunk, dtype):
    """The MC reductions over chunks of rows whose channels are ``l`` adjacent columns
    (NCL samples of short planes viewed flat): each chunk's partial row per column,
    and per channel the moments (shifted by its first value) and gradient sums."""
    rng = np.random.default_rng(m * c * l + nchunk)
    x = rng.normal(3.0, 2.0, (m, c * l)).astype(dtype)
    dy = rng.standard_normal((m, c * l)).astype(dtype)
    mean = rng.normal(3.0, 1.0, c)
    k = (lambda a: a.view(np.uint16)) if dtype == np.float16 else (lambda a: a)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    per_channel = x64.reshape(m, c, l).transpose(1, 0, 2).reshape(c, m * l)
    part, out = np.full((nchunk, 2, c * l), np.nan), np.full((2, c), np.nan)
    reduce.sums_mc(None, k(x), None, l, nchunk, part, out)
    shift = np.repeat(x64[0, ::l], l)
    for t in range(nchunk):
        d = x64[t * m // nchunk : (t + 1) * m // nchunk] - shift
        expected = [d.sum(axis=0), (d * d).sum(axis=0)]
        np.testing.assert_allclose(part[t], expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out[0], per_channel.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(out[1], per_channel.var(axis=1), rtol=1e-10)
    out[...] = np.nan
    reduce.sums_mc(k(dy), k(x), mean, l, nchunk, part, out)
    d = (x64 - np.repeat(mean, l)).reshape(m, c, l)
    g = dy64.reshape(m, c, l)
    expected = [g.sum(axis=(0, 2)), (g * d).sum(axis=(0, 2))]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "shape,nseg,nchunk",
    [((3, 5, 100), 1, 4), ((3, 5, 100), 3, 4), ((2, 3, 1000), 4, 5), ((1, 7, 64), 2, 3),
     ((4, 1, 333), 5, 7), ((5, 4, 48), 1, 1)],
)
def test_elementwise_tasks_walk_every_segment(shape, nseg, nchunk):
    """``ncl_segments`` (both formulas) deals ``N * C * nseg`` plane segments out in
    ``nchunk`` runs, which start at any segment of any plane: every element is
    written once, with its own channel's constants."""
    rng = np.random.default_rng(sum(shape) * nseg + nchunk)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    params = rng.uniform(0.5, 1.5, (5, shape[1]))
    y, dx = np.full(shape, np.nan), np.full(shape, np.nan)
    elementwise.ncl_segments[False](None, x, params[:4].copy(), nseg, nchunk, y)
    elementwise.ncl_segments[False](dy, x, params, nseg, nchunk, dx)
    hi, lo, a, b, k1 = (p[None, :, None] for p in params)
    np.testing.assert_allclose(y, ((x - hi) - lo) * a + b, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(dx, (dy - b - ((x - hi) - lo) * a) * k1, rtol=1e-13, atol=1e-13)
