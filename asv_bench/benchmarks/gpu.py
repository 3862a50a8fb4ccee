"""GPU timings (skipped where no CUDA device is present)."""

from __future__ import annotations

import numpy as np

import numbabn

from . import DTYPES, LAYOUTS, SHAPES, batch, requires_cuda


class GpuOps:
    params = [LAYOUTS, list(SHAPES), DTYPES]
    param_names = ["layout", "shape", "dtype"]

    def setup(self, layout, shape, dtype):
        cuda = requires_cuda()
        self.cuda = cuda
        x, self.axis = batch(shape, layout, dtype)
        dy, _ = batch(shape, layout, dtype, seed=1)
        c = x.shape[self.axis]
        self.x, self.dy = cuda.to_device(x), cuda.to_device(dy)
        self.rm = cuda.to_device(np.zeros(c, np.float32))
        self.rv = cuda.to_device(np.ones(c, np.float32))
        _, self.mean, self.invstd = numbabn.batch_norm_forward(self.x, axis=self.axis)
        self.time_train_forward()
        self.time_backward()
        cuda.synchronize()

    def time_batch_stats(self, *_):
        numbabn.batch_stats(self.x, axis=self.axis)
        self.cuda.synchronize()

    def time_train_forward(self, *_):
        numbabn.batch_norm(self.x, self.rm, self.rv, training=True, axis=self.axis)
        self.cuda.synchronize()

    def time_eval_forward(self, *_):
        numbabn.batch_norm(self.x, self.rm, self.rv, axis=self.axis)
        self.cuda.synchronize()

    def time_backward(self, *_):
        numbabn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, axis=self.axis)
        self.cuda.synchronize()
