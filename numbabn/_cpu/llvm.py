"""LLVM IR helpers for the CPU kernels' hand-written vector loops (``vector``).

LLVM's loop vectorizer does not emit non-temporal stores, nor the fused loops that
write one channel while they sum the next, so those loops are built here as IR: vector
loads that widen float16 and bfloat16 (which arrive as bits, as in ``_half``), 32-byte
``!nontemporal`` stores, loops with phi values, fused multiply-adds, prefetches. The
arithmetic of the elementwise formulas comes from ``formulas`` itself (:func:`formula`
evaluates it on IR values), with the ``contract`` flag of the njit paths, so both give
bitwise the same results.

Also the index helpers the njit traversals share with those loops: :func:`bounds` (the
aligned whole-vector part of a row that a streamed loop may write; the caller writes the
rest with plain stores and calls :func:`fence` once per task) and :func:`line_blocks`;
and :func:`flat_view`, the 1-D view of a C-contiguous array that their flat rows walk.

Numba's on-disk cache keys a kernel on its own source file only: the test suite keys
the cache on this package's sources (``tests/conftest.py``); by hand, delete
``numbabn/_cpu/__pycache__/*.nb[ci]`` after editing a module that others inline.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

from .._half import bf16_narrow_ir, bf16_widen_ir
from . import formulas
from .tuning import X86_64

VECTOR_BYTES = 32
LINE_BYTES = 64


def item_bytes(a):
    """The size of array ``a``'s elements, as a compile-time constant (``a.itemsize`` is
    read at run time, and dividing by it costs a division instruction per use)."""


@overload(item_bytes, jit_options=formulas.INLINED)
def _item_bytes(a):
    size = a.dtype.bitwidth // 8
    return lambda a: size


@njit(inline="always")
def _boundary(y, nbytes):
    """(index of the first multiple of ``nbytes`` in 1-D contiguous array ``y``, at most
    its size; values per ``nbytes``), or (0, 0) for an array whose address is not a
    multiple of its item size."""
    item = item_bytes(y)
    if y.ctypes.data % item:
        return 0, 0
    per = nbytes // item
    return min((-(y.ctypes.data // item)) % per, y.size), per


@njit(inline="always")
def bounds(y):
    """(start, stop): the aligned whole-vector part of 1-D contiguous array ``y``;
    (0, 0) for an array whose address is not a multiple of its item size."""
    start, per = _boundary(y, VECTOR_BYTES)
    if per == 0:
        return 0, 0
    return start, start + (y.size - start) // per * per


@njit(inline="always")
def line_blocks(y):
    """(start, blocks): the index of the first cache-line boundary of 1-D contiguous
    array ``y`` and the number of whole lines from there, for loops that stream a line
    at a time; (0, 0) for an array whose address is not a multiple of its item size.
    Lines written whole by consecutive stores leave the write-combining buffers at
    once; with a row that starts mid-line, each line took the end of one block and
    the start of the next, and the fused rows (below) ran 1.3x slower."""
    start, per = _boundary(y, LINE_BYTES)
    if per == 0:
        return 0, 0
    return start, (y.size - start) // per


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (float64), whatever the fast-math flags of the caller."""
    if not all(t == types.float64 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return fma_ir(builder, *args)

    return types.float64(types.float64, types.float64, types.float64), codegen


@intrinsic
def flat_view(typingctx, a):
    """The 1-D view of C-contiguous array ``a``: ``a.reshape(-1)`` without numba's
    reshape, whose shape check compiles a function of its own in every process (0.2 s
    of a first call)."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None
    flat_type = a.copy(ndim=1)

    def codegen(context, builder, signature, args):
        src = make_array(a)(context, builder, args[0])
        view = make_array(flat_type)(context, builder)
        populate_array(
            view, data=src.data, shape=[src.nitems], strides=[src.itemsize],
            itemsize=src.itemsize, meminfo=src.meminfo, parent=src.parent,
        )
        return impl_ret_borrowed(context, builder, flat_type, view._getvalue())

    return flat_type(a), codegen


@intrinsic
def fence(typingctx):
    """Order this thread's streamed stores before anything it does next."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


# --- IR helpers ------------------------------------------------------------------------


def _is_half(dtype) -> bool:
    return dtype == types.uint16


def _is_bf16(dtype) -> bool:
    return dtype == types.int16  # bfloat16 bits (``_half``)


class Vectors:
    """Vector loads, conversions and stores of ``lanes`` elements at index ``i``."""

    def __init__(self, context, builder, lanes, compute):
        self.context, self.builder, self.lanes = context, builder, lanes
        self.ct = context.get_value_type(compute)
        self.vct = ir.VectorType(self.ct, lanes)
        self.compute = compute

    def _pointer(self, aty, arr, i):
        elem = ir.HalfType() if _is_half(aty.dtype) else self.context.get_value_type(aty.dtype)
        data = self.context.make_array(aty)(self.context, self.builder, arr).data
        vec = ir.VectorType(elem, self.lanes)
        return self.builder.bitcast(self.builder.gep(data, [i]), vec.as_pointer()), vec

    def load(self, aty, arr, i):
        ptr, vec = self._pointer(aty, arr, i)
        align = self.context.get_abi_sizeof(self.context.get_value_type(aty.dtype))
        v = self.builder.load(ptr, align=align)
        if _is_bf16(aty.dtype):
            v = bf16_widen_ir(self.builder, v)
        if v.type.element != self.ct:
            v = self.builder.fpext(v, self.vct)
        return v

    def narrow(self, aty, v, vec):
        """Compute values ``v`` as the elements (vector type ``vec``) of ``aty``."""
        if _is_bf16(aty.dtype):
            return bf16_narrow_ir(self.builder, v)
        return v if vec.element == self.ct else self.builder.fptrunc(v, vec)

    def param(self, pty, value, i):
        """A per-channel parameter: a splatted scalar, a vector load of an array, or
        (``pty`` None) a vector loaded before the loop."""
        if pty is None:
            return value
        if isinstance(pty, types.Array):
            return self.load(pty, value, i)
        scalar = self.context.cast(self.builder, value, pty, self.compute)
        v = ir.Constant(self.vct, ir.Undefined)
        for k in range(self.lanes):
            v = self.builder.insert_element(v, scalar, ir.Constant(ir.IntType(32), k))
        return v

    def store_nt(self, aty, arr, i, v):
        ptr, vec = self._pointer(aty, arr, i)
        v = self.narrow(aty, v, vec)
        if _is_half(aty.dtype):  # (stored as its bits, as bfloat16's are)
            bits = ir.VectorType(ir.IntType(16), vec.count)
            v, ptr = self.builder.bitcast(v, bits), self.builder.bitcast(ptr, bits.as_pointer())
        if _is_half(aty.dtype) or _is_bf16(aty.dtype):
            v = _opaque(self.builder, v)
        st = self.builder.store(v, ptr, align=VECTOR_BYTES)
        st.set_metadata("nontemporal", self.builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))

    def sub(self, a, b):
        return self.builder.fsub(a, b, flags=("contract",))

    def mul(self, a, b):
        return self.builder.fmul(a, b, flags=("contract",))

    def add(self, a, b):
        return self.builder.fadd(a, b, flags=("contract",))


