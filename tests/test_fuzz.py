"""Fuzzing the public functions: random shapes (zero-size axes included), strides,
dtypes, operations and ``out`` arguments that alias x or the running statistics. Every
call either matches the float64 reference or raises the contract's exception with
nothing written."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbabn
import numbabn.reference as ref

from helpers import ON_DEVICE, RTOL, to_host, to_side

OPS = ["train", "eval", "forward", "stats", "backward", "backward_eval"]
OUTS = ["none", "fresh", "x", "overlap", "over_stats"]


@st.composite
def calls(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    return {
        "shape": shape,
        "axis": axis,
        "dtype": np.dtype(draw(st.sampled_from([np.float16, np.float32, np.float64]))),
        "op": draw(st.sampled_from(OPS)),
        "view": draw(st.sampled_from(["plain", "transposed", "stepped"])),
        "out": draw(st.sampled_from(OUTS)),
        "shift": draw(st.integers(1, 7)),
        "affine": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.0])),
        "momentum": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "seed": draw(st.integers(0, 2**16)),
        "loc": draw(st.sampled_from([0.0, 5.0])),
    }


def _x_view(case, data):
    """x with the drawn memory layout (data's values), on the side under test."""
    shape, view = case["shape"], case["view"]
    if view == "transposed" and len(shape) > 2:  # channels-last-like memory order
        perm = list(range(1, len(shape))) + [0]
        base = to_side(np.transpose(data, perm).copy())  # a copy even when already C order
        return base.transpose(tuple(np.argsort(perm)))
    if view == "stepped" and shape[0] > 0:
        wide = np.zeros((2 * shape[0],) + shape[1:], data.dtype)
        wide[::2] = data
        return to_side(wide)[::2]
    return to_side(data.copy())


def _expected_error(case, c, count):
    op, out = case["op"], case["out"]
    needs_two = op in ("train", "forward", "backward")
    if c and ((needs_two and count < 2) or (op == "stats" and count < 1)):
        return ValueError
    if case["eps"] == 0.0 and op in ("train", "forward"):
        return ValueError
    if op in ("train", "eval") and out == "over_stats" and c and count:
        return ValueError
    return None


def _quiet(f, *args):
    """A reference function, whose NumPy means of empty channels warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return f(*args)


def _check(actual, expected, dtype, factor):
    a = np.asarray(to_host(actual), np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape
    tol = RTOL[np.dtype(dtype)] * factor * (1 + np.abs(e))
    assert np.all(np.abs(a - e) <= tol) or np.array_equal(np.isnan(a), np.isnan(e)) and np.all(
        np.abs(a - e)[~np.isnan(e)] <= tol[~np.isnan(e)]
    ), f"worst error {np.nanmax(np.abs(a - e)) if a.size else 0}"


# CI draws the same examples on every run (a failure there is then reproducible and not
# a matter of luck); elsewhere each run draws new ones.
@settings(max_examples=120 if ON_DEVICE else 2000, deadline=None,
          derandomize=os.environ.get("CI") == "true",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(calls())
def test_fuzz(case):
    shape, axis, dtype, op = case["shape"], case["axis"], case["dtype"], case["op"]
    c = shape[axis]
    count = math.prod(shape) // c if c else 0
    rng = np.random.default_rng(case["seed"])
    data = (rng.standard_normal(shape) + case["loc"]).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype) if case["affine"] else None
    b = rng.uniform(-0.5, 0.5, c).astype(dtype) if case["affine"] else None
    rm0, rv0 = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    x = _x_view(case, data)
    rm, rv = to_side(rm0.copy()), to_side(rv0.copy())
    out = None
    if op in ("train", "eval"):
        total = math.prod(shape)
        if case["out"] == "fresh":
            out = to_side(np.full(shape, 7, dtype))
        elif case["out"] == "x":
            out = x
        elif case["out"] == "overlap" and case["view"] == "plain":
            buf = to_side(np.zeros(total + case["shift"], dtype))
            buf[:total] = to_side(data.ravel())
            x, out = buf[:total].reshape(shape), buf[case["shift"]:total + case["shift"]].reshape(shape)
        elif case["out"] == "over_stats" and total and c:
            buf = to_side(np.full(total + c, 7, dtype))
            out, rm = buf[:total].reshape(shape), buf[total - 1: total - 1 + c]
            rm[:] = to_side(rm0)
    watched = {"x": x, "running_mean": rm, "running_var": rv, "out": out}
    before = {k: to_host(v).copy() for k, v in watched.items() if v is not None}
    expected_error = _expected_error(case, c, count)
    if case["eps"] == 0.0 and op == "backward_eval":
        case = {**case, "eps": 1e-5}
    stat_dtype = np.float32 if dtype == np.float16 else dtype
    try:
        if op in ("train", "eval"):
            training = op == "train"
            y = numbabn.batch_norm(x, rm, rv, to_side(w), to_side(b), training, case["momentum"],
                                   case["eps"], axis=axis, out=out)
            y_ref, rm_ref, rv_ref = _quiet(ref.batch_norm, data, rm0, rv0, w, b, training, case["momentum"],
                                                   case["eps"], axis)
            results = [(y, y_ref, dtype)]
            if training and count >= 2:
                results += [(rm, rm_ref, dtype), (rv, rv_ref, dtype)]
            if out is not None:
                assert y is out
        elif op == "forward":
            got = numbabn.batch_norm_forward(x, to_side(w), to_side(b), case["eps"], axis=axis)
            want = _quiet(ref.batch_norm_forward, data, w, b, case["eps"], axis)
            results = list(zip(got, want, (dtype, stat_dtype, stat_dtype)))
        elif op == "stats":
            got = numbabn.batch_stats(x, axis=axis)
            results = list(zip(got, _quiet(ref.batch_stats, data, axis), (stat_dtype, stat_dtype)))
        else:
            training = op == "backward"
            dy = rng.standard_normal(shape).astype(dtype)
            invstd = (1 / np.sqrt(rv0.astype(np.float64) + 1e-5)).astype(stat_dtype)
            mean = rm0.astype(stat_dtype)
            if training and count >= 2 and c:
                _, mean, invstd = ref.batch_norm_forward(data, eps=1e-5, axis=axis)
                mean, invstd = mean.astype(stat_dtype), invstd.astype(stat_dtype)
            got = numbabn.batch_norm_backward(to_side(dy), x, to_side(mean), to_side(invstd), to_side(w),
                                              axis=axis, training=training)
            want = _quiet(ref.batch_norm_backward, dy, data, mean, invstd, w, axis, training)
            results = list(zip(got, want, (dtype, stat_dtype, stat_dtype)))
    except (ValueError, TypeError) as exc:
        assert expected_error is not None and isinstance(exc, expected_error), repr(exc)
        for k, v in before.items():
            np.testing.assert_array_equal(to_host(watched[k]), v, err_msg=f"{k} written")
        return
    assert expected_error is None, f"expected {expected_error.__name__}"
    if out is None or case["out"] not in ("x", "overlap"):
        np.testing.assert_array_equal(to_host(x), before["x"], err_msg="x written")
    # Values far from zero lose digits when rounded into their own dtype.
    factor = 8 * (1 + case["loc"]) * (1 + (case["affine"] or 0)) * (4 if dtype == np.float16 else 1)
    factor *= 1 + math.sqrt(count)  # the sums of the backward grow with the count
    for actual, expected, dt in results:
        _check(actual, expected, dt, factor)
