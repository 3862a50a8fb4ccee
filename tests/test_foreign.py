"""CUDA arrays of other libraries: anything with ``__cuda_array_interface__``.

Under the CUDA simulator a stand-in for CuPy is enough to follow such an array
through numbabn: validation reads the interface, the kernels run on the memory it
points to (no copy), and results come back as the caller's kind of array. On a real
GPU, ``scripts/gpu_check.py`` does the same with PyTorch tensors.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref

from helpers import ON_DEVICE, assert_close, channel_vector, random_batch

pytestmark = pytest.mark.skipif(not ON_DEVICE, reason="needs the CUDA simulator")


class Foreign:
    """A CUDA array known to numbabn only through ``__cuda_array_interface__``; its
    (simulated) device memory is the host array it holds."""

    __module__ = "cupy"

    def __init__(self, memory: np.ndarray, readonly: bool = False):
        self.memory = memory
        self.readonly = readonly

    @property
    def __cuda_array_interface__(self):
        m = self.memory
        return {
            "shape": m.shape,
            "typestr": m.dtype.str,
            "data": (m.__array_interface__["data"][0], self.readonly),
            "strides": m.strides,
            "version": 3,
        }


@pytest.fixture
def fake_cupy(monkeypatch):
    """The ``cupy.asarray`` numbabn calls to return results as CuPy arrays."""
    module = types.ModuleType("cupy")
    module.asarray = lambda a: Foreign(a._ary)  # a simulator device array: no copy
    monkeypatch.setitem(sys.modules, "cupy", module)
    return module


def _vectors(c):
    return (
        channel_vector(c, np.float32, 1, -1, 1),
        channel_vector(c, np.float32, 2),
        channel_vector(c, np.float32, 3),
        channel_vector(c, np.float32, 4, -1, 1),
    )


@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((7, 5, 4), -1)])
def test_train_forward_and_backward_on_foreign_arrays(shape, axis, fake_cupy):
    c = shape[axis]
    x = random_batch(shape, np.float32, per_channel_axis=axis)
    dy = random_batch(shape, np.float32, seed=9)
    rm0, rv0, w, b = _vectors(c)
    rm, rv = Foreign(rm0.copy()), Foreign(rv0.copy())
    y = numbabn.batch_norm(Foreign(x.copy()), rm, rv, Foreign(w), Foreign(b), True, 0.2, axis=axis)
    assert isinstance(y, Foreign)
    yref, rmref, rvref = ref.batch_norm(x, rm0, rv0, w, b, True, 0.2, axis=axis)
    assert_close(y.memory, yref, np.float32, factor=2)
    assert_close(rm.memory, rmref, np.float32, scale=4, factor=2)  # updated in place
    assert_close(rv.memory, rvref, np.float32, factor=2)

    _, mean, invstd = numbabn.batch_norm_forward(Foreign(x), Foreign(w), axis=axis)
    dx, dw, db = numbabn.batch_norm_backward(Foreign(dy), Foreign(x), mean, invstd, Foreign(w), axis=axis)
    assert all(isinstance(a, Foreign) for a in (mean, invstd, dx, dw, db))
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean.memory, invstd.memory, w, axis=axis)
    assert_close(dx.memory, dxr, np.float32, factor=8)
    assert_close(dw.memory, dwr, np.float32, scale=4, factor=8)
    assert_close(db.memory, dbr, np.float32, scale=4, factor=8)


def test_strided_foreign_input_and_out(fake_cupy):
    x = random_batch((4, 3, 5, 6), np.float32, per_channel_axis=1)
    padded = np.zeros((4, 3, 5, 7), np.float32)
    padded[..., :-1] = x
    out_memory = np.full((4, 3, 5, 7), -7.0, np.float32)
    out = Foreign(out_memory[..., :-1])
    y = numbabn.batch_norm(Foreign(padded[..., :-1]), training=True, out=out)
    assert y is out
    yref, _, _ = ref.batch_norm(x, training=True)
    assert_close(out_memory[..., :-1], yref, np.float32, factor=2)
    assert (out_memory[..., -1] == -7.0).all()  # the gaps are not written


def test_foreign_arrays_are_not_modified(fake_cupy):
    x = random_batch((5, 3, 4), np.float32, per_channel_axis=1)
    xf = Foreign(x.copy())
    numbabn.batch_norm(xf, training=True)
    np.testing.assert_array_equal(xf.memory, x)


def test_mixing_foreign_and_host_arrays_is_a_type_error(fake_cupy):
    x = Foreign(random_batch((5, 3, 4), np.float32))
    with pytest.raises(TypeError, match="same side"):
        numbabn.batch_norm(x, weight=np.ones(3, np.float32), training=True)


def test_read_only_foreign_running_stats_are_refused(fake_cupy):
    x = Foreign(random_batch((5, 3, 4), np.float32))
    rm = Foreign(np.zeros(3, np.float32), readonly=True)
    rv = Foreign(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="read-only"):
        numbabn.batch_norm(x, rm, rv, training=True)
    assert (rv.memory == 1).all()
