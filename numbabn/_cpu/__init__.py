"""CPU backend: runs the CPU kernels on NumPy arrays.

Arguments arrive validated (``_validate``). An operation views its tensors as the
kernels want them (``arrays``), takes the plan of its geometry (``plan``: which kernels,
how the work is split, which stores) and allocates outputs. The per-channel arithmetic
between passes runs in kernels too (``formulas``): each Python step costs microseconds,
more than the passes of a small tensor take.

The kernels, by role: ``formulas`` (every formula, once), ``reduce`` (sums),
``elementwise`` (one kernel per traversal, both formulas), ``fused`` (per-channel
passes from cache), ``small`` (single-thread), ``vector`` and ``llvm`` (hand-written
vector loops), ``pieces`` (work cuts), ``tuning`` (every tunable).

Operations (mirrored by the GPU backend, ``_gpu``): ``batch_stats``,
``forward_train``, ``forward_eval``, ``backward``; and the pieces
``numbabn.distributed`` assembles around its exchanges.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._channel import as64
from .._pool import threads as _threads
from .._validate import Checked, Layout, stats_dtype
from . import arrays, formulas, fused, plan, reduce, small
from .plan import make as _plan

# Below this eps, 1 / sqrt(var + eps) of a constant channel exceeds float32's range.
_TINY_EPS = 1e-76


class Kernels(NamedTuple):
    """The kernels of one view kind."""

    sums: object
    small_stats: object
    small_forward: object
    small_backward: object
    small_elementwise: object


KERNELS = {
    "ncl": Kernels(
        reduce.sums_ncl, small.stats_ncl, small.forward_ncl, small.backward_ncl,
        small.elementwise_ncl,
    ),
    "mc": Kernels(
        reduce.sums_mc, small.stats_mc, small.forward_mc, small.backward_mc,
        small.elementwise_mc,
    ),
}


def _reduce(g, x, centre, layout: Layout, p: plan.Plan, r=None) -> np.ndarray:
    """The (2, C) float64 per-channel sums of canonical view ``x``: ``g`` None, its mean
    and biased variance; else (sum g, sum g * (x - centre)), and with ``r`` (a canonical
    view) each g stored there as it is summed."""
    view, k = p.sums, arrays.kernel_array
    if view != layout:  # flat rows: one column per value of a sample
        x, g, r = (arrays.operand(lambda a: a.reshape(view.n, view.c), a) for a in (x, g, r))
    part = np.empty((p.sums_tasks, 2, view.c))
    out = np.empty((2, layout.c))
    sums = KERNELS[view.kind].sums  # (runs its tasks through ``tasks``)
    sums(arrays.operand(k, g), k(x), centre, *p.sums_work, part, out, arrays.operand(k, r))
    return out


def _elementwise(g, x, params: np.ndarray, result: np.ndarray, layout: Layout, p: plan.Plan):
    """The formula (normalize when ``g`` is None, else grad_input of ``g`` and ``x``;
    either may be an operand tuple, see ``formulas``) into ``result``, with per-channel
    constants ``params``, as the plan routes it."""
    k = arrays.kernel_array
    if p.small:
        kernel = KERNELS[layout.kind].small_elementwise
        kernel(arrays.operand(k, g), arrays.operand(k, x), params, k(result))
        return
    kernel, view, work = plan.route(p, layout, result)
    if view != layout:  # flat rows of short planes
        result = result.reshape(view.n, view.c)
        g, x = (arrays.operand(lambda a: a.reshape(view.n, view.c), a) for a in (g, x))
    kernel(arrays.operand(k, g), arrays.operand(k, x), params, *work, k(result))


def _moments(v: np.ndarray, layout: Layout, p: plan.Plan) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and biased variance of each channel of a canonical view."""
    if p.small:
        stats = np.empty((2, layout.c))
        KERNELS[layout.kind].small_stats(arrays.kernel_array(v), stats)
        return stats[0], stats[1]
    moments = _reduce(None, v, None, layout, p)
    return moments[0], moments[1]


def _epilogue(xv, layout, residual, relu):
    """Normalize's x operand: ``xv``, or with an epilogue the triple (xv, the residual's
    canonical view or None, the ReLU's zero or None) of ``formulas``."""
    if residual is None and not relu:
        return xv
    z = None if residual is None else arrays.view(residual, layout)
    return xv, z, stats_dtype(xv.dtype).type(0) if relu else None


def _normalize(x, xv, layout, mean, var, eps, weight, bias, out, p, residual=None, relu=False):
    """y from ``x`` (canonical view ``xv``) normalized with the given mean and biased
    variance (float64, or running statistics as stored), then the epilogue (``residual``
    added, ``relu``); any count, even 0. Returns (y, float64 invstd)."""
    xop = _epilogue(xv, layout, residual, relu)
    y, yv = arrays.output(out, x, layout, residual)
    c = layout.c
    params, stats = np.empty((4, c), stats_dtype(x.dtype)), np.empty((3, c))
    # (running statistics widened here, exactly: one compiled channel_params serves them
    # in every dtype and the batch statistics of training)
    mean, var = mean.astype(np.float64, copy=False), var.astype(np.float64, copy=False)
    formulas.channel_params(mean, var, as64(weight, c, 1.0), as64(bias, c, 0.0), eps, params, stats)
    if layout.count * c:
        _elementwise(None, xop, params, yv, layout, p)
    return arrays.finish_output(y, out), stats[2]


