"""float16 and bfloat16 loads and stores for CPU kernels.

Numba's CPU target has neither type, so float16 arrays reach the kernels as uint16
views of the same bytes, and bfloat16 arrays (``ml_dtypes.bfloat16``) as int16 views.
``load`` widens an element to the kernel's compute type, float32 (float16 through
LLVM's ``fpext half``, which vectorizes to ``vcvtph2ps``; bfloat16 by moving its bits
to the top of a float32's); ``store`` narrows a compute value to the element type of the
destination array (round to nearest even, as NumPy's and ml_dtypes' ``astype``; a NaN
stays a NaN). For float32 and float64 arrays both are the identity, so one kernel
source serves every dtype. The bfloat16 conversions are IR builders shared with the
vector loops (``_cpu.llvm``), scalars or vectors alike.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


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


def _conversion(source, target, build):
    """An intrinsic converting one ``source`` value to ``target``, its IR made by
    ``build(builder, value)``."""

    def convert(typingctx, value):
        if value != source:
            return None

        def codegen(context, builder, signature, args):
            return build(builder, args[0])

        return target(source), codegen

    return intrinsic(convert)


def _half_widen_ir(builder, bits):
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())


def _half_narrow_ir(builder, value):
    return builder.bitcast(builder.fptrunc(value, ir.HalfType()), ir.IntType(16))


_half_bits_to_float32 = _conversion(types.uint16, types.float32, _half_widen_ir)
_float32_to_half_bits = _conversion(types.float32, types.uint16, _half_narrow_ir)
_bf16_bits_to_float32 = _conversion(types.int16, types.float32, bf16_widen_ir)
_float32_to_bf16_bits = _conversion(types.float32, types.int16, bf16_narrow_ir)


def load(value):
    """Widen one array element to its compute type (float32 or float64)."""


def store(value, like):
    """Convert a compute value to the element type of array ``like``."""


@overload(load, inline="always")
def _load(value):
    if value == types.uint16:
        return lambda value: _half_bits_to_float32(value)
    if value == types.int16:
        return lambda value: _bf16_bits_to_float32(value)
    if isinstance(value, types.Float):
        return lambda value: value
    return None


@overload(store, inline="always")
def _store(value, like):
    if like.dtype == types.uint16:
        return lambda value, like: _float32_to_half_bits(types.float32(value))
    if like.dtype == types.int16:
        return lambda value, like: _float32_to_bf16_bits(types.float32(value))
    if isinstance(like.dtype, types.Float):
        target = like.dtype
        return lambda value, like: target(value)
    return None


def zero(a):
    """0 in the compute type of array ``a``'s elements (float32 or float64)."""


@overload(zero, inline="always")
def _zero(a):
    if a.dtype in (types.uint16, types.int16, types.float32):
        return lambda a: types.float32(0.0)
    if a.dtype == types.float64:
        return lambda a: 0.0
    return None
