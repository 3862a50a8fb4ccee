"""Argument checking and memory-layout analysis, shared by both backends.

Everything a public function must refuse is refused here, in plain Python, before a
backend allocates, launches or writes anything. The backends receive arguments that
are known to be valid and a :class:`Layout` that says how to view the tensor.

Two canonical views are used by the kernels:

* ``"ncl"``: the array is C-contiguous; it is viewed as ``(N, C, L)`` with ``N`` the
  product of the axes before the channel axis and ``L`` the product of those after it.
* ``"mc"``: the channel axis is the innermost one in memory; moving it last gives a
  C-contiguous array, viewed as ``(M, C)``.

An input that fits neither (sliced, transposed, negative strides, non-native byte
order) is copied once into the canonical order, which the layout records with
``copy=True``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _alias, _dtypes

HOST = "host"
DEVICE = "device"


class ArrayInfo(NamedTuple):
    """What validation needs to know about an array, whichever side it lives on."""

    side: str
    dtype: np.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    writeable: bool


class Layout(NamedTuple):
    """How the kernels see a tensor whose channel axis is ``axis``.

    For ``kind == "ncl"`` the kernel view is ``(n, c, l)``; for ``kind == "mc"`` it is
    ``(n, c)`` with ``l == 1``. ``count`` is the number of values per channel.
    """

    kind: str
    copy: bool
    axis: int
    shape: tuple[int, ...]
    n: int
    c: int
    l: int

    @property
    def count(self) -> int:
        return self.n * self.l


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def stats_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of statistics and per-channel gradients: float32 for float16, bfloat16
    and float32 data, float64 for float64 data."""
    return _F64 if dtype == _F64 else _F32


def cuda_interface(a: Any) -> dict | None:
    try:
        return a.__cuda_array_interface__
    except Exception:
        pass
    try:  # PyTorch refuses the interface of tensors that require grad; read their data
        return a.detach().__cuda_array_interface__
    except Exception:
        return None


def is_device_array(a: Any) -> bool:
    """True for anything with ``__cuda_array_interface__`` or a numba device array.

    The CUDA simulator's arrays carry only ``__cuda_ndarray__``, so both are checked.
    """
    return (
        getattr(a, "__cuda_ndarray__", False) is True
        or cuda_interface(a) is not None
    )


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = []
    step = itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def is_c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """C-contiguity that ignores the strides of axes of extent 1 (as NumPy does)."""
    if math.prod(shape) == 0:
        return True
    expected = _c_strides(shape, itemsize)
    return all(e == 1 or s == w for e, s, w in zip(shape, strides, expected))


def _torch_info(a: Any) -> ArrayInfo | None:
    """The ArrayInfo of a CUDA PyTorch tensor of a float dtype numbabn knows, read from
    its attributes (a few times cheaper than building ``__cuda_array_interface__``,
    and it also serves tensors that require grad); None otherwise."""
    dtype = _dtypes.of_torch(a.dtype)
    if dtype is None or not a.is_cuda:
        return None
    item = dtype.itemsize
    return ArrayInfo(DEVICE, dtype, tuple(a.shape), tuple([s * item for s in a.stride()]), True)


