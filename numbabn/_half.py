"""float16 and bfloat16 loads and stores for the CPU and GPU kernels.

Numba's CPU target has neither type, so float16 arrays reach the CPU kernels as uint16
views of the same bytes, and bfloat16 arrays (``ml_dtypes.bfloat16``) as int16 views;
the GPU kernels take float16 as it is and bfloat16 as int16 views too.
``load`` widens an element to the kernel's compute type, float32 (float16 through
LLVM's ``fpext half``, which vectorizes to ``vcvtph2ps``; bfloat16 by moving its bits
to the top of a float32's); ``store`` narrows a compute value to the element type of the
destination array (round to nearest even, as NumPy's and ml_dtypes' ``astype``; a NaN
stays a NaN). For float32 and float64 arrays both are the identity, so one kernel
source serves every dtype. They are intrinsics of plain LLVM IR, which both targets
compile; the bfloat16 conversions are IR builders shared with the vector loops
(``_cpu.llvm``), scalars or vectors alike."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._dtypes import bf16


def _like(value, bits: int, constant: int):
    """An integer constant of ``bits`` bits, splatted if ``value`` is a vector."""
    scalar = ir.IntType(bits)
    if isinstance(value.type, ir.VectorType):
        return ir.Constant(ir.VectorType(scalar, value.type.count), [constant] * value.type.count)
    return ir.Constant(scalar, constant)


def _retype(value, element):
    """``value``'s type with ``element`` as its (vector) element type."""
    if isinstance(value.type, ir.VectorType):
        return ir.VectorType(element, value.type.count)
    return element


def bf16_widen_ir(builder, bits):
    """bfloat16 bits (i16, or a vector of them) to float32: the top half of its bits."""
    if isinstance(bits.type, ir.VectorType):  # each between zeros: one shuffle on x86
        n = bits.type.count
        picks = [k // 2 + (n if k % 2 else 0) for k in range(2 * n)]  # (little-endian)
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 2 * n), picks)
        pairs = builder.shuffle_vector(ir.Constant(bits.type, None), bits, mask)
        return builder.bitcast(pairs, ir.VectorType(ir.FloatType(), n))
    wide = builder.zext(bits, _retype(bits, ir.IntType(32)))
    return builder.bitcast(builder.shl(wide, _like(wide, 32, 16)), _retype(bits, ir.FloatType()))


def bf16_narrow_ir(builder, value):
    """float32 (a scalar or vector) to bfloat16 bits, rounded to nearest even; a NaN
    keeps its sign and becomes quiet."""
    i = builder.bitcast(value, _retype(value, ir.IntType(32)))
    top = builder.lshr(i, _like(i, 32, 16))
    bias = builder.add(builder.and_(top, _like(i, 32, 1)), _like(i, 32, 0x7FFF))
    rounded = builder.lshr(builder.add(i, bias), _like(i, 32, 16))
    quiet = builder.or_(top, _like(i, 32, 0x40))
    nan = builder.fcmp_unordered("uno", value, value)
    return builder.trunc(builder.select(nan, quiet, rounded), _retype(value, ir.IntType(16)))


def _odd_float32_ir(builder, value):
    """float64 to float32 rounded to odd (toward zero, the lowest bit set when inexact):
    a further rounding to nearest of 16 or fewer significant bits (float16, bfloat16) is
    then the one rounding of the float64 value, as NumPy's and ml_dtypes' ``astype``."""
    i32 = ir.IntType(32)
    one = ir.Constant(i32, 1)
    r = builder.fptrunc(value, ir.FloatType())
    back = builder.fpext(r, ir.DoubleType())
    bits = builder.bitcast(r, i32)
    negative = builder.fcmp_ordered("<", value, ir.Constant(ir.DoubleType(), 0.0))
    away = builder.icmp_unsigned("!=", builder.fcmp_ordered(">", back, value), negative)
    other = builder.select(away, builder.sub(bits, one), builder.add(bits, one))
    even = builder.icmp_unsigned("==", builder.and_(bits, one), ir.Constant(i32, 0))
    move = builder.and_(builder.fcmp_ordered("!=", back, value), even)  # (a NaN stays)
    return builder.bitcast(builder.select(move, other, bits), ir.FloatType())


def _half_widen_ir(builder, bits):
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())


def _half_narrow_ir(builder, value):
    return builder.bitcast(builder.fptrunc(value, ir.HalfType()), ir.IntType(16))


# The bit forms of the 16-bit floats: float16 (CPU only) and bfloat16.
_WIDEN = {types.uint16: _half_widen_ir, types.int16: bf16_widen_ir}
_NARROW = {types.uint16: _half_narrow_ir, types.int16: bf16_narrow_ir}


@intrinsic
def load(typingctx, value):
    """Widen one array element to its compute type (float32 or float64)."""
    widen = _WIDEN.get(value)
    if widen is not None:
        return types.float32(value), lambda context, builder, sig, args: widen(builder, args[0])
    if isinstance(value, types.Float):
        return value(value), lambda context, builder, sig, args: args[0]
    return None


@intrinsic
def store(typingctx, value, like):
    """Convert a compute value to the element type of array ``like``."""
    if not isinstance(value, (types.Float, types.Integer)):
        return None
    dtype = like.dtype
    narrow = _NARROW.get(dtype)
    if narrow is None and not isinstance(dtype, types.Float):
        return None
    f32 = types.float32

    def codegen(context, builder, sig, args):
        if narrow is None:
            return context.cast(builder, args[0], value, dtype)
        if value == types.float64:
            return narrow(builder, _odd_float32_ir(builder, args[0]))
        return narrow(builder, context.cast(builder, args[0], value, f32))

    return dtype(value, like), codegen


# The CUDA simulator runs kernels as Python, on NumPy scalars: ``load`` and ``store``
# for it (its kernels see bfloat16 as int16 bits, float16 as float16).


def sim_load(value):
    """``load`` of one NumPy scalar (int16: bfloat16 bits, which need ml_dtypes)."""
    if isinstance(value, np.int16):
        return np.float32(value.view(bf16(load=True)))
    return value


def sim_store(value, like):
    """``store`` into NumPy array ``like``."""
    if like.dtype != np.int16:
        return value
    return np.asarray(value).astype(bf16(load=True)).view(np.int16)[()]
