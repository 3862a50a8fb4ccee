"""Regression tests of the contract's edge cases: empty batches, aliasing, huge or tiny
scalars, infinities, masked arrays, layers shared by threads, forked processes."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref

from helpers import DTYPES, ON_DEVICE, assert_close, random_batch, to_host, to_side

C = 3


def _stats_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# --- empty batches --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((0, C, 5, 5), 1), ((0, 5, 5, C), -1), ((4, 0, 5, 5), 1),
                                        ((4, 5, 5, 0), -1), ((0, 0), 1), ((6, 0), 1)])
def test_empty_batches_give_empty_results(shape, axis, dtype):
    """Eval forward and backward with N = 0, and every operation with C = 0, return
    empty results (zero dweight and dbias) instead of failing."""
    x = np.zeros(shape, dtype)
    c = shape[axis]
    rm, rv = to_side(np.zeros(c, dtype)), to_side(np.ones(c, dtype))
    sd = _stats_dtype(dtype)
    y = numbabn.batch_norm(to_side(x), rm, rv, axis=axis)
    assert to_host(y).shape == shape and to_host(y).dtype == dtype
    out = to_side(np.zeros(shape, dtype))
    assert numbabn.batch_norm(to_side(x), rm, rv, axis=axis, out=out) is out
    dx, dw, db = numbabn.batch_norm_backward(to_side(x), to_side(x), rm, rv, axis=axis, training=False)
    assert to_host(dx).shape == shape
    for g in (dw, db):
        assert to_host(g).dtype == sd
        np.testing.assert_array_equal(to_host(g), np.zeros(c))
    if c:
        with pytest.raises(ValueError, match="at least 2"):
            numbabn.batch_norm(to_side(x), rm, rv, training=True, axis=axis)
        return
    y, mean, invstd = numbabn.batch_norm_forward(to_side(x), axis=axis)
    assert to_host(y).shape == shape and to_host(mean).shape == (0,) and to_host(invstd).dtype == sd
    mean, var = numbabn.batch_stats(to_side(x), axis=axis)
    assert to_host(mean).shape == (0,) and to_host(var).dtype == sd
    y = numbabn.batch_norm(to_side(x), rm, rv, training=True, axis=axis)
    assert to_host(y).shape == shape
    dx, dw, _ = numbabn.batch_norm_backward(to_side(x), to_side(x), mean, var, axis=axis)
    assert to_host(dx).shape == shape and to_host(dw).shape == (0,)


def test_layer_in_eval_takes_an_empty_batch():
    bn = numbabn.BatchNorm(C).eval()
    x = to_side(np.zeros((0, C, 4, 4), np.float32))
    assert to_host(bn(x)).shape == (0, C, 4, 4)
    assert to_host(bn.backward(x)).shape == (0, C, 4, 4)
    np.testing.assert_array_equal(to_host(bn.weight_grad), np.zeros(C))


# --- aliasing ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shift", [1, 7, -5])
def test_out_overlapping_x_gives_the_result_of_a_copy(training, shift):
    """An ``out`` that overlaps x partly (x = buf[:120], out = buf[1:121]) is filled as
    if x had been copied first, on both backends."""
    buf = random_batch((260,), np.float32, seed=3)
    lo = max(0, -shift)
    xs = slice(lo + max(0, 0), lo + 120)
    os_ = slice(lo + shift, lo + shift + 120)
    x0 = buf[xs].reshape(4, C, 10).copy()
    rm, rv = np.linspace(-1, 1, C).astype(np.float32), np.linspace(1, 2, C).astype(np.float32)
    expected = ref.batch_norm(x0, rm, rv, training=training)[0]
    b = to_side(buf)
    x, out = b[xs].reshape(4, C, 10), b[os_].reshape(4, C, 10)
    numbabn.batch_norm(x, to_side(rm.copy()), to_side(rv.copy()), training=training, out=out)
    assert_close(out, expected, np.float32)


def test_running_statistics_that_are_views_of_x():
    """Running statistics inside x's memory: y is normalized from x as it was given,
    then the statistics are updated (on the GPU too, where the update runs first)."""
    x0 = random_batch((4, C, 10), np.float32, seed=4, per_channel_axis=1)
    y_ref, rm_ref, rv_ref = ref.batch_norm(x0, x0[0, :, 0], x0[1, :, 1], training=True)
    x = to_side(x0.copy())
    y = numbabn.batch_norm(x, x[0, :, 0], x[1, :, 1], training=True)
    assert_close(y, y_ref, np.float32)
    host = to_host(x)
    assert_close(host[0, :, 0], rm_ref, np.float32)
    assert_close(host[1, :, 1], rv_ref, np.float32)


@pytest.mark.parametrize("target", ["running_mean", "running_var", "weight", "bias"])
def test_out_overlapping_a_per_channel_argument_is_refused(target):
    x0 = random_batch((4, C, 5), np.float32, seed=5)
    buf = to_side(np.zeros(C + x0.size, np.float32))
    out = buf[:x0.size].reshape(x0.shape)
    names = ("running_mean", "running_var", "weight", "bias")
    args = {k: to_side(np.full(C, 1.0, np.float32)) for k in names}
    args[target] = buf[x0.size - 1: x0.size - 1 + C]  # shares one value with out
    before = to_host(buf).copy()
    for training in (True, False):
        with pytest.raises(ValueError, match=f"out overlaps {target}"):
            numbabn.batch_norm(to_side(x0), args["running_mean"], args["running_var"], args["weight"],
                               args["bias"], training, out=out)
        np.testing.assert_array_equal(to_host(buf), before)


def test_out_may_be_x_itself():
    x0 = random_batch((4, C, 6), np.float64, seed=6)
    x = to_side(x0.copy())
    assert numbabn.batch_norm(x, training=True, out=x) is x
    assert_close(x, ref.batch_norm(x0, training=True)[0], np.float64)


# --- scalars, infinities, masks --------------------------------------------------------


@pytest.mark.parametrize("kw", [{"eps": 10**400}, {"momentum": 10**400}, {"eps": -(10**400)}])
def test_huge_integer_scalars_are_value_errors(kw):
    x = to_side(random_batch((4, C, 5), np.float32))
    with pytest.raises(ValueError):
        numbabn.batch_norm(x, to_side(np.zeros(C, np.float32)), to_side(np.ones(C, np.float32)),
                           training=True, **kw)
    with pytest.raises(ValueError):
        numbabn.BatchNorm(C, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_running_mean_gives_infinities_as_torch(dtype):
    x = random_batch((4, C, 5), dtype, seed=7)
    rm = np.array([np.inf, -np.inf, 0.0], dtype)
    rv = np.ones(C, dtype)
    y = to_host(numbabn.batch_norm(to_side(x), to_side(rm), to_side(rv)))
    assert np.all(y[:, 0] == -np.inf) and np.all(y[:, 1] == np.inf)
    assert np.isfinite(y[:, 2]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-80, 1e-300])
def test_constant_channel_with_tiny_eps_normalizes_to_zero(dtype, eps):
    """var + eps below float32's range: the scale is clamped to the compute type, so a
    constant channel still gives exactly 0 (not inf * 0), and no warning escapes."""
    x = random_batch((4, C, 10), dtype, seed=8)
    x[:, 1] = 2.5
    with warnings.catch_warnings():
        if ON_DEVICE:  # the simulator's own float32 casts of the inf invstd it returns
            warnings.filterwarnings("ignore", "overflow encountered in cast")
        y, _, _ = numbabn.batch_norm_forward(to_side(x), eps=eps)
        y_train = numbabn.batch_norm(to_side(x), training=True, eps=eps)
    for out in (y, y_train):
        np.testing.assert_array_equal(to_host(out)[:, 1], 0.0)


def test_masked_arrays_are_refused():
    x = np.ma.masked_array(random_batch((4, C, 5), np.float32), mask=False)
    with pytest.raises(TypeError, match="masked"):
        numbabn.batch_norm(x, training=True)
    with pytest.raises(TypeError, match="masked"):
        numbabn.batch_stats(x)
    rm = np.ma.masked_array(np.zeros(C, np.float32))
    with pytest.raises(TypeError, match="masked"):
        numbabn.batch_norm(x.data, rm, np.ones(C, np.float32), training=True)


# --- layers shared by threads; failed calls ------------------------------------------


def test_cumulative_average_of_a_layer_shared_by_threads():
    """momentum=None: 8 threads x 4 batches give the average of all 32 batch means."""
    from numba import config

    if ON_DEVICE and config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator is not for thread stress")
    bn = numbabn.BatchNorm(C, momentum=None)
    batches = [random_batch((4, C, 64), np.float32, seed=s) + np.float32(s) for s in range(32)]

    def work(i):
        bn(to_side(batches[i]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(32)))
    assert bn.num_batches_tracked == 32
    means = np.mean([ref.batch_stats(b)[0] for b in batches], axis=0)
    assert_close(bn.running_mean, means, np.float32, factor=10)


def test_failed_call_moves_nothing_to_the_device():
    if not ON_DEVICE:
        pytest.skip("needs device arrays")
    bn = numbabn.BatchNorm(C)
    with pytest.raises(ValueError):
        bn(to_side(np.ones((4, C + 1, 2), np.float32)))
    assert all(isinstance(a, np.ndarray) for a in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    bn(to_side(random_batch((4, C, 2), np.float32)))
    assert not isinstance(bn.weight, np.ndarray)


def test_scratch_is_kept_for_a_bounded_number_of_streams():
    if not ON_DEVICE:
        pytest.skip("needs device arrays")
    from numba import cuda

    from numbabn import _gpu

    x = to_side(random_batch((2, C, 4), np.float32))
    for _ in range(_gpu._SCRATCH_STREAMS + 3):
        numbabn.batch_stats(x, stream=cuda.stream())
    assert len(_gpu._per_stream) <= _gpu._SCRATCH_STREAMS


# --- processes: fork, and the workqueue threading layer -------------------------------

_PARALLEL_SHAPE = (16, 16, 48, 48)  # past the single-thread kernels: fused and unfused passes


def _all_outputs(x):
    y, mean, invstd = numbabn.batch_norm_forward(x)
    outs = [y, mean, invstd, *numbabn.batch_stats(x), numbabn.batch_norm(x, mean, invstd)]
    return outs + list(numbabn.batch_norm_backward(x, x, mean, invstd))


@pytest.mark.skipif(ON_DEVICE, reason="the CPU thread pool")
def test_child_forked_after_a_parallel_call_runs_and_agrees_bitwise():
    """numba's GNU OpenMP layer kills a forked child that runs a parallel kernel; the
    child runs serial twins of the kernels instead, with the same results."""
    x = random_batch(_PARALLEL_SHAPE, np.float32, seed=9, per_channel_axis=1)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    parent = _all_outputs(x) + [numbabn.batch_norm(xl, training=True, axis=-1)]
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            child = _all_outputs(x) + [numbabn.batch_norm(xl, training=True, axis=-1)]
            same = all(a.tobytes() == b.tobytes() for a, b in zip(parent, child))
            code = 0 if same else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(ON_DEVICE, reason="the CPU thread pool")
def test_concurrent_calls_under_the_workqueue_layer():
    """numba's workqueue layer aborts the process when two threads run parallel
    kernels at once; numbabn serializes its parallel calls there."""
    script = (
        "import numpy as np, numbabn, numba\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        f"x = np.random.default_rng(0).standard_normal({_PARALLEL_SHAPE}).astype(np.float32)\n"
        "ref = numbabn.batch_norm(x, training=True)\n"
        "assert numba.threading_layer() == 'workqueue'\n"
        "with ThreadPoolExecutor(4) as p:\n"
        "    same = lambda i: np.array_equal(numbabn.batch_norm(x, training=True), ref)\n"
        "    ok = list(p.map(same, range(24)))\n"
        "assert all(ok)\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


class _DLPackArray:
    """A CPU array of another library, known only by the DLPack protocol."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


