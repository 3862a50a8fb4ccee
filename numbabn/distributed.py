"""Synchronized batch normalization across MPI processes (data-parallel training).

Each process (rank) holds a slice of the batch; the statistics are those of the union
of all slices, as PyTorch's SyncBatchNorm and Flax's ``axis_name``. Every function
takes ``comm``, an mpi4py communicator, and must be called by every rank of it.

* Forward (training): each rank reduces its slice to per-channel (count, mean, M2) in
  float64; one ``allgather`` exchanges them (3 * C + 2 numbers per rank); every rank
  merges them with Chan's formula in rank order, so all ranks get bitwise the same
  statistics. Running statistics use the global count.
* Backward (training): each rank's per-channel sums (sum dy, sum dy * (x - mean)) are
  exchanged by one ``allgather`` (2 * C + 2 numbers per rank) and added in rank order.
  The returned dweight and dbias are those of the whole batch (do not all-reduce them
  again).
* Eval mode uses the running statistics and needs no communication.

Ranks may hold different batch sizes, including none. An argument error on any rank
is raised on every rank (the rank that found it raises it, the others say which rank
failed), so a bad call never leaves the others waiting in a collective.

CUDA arrays work too: the per-channel vectors (C values) are staged through host
memory; the tensors never leave the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _validate
from ._dispatch import backend
from ._functional import batch_norm as _local_batch_norm
from ._functional import batch_norm_backward as _local_batch_norm_backward
from ._module import BatchNorm as _LocalBatchNorm

Array = Any


def _exchange(comm, local):
    """Run ``local()`` here and allgather its result; raise on every rank if any failed."""
    try:
        payload, error = local(), None
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        payload, error = None, exc
    note = None if error is None else (type(error).__name__, str(error))
    results = comm.allgather((note, payload))
    if error is not None:
        raise error
    for rank, (other, _) in enumerate(results):
        if other is not None:
            kind = {"TypeError": TypeError, "ValueError": ValueError}.get(other[0], RuntimeError)
            raise kind(f"rank {rank} failed: {other[0]}: {other[1]}")
    return [p for _, p in results]


def _same_channels(parts):
    channels = [p[0] for p in parts]
    if len(set(channels)) > 1:
        raise ValueError(f"ranks disagree on the number of channels: {channels}")


def _check_total(count, need, what):
    if count < need:
        raise ValueError(f"{what} needs at least {need} value(s) per channel over all ranks, got {count}")


def merge_moments(parts):
    """Chan et al.'s merge of per-rank (count, mean, M2), in the given (rank) order.

    Returns (count, mean, M2) of the union; ranks with count 0 are skipped.
    """
    total, mean, m2 = 0, None, None
    for count, mu, q in parts:
        if count == 0:
            continue
        if total == 0:
            total, mean, m2 = count, np.array(mu, np.float64), np.array(q, np.float64)
            continue
        n = total + count
        delta = mu - mean
        mean = mean + delta * (count / n)
        m2 = m2 + q + delta * delta * (total * count / n)
        total = n
    return total, mean, m2


def _global_moments(comm, x, check, need, what):
    """(chk, backend, count, mean, var) of the batch spread over ``comm``."""
    here = {}

    def local():
        chk = check()
        be = backend(chk.side)
        mean, m2 = be.local_moments(x, chk)
        here.update(chk=chk, be=be)
        return chk.layout.c, chk.layout.count, mean, m2

    parts = _exchange(comm, local)
    _same_channels(parts)
    count, mean, m2 = merge_moments([p[1:] for p in parts])
    _check_total(count, need, what)
    return here["chk"], here["be"], count, mean, np.maximum(m2 / count, 0.0)


def _train(comm, x, running_mean, running_var, weight, bias, momentum, eps, axis, out):
    """Training forward over the whole batch: (y, mean, invstd) on x's side."""
    chk, be, count, mean, var = _global_moments(
        comm, x,
        lambda: _validate.batch_norm_args(
            x, running_mean, running_var, weight, bias, True, momentum, eps, axis, out, min_count=0
        ),
        2, "training",
    )
    y = be.normalize_global(x, chk, mean, var, weight, bias, out)
    if running_mean is not None:
        be.update_running(running_mean, running_var, mean, var, count, chk.momentum)
    sd = _validate.stats_dtype(_validate.describe(x, "x").dtype)
    invstd = 1.0 / np.sqrt(var + chk.eps)
    with np.errstate(over="ignore"):  # invstd past float32 (var + eps < 1e-77) is inf
        return y, be.from_host(mean.astype(sd), x), be.from_host(invstd.astype(sd), x)