def batch_stats(x: np.ndarray, chk: Checked) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance."""
    layout = chk.layout
    if layout.c == 0:
        none = np.empty(0, stats_dtype(x.dtype))
        return none, none.copy()
    mean, var = _moments(arrays.view(x, layout), layout, _plan(layout, _threads(), x.itemsize))
    sd = stats_dtype(x.dtype)
    return mean.astype(sd, copy=False), var.astype(sd, copy=False)


def forward_train(
    x, chk: Checked, weight, bias, running_mean, running_var, out, residual=None, relu=False
):
    """Normalize with batch statistics, then the epilogue (``residual`` added,
    ``relu``); update running statistics if given.

    Returns ``(y, mean, invstd)`` with the statistics in :func:`stats_dtype`.
    """
    layout = chk.layout
    if layout.c == 0:  # (training needs 2 values in each channel there is)
        none = np.empty(0, stats_dtype(x.dtype))
        return arrays.nothing(x, layout, out), none, none.copy()
    x, xv = arrays.ordered(x, layout)
    p = _plan(layout, _threads(), x.itemsize)
    if p.small or p.fuse_forward:
        xop = arrays.operand(arrays.kernel_array, _epilogue(xv, layout, residual, relu))
        y, yv = arrays.output(out, x, layout, residual)
        c = layout.c
        stats = np.empty((3, c))
        args = (
            xop, as64(weight, c, 1.0), as64(bias, c, 0.0), chk.eps,
            np.empty((4, c), stats_dtype(x.dtype)), stats,
        )
        if p.small:
            KERNELS[layout.kind].small_forward(*args, arrays.kernel_array(yv))
        else:
            kernel = fused.forward_channels[plan.streamed(yv, layout)]
            kernel(*args, p.runs, arrays.kernel_array(yv))
        y = arrays.finish_output(y, out)
        mean, var, invstd = stats
    else:
        mean, var = _moments(xv, layout, p)
        y, invstd = _normalize(
            x, xv, layout, mean, var, chk.eps, weight, bias, out, p, residual, relu
        )
    if running_mean is not None:
        update_running(running_mean, running_var, mean, var, layout.count, chk.momentum)
    sd = stats_dtype(x.dtype)
    if chk.eps >= _TINY_EPS:
        return y, mean.astype(sd, copy=False), invstd.astype(sd, copy=False)
    # invstd past float32's range becomes inf, quietly (np.errstate costs 1.4 us a call,
    # so only where that can happen)
    with np.errstate(over="ignore"):
        return y, mean.astype(sd), invstd.astype(sd)


def update_running(running_mean, running_var, mean, var, count, momentum) -> None:
    """The running-statistics update from float64 batch mean and biased variance."""
    formulas.update_running(
        arrays.kernel_array(running_mean), arrays.kernel_array(running_var), mean, var, count, momentum
    )


def running_invstd(running_var: np.ndarray, eps: float) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        return 1.0 / np.sqrt(running_var.astype(np.float64) + eps)


def forward_eval(
    x, chk: Checked, running_mean, running_var, weight, bias, out, residual=None, relu=False
):
    """Normalize with the running statistics, then the epilogue."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return arrays.nothing(x, layout, out)
    x, xv = arrays.ordered(x, layout)
    p = _plan(layout, _threads(), x.itemsize)
    stats = (running_mean, running_var, chk.eps, weight, bias)
    return _normalize(x, xv, layout, *stats, out, p, residual, relu)[0]


