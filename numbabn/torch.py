"""numbabn for PyTorch: a differentiable ``batch_norm`` and drop-in BatchNorm modules.

``batch_norm`` is a ``torch.library`` custom operator (``numbabn::batch_norm``) with its
autograd formula (``numbabn::batch_norm_backward``) and fake kernels registered, so it
passes ``torch.library.opcheck`` and runs inside ``torch.compile`` without a graph break.
CPU tensors run numbabn's CPU kernels on zero-copy NumPy views, CUDA tensors its GPU
kernels on PyTorch's current stream, with new tensors from PyTorch's allocator. On the
CPU numbabn uses at most PyTorch's thread count (``torch.get_num_threads``).

PyTorch is needed here only; numbabn itself never imports it.
"""

from __future__ import annotations

from typing import Optional

import numba
import numpy as np
import torch
from torch import Tensor

from . import _cpu, _epilogue, _fold, _functional, distributed
from ._interop import numpy_tensor, tensor_numpy
from ._validate import stats_dtype

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm", "convert", "fold",
]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Threads:
    """numba's thread count of the calling thread capped at PyTorch's for one call (and
    put back after), so the two pools do not ask for more cores than PyTorch was given."""

    def __enter__(self):
        self.before = None
        have, allowed = _cpu._threads(), torch.get_num_threads()  # (_threads starts the pool)
        if allowed < have:
            self.before = have
            numba.set_num_threads(max(1, allowed))

    def __exit__(self, *exc):
        if self.before is not None:
            numba.set_num_threads(self.before)


def _native(t):
    """What numbabn's functions take for a tensor: the zero-copy NumPy view of a CPU
    tensor; a CUDA tensor (or None) as it is."""
    return t if t is None or t.is_cuda else tensor_numpy(t)


def _tensor(a):
    """A result of numbabn's functions as a tensor (a NumPy result shares its memory)."""
    return numpy_tensor(a) if isinstance(a, np.ndarray) else a


def _call(f, like, *args, **kwargs):
    """``f`` (a numbabn function) on native arrays: CUDA ones on PyTorch's current
    stream (``like``, the input tensor, says which device), host ones with numba's
    threads capped at PyTorch's."""
    if like.is_cuda:
        return f(*args, stream=torch.cuda.current_stream(like.device), **kwargs)
    with _Threads():
        return f(*args, **kwargs)


def _compute(input, running_mean, running_var, weight, bias, training, momentum, eps,
             residual=None, activation=None, stats=True):
    """numbabn's forward of these tensors: (y, mean, invstd) as numbabn returns them
    (NumPy arrays for CPU tensors); in training it updates the running statistics in
    place, in eval mean and invstd are those of the running statistics (None for both
    unless ``stats``: only a backward needs them)."""
    x, rm, rv, w, b, z = map(_native, (input, running_mean, running_var, weight, bias, residual))
    epi = {"residual": z, "activation": activation}
    if training:
        return _call(_functional.batch_norm_forward, input, x, w, b, eps, running_mean=rm,
                     running_var=rv, momentum=momentum, **epi)
    y = _call(_functional.batch_norm, input, x, rm, rv, w, b, False, 0.0, eps, **epi)
    if not stats:
        return y, None, None
    if input.is_cuda:  # (on PyTorch's stream, from its allocator)
        sd = _stats_dtype(input.dtype)
        return y, running_mean.to(sd, copy=True), torch.rsqrt(running_var.to(sd) + eps)
    sd = stats_dtype(x.dtype)  # (NumPy: a fifth of the time of PyTorch's operations here)
    return y, rm.astype(sd), _cpu.running_invstd(rv, eps).astype(sd)


def _gradients(grad, input, mean, invstd, weight, training, y=None, residual_grad=False):
    """numbabn's (dx, dweight, dbias, dresidual or None) as it returns them; ``mean``
    and ``invstd`` native arrays, the others tensors."""
    activation = None if y is None else "relu"
    grads = _call(_functional.batch_norm_backward, input, _native(grad), _native(input), mean,
                  invstd, _native(weight), training=training, activation=activation,
                  y=_native(y), residual_grad=residual_grad)
    return grads if residual_grad else (*grads, None)


