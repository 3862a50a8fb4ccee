"""``BatchNorm``: a stateful layer in the manner of ``torch.nn.BatchNorm2d``."""

from __future__ import annotations

import numbers
import threading
from typing import Any

import numpy as np

from . import _dtypes, _epilogue, _validate
from ._dispatch import backend

Array = Any


class BatchNorm:
    """Batch normalization layer with running statistics and a backward pass.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
        Added to the variance.
    momentum : float in [0, 1] or None
        Weight of each new batch in the running statistics (PyTorch convention:
        ``r = (1 - momentum) * r + momentum * batch``; Keras' ``momentum=0.99`` is
        ``0.01`` here). None gives the cumulative average over all batches.
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool
        Keep ``running_mean`` (zeros) and ``running_var`` (ones). Without them batch
        statistics are used in both modes.
    axis : int
        The channel axis of the inputs.
    dtype : float dtype
        dtype of the parameters and running statistics.
    activation : None or "relu"
        The fused epilogue: ``bn(x, residual)`` gives ``relu(bn(x) + residual)`` in
        one pass.

    Notes
    -----
    Starts in training mode. ``bn(x)`` runs the forward pass and remembers what the
    backward pass needs; ``bn.backward(dy)`` returns ``dx`` and sets ``weight_grad``
    and ``bias_grad`` (and ``residual_grad``, None when the forward had no residual).
    In eval mode the backward pass treats the running statistics
    as constants (``dx = dy * weight / sqrt(running_var + eps)``).
    The arrays live where the inputs do: the first valid CUDA input moves them to the
    GPU (an input the call rejects moves nothing).
    A layer may be shared by threads: each forward (its running-statistics update and
    ``num_batches_tracked``) and each backward runs whole, one at a time; ``backward``
    differentiates the forward that ran last.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        dtype: Any = np.float32,
        activation: str | None = None,
    ) -> None:
        _epilogue.relu(activation)
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an integer, got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if momentum is not None:
            momentum = _validate.check_momentum(momentum)
        _validate.check_eps(eps, training=False)
        dtype = _dtypes.as_dtype(dtype)
        if not _dtypes.taken(dtype):
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        c = int(num_features)
        self.num_features = c
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dtype
        self.activation = activation
        self.weight: Array | None = np.ones(c, dtype) if affine else None
        self.bias: Array | None = np.zeros(c, dtype) if affine else None
        self.running_mean: Array | None = np.zeros(c, dtype) if track_running_stats else None
        self.running_var: Array | None = np.ones(c, dtype) if track_running_stats else None
        self.num_batches_tracked = 0
        self.training = True
        self.weight_grad: Array | None = None
        self.bias_grad: Array | None = None
        self.residual_grad: Array | None = None
        self._saved: tuple | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # copies and pickles: a lock of their own
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def train(self, mode: bool = True) -> BatchNorm:
        """Switch to training mode (or eval with ``mode=False``)."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Switch to eval mode: normalize with the running statistics."""
        return self.train(False)

    def reset_running_stats(self) -> None:
        """Running mean to 0, running variance to 1, batch count to 0."""
        if self.running_mean is not None:
            self.running_mean[:] = 0  # [:], not [...]: numba device arrays take no Ellipsis
            self.running_var[:] = 1
        self.num_batches_tracked = 0

    def _arrays(self) -> dict[str, Array | None]:
        return {k: getattr(self, k) for k in ("weight", "bias", "running_mean", "running_var")}

    def _placed(self, x: Array) -> dict[str, Array | None]:
        """The parameters and buffers on the side ``x`` lives on: those already there,
        copies of the others (kept only once a call with them has succeeded)."""
        side = _validate.describe(x, "x").side
        arrays = self._arrays()
        for name, a in arrays.items():
            if a is not None and _validate.describe(a, name).side != side:
                arrays[name] = backend(side).from_other_side(a)
        return arrays

    def __call__(self, x: Array, residual: Array | None = None) -> Array:
        return self.forward(x, residual)

    def forward(self, x: Array, residual: Array | None = None) -> Array:
        """Normalize ``x`` (then ``residual`` added and the activation); in training
        mode also update the running statistics."""
        with self._lock:
            p = self._placed(x)
            epi = {}
            if residual is not None or self.activation is not None:
                side = _validate.describe(x, "x").side
                epi = _epilogue.forward(side, x, residual, self.activation)
            rm, rv = p["running_mean"], p["running_var"]
            use_batch = self.training or rm is None
            update = self.training and rm is not None
            if use_batch:
                factor = 0.0
                if update:
                    factor = self.momentum
                    if factor is None:
                        factor = 1.0 / (self.num_batches_tracked + 1)
                else:
                    rm = rv = None
                y, mean, invstd = self._batch_forward(x, p, rm, rv, factor, **epi)
            else:
                w, b = p["weight"], p["bias"]
                chk = _validate.batch_norm_args(x, rm, rv, w, b, False, 0.0, self.eps, self.axis, None)
                be = backend(chk.side)
                y = be.forward_eval(x, chk, rm, rv, w, b, None, **epi)
                mean, invstd = be.copy(rm), be.running_invstd(rv, self.eps)
            self.__dict__.update(p)  # the call succeeded: keep what moved to x's side
            if update:
                self.num_batches_tracked += 1
            # the backward's epilogue arguments: the output a ReLU masks with, and
            # whether there is a residual to differentiate
            epi = {"y": y if self.activation else None, "residual_grad": residual is not None}
            self._saved = (x, mean, invstd, use_batch, epi)
            return y

    def _batch_forward(self, x, p, rm, rv, factor, **epilogue):
        """(y, mean, invstd) with batch statistics (``p``: ``_placed``'s arrays);
        updates rm/rv when given."""
        w, b = p["weight"], p["bias"]
        chk = _validate.batch_norm_args(x, rm, rv, w, b, True, factor, self.eps, self.axis, None)
        return backend(chk.side).forward_train(x, chk, w, b, rm, rv, None, **epilogue)

    def _batch_backward(self, dy, x, mean, invstd, **epilogue):
        """(dx, dweight, dbias[, dresidual]) through batch statistics."""
        chk = _validate.batch_norm_backward_args(dy, x, mean, invstd, self.weight, self.axis, True)
        return backend(chk.side).backward(dy, x, chk, mean, invstd, self.weight, True, **epilogue)

    def backward(self, dy: Array) -> Array:
        """Gradient of the last forward; sets ``weight_grad`` and ``bias_grad``."""
        with self._lock:
            if self._saved is None:
                raise RuntimeError("backward() needs a forward pass first")
            x, mean, invstd, batch, epi = self._saved
            if batch:
                grads = self._batch_backward(dy, x, mean, invstd, **epi)
            else:
                w = self.weight
                chk = _validate.batch_norm_backward_args(dy, x, mean, invstd, w, self.axis, False)
                grads = backend(chk.side).backward(dy, x, chk, mean, invstd, w, False, **epi)
            if self.affine:
                self.weight_grad, self.bias_grad = grads[1], grads[2]
            self.residual_grad = grads[3] if epi["residual_grad"] else None
            return grads[0]

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"axis={self.axis}, dtype={self.dtype}"
            + (f", activation={self.activation!r})" if self.activation else ")")
        )