def backward(dy, x, chk: Checked, mean, invstd, weight, training: bool, y=None, residual_grad=False):
    """Gradients (dx, dweight, dbias); see the API contract for the formulas. ``y``:
    the output of a forward with a ReLU, which ``dy`` goes through first (a masked
    operand of the passes); ``residual_grad``: also return dresidual, that gradient,
    which every path writes in the loop that first sums it (the two-pass path then
    reads it as the ``dy`` of its dx pass)."""
    layout = chk.layout
    if layout.count * layout.c == 0:  # eval with N = 0, or no channels
        zeros = np.zeros(layout.c, stats_dtype(x.dtype))
        none = (arrays.nothing(x, layout, None), zeros, zeros.copy())
        return (*none, arrays.empty(layout, dy)[0]) if residual_grad else none
    p = _plan(layout, _threads(), x.itemsize)
    mean64, invstd64 = np.asarray(mean, dtype=np.float64), np.asarray(invstd, dtype=np.float64)
    (dy, dyv), (x, xv) = arrays.ordered(dy, layout), arrays.ordered(x, layout)
    if not (p.small or (p.fuse_backward if y is None else p.fuse_backward_relu)):
        dr, drv = arrays.empty(layout, dy) if residual_grad else (None, None)
        sums = local_grad_sums(dy, x, chk, mean64, p, y, drv)
        if dr is not None:  # (dx then reads one array where the masked pair was two)
            dy, y = dr, None
        grads = grad_input(dy, x, chk, mean64, invstd64, weight, sums, layout.count, training, p, y)
        return (*grads, dr) if residual_grad else grads
    c = layout.c
    ctype = stats_dtype(x.dtype)  # also the dtype of dweight and dbias
    dx, dxv = arrays.output(None, x, layout)
    grads = np.empty((2, c), ctype)
    k = arrays.kernel_array
    # (the operands spelled out, not through ``arrays.operand``: 1-2% of a tiny call)
    g = k(dyv) if y is None else (k(dyv), k(arrays.view(y, layout)))
    dr, drv = arrays.empty(layout, dy) if residual_grad else (None, None)
    r = None if drv is None else k(drv)
    per_channel = (mean64, invstd64, as64(weight, c, 1.0))
    params = np.empty((5, c), ctype)
    if p.small:
        small_backward = KERNELS[layout.kind].small_backward
        small_backward(g, k(xv), *per_channel, training, params, grads, r, k(dxv))
    else:
        kernel = fused.backward_channels[plan.streamed(dxv, layout), training]
        kernel(g, k(xv), *per_channel, params, grads, p.runs, r, k(dxv))
    return (dx, grads[0], grads[1], dr) if residual_grad else (dx, grads[0], grads[1])


# --- the pieces ``numbabn.distributed`` assembles around its exchanges ---------------


def local_moments(x, chk: Checked) -> tuple[np.ndarray, np.ndarray]:
    """float64 (mean, sum of squared deviations) of this array's values (zeros if none)."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return np.zeros(layout.c), np.zeros(layout.c)
    mean, var = _moments(arrays.view(x, layout), layout, _plan(layout, _threads(), x.itemsize))
    return mean, var * layout.count


def normalize_global(x, chk: Checked, mean, var, weight, bias, out):
    """Normalize with given float64 statistics (those of the whole distributed batch)."""
    layout = chk.layout
    x, xv = arrays.ordered(x, layout)
    p = _plan(layout, _threads(), x.itemsize)
    return _normalize(x, xv, layout, mean, var, chk.eps, weight, bias, out, p)[0]


def _gradient(dy, y, layout: Layout):
    """The gradient operand: dy's canonical view, or through the ReLU whose output is
    ``y``, the pair of views (``formulas.load_at``)."""
    dyv = arrays.view(dy, layout)
    return dyv if y is None else (dyv, arrays.view(y, layout))


def local_grad_sums(
    dy, x, chk: Checked, mean, p: plan.Plan | None = None, y=None, drv=None
) -> np.ndarray:
    """float64 (sum dy, sum dy * (x - mean)) per channel, shape (2, C) (``plan``: the
    caller's :func:`_plan`, made here if not given; ``y``: as for :func:`backward`;
    ``drv``: a canonical view that the gradient is stored into, dresidual)."""
    layout = chk.layout
    if layout.count * layout.c == 0:
        return np.zeros((2, layout.c))
    p = p or _plan(layout, _threads(), x.itemsize)
    return _reduce(_gradient(dy, y, layout), arrays.view(x, layout), mean, layout, p, drv)


def grad_input(dy, x, chk: Checked, mean, invstd, weight, sums, count, training, p=None, y=None):
    """(dx, dweight, dbias) from the sums over ``count`` values per channel
    (``plan``: the caller's :func:`_plan`, made here if not given; ``y``: as for
    :func:`backward`)."""
    layout = chk.layout
    c = layout.c
    ctype = stats_dtype(x.dtype)
    dx, dxv = arrays.output(None, x, layout)
    params, grads = np.empty((5, c), ctype), np.empty((2, c), ctype)
    formulas.grad_params(sums, count, mean, invstd, as64(weight, c, 1.0), training, params, grads)
    if layout.count * c:
        g = _gradient(dy, y, layout)
        p = p or _plan(layout, _threads(), x.itemsize)
        if training:
            _elementwise(g, arrays.view(x, layout), params, dxv, layout, p)
        else:
            _elementwise(None, g, params, dxv, layout, p)
    return dx, grads[0], grads[1]


def to_host(a) -> np.ndarray:
    """A per-channel vector as float64 NumPy."""
    return np.asarray(a, dtype=np.float64)


def from_host(a: np.ndarray, like) -> np.ndarray:
    """A host per-channel vector on this side (as the kind of array ``like`` is)."""
    return a


def copy(a: np.ndarray) -> np.ndarray:
    return a.copy()


def from_other_side(a) -> np.ndarray:
    """A host copy of a CUDA array (used when a layer follows its input to the CPU)."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    from numba import cuda

    return cuda.as_cuda_array(a).copy_to_host()