def describe(a: Any, name: str) -> ArrayInfo:
    """Return the :class:`ArrayInfo` of ``a``, or raise TypeError for other objects."""
    if isinstance(a, np.ndarray):
        if isinstance(a, np.ma.MaskedArray):  # its mask would be silently ignored
            raise TypeError(
                f"{name} is a masked array; numbabn does not honour masks: pass "
                f"{name}.filled(...) or {name}.data"
            )
        return ArrayInfo(HOST, a.dtype, a.shape, a.strides, a.flags.writeable)
    if type(a).__module__.startswith("torch"):
        info = _torch_info(a)
        if info is not None:
            return info
    if getattr(a, "__cuda_ndarray__", False) is True:  # numba's (and the simulator's)
        return ArrayInfo(DEVICE, np.dtype(a.dtype), tuple(a.shape), tuple(a.strides), True)
    cai = cuda_interface(a)
    if cai is not None:
        shape = tuple(int(s) for s in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        strides = _c_strides(shape, dtype.itemsize) if strides is None else tuple(strides)
        readonly = bool(cai["data"][1])
        return ArrayInfo(DEVICE, dtype, shape, strides, not readonly)
    raise TypeError(
        f"{name} must be a NumPy array or a CUDA array (an object with "
        f"__cuda_array_interface__), got {type(a).__module__}.{type(a).__qualname__}"
    )


def _check_float(info: ArrayInfo, name: str) -> None:
    if not _dtypes.taken(info.dtype):
        hint = ""
        if info.dtype.kind == "f":
            hint = f"; convert with .astype('={info.dtype.kind}{info.dtype.itemsize}')"
        raise TypeError(
            f"{name} has dtype {info.dtype}; numbabn supports native float16, bfloat16 "
            f"(ml_dtypes), float32 and float64{hint}"
        )


def _one_side(names: tuple[str, ...], sides: tuple[str | None, ...]) -> str:
    """The side all arrays of a call live on (``sides``: each named array's, None if
    absent; the first is always given); TypeError when they are not all there."""
    if sides.count(sides[0]) + sides.count(None) == len(sides):
        return sides[0]
    where = ", ".join(f"{k} on {v}" for k, v in zip(names, sides) if v is not None)
    raise TypeError(f"all arrays of one call must live on the same side: {where}")


def normalize_axis(axis: Any, ndim: int) -> int:
    """Return ``axis`` in ``[0, ndim)``; ValueError if out of range."""
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    if type(axis) is not int and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of ndim {ndim}")
    return axis % ndim


def fits(dtype: np.dtype, shape, strides, kind: str, axis: int) -> bool:
    """True when an array of this geometry can be viewed as ``kind`` (``"ncl"`` or
    ``"mc"``) with no copy."""
    if not dtype.isnative:
        return False
    if kind == "mc":  # the channel axis moved last
        order = [i for i in range(len(shape)) if i != axis] + [axis]
        shape, strides = tuple(shape[i] for i in order), tuple(strides[i] for i in order)
    return is_c_contiguous(shape, strides, dtype.itemsize)


def plan_layout(info: ArrayInfo, axis: int) -> Layout:
    """Choose the kernel view for an array whose channel axis is ``axis``."""
    return _plan(info.dtype, info.shape, info.strides, axis)


@functools.lru_cache(maxsize=256)
def _plan(dtype: np.dtype, shape: tuple[int, ...], strides: tuple[int, ...], axis: int) -> Layout:
    """:func:`plan_layout` of one geometry; a training loop repeats a few of them."""
    c = shape[axis]
    n = math.prod(shape[:axis])
    l = math.prod(shape[axis + 1 :])
    if l > 1 and fits(dtype, shape, strides, "ncl", axis):
        return Layout("ncl", False, axis, shape, n, c, l)
    if fits(dtype, shape, strides, "mc", axis):
        return Layout("mc", False, axis, shape, n * l, c, 1)
    if l > 1:
        return Layout("ncl", True, axis, shape, n, c, l)
    return Layout("mc", True, axis, shape, n, c, 1)


def _check_tensor(a: Any, name: str, axis: Any) -> tuple[ArrayInfo, int]:
    if (  # the common case, a NumPy array and an int axis, in as few steps as it takes
        type(a) is np.ndarray
        and a.dtype in _dtypes.FLOAT_SET
        and type(axis) is int
        and -a.ndim <= axis < a.ndim
        and a.ndim >= 2
    ):
        return ArrayInfo(HOST, a.dtype, a.shape, a.strides, a.flags.writeable), axis % a.ndim
    info = describe(a, name)
    _check_float(info, name)
    ndim = len(info.shape)
    if ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (N, C, ...), got shape {info.shape}")
    return info, normalize_axis(axis, ndim)


def _vector_side(a: Any, name: str, c: int, writeable: bool = False) -> str | None:
    """The side of per-channel vector ``a`` (None if absent), after checking it."""
    if a is None:
        return None
    if (  # the common case, a valid NumPy vector, without building its ArrayInfo
        type(a) is np.ndarray
        and a.dtype in _dtypes.FLOAT_SET
        and a.shape == (c,)
        and (not writeable or a.flags.writeable)
    ):
        return HOST
    info = describe(a, name)
    _check_float(info, name)
    if len(info.shape) != 1 or info.shape[0] != c:
        raise ValueError(f"{name} must have shape ({c},) (one value per channel), got {info.shape}")
    if writeable and not info.writeable:
        raise ValueError(f"{name} is read-only but must be updated in place")
    return info.side


def _given(a: Any, name: str) -> Any:
    if a is None:
        raise ValueError(f"{name} is required")
    return a


def _out_side(out: Any, x: ArrayInfo) -> str | None:
    """The side of ``out`` (None if absent), after checking it against ``x``."""
    if out is None:
        return None
    info = describe(out, "out")
    if info.dtype != x.dtype:
        raise TypeError(f"out has dtype {info.dtype} but x has dtype {x.dtype}")
    if info.shape != x.shape:
        raise ValueError(f"out has shape {info.shape} but x has shape {x.shape}")
    if not info.writeable:
        raise ValueError("out is read-only")
    return info.side


def _real(value: Any, name: str, what: str) -> float:
    """``value`` as a float; TypeError for a non-real, ValueError for one too large for
    a float (an int of 10**400, say)."""
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        too_large = f"got an {type(value).__name__} too large for a float"
        raise ValueError(f"{name} must be {what}; {too_large}") from None


def check_eps(eps: Any, training: bool) -> float:
    eps = _real(eps, "eps", "a real number")
    if not eps >= 0.0 or math.isinf(eps):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if training and eps == 0.0:
        raise ValueError(
            "eps must be > 0 when normalizing with batch statistics (eps == 0 is allowed only in eval)"
        )
    return eps


def check_momentum(momentum: Any) -> float:
    """Return ``momentum`` as a float in [0, 1]."""
    momentum = _real(momentum, "momentum", "a real number in [0, 1]")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum


def _check_count(layout: Layout, need: int, what: str) -> None:
    """ValueError when a channel has fewer than ``need`` values (with no channels, C = 0,
    there is nothing to check: such calls return empty results)."""
    if layout.count < need and layout.c:
        raise ValueError(
            f"{what} needs at least {need} value(s) per channel, got {layout.count} "
            f"(input shape {layout.shape}, channel axis {layout.axis})"
        )


class Checked(NamedTuple):
    """The outcome of validation: the side the arrays live on and the tensor layout;
    ``alias``: an array the call writes (``out``, or on the device running statistics)
    overlaps x other than as x itself, so x must be read from a copy."""

    side: str
    layout: Layout
    eps: float
    momentum: float
    alias: bool = False


_NORM_ARRAYS = ("x", "running_mean", "running_var", "weight", "bias", "out")


def batch_norm_args(
    x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out, min_count=2
) -> Checked:
    """Validate the arguments of :func:`numbabn.batch_norm`.

    ``min_count`` is the number of values per channel training needs in ``x``; the
    distributed functions pass 0 and check the count of the whole batch themselves.
    """
    xi, axis = _check_tensor(x, "x", axis)
    c = xi.shape[axis]
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    training = bool(training)
    side = _one_side(_NORM_ARRAYS, (
        xi.side,
        _vector_side(running_mean, "running_mean", c, writeable=training),
        _vector_side(running_var, "running_var", c, writeable=training),
        _vector_side(weight, "weight", c),
        _vector_side(bias, "bias", c),
        _out_side(out, xi),
    ))
    eps = check_eps(eps, training)
    momentum = check_momentum(momentum)
    layout = _plan(xi.dtype, xi.shape, xi.strides, axis)
    if training:
        _check_count(layout, min_count, "training")
    elif running_mean is None:
        raise ValueError("eval mode (training=False) needs running_mean and running_var")
    alias = False
    if out is not None or (training and running_mean is not None and side == DEVICE):
        vectors = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
        alias = _alias.check(x, out, vectors, training, side == DEVICE)
    return Checked(side, layout, eps, momentum, alias)


def batch_stats_args(x, axis, min_count=1) -> Checked:
    """Validate the arguments of :func:`numbabn.batch_stats`."""
    xi, axis = _check_tensor(x, "x", axis)
    layout = _plan(xi.dtype, xi.shape, xi.strides, axis)
    _check_count(layout, min_count, "batch statistics")
    return Checked(xi.side, layout, 0.0, 0.0)


_FORWARD_ARRAYS = ("x", "weight", "bias")


def batch_norm_forward_args(x, weight, bias, eps, axis, min_count=2) -> Checked:
    """Validate the arguments of :func:`numbabn.batch_norm_forward`."""
    xi, axis = _check_tensor(x, "x", axis)
    c = xi.shape[axis]
    side = _one_side(_FORWARD_ARRAYS, (
        xi.side, _vector_side(weight, "weight", c), _vector_side(bias, "bias", c)
    ))
    eps = check_eps(eps, True)
    layout = _plan(xi.dtype, xi.shape, xi.strides, axis)
    _check_count(layout, min_count, "training")
    return Checked(side, layout, eps, 0.0)


_BACKWARD_ARRAYS = ("x", "dy", "mean", "invstd", "weight")


def batch_norm_backward_args(dy, x, mean, invstd, weight, axis, training, min_count=None) -> Checked:
    """Validate the arguments of :func:`numbabn.batch_norm_backward`."""
    xi, axis = _check_tensor(x, "x", axis)
    if type(dy) is np.ndarray and dy.dtype in _dtypes.FLOAT_SET:  # the common case
        dy_side, dy_dtype, dy_shape = HOST, dy.dtype, dy.shape
    else:
        dyi = describe(dy, "dy")
        _check_float(dyi, "dy")
        dy_side, dy_dtype, dy_shape = dyi.side, dyi.dtype, dyi.shape
    if dy_shape != xi.shape:
        raise ValueError(f"dy has shape {dy_shape} but x has shape {xi.shape}")
    if dy_dtype != xi.dtype:
        raise TypeError(f"dy has dtype {dy_dtype} but x has dtype {xi.dtype}")
    c = xi.shape[axis]
    side = _one_side(_BACKWARD_ARRAYS, (
        xi.side, dy_side, _vector_side(_given(mean, "mean"), "mean", c),
        _vector_side(_given(invstd, "invstd"), "invstd", c), _vector_side(weight, "weight", c),
    ))
    layout = _plan(xi.dtype, xi.shape, xi.strides, axis)
    if min_count is None:  # eval: constant statistics, so an empty batch is fine
        min_count = 2 if training else 0
    _check_count(layout, min_count, "training backward" if training else "backward")
    return Checked(side, layout, 0.0, 0.0)


def fold_args(layer_weight, layer_bias, running_mean, running_var, weight, bias, eps, axis):
    """Check ``numbabn.fold``'s arguments; returns (side, channel axis, eps, the layer
    weight's dtype)."""
    info = describe(layer_weight, "layer_weight")
    _check_float(info, "layer_weight")
    if not info.shape:
        raise ValueError("layer_weight must have at least 1 dimension")
    axis = normalize_axis(axis, len(info.shape))
    c = info.shape[axis]
    names = ("layer_weight", "layer_bias", "running_mean", "running_var", "weight", "bias")
    vectors = (layer_bias, _given(running_mean, "running_mean"), _given(running_var, "running_var"))
    sides = [info.side] + [_vector_side(v, n, c) for v, n in zip(vectors + (weight, bias), names[1:])]
    return _one_side(names, tuple(sides)), axis, check_eps(eps, False), info.dtype


def stream_kwargs(side: str, stream: Any) -> dict:
    """``{"stream": stream}`` for the GPU backend; TypeError for a stream with host arrays."""
    if stream is None:
        return {}
    if side != DEVICE:
        raise TypeError("stream= applies to CUDA arrays only; these arrays are NumPy arrays")
    return {"stream": stream}
