"""Every error of the contract: the right exception, raised before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

import numbabn

from helpers import ON_DEVICE, random_batch, to_host, to_side

C = 3


def _fresh():
    x = random_batch((4, C, 5), np.float32, seed=1)
    return {
        "x": x,
        "running_mean": np.linspace(-1, 1, C).astype(np.float32),
        "running_var": np.linspace(1, 2, C).astype(np.float32),
        "weight": np.linspace(0.5, 1.5, C).astype(np.float32),
        "bias": np.linspace(-0.5, 0.5, C).astype(np.float32),
        "out": np.full_like(x, 9.0),
    }


def _call_batch_norm(arrays, **kw):
    """Call batch_norm with ``arrays`` on the side under test; check nothing was written."""
    args = {k: to_side(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
    before = {k: to_host(v).copy() for k, v in args.items() if hasattr(v, "shape") and np.ndim(v)}
    params = {"training": True, "momentum": 0.1, "eps": 1e-5, "axis": 1, **kw}
    try:
        return numbabn.batch_norm(
            args["x"], args["running_mean"], args["running_var"], args["weight"], args["bias"],
            params["training"], params["momentum"], params["eps"],
            axis=params["axis"], out=args["out"],
        )
    finally:
        for k, v in before.items():
            np.testing.assert_array_equal(to_host(args[k]), v, err_msg=f"{k} was modified")


BAD_BATCH_NORM = [
    ("x", np.arange(12, dtype=np.int32).reshape(4, 3), TypeError),
    ("x", np.ones((4, 3), np.complex64), TypeError),
    ("x", np.ones((4, 3), bool), TypeError),
    ("x", np.ones((4, 3), object), TypeError),
    ("x", np.ones((4, 3), ">f4"), TypeError),
    ("x", [[1.0, 2.0, 3.0]] * 4, TypeError),
    ("x", np.ones(3, np.float32), ValueError),
    ("x", np.float32(1.0), TypeError),
    ("running_mean", np.zeros(4, np.float32), ValueError),
    ("running_var", np.ones((C, 1), np.float32), ValueError),
    ("weight", np.ones(C + 1, np.float32), ValueError),
    ("bias", np.zeros(C, np.int64), TypeError),
    ("out", np.zeros((4, C, 6), np.float32), ValueError),
    ("out", np.zeros((4, C, 5), np.float64), TypeError),
    ("running_mean", None, ValueError),
    ("running_var", None, ValueError),
]


def _case_id(v):
    return getattr(v, "__name__", None) or str(getattr(v, "dtype", v))[:12]


@pytest.mark.parametrize("name,value,exc", BAD_BATCH_NORM, ids=_case_id)
def test_bad_arrays(name, value, exc):
    arrays = _fresh()
    arrays[name] = value
    if name == "x" and not (isinstance(value, np.ndarray) and value.ndim == 3):
        arrays["out"] = None
    if ON_DEVICE and name == "x" and not isinstance(value, np.ndarray):
        pytest.skip("not an array; to_device does not apply")
    with pytest.raises(exc):
        _call_batch_norm(arrays)


@pytest.mark.parametrize(
    "kw,exc",
    [
        ({"axis": 3}, ValueError),
        ({"axis": -4}, ValueError),
        ({"axis": 1.0}, TypeError),
        ({"eps": -1e-5}, ValueError),
        ({"eps": 0.0}, ValueError),
        ({"eps": float("nan")}, ValueError),
        ({"momentum": -0.1}, ValueError),
        ({"momentum": 1.5}, ValueError),
        ({"momentum": None}, TypeError),
        ({"momentum": float("nan")}, ValueError),
    ],
)
def test_bad_scalars(kw, exc):
    with pytest.raises(exc):
        _call_batch_norm(_fresh(), **kw)


def test_eps_zero_allowed_in_eval_only():
    arrays = _fresh()
    arrays["out"] = None
    y = _call_batch_norm(arrays, training=False, eps=0.0)
    assert np.isfinite(to_host(y)).all()


@pytest.mark.parametrize("n,shape", [(1, (1, C)), (1, (1, C, 1, 1)), (0, (0, C, 4)), (0, (2, C, 0))])
def test_training_needs_two_values_per_channel(n, shape):
    arrays = _fresh()
    arrays["x"] = np.ones(shape, np.float32)
    arrays["out"] = None
    with pytest.raises(ValueError, match="at least 2"):
        _call_batch_norm(arrays)
    with pytest.raises(ValueError):
        numbabn.batch_norm_forward(to_side(arrays["x"]))


def test_eval_needs_running_stats():
    x = to_side(random_batch((4, C, 5), np.float32))
    with pytest.raises(ValueError, match="running_mean"):
        numbabn.batch_norm(x, training=False)


def test_mixed_host_and_device_arrays():
    pytest.importorskip("numba.cuda")
    from numba import cuda

    if not ON_DEVICE:
        pytest.skip("needs device arrays (runs under the CUDA simulator)")
    arrays = _fresh()
    x = cuda.to_device(arrays["x"])
    rm, rv = arrays["running_mean"].copy(), arrays["running_var"].copy()
    with pytest.raises(TypeError, match="same side"):
        numbabn.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, arrays["running_mean"])
    with pytest.raises(TypeError, match="same side"):
        numbabn.batch_norm(arrays["x"], cuda.to_device(rm), cuda.to_device(rv), training=True)


def test_read_only_running_stats_rejected_in_training():
    if ON_DEVICE:
        pytest.skip("device arrays have no read-only flag")
    arrays = _fresh()
    rm = arrays["running_mean"].copy()
    rm.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        numbabn.batch_norm(arrays["x"], rm, arrays["running_var"].copy(), training=True)


def test_batch_stats_errors():
    with pytest.raises(TypeError):
        numbabn.batch_stats(to_side(np.ones((3, 4), np.int16)))
    with pytest.raises(ValueError):
        numbabn.batch_stats(to_side(np.ones(4, np.float32)))
    with pytest.raises(ValueError):
        numbabn.batch_stats(to_side(np.ones((3, 4), np.float32)), axis=2)
    with pytest.raises(ValueError):
        numbabn.batch_stats(to_side(np.ones((0, 4), np.float32)))


def test_forward_errors():
    x = to_side(random_batch((4, C, 5), np.float32))
    with pytest.raises(ValueError):
        numbabn.batch_norm_forward(x, eps=0.0)
    with pytest.raises(ValueError):
        numbabn.batch_norm_forward(x, to_side(np.ones(C + 1, np.float32)))
    with pytest.raises(TypeError):
        numbabn.batch_norm_forward(x, to_side(np.ones(C, np.int32)))


def test_backward_errors():
    x = random_batch((4, C, 5), np.float32)
    dy = random_batch((4, C, 5), np.float32, seed=2)
    m = np.zeros(C, np.float32)
    s = np.ones(C, np.float32)
    X, DY, M, S = (to_side(a) for a in (x, dy, m, s))
    with pytest.raises(ValueError):
        numbabn.batch_norm_backward(to_side(dy[:, :, :4].copy()), X, M, S)
    with pytest.raises(TypeError):
        numbabn.batch_norm_backward(to_side(dy.astype(np.float64)), X, M, S)
    with pytest.raises(ValueError):
        numbabn.batch_norm_backward(DY, X, to_side(np.zeros(C + 1, np.float32)), S)
    with pytest.raises(ValueError):
        numbabn.batch_norm_backward(DY, X, M, S, to_side(np.ones(2, np.float32)))
    with pytest.raises(ValueError):
        numbabn.batch_norm_backward(DY, X, M, S, axis=5)
    with pytest.raises(ValueError):
        numbabn.batch_norm_backward(DY, X, None, S)
    with pytest.raises(TypeError):
        numbabn.batch_norm_backward(DY, to_side(x.astype(np.int32)), M, S)
    one = to_side(np.ones((1, C), np.float32))
    with pytest.raises(ValueError):
        numbabn.batch_norm_backward(one, one, M, S, training=True)
    np.testing.assert_array_equal(to_host(X), x)
    np.testing.assert_array_equal(to_host(DY), dy)


def test_module_rejects_bad_construction():
    with pytest.raises(ValueError):
        numbabn.BatchNorm(0)
    with pytest.raises(TypeError):
        numbabn.BatchNorm(3.0)
    with pytest.raises(ValueError):
        numbabn.BatchNorm(3, momentum=2.0)
    with pytest.raises(ValueError):
        numbabn.BatchNorm(3, eps=-1.0)
    with pytest.raises(TypeError):
        numbabn.BatchNorm(3, dtype=np.int32)


def test_module_bad_input_changes_nothing():
    bn = numbabn.BatchNorm(C)
    with pytest.raises(ValueError):
        bn(to_side(np.ones((4, C + 1, 2), np.float32)))
    with pytest.raises(ValueError):
        bn(to_side(np.ones((1, C), np.float32)))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(to_host(bn.running_mean), np.zeros(C))
    np.testing.assert_array_equal(to_host(bn.running_var), np.ones(C))
    with pytest.raises(RuntimeError):
        numbabn.BatchNorm(C).backward(to_side(np.ones((4, C), np.float32)))