def batch_norm(
    x: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: Array | None = None,
    comm,
) -> Array:
    """:func:`numbabn.batch_norm` with the statistics of the batch over all ranks of ``comm``."""
    if not training:
        return _local_batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps,
                                 axis=axis, out=out)
    return _train(comm, x, running_mean, running_var, weight, bias, momentum, eps, axis, out)[0]


def batch_stats(x: Array, *, axis: int = 1, comm) -> tuple[Array, Array]:
    """Per-channel mean and biased variance of the batch over all ranks."""
    chk, be, _, mean, var = _global_moments(
        comm, x, lambda: _validate.batch_stats_args(x, axis, min_count=0), 1, "batch statistics"
    )
    sd = _validate.stats_dtype(_validate.describe(x, "x").dtype)
    return be.from_host(mean.astype(sd), x), be.from_host(var.astype(sd), x)


def batch_norm_forward(
    x: Array, weight: Array | None = None, bias: Array | None = None, eps: float = 1e-5, *,
    axis: int = 1, comm,
) -> tuple[Array, Array, Array]:
    """:func:`numbabn.batch_norm_forward` with the statistics of the batch over all ranks."""
    return _train(comm, x, None, None, weight, bias, 0.0, eps, axis, None)


def batch_norm_backward(
    dy: Array, x: Array, mean: Array, invstd: Array, weight: Array | None = None, *,
    axis: int = 1, training: bool = True, comm, local_weight_grads: bool = False,
) -> tuple[Array, Array, Array]:
    """:func:`numbabn.batch_norm_backward` through the statistics of the whole batch.

    ``mean`` and ``invstd`` are the global ones (as returned by
    :func:`batch_norm_forward`); dweight and dbias are sums over all ranks, or with
    ``local_weight_grads`` this rank's share (for data-parallel wrappers that add the
    ranks' parameter gradients themselves, as PyTorch's DDP). In eval mode
    (``training=False``) nothing is exchanged and dweight, dbias are this rank's.
    """
    if not training:
        return _local_batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, training=False)
    here = {}

    def local():
        chk = _validate.batch_norm_backward_args(dy, x, mean, invstd, weight, axis, True, min_count=0)
        be = backend(chk.side)
        mean64, invstd64 = be.to_host(mean), be.to_host(invstd)
        here.update(chk=chk, be=be, mean=mean64, invstd=invstd64)
        here["sums"] = be.local_grad_sums(dy, x, chk, mean64)
        return chk.layout.c, chk.layout.count, here["sums"]

    parts = _exchange(comm, local)
    _same_channels(parts)
    count = sum(p[1] for p in parts)
    _check_total(count, 2, "training backward")
    sums = np.zeros_like(parts[0][2])
    for p in parts:  # rank order: the same bits on every rank
        sums = sums + p[2]
    be, chk = here["be"], here["chk"]
    dx, dweight, dbias = be.grad_input(
        dy, x, chk, here["mean"], here["invstd"], weight, sums, count, True
    )
    if local_weight_grads:
        sd = _validate.stats_dtype(_validate.describe(x, "x").dtype)
        mine = here["sums"]
        dweight = be.from_host((mine[1] * here["invstd"]).astype(sd), x)
        dbias = be.from_host(mine[0].astype(sd), x)
    return dx, dweight, dbias


class BatchNorm(_LocalBatchNorm):
    """:class:`numbabn.BatchNorm` whose batch statistics span all ranks of ``comm``.

    Every rank must call forward and backward together (in training mode; eval mode
    needs no communication). The running statistics stay identical on every rank.
    """

    def __init__(self, num_features: int, *, comm, **kwargs) -> None:
        if kwargs.get("activation") is not None:
            raise ValueError("numbabn.distributed.BatchNorm has no fused epilogue (activation=None)")
        super().__init__(num_features, **kwargs)
        self.comm = comm

    def _batch_forward(self, x, p, rm, rv, factor, residual=None, relu=False):
        if residual is not None:
            raise ValueError("numbabn.distributed.BatchNorm has no fused epilogue (residual=None)")
        return _train(self.comm, x, rm, rv, p["weight"], p["bias"], factor, self.eps, self.axis, None)

    def _batch_backward(self, dy, x, mean, invstd, y=None, residual_grad=False):
        return batch_norm_backward(dy, x, mean, invstd, self.weight, axis=self.axis, comm=self.comm)