def _opaque(builder, v):
    """``v`` through an empty inline asm (x86 only): x86 code generation drops the
    non-temporal hint of 16-bit vector stores it folds with a conversion or meets as
    ``half`` (docs/performance.md, "Fused epilogue and bfloat16")."""
    if not X86_64:
        return v
    return builder.call(ir.InlineAsm(ir.FunctionType(v.type, [v.type]), "", "=x,0"), [v])


def loop(builder, start, stop, step, inits, body):
    """for (i = start; i < stop; i += step) values = body(i, values), with ``inits``
    the values before the loop; returns the values after it."""
    i64 = ir.IntType(64)
    entry = builder.block
    cond = builder.append_basic_block("loop.cond")
    loop = builder.append_basic_block("loop.body")
    done = builder.append_basic_block("loop.done")
    builder.branch(cond)
    builder.position_at_end(cond)
    i = builder.phi(i64)
    i.add_incoming(start, entry)
    phis = []
    for value in inits:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        phis.append(phi)
    builder.cbranch(builder.icmp_signed("<", i, stop), loop, done)
    builder.position_at_end(loop)
    new = body(i, phis)
    end = builder.block
    i.add_incoming(builder.add(i, ir.Constant(i64, step)), end)
    for phi, value in zip(phis, new):
        phi.add_incoming(value, end)
    builder.branch(cond)
    builder.position_at_end(done)
    return phis


def vector_loop(builder, start, stop, step, body):
    """for (i = start; i < stop; i += step) body(i)"""
    loop(builder, start, stop, step, [], lambda i, _: body(i) or [])


def compute_type(consts):
    """The compute type of a tuple of constants (scalars, or arrays of them)."""
    last = consts.types[-1]
    return last.dtype if isinstance(last, types.Array) else last


def contiguous(*args) -> bool:
    """The vector loops index raw data pointers: every array (tuples' members
    included) must be C-contiguous."""
    members = [m for a in args for m in (a.types if isinstance(a, types.BaseTuple) else (a,))]
    return all(a.layout == "C" for a in members if isinstance(a, types.Array))