@pytest.mark.skipif(ON_DEVICE, reason="CPU arrays of other libraries")
def test_dlpack_cpu_arrays_are_viewed_without_copies():
    """Arrays known only by DLPack run on NumPy views of their memory: running
    statistics are updated in it; the result comes back as NumPy (no from_dlpack in the
    exporter's module)."""
    x0 = random_batch((4, C, 5), np.float32, seed=10)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y = numbabn.batch_norm(_DLPackArray(x0), _DLPackArray(rm), _DLPackArray(rv), training=True)
    y_ref, rm_ref, rv_ref = ref.batch_norm(x0, np.zeros(C), np.ones(C), training=True)
    assert_close(y, y_ref, np.float32)
    assert_close(rm, rm_ref, np.float32)
    assert_close(rv, rv_ref, np.float32)


def test_layer_copies_and_pickles_with_a_lock_of_its_own():
    import copy
    import pickle

    if ON_DEVICE:
        pytest.skip("host arrays")
    bn = numbabn.BatchNorm(C, momentum=None)
    bn(random_batch((4, C, 5), np.float32))
    for other in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert other._lock is not bn._lock and other.num_batches_tracked == 1
        np.testing.assert_array_equal(other.running_mean, bn.running_mean)
        other(random_batch((4, C, 5), np.float32, seed=1))
        assert other.num_batches_tracked == 2 and bn.num_batches_tracked == 1
