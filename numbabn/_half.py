"""float16 loads and stores for CPU kernels.

Numba's CPU target has no float16 type, so float16 arrays reach the kernels as uint16
views of the same bytes. ``load`` widens an element to the kernel's compute type
(float16 -> float32 through LLVM's ``fpext half``, which vectorizes to ``vcvtph2ps``);
``store`` narrows a compute value to the element type of the destination array
(round to nearest even, as NumPy's ``astype``). For float32 and float64 arrays both
are the identity, so one kernel source serves all three dtypes.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def _half_bits_to_float32(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float32_to_half_bits(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def load(value):
    """Widen one array element to its compute type (float32 or float64)."""


def store(value, like):
    """Convert a compute value to the element type of array ``like``."""


@overload(load, inline="always")
def _load(value):
    if value == types.uint16:
        return lambda value: _half_bits_to_float32(value)
    if isinstance(value, types.Float):
        return lambda value: value
    return None


@overload(store, inline="always")
def _store(value, like):
    if like.dtype == types.uint16:
        return lambda value, like: _float32_to_half_bits(types.float32(value))
    if isinstance(like.dtype, types.Float):
        target = like.dtype
        return lambda value, like: target(value)
    return None


def zero(a):
    """0 in the compute type of array ``a``'s elements (float32 or float64)."""


@overload(zero, inline="always")
def _zero(a):
    if a.dtype in (types.uint16, types.float32):
        return lambda a: types.float32(0.0)
    if a.dtype == types.float64:
        return lambda a: 0.0
    return None