@torch.library.custom_op("numbabn::batch_norm", mutates_args=())
def _forward(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, new running mean, new running variance): batch statistics in
    training, else the running ones; y through the epilogue act(bn(x) + residual). The
    operator is functional (autograd needs it so): it updates copies of the running
    statistics, which ``batch_norm`` copies back (empty when there is nothing to
    update)."""
    sd = _stats_dtype(input.dtype)
    update = training and running_mean is not None
    rm = running_mean.clone() if update else input.new_empty(0, dtype=sd)
    rv = running_var.clone() if update else input.new_empty(0, dtype=sd)
    stats = (rm, rv) if update else (running_mean, running_var)
    results = _compute(
        input, *stats, weight, bias, training, momentum, eps, residual, activation
    )
    return (*map(_tensor, results), rm, rv)


@_forward.register_fake
def _(input, running_mean, running_var, weight, bias, training, momentum, eps, residual=None,
      activation=None):
    c = input.shape[1]
    sd = _stats_dtype(input.dtype)
    update = training and running_mean is not None
    rm = torch.empty_like(running_mean) if update else input.new_empty(0, dtype=sd)
    rv = torch.empty_like(running_var) if update else input.new_empty(0, dtype=sd)
    return torch.empty_like(input), input.new_empty(c, dtype=sd), input.new_empty(c, dtype=sd), rm, rv


def _grads(
    grad: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    training: bool, y: Optional[Tensor] = None, residual_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual); ``training``: through batch statistics; ``y``:
    the output of a forward with a ReLU, which the gradient goes through first;
    dresidual empty unless ``residual_grad``."""
    *grads, dr = _gradients(grad, input, _native(mean), _native(invstd), weight, training, y,
                            residual_grad)
    return (*map(_tensor, grads), grad.new_empty(0) if dr is None else _tensor(dr))


_backward = torch.library.custom_op("numbabn::batch_norm_backward", _grads, mutates_args=())


@_backward.register_fake
def _(grad, input, mean, invstd, weight, training, y=None, residual_grad=False):
    c = input.shape[1]
    sd = _stats_dtype(input.dtype)
    dr = torch.empty_like(grad) if residual_grad else grad.new_empty(0)
    return torch.empty_like(input), input.new_empty(c, dtype=sd), input.new_empty(c, dtype=sd), dr


def _save(ctx, input, weight, bias, training, y, residual, activation, *stats):
    """What the backward needs (the output too when a ReLU masks the gradient; mean and
    invstd here when they are tensors)."""
    ctx.save_for_backward(input, weight, y if activation else None, *stats)
    ctx.training, ctx.has_bias, ctx.has_residual = training, bias is not None, residual is not None


def _setup_context(ctx, inputs, output):
    input, _, _, weight, bias, training, _, _, *epilogue = inputs
    residual, activation = (epilogue + [None, None])[:2]
    y, mean, invstd, _, _ = output
    _save(ctx, input, weight, bias, training, y, residual, activation, mean, invstd)


def _input_grads(ctx, weight, dx, dweight, dbias, dr):
    """``batch_norm``'s gradients (one per argument) from numbabn's, as tensors: dweight
    and dbias in the parameters' dtype (dbias in numbabn's statistics dtype when there
    is no weight)."""
    def parameter(g):
        g = _tensor(g)
        return g if weight is None or g.dtype == weight.dtype else g.to(weight.dtype)

    dweight = None if weight is None else parameter(dweight)
    dbias = parameter(dbias) if ctx.has_bias else None
    dr = _tensor(dr) if ctx.has_residual else None
    return _tensor(dx), None, None, dweight, dbias, None, None, None, dr, None


def _differentiate(ctx, grad, *_grads_of_statistics):
    input, weight, y, mean, invstd = ctx.saved_tensors
    grads = _backward(grad, input, mean, invstd, weight, ctx.training, y, ctx.has_residual)
    return _input_grads(ctx, weight, *grads)


torch.library.register_autograd(
    "numbabn::batch_norm", _differentiate, setup_context=_setup_context
)


