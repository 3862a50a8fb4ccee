"""CPU timings of every operation, against a plain NumPy implementation."""

from __future__ import annotations

import numpy as np

import numbabn
from numbabn import reference

from . import DTYPES, LAYOUTS, SHAPES, batch


class Ops:
    params = [["numbabn", "numpy"], LAYOUTS, list(SHAPES), DTYPES]
    param_names = ["impl", "layout", "shape", "dtype"]
    timeout = 300

    def setup(self, impl, layout, shape, dtype):
        if impl == "numpy" and shape == "llc" and dtype != "float32":
            raise NotImplementedError("NumPy baseline at the largest size: float32 only")
        self.x, self.axis = batch(shape, layout, dtype)
        self.dy, _ = batch(shape, layout, dtype, seed=1)
        c = self.x.shape[self.axis]
        self.rm, self.rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        self.w, self.b = np.ones(c, np.float32), np.zeros(c, np.float32)
        self.lib = numbabn if impl == "numbabn" else _NumpyOps
        _, self.mean, self.invstd = numbabn.batch_norm_forward(self.x, axis=self.axis)
        self.lib.batch_norm(self.x, self.rm, self.rv, self.w, self.b, True, axis=self.axis)

    def time_batch_stats(self, *_):
        self.lib.batch_stats(self.x, axis=self.axis)

    def time_train_forward(self, *_):
        self.lib.batch_norm(self.x, self.rm, self.rv, self.w, self.b, True, axis=self.axis)

    def time_eval_forward(self, *_):
        self.lib.batch_norm(self.x, self.rm, self.rv, self.w, self.b, False, axis=self.axis)

    def time_backward(self, *_):
        self.lib.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w, axis=self.axis)


class ShortPlanes:
    """NCHW batches of short planes, out of cache, whose statistics and gradient sums take
    the unfused reductions (each run of samples read in memory order), float32; the
    elementwise passes over 7x7 planes run as flat rows with per-channel constants.
    28x28 and 32x32 planes (3-4 KB rows) are fused only in cache (``_cpu.plan.fuse``)."""

    params = [["32x32", "28x28", "14x14", "7x7", "7x7 x512"]]
    param_names = ["planes"]
    timeout = 300
    # 25.7 MB each (32x32: 26.2 MB)
    shapes = {
        "32x32": (50, 128, 32, 32),
        "28x28": (64, 128, 28, 28),
        "14x14": (128, 256, 14, 14),
        "7x7": (64, 2048, 7, 7),
        "7x7 x512": (256, 512, 7, 7),
    }

    def setup(self, planes):
        rng = np.random.default_rng(0)
        shape = self.shapes[planes]
        self.x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
        self.dy = rng.standard_normal(shape, dtype=np.float32)
        _, self.mean, self.invstd = numbabn.batch_norm_forward(self.x)
        self.running = (self.mean.copy(), (1 / self.invstd**2).astype(np.float32))
        numbabn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd)
        numbabn.batch_norm(self.x, *self.running)

    def time_batch_stats(self, _):
        numbabn.batch_stats(self.x)

    def time_eval_forward(self, _):
        numbabn.batch_norm(self.x, *self.running)

    def time_train_forward(self, _):
        numbabn.batch_norm(self.x, training=True)

    def time_backward(self, _):
        numbabn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd)


class _NumpyOps:
    """The reference in the input dtype: what a NumPy user would write."""

    @staticmethod
    def batch_stats(x, axis):
        return reference.batch_stats(x, axis, dtype=None)

    @staticmethod
    def batch_norm(x, rm, rv, w, b, training, axis):
        return reference.batch_norm(x, rm, rv, w, b, training, axis=axis, dtype=None)

    @staticmethod
    def batch_norm_backward(dy, x, mean, invstd, w, axis):
        return reference.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, dtype=None)


class Bandwidth:
    """Achieved memory bandwidth (GB/s) of the main cases, counted in passes moved."""

    params = [LAYOUTS, ["resnet", "llc"]]
    param_names = ["layout", "shape"]
    unit = "GB/s"
    timeout = 300

    def setup(self, layout, shape):
        self.x, self.axis = batch(shape, layout, "float32")
        self.dy, _ = batch(shape, layout, "float32", seed=1)
        self.out = np.empty_like(self.x)
        _, self.mean, self.invstd = numbabn.batch_norm_forward(self.x, axis=self.axis)

    def _rate(self, fn, passes, repeats=10):
        import time

        fn()
        best = min(_timed(fn, time) for _ in range(repeats))
        return passes * self.x.nbytes / best / 1e9

    def track_train_forward_gbps(self, *_):
        return self._rate(lambda: numbabn.batch_norm(self.x, training=True, axis=self.axis, out=self.out), 3)

    def track_eval_forward_gbps(self, *_):
        m, v = self.mean, 1 / self.invstd**2
        return self._rate(lambda: numbabn.batch_norm(self.x, m, v, axis=self.axis, out=self.out), 2)

    def track_backward_gbps(self, *_):
        return self._rate(
            lambda: numbabn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, axis=self.axis), 5
        )


def _timed(fn, time):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Memory:
    """Peak memory of a call: its outputs only (and nothing with out=)."""

    params = [["fresh", "out"]]
    param_names = ["output"]

    def setup(self, output):
        self.x, self.axis = batch("resnet", "nchw", "float32")
        self.out = np.empty_like(self.x) if output == "out" else None
        numbabn.batch_norm(self.x, training=True, out=self.out)

    def peakmem_train_forward(self, output):
        numbabn.batch_norm(self.x, training=True, out=self.out)


class Epilogue:
    """The fused epilogue relu(bn(x) + z) and its backward, float32, against plain batch
    norm (one more read: of z) and against NumPy's composition of the three steps."""

    params = [["fused", "plain", "numpy"], LAYOUTS]
    param_names = ["impl", "layout"]
    timeout = 300

    def setup(self, impl, layout):
        self.x, self.axis = batch("resnet", layout, "float32")
        self.z, _ = batch("resnet", layout, "float32", seed=2)
        self.dy, _ = batch("resnet", layout, "float32", seed=1)
        self.y, self.mean, self.invstd = numbabn.batch_norm_forward(
            self.x, axis=self.axis, residual=self.z, activation="relu"
        )
        self.time_train_forward(impl, layout)
        self.time_backward(impl, layout)

    def time_train_forward(self, impl, layout):
        if impl == "fused":
            numbabn.batch_norm(self.x, training=True, axis=self.axis, residual=self.z, activation="relu")
        elif impl == "plain":
            numbabn.batch_norm(self.x, training=True, axis=self.axis)
        else:
            y = reference.batch_norm(self.x, training=True, axis=self.axis, dtype=None)[0]
            np.maximum(y + self.z, 0, out=y)

    def time_backward(self, impl, layout):
        if impl == "fused":
            numbabn.batch_norm_backward(
                self.dy, self.x, self.mean, self.invstd, axis=self.axis, activation="relu",
                y=self.y, residual_grad=True,
            )
        elif impl == "plain":
            numbabn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, axis=self.axis)
        else:
            g = np.where(self.y > 0, self.dy, 0)
            reference.batch_norm_backward(g, self.x, self.mean, self.invstd, axis=self.axis, dtype=None)

    def peakmem_train_forward(self, impl, layout):
        self.time_train_forward(impl, layout)