def lanes_of(context, out):
    return VECTOR_BYTES // context.get_abi_sizeof(context.get_value_type(out.dtype))


def store_plain(vec, aty, arr, i, v):
    ptr, vtype = vec._pointer(aty, arr, i)
    v = vec.narrow(aty, v, vtype)
    align = vec.context.get_abi_sizeof(vec.context.get_value_type(aty.dtype))
    vec.builder.store(v, ptr, align=align)


def fma_ir(builder, a, b, c):
    """a * b + c rounded once (LLVM's fma, scalars or vectors)."""
    t = a.type
    suffix = f"v{t.count}f64" if isinstance(t, ir.VectorType) else "f64"  # float64 only
    fnty = ir.FunctionType(t, [t, t, t])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.{suffix}")
    return builder.call(fn, [a, b, c])


def prefetch(vec, aty, arr, i):
    """Ask for the cache line holding element ``i`` of contiguous array ``arr`` (type
    ``aty``), for reading, into L2 (x86 ``prefetcht1``). A hint: an address outside
    the array is allowed and never faults."""
    builder = vec.builder
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    ptr = builder.bitcast(vec._pointer(aty, arr, i)[0], i8p)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    # (read, locality 2 of 0-3, data cache)
    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])


def splat(builder, value, vtype):
    v = ir.Constant(vtype, ir.Undefined)
    for k in range(vtype.count):
        v = builder.insert_element(v, value, ir.Constant(ir.IntType(32), k))
    return v


class _Value:
    """An IR vector whose arithmetic emits the vector loops' instructions (``contract``
    flag), so that :func:`formula` runs the formulas of ``formulas`` on IR values."""

    __slots__ = ("vec", "v")

    def __init__(self, vec, v):
        self.vec, self.v = vec, v

    def __sub__(self, other):
        return _Value(self.vec, self.vec.sub(self.v, other.v))

    def __add__(self, other):
        return _Value(self.vec, self.vec.add(self.v, other.v))

    def __mul__(self, other):
        return _Value(self.vec, self.vec.mul(self.v, other.v))


def _relu(vec, v):
    """``_channel.relu`` (zero if v < zero else v: NaN kept) on a vector."""
    zero = ir.Constant(vec.vct, None)
    return vec.builder.select(vec.builder.fcmp_ordered("<", v, zero), zero, v)


def load_operand(vec, ty, val, i):
    """The vector at ``i`` of an operand: an array's, or of a pair (dy, y) the gradient
    through the ReLU whose output is y (``_channel.relu_grad``: g if y > zero else zero,
    which a NaN y masks)."""
    if not isinstance(ty, types.BaseTuple):
        return vec.load(ty, val, i)
    (gt, gv), (yt, yv) = unpack(vec.builder, ty, val)
    zero = ir.Constant(vec.vct, None)
    positive = vec.builder.fcmp_ordered(">", vec.load(yt, yv, i), zero)
    return vec.builder.select(positive, vec.load(gt, gv, i), zero)


def formula(vec, g, x, consts, i):
    """The elementwise formula of the vector at ``i``: normalize of ``x`` when ``g`` is
    None, else grad_input of (``g``, ``x``) ((type, value) pairs; operands as in
    ``formulas``: masked pairs, normalize's epilogue triple); ``consts``: (type, value)
    pairs as :meth:`Vectors.param` takes them."""
    xty, xval = x
    if isinstance(xty, types.BaseTuple) and len(xty) == 3:  # (x, residual, zero)
        (xt, xv), (zt, zv), (rt, _) = unpack(vec.builder, xty, xval)
        v = formula(vec, g, (xt, xv), consts, i)
        if not isinstance(zt, types.NoneType):
            v = vec.add(v, vec.load(zt, zv, i))
        return v if isinstance(rt, types.NoneType) else _relu(vec, v)
    k = [_Value(vec, vec.param(t, v, i)) for t, v in consts]
    xv = _Value(vec, load_operand(vec, xty, xval, i))
    if g is None:
        return formulas.normalize(xv, *k).v
    return formulas.grad_input(_Value(vec, load_operand(vec, *g, i)), xv, *k).v


def unpack(builder, tty, tval):
    """The (type, value) pairs of a tuple argument's members."""
    return [(t, builder.extract_value(tval, r)) for r, t in enumerate(tty.types)]


def arrays_of(builder, ty, val):
    """The (type, value) pairs of an operand's arrays: the array, or a tuple's members."""
    return unpack(builder, ty, val) if isinstance(ty, types.BaseTuple) else [(ty, val)]
