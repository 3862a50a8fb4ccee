"""How the NCL kernels split their work. The reductions take runs of samples, each
plane cut into segments (``_cpu_kernels.stats_ncl``, ``grad_sums_ncl``): each partial
row must hold exactly its own run's and segment's sums, where the functional tests
check only totals. The elementwise passes walk plane segments in runs that may start
mid-plane."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels only")

if not ON_DEVICE:
    from numbabn import _cpu_kernels


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
def test_reduction_rows_are_runs_and_segments(shape, nrun, nseg, dtype):
    rng = np.random.default_rng(sum(shape) + nrun + nseg)
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    per_channel = rng.normal(3.0, 1.0, shape[1])
    k = (lambda a: a.view(np.uint16)) if dtype == np.float16 else (lambda a: a)
    part = np.full((nrun * nseg, 2, shape[1]), np.nan)
    _cpu_kernels.stats_ncl(k(x), per_channel, nrun, nseg, part)
    np.testing.assert_allclose(part, _expected((x,), per_channel, nrun, nseg, _stats), rtol=1e-12, atol=1e-9)
    part[...] = np.nan
    _cpu_kernels.grad_sums_ncl(k(dy), k(x), per_channel, nrun, nseg, part)
    np.testing.assert_allclose(part, _expected((dy, x), per_channel, nrun, nseg, _grad), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "shape,nseg,nchunk",
    [((3, 5, 100), 1, 4), ((3, 5, 100), 3, 4), ((2, 3, 1000), 4, 5), ((1, 7, 64), 2, 3),
     ((4, 1, 333), 5, 7), ((5, 4, 48), 1, 1)],
)
def test_elementwise_tasks_walk_every_segment(shape, nseg, nchunk):
    """normalize_ncl and grad_input_ncl deal ``N * C * nseg`` plane segments out in
    ``nchunk`` runs, which start at any segment of any plane: every element is
    written once, with its own channel's constants."""
    rng = np.random.default_rng(sum(shape) * nseg + nchunk)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    params = rng.uniform(0.5, 1.5, (5, shape[1]))
    y, dx = np.full(shape, np.nan), np.full(shape, np.nan)
    _cpu_kernels.normalize_ncl(x, params[:4].copy(), nseg, nchunk, False, y)
    _cpu_kernels.grad_input_ncl(dy, x, params, nseg, nchunk, False, dx)
    hi, lo, a, b, k1 = (p[None, :, None] for p in params)
    np.testing.assert_allclose(y, ((x - hi) - lo) * a + b, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(dx, (dy - b - ((x - hi) - lo) * a) * k1, rtol=1e-13, atol=1e-13)
