"""numbabn.distributed against single-process numbabn on the concatenated batch.

Run under MPI: ``mpiexec -n 2 python -m pytest tests/test_distributed.py`` (and -n 3,
where the last rank holds an empty slice); tests/run.sh does both, on host arrays and
under the CUDA simulator. In a plain single-process run the tests skip.
"""

from __future__ import annotations

import numpy as np
import pytest

import numbabn

from helpers import DTYPES, ON_DEVICE, assert_close, random_batch, to_host, to_side

MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD
pytestmark = pytest.mark.skipif(COMM.size < 2, reason="needs mpiexec -n 2 or more")

import numbabn.distributed as dist  # noqa: E402

CASES = [((9, 3, 5), 1), ((9, 4, 3), -1), ((9, 2, 3, 3), 1)]


def _sizes(n):
    """Uneven slices of n rows; with 3 or more ranks the last one gets none."""
    weights = np.arange(1, COMM.size + 1, dtype=float)
    if COMM.size >= 3:
        weights[-1] = 0
    cuts = np.floor(np.cumsum(weights) / weights.sum() * n).astype(int)
    return np.diff(np.concatenate([[0], cuts]))


def _slice(a):
    sizes = _sizes(a.shape[0])
    start = int(sizes[: COMM.rank].sum())
    return a[start : start + sizes[COMM.rank]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_and_running_stats_match_concatenated_batch(shape, axis, dtype):
    c = shape[axis]
    x = random_batch(shape, dtype, seed=1, per_channel_axis=axis)
    w = np.linspace(0.5, 1.5, c).astype(np.float32)
    b = np.linspace(-1, 1, c).astype(np.float32)
    rm, rv = to_side(np.zeros(c)), to_side(np.ones(c))
    y = dist.batch_norm(to_side(_slice(x)), rm, rv, to_side(w), to_side(b), True, 0.3,
                        axis=axis, comm=COMM)
    rm1, rv1 = np.zeros(c), np.ones(c)
    yfull = numbabn.batch_norm(x, rm1, rv1, w, b, True, 0.3, axis=axis)
    assert_close(y, _slice(yfull), dtype, factor=2)
    np.testing.assert_allclose(to_host(rm), rm1, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(to_host(rv), rv1, rtol=1e-12, atol=1e-15)
    # Every rank holds bitwise the same running statistics.
    gathered = COMM.allgather((to_host(rm), to_host(rv)))
    for other in gathered:
        np.testing.assert_array_equal(other[0], gathered[0][0])
        np.testing.assert_array_equal(other[1], gathered[0][1])


@pytest.mark.parametrize("shape,axis", CASES)
def test_stats_forward_backward_match_concatenated_batch(shape, axis):
    x = random_batch(shape, np.float64, seed=2, per_channel_axis=axis)
    dy = random_batch(shape, np.float64, seed=3)
    w = np.linspace(0.5, 1.5, x.shape[axis])
    mean, var = dist.batch_stats(to_side(_slice(x)), axis=axis, comm=COMM)
    mref, vref = numbabn.batch_stats(x, axis=axis)
    np.testing.assert_allclose(to_host(mean), mref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(to_host(var), vref, rtol=1e-12)
    y, m, s = dist.batch_norm_forward(to_side(_slice(x)), to_side(w), axis=axis, comm=COMM)
    yref, mref, sref = numbabn.batch_norm_forward(x, w, axis=axis)
    np.testing.assert_allclose(to_host(y), _slice(yref), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_host(s), sref, rtol=1e-12)
    dx, dw, db = dist.batch_norm_backward(
        to_side(_slice(dy)), to_side(_slice(x)), m, s, to_side(w), axis=axis, comm=COMM
    )
    dxr, dwr, dbr = numbabn.batch_norm_backward(dy, x, mref, sref, w, axis=axis)
    np.testing.assert_allclose(to_host(dx), _slice(dxr), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_host(dw), dwr, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_host(db), dbr, rtol=1e-10, atol=1e-12)


def test_bfloat16_matches_concatenated_batch():
    """bfloat16 data and running statistics: the same statistics as one process (float32),
    outputs within one bfloat16 rounding of its outputs."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = random_batch((9, 3, 5), np.float32, seed=4, per_channel_axis=1).astype(bf16)
    dy = random_batch(x.shape, np.float32, seed=5).astype(bf16)
    rm, rv = np.zeros(3, bf16), np.ones(3, bf16)
    rms, rvs = to_side(rm.copy()), to_side(rv.copy())
    dist.batch_norm(to_side(_slice(x)), rms, rvs, None, None, True, 0.3, comm=COMM)
    numbabn.batch_norm(x, rm, rv, None, None, True, 0.3)  # (the running statistics)
    y, m, s = dist.batch_norm_forward(to_side(_slice(x)), comm=COMM)
    yref, mref, sref = numbabn.batch_norm_forward(x)
    np.testing.assert_allclose(to_host(s), sref, rtol=1e-6)
    dx = dist.batch_norm_backward(to_side(_slice(dy)), to_side(_slice(x)), m, s, comm=COMM)[0]
    dxr = numbabn.batch_norm_backward(dy, x, mref, sref)[0]
    for got, want in [(to_host(rms), rm), (to_host(rvs), rv), (to_host(y), _slice(yref)),
                      (to_host(dx), _slice(dxr))]:
        assert got.dtype == bf16
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=2.0**-7, atol=2.0**-7)


def test_layer_over_several_steps_matches_single_process():
    c = 3
    bn = dist.BatchNorm(c, comm=COMM, momentum=None, dtype=np.float64)
    ref = numbabn.BatchNorm(c, momentum=None, dtype=np.float64)
    for step in range(3):
        x = random_batch((8, c, 4), np.float64, seed=10 + step, per_channel_axis=1)
        dy = random_batch(x.shape, np.float64, seed=20 + step)
        y = bn(to_side(_slice(x)))
        dx = bn.backward(to_side(_slice(dy)))
        yr = ref(x)
        dxr = ref.backward(dy)
        np.testing.assert_allclose(to_host(y), _slice(yr), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_host(dx), _slice(dxr), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(to_host(bn.weight_grad), ref.weight_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_host(bn.running_var), ref.running_var, rtol=1e-12)
    assert bn.num_batches_tracked == ref.num_batches_tracked == 3
    bn.eval()
    ref.eval()
    x = random_batch((4, c, 4), np.float64, seed=30)
    np.testing.assert_allclose(to_host(bn(to_side(x))), ref(x), rtol=1e-12, atol=1e-12)


def test_error_on_one_rank_raises_on_every_rank_and_writes_nothing():
    c = 3 if COMM.rank else 4  # rank 0 disagrees on the channel count
    x = to_side(random_batch((4, c, 5), np.float32, seed=4))
    rm, rv = to_side(np.zeros(c)), to_side(np.ones(c))
    with pytest.raises(ValueError, match="channels"):
        dist.batch_norm(x, rm, rv, training=True, comm=COMM)
    np.testing.assert_array_equal(to_host(rm), np.zeros(c))
    bad = to_side(np.ones((2, 3, 4), np.int32)) if COMM.rank == 0 else to_side(np.ones((2, 3, 4)))
    with pytest.raises(TypeError):
        dist.batch_norm(bad, training=True, comm=COMM)


def test_too_few_values_over_all_ranks():
    x = to_side(np.ones((1, 3), np.float32)) if COMM.rank == 0 else to_side(np.ones((0, 3), np.float32))
    with pytest.raises(ValueError, match="over all ranks"):
        dist.batch_norm(x, training=True, comm=COMM)


@pytest.mark.skipif(ON_DEVICE, reason="host arrays")
def test_merge_moments_skips_empty_ranks_and_is_exact():
    a = np.arange(10.0)
    parts = [(4, np.array([a[:4].mean()]), np.array([((a[:4] - a[:4].mean()) ** 2).sum()])),
             (0, np.zeros(1), np.zeros(1)),
             (6, np.array([a[4:].mean()]), np.array([((a[4:] - a[4:].mean()) ** 2).sum()]))]
    n, mean, m2 = dist.merge_moments(parts)
    assert n == 10
    np.testing.assert_allclose(mean, a.mean(), rtol=1e-15)
    np.testing.assert_allclose(m2 / n, a.var(), rtol=1e-14)