def _differentiable(*tensors) -> bool:
    """Whether autograd records a call on these tensors (None among them allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Eager(torch.autograd.Function):
    """The same computation in eager mode without the dispatcher (whose Python layers
    cost more than the kernels of a small layer), updating the running statistics in
    place, not through copies, and keeping numbabn's own mean and invstd for the
    backward. ``batch_norm`` takes the operator when compiling or under functorch
    transforms."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, training, momentum, eps,
                residual, activation):
        y, *ctx.stats = _compute(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, residual, activation)
        y = _tensor(y)
        _save(ctx, input, weight, bias, training, y, residual, activation)
        return y

    @staticmethod
    def backward(ctx, grad):
        input, weight, y = ctx.saved_tensors
        grads = _gradients(grad, input, *ctx.stats, weight, ctx.training, y, ctx.has_residual)
        return _input_grads(ctx, weight, *grads)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` computed by numbabn (differentiable with
    respect to input, weight and bias), with numbabn's fused epilogue
    ``activation(bn(input) + residual)`` (differentiable with respect to the residual)."""
    args = (input, running_mean, running_var, weight, bias, bool(training), float(momentum),
            float(eps), residual, activation)
    if not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
        if _differentiable(input, weight, bias, residual):
            return _Eager.apply(*args)
        return _tensor(_compute(*args, stats=False)[0])  # no graph to record (inference)
    y, _, _, rm, rv = _forward(*args)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return y


class _Numbabn:
    """The forward of torch's ``_BatchNorm``, with numbabn's kernels, and its fused
    epilogue: ``activation`` ("relu" or None), ``forward(input, residual=None)``."""

    activation = None

    def __init__(self, *args, activation: Optional[str] = None, **kwargs):
        _epilogue.relu(activation)
        super().__init__(*args, **kwargs)
        self.activation = activation

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + act

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        if input.dim() > 1 and input.shape[1] != self.num_features:
            raise RuntimeError(
                f"expected {self.num_features} channels (input.shape[1]), got {input.shape[1]}"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        tracked = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if tracked and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        rm, rv = (self.running_mean, self.running_var) if keep else (None, None)
        y = self._normalize(input, rm, rv, bn_training, factor, residual)
        if tracked:  # after the call: a call that raises changes nothing
            self.num_batches_tracked.add_(1)
        return y

    def _normalize(self, input, running_mean, running_var, training, factor, residual=None):
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, training,
                          factor, self.eps, residual=residual, activation=self.activation)


class BatchNorm1d(_Numbabn, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by numbabn."""


class BatchNorm2d(_Numbabn, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by numbabn."""


class BatchNorm3d(_Numbabn, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by numbabn."""


class _TorchComm:
    """``numbabn.distributed``'s exchange (an allgather of small Python objects) over a
    ``torch.distributed`` process group, any backend."""

    def __init__(self, group):
        self.group = group

    def allgather(self, obj):
        gathered = [None] * torch.distributed.get_world_size(self.group)
        torch.distributed.all_gather_object(gathered, obj, group=self.group)
        return gathered


class _Synced(torch.autograd.Function):
    """Batch norm with the statistics of the whole group's batch (``numbabn.distributed``):
    one exchange forward, one backward; dweight and dbias are this rank's share."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, comm):
        with _Threads():
            y, mean, invstd = distributed._train(
                comm, _native(input), _native(running_mean), _native(running_var), _native(weight),
                _native(bias), momentum, eps, 1, None,
            )
        mean, invstd = _tensor(mean), _tensor(invstd)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.comm, ctx.has_bias = comm, bias is not None
        return _tensor(y)

    @staticmethod
    def backward(ctx, grad):
        input, weight, mean, invstd = ctx.saved_tensors
        with _Threads():
            dx, dweight, dbias = distributed.batch_norm_backward(
                _native(grad.contiguous()), _native(input), _native(mean), _native(invstd), _native(weight),
                comm=ctx.comm, local_weight_grads=True,
            )
        dtype = weight.dtype if weight is not None else input.dtype
        dweight = _tensor(dweight).to(dtype) if weight is not None else None
        dbias = _tensor(dbias).to(dtype) if ctx.has_bias else None
        return _tensor(dx), dweight, dbias, None, None, None, None, None


class SyncBatchNorm(_Numbabn, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by numbabn, over ``torch.distributed`` with any
    backend (gloo on CPU included): in training, the statistics of the batch of every
    rank of ``process_group`` (ranks may hold uneven or empty slices); dweight and dbias
    are this rank's share, which DDP all-reduces as it does torch's. Outside training, or
    on a group of one rank, a plain batch norm."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("activation") is not None:
            raise ValueError("numbabn.torch.SyncBatchNorm has no fused epilogue (activation=None)")
        super().__init__(*args, **kwargs)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _normalize(self, input, running_mean, running_var, training, factor, residual=None):
        if residual is not None:
            raise ValueError("numbabn.torch.SyncBatchNorm has no fused epilogue (residual=None)")
        dist = torch.distributed
        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        if not (training and group is not None and dist.get_world_size(group) > 1):
            return super()._normalize(input, running_mean, running_var, training, factor)
        return _Synced.apply(input, self.weight, self.bias, running_mean, running_var, factor,
                             self.eps, _TorchComm(group))


_REPLACE = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _converted(bn: torch.nn.Module, sync: bool, process_group) -> torch.nn.Module:
    """A numbabn layer holding ``bn``'s own parameters and buffers (the same tensors)."""
    cls = SyncBatchNorm if sync else _REPLACE[type(bn)]
    new = cls.__new__(cls)
    torch.nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in bn.__dict__.items() if k not in ("_parameters", "_buffers")})
    new._parameters = dict(bn._parameters)
    new._buffers = dict(bn._buffers)
    if sync:
        new.process_group = process_group
    return new


def convert(
    module: torch.nn.Module, sync: bool = False, process_group=None, fuse_relu: bool = False
) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` of ``module`` (``module`` itself
    included) by numbabn's (``sync``: by numbabn's ``SyncBatchNorm`` over
    ``process_group``, default the whole world), keeping its parameters, buffers, dtype,
    device and training mode; returns the module (the new layer, if ``module`` itself
    was replaced). ``fuse_relu`` (not with ``sync``): a batch norm directly followed by
    an ``nn.ReLU`` in an ``nn.Sequential`` takes the ReLU as its epilogue, and the ReLU
    becomes ``nn.Identity``."""
    if type(module) in _REPLACE or (sync and type(module) is torch.nn.SyncBatchNorm):
        return _converted(module, sync, process_group)
    for name, child in module.named_children():
        setattr(module, name, convert(child, sync, process_group, fuse_relu))
    if fuse_relu and not sync and isinstance(module, torch.nn.Sequential):
        names = [name for name, _ in module.named_children()]
        for first, second in zip(names, names[1:]):
            bn, relu = module._modules[first], module._modules[second]
            if type(bn) in _REPLACE.values() and type(relu) is torch.nn.ReLU and not bn.activation:
                bn.activation = "relu"
                module._modules[second] = torch.nn.Identity()
    return module


_FOLDABLE = {  # layer type: the output-channel axis of its weight
    torch.nn.Linear: 0, torch.nn.Conv1d: 0, torch.nn.Conv2d: 0, torch.nn.Conv3d: 0,
    torch.nn.ConvTranspose1d: 1, torch.nn.ConvTranspose2d: 1, torch.nn.ConvTranspose3d: 1,
}


def _fold_pair(layer: torch.nn.Module, bn: torch.nn.Module) -> bool:
    """Fold ``bn`` into ``layer`` in place (``numbabn.fold``); False if they do not fold
    (grouped transposed convolutions, a batch norm without running statistics)."""
    axis = _FOLDABLE.get(type(layer))
    if (
        axis is None
        or not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
        or bn.running_mean is None
        or (axis == 1 and layer.groups != 1)  # (in, out / groups, ...): not one axis
        or layer.weight.shape[axis] != bn.num_features
    ):
        return False
    with torch.no_grad():
        w, b = _fold.fold(
            layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
            bn.running_mean, bn.running_var, None if bn.weight is None else bn.weight.detach(),
            None if bn.bias is None else bn.bias.detach(), bn.eps, axis=axis,
        )
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = torch.nn.Parameter(b.to(layer.weight.dtype))
        else:
            layer.bias.copy_(b)
    return True


def fold(module: torch.nn.Module) -> torch.nn.Module:
    """Fold each batch norm that directly follows a Conv/ConvTranspose/Linear layer in
    an ``nn.Sequential`` of the eval-mode ``module`` into that layer (its weight and
    bias updated, the batch norm replaced by ``nn.Identity``); returns the module.
    ValueError for a module in training mode, whose batch norms use batch statistics."""
    if module.training:
        raise ValueError("fold needs a model in eval mode (call module.eval() first)")
    for child in module.children():
        fold(child)
    if isinstance(module, torch.nn.Sequential):
        names = [name for name, _ in module.named_children()]
        for first, second in zip(names, names[1:]):
            if _fold_pair(module._modules[first], module._modules[second]):
                module._modules[second] = torch.nn.Identity()
    return module
