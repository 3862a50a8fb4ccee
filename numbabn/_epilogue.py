"""Arguments of the fused epilogues, y = act(bn(x) + residual): checked here, before a
backend writes anything (as ``_validate`` does for the rest of a call)."""

from __future__ import annotations

from typing import Any

from . import _validate


def relu(activation: Any) -> bool:
    """Whether ``activation`` asks for the ReLU; ValueError for one not supported."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def like_x(a: Any, name: str, x: Any, side: str) -> None:
    """Check an array that must have x's shape and dtype (any strides) and live on
    x's side: ValueError for another shape, TypeError for another dtype or side."""
    info = _validate.describe(a, name)
    xi = _validate.describe(x, "x")
    if info.dtype != xi.dtype:
        raise TypeError(f"{name} has dtype {info.dtype} but x has dtype {xi.dtype}")
    if info.shape != xi.shape:
        raise ValueError(f"{name} has shape {info.shape} but x has shape {xi.shape}")
    _validate._one_side(("x", name), (side, info.side))


def forward(side: str, x: Any, residual: Any, activation: Any) -> dict:
    """The backend's epilogue arguments of a forward call, checked: {} without an
    epilogue, else {"residual": ..., "relu": ...}."""
    if residual is None and activation is None:
        return {}
    if residual is not None:
        like_x(residual, "residual", x, side)
    return {"residual": residual, "relu": relu(activation)}


def backward(side: str, x: Any, activation: Any, y: Any) -> Any:
    """The forward output a ReLU backward needs (None without an activation), checked."""
    if not relu(activation):
        return None
    if y is None:
        raise ValueError("the backward of activation='relu' needs y, the forward's output")
    like_x(y, "y", x, side)
    return y
