"""``numbabn.fold``: a convolution, linear or transposed convolution layer followed by an
eval-mode batch norm equals the layer with the folded weight and bias (float64, 1e-10),
with and without a layer bias, on host arrays and (simulator run) device arrays; the
dtype is the layer weight's; inputs are never modified; bad input raises first."""

from __future__ import annotations

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref
from numbabn._dtypes import bf16

from helpers import ON_DEVICE, to_host, to_side

RNG = np.random.default_rng(11)


def _conv2d(x, w, b):
    """Valid 2-D cross-correlation, NCHW, weight (out, in, kh, kw)."""
    patches = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    z = np.einsum("nchwij,ocij->nohw", patches, w)
    return z if b is None else z + b[:, None, None]


def _linear(x, w, b):
    z = x @ w.T
    return z if b is None else z + b


def _conv_transpose1d(x, w, b):
    """Transposed 1-D convolution, weight (in, out, k): output length L + k - 1."""
    n, _, length = x.shape
    k = w.shape[2]
    z = np.zeros((n, w.shape[1], length + k - 1))
    for j in range(k):
        z[:, :, j : j + length] += np.einsum("ncl,co->nol", x, w[:, :, j])
    return z if b is None else z + b[:, None]


LAYERS = {
    "conv2d": (_conv2d, (6, 3, 3, 3), (2, 3, 7, 8), 0),
    "linear": (_linear, (5, 9), (4, 9), 0),
    "conv_transpose1d": (_conv_transpose1d, (3, 4, 5), (2, 3, 6), 1),
}


def _bn_params(c, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(0.5, 2.0, c), rng.uniform(0.2, 3.0, c), rng.uniform(0.5, 1.5, c),
        rng.normal(0.0, 1.0, c),
    )


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("name", list(LAYERS))
def test_fold_equals_layer_then_eval_batch_norm(name, with_bias):
    layer, wshape, xshape, axis = LAYERS[name]
    w = RNG.standard_normal(wshape)
    c = wshape[axis]
    b = RNG.standard_normal(c) if with_bias else None
    rm, rv, gamma, beta = _bn_params(c, 5)
    x = RNG.standard_normal(xshape)
    expected = ref.batch_norm(layer(x, w, b), rm, rv, gamma, beta, False, 0.1, 1e-3, 1)[0]
    args = [to_side(a) for a in (w, b, rm, rv, gamma, beta)]
    copies = [None if a is None else a.copy() for a in (w, b, rm, rv, gamma, beta)]
    wf, bf = numbabn.fold(*args, eps=1e-3, axis=axis)
    wf, bf = to_host(wf), to_host(bf)
    assert wf.dtype == np.float64 and wf.shape == w.shape and bf.shape == (c,)
    np.testing.assert_allclose(layer(x, wf, bf), expected, rtol=1e-10, atol=1e-10)
    for a, kept in zip(args, copies):  # inputs unchanged
        if a is not None:
            np.testing.assert_array_equal(to_host(a), kept)


@pytest.mark.parametrize("dtype", [np.float16, np.float32] + [d for d in [bf16(load=True)] if d])
def test_fold_returns_the_layer_dtype_from_float64_arithmetic(dtype):
    w = RNG.standard_normal((4, 2, 3)).astype(dtype)
    rm, rv, gamma, beta = (a.astype(np.float32) for a in _bn_params(4, 6))
    wf, bf = numbabn.fold(to_side(w), None, *map(to_side, (rm, rv, gamma, beta)))
    wf, bf = to_host(wf), to_host(bf)
    scale = gamma.astype(np.float64) / np.sqrt(rv.astype(np.float64) + 1e-5)
    assert wf.dtype == dtype and bf.dtype == dtype
    np.testing.assert_array_equal(wf, (w.astype(np.float64) * scale[:, None, None]).astype(dtype))
    np.testing.assert_array_equal(bf, ((-rm.astype(np.float64)) * scale + beta).astype(dtype))


def test_fold_defaults_and_strided_weights():
    """weight and bias omitted count as 1 and 0; a weight that is a strided view."""
    base = RNG.standard_normal((3, 6, 4))
    w = base[:, ::2, :]  # not contiguous (on the device too: a view of a device array)
    rm, rv = np.array([1.0, -2.0, 0.5]), np.array([4.0, 1.0, 0.25])
    wf, bf = numbabn.fold(to_side(base)[:, ::2, :], None, to_side(rm), to_side(rv), eps=0.0)
    wf, bf = to_host(wf), to_host(bf)
    np.testing.assert_allclose(wf, w / np.sqrt(rv)[:, None, None], rtol=1e-15)
    np.testing.assert_allclose(bf, -rm / np.sqrt(rv), rtol=1e-15)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"running_mean": np.zeros(3)}, ValueError),  # 3 values for 4 channels
        ({"layer_bias": np.zeros(5)}, ValueError),
        ({"axis": 3}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"layer_weight": np.zeros((4, 2), np.int32)}, TypeError),
        ({"running_mean": None}, ValueError),
    ],
)
def test_fold_errors(change, error):
    args = {
        "layer_weight": RNG.standard_normal((4, 2)), "layer_bias": None,
        "running_mean": np.zeros(4), "running_var": np.ones(4), "eps": 1e-5, "axis": 0,
    }
    args.update(change)
    args = {k: to_side(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    with pytest.raises(error):
        numbabn.fold(**args)


@pytest.mark.skipif(not ON_DEVICE, reason="needs device arrays (runs under the CUDA simulator)")
def test_fold_refuses_mixed_sides():
    w = RNG.standard_normal((4, 2))
    with pytest.raises(TypeError, match="same side"):
        numbabn.fold(to_side(w), None, np.zeros(4), np.ones(4))


@pytest.mark.skipif(ON_DEVICE, reason="torch CPU tensors")
def test_fold_takes_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    w = torch.randn(4, 3, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.full((4,), 4.0, dtype=torch.float64)
    wf, bf = numbabn.fold(w, None, rm, rv, eps=0.0)
    assert isinstance(wf, torch.Tensor) and isinstance(bf, torch.Tensor)
    torch.testing.assert_close(wf, w / 2)
