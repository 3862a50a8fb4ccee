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
        z, _ = batch(shape, layout, dtype, seed=2)
        c = x.shape[self.axis]
        self.x, self.dy, self.z = cuda.to_device(x), cuda.to_device(dy), cuda.to_device(z)
        self.rm = cuda.to_device(np.zeros(c, np.float32))
        self.rv = cuda.to_device(np.ones(c, np.float32))
        _, self.mean, self.invstd = numbabn.batch_norm_forward(self.x, axis=self.axis)
        self.y, _, _ = numbabn.batch_norm_forward(
            self.x, axis=self.axis, residual=self.z, activation="relu"
        )
        self.time_train_forward()
        self.time_backward()
        self.time_fused_forward()
        self.time_fused_backward()
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

    def time_fused_forward(self, *_):
        """relu(bn(x) + z) in training: the statistics, then one elementwise kernel."""
        numbabn.batch_norm(self.x, self.rm, self.rv, training=True, axis=self.axis,
                           residual=self.z, activation="relu")
        self.cuda.synchronize()

    def time_fused_backward(self, *_):
        """Its backward with dresidual: the reduction reads dy, y and x and stores
        dresidual, the dx kernel reads dresidual and x."""
        numbabn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, axis=self.axis,
                                    activation="relu", y=self.y, residual_grad=True)
        self.cuda.synchronize()
