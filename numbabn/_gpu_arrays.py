"""Device arrays for the GPU backend: zero-copy views, device copies, allocation.

Host code works with strided 3-D ``(N, C, L)`` or 2-D ``(M, C)`` views of the caller's
memory (``kernel_view``); NCL kernels receive theirs as a flat 1-D view plus element
strides (``operands``). Views are cached by address (``_view``). Arrays whose strides
cannot be walked that way are copied once on the device into the layout's memory order
(``input_view``), and such an ``out`` is written through a device copy (``output_view``
then ``copy_strided``). Results go
back as the caller's kind of array: fresh arrays for a PyTorch or CuPy caller come
from that library's allocator (its memory pool, its accounting; numba's own
allocation and release can synchronize the device), numba device arrays otherwise
(``allocate``). PyTorch tensors that require grad are read through ``detach()``:
numbabn computes its own gradients and records nothing for autograd. Under the CUDA
simulator, "device" memory is host memory; ``numba_array`` wraps foreign arrays there
too. numba has no bfloat16: every numba view of bfloat16 memory is an int16 view of its
bits (the kernels' form, see ``_half``), and goes back to the caller as bfloat16
(``as_kind_of``); int16 data is refused before it gets here, so int16 means bfloat16.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
from numba import config, cuda

from ._dtypes import bf16, is_bf16, torch_dtype
from ._gpu_launch import launcher
from ._gpu_reduce import BLOCK
from ._validate import Layout, cuda_interface, describe

_SIM = bool(config.ENABLE_CUDASIM)
_BITS = np.dtype(np.int16)


def _bits_dtype(dtype):
    """The dtype of numba's views of data of ``dtype``."""
    return _BITS if is_bf16(dtype) else dtype


def _element_dtype(dtype):
    """The caller's dtype of data that numba views as ``dtype`` (``_bits_dtype``'s inverse)."""
    return bf16() if dtype == _BITS else dtype


def _bits(a):
    """A numba array as the kernels take it: bfloat16 as int16 bits."""
    return a.view(_BITS) if is_bf16(a.dtype) else a


def numba_array(a):
    """A numba device array over the whole of ``a``'s memory (no copy)."""
    if getattr(a, "__cuda_ndarray__", False) is True:
        return _bits(a)
    if _SIM:
        return _simulator_array(a)
    info = describe(a, "array")
    if min(info.strides, default=0) < 0:
        return strided(a, info.shape, info.strides)
    return _view(_address(a), tuple(info.shape), tuple(info.strides), info.dtype)


def _simulator_array(a):
    """Under the CUDA simulator, "device" memory is host memory and there is no
    ``as_cuda_array``: wrap the memory that ``__cuda_array_interface__`` points to."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    info = describe(a, "array")
    pointer = a.__cuda_array_interface__["data"][0]
    extents = [(e - 1) * s for e, s in zip(info.shape, info.strides) if e > 0]
    low = sum(min(0, x) for x in extents)
    size = sum(max(0, x) for x in extents) - low + info.dtype.itemsize
    dtype = _bits_dtype(info.dtype)
    if len(extents) < len(info.shape):  # an empty array
        return FakeCUDAArray(np.empty(info.shape, dtype))
    memory = (ctypes.c_char * size).from_address(pointer + low)
    return FakeCUDAArray(
        np.ndarray(info.shape, dtype, buffer=memory, offset=-low, strides=info.strides)
    )


def strided(a, shape, strides, info=None):
    """A view of ``a``'s memory with the given shape and byte strides (``info``: ``a``'s
    ArrayInfo, if the caller has it)."""
    if _SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = np.lib.stride_tricks.as_strided(numba_array(a)._ary, shape, strides)
        return FakeCUDAArray(host)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    if getattr(a, "__cuda_ndarray__", False) is True:  # a numba array: no need to describe it
        a = _bits(a)
        if _borrowed(a):  # a cached view (non-negative strides): another one
            return _view(a.device_ctypes_pointer.value or 0, tuple(shape), tuple(strides), a.dtype)
        # The view holds the memory: numba's allocations (results and temporaries) are
        # freed when their last array goes. With negative strides numba places the
        # data pointer.
        return DeviceNDArray(shape, strides, a.dtype, gpu_data=a.gpu_data)
    info = info or describe(a, "array")
    if min(info.strides, default=0) < 0:  # rare: let numba place the data pointer
        base = cuda.as_cuda_array(a)
        return DeviceNDArray(shape, strides, _bits_dtype(base.dtype), gpu_data=base.gpu_data)
    return _view(_address(a), tuple(shape), tuple(strides), info.dtype)


def _address(a) -> int:
    """The device address of element 0 of a foreign CUDA array (non-negative strides;
    numba arrays are viewed through their own pointer, see ``strided``)."""
    if type(a).__module__.startswith("torch"):
        return a.data_ptr()
    return cuda_interface(a)["data"][0]


# Views of device memory by (address, shape, strides, dtype). Building a numba device
# array costs tens of microseconds of Python; the same memory comes back call after
# call (parameters, running statistics, and the addresses a caching allocator hands
# out again). A view does not own or keep alive the memory it describes: it is only
# made of memory that a caller's array holds during a call (PyTorch and CuPy arrays,
# and arrays from their allocators), and never returned. Memory that numba allocated
# is viewed through ``strided``'s other branch, which holds it.
_VIEWS: dict = {}
_VIEW_LIMIT = 1024
_BORROWED = None


def _borrowed_pointer():
    """The class of the memory pointers of cached views (made on first use: the
    driver module is not needed under the simulator)."""
    global _BORROWED
    if _BORROWED is None:
        from numba.cuda.cudadrv import driver

        class BorrowedPointer(driver.MemoryPointer):
            """Device memory that a caller's array owns and keeps alive."""

        _BORROWED = BorrowedPointer
    return _BORROWED


def _borrowed(a) -> bool:
    """Whether a numba array is a cached view of borrowed memory (see ``_view``)."""
    return _BORROWED is not None and isinstance(a.gpu_data, _BORROWED)


def _view(address, shape, strides, dtype):
    dtype = _bits_dtype(dtype)
    key = (address, shape, strides, dtype.char)
    view = _VIEWS.get(key)
    if view is None:
        from numba.cuda.cudadrv import driver
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        size = sum((e - 1) * s for e, s in zip(shape, strides)) + dtype.itemsize
        if 0 in shape:
            size = 0
        memory = _borrowed_pointer()(
            cuda.current_context(), driver.binding.CUdeviceptr(address), size=size, owner=None
        )
        view = DeviceNDArray(shape, strides, dtype, gpu_data=memory)
        if len(_VIEWS) >= _VIEW_LIMIT:
            _VIEWS.clear()
        _VIEWS[key] = view
    return view


def _merge(shape, strides):
    """(extent, stride) of several axes walked as one, or None if they cannot be."""
    axes = _compress(shape, strides)
    if len(axes) > 1:
        return None
    return axes[0] if axes else (1, 0)


def _view_geometry(info, layout: Layout):
    """(shape, strides) of the kernel view of an array, or None if it has none."""
    ax = layout.axis
    c_stride = info.strides[ax]
    if layout.kind == "ncl":
        pre = _merge(info.shape[:ax], info.strides[:ax])
        post = _merge(info.shape[ax + 1 :], info.strides[ax + 1 :])
        if pre is None or post is None:
            return None
        strides = (pre[1], c_stride, post[1])
        item = info.dtype.itemsize
        for s in strides:
            if s < 0 or s % item:  # no flat walk
                return None
        return (layout.n, layout.c, layout.l), strides
    rest = _merge(info.shape[:ax] + info.shape[ax + 1 :], info.strides[:ax] + info.strides[ax + 1 :])
    if rest is None:
        return None
    return (layout.n, layout.c), (rest[1], c_stride)


def kernel_view(a, name, layout: Layout):
    """The kernel view of an array whose strides allow one (see ``_view_geometry``)."""
    return strided(a, *_view_geometry(describe(a, name), layout))


def operands(view, layout: Layout) -> tuple:
    """How a kernel view is handed to a kernel: an MC view as it is; an NCL view as a
    flat 1-D view from its element (0, 0, 0) and its element strides (sN, sC, sL)."""
    if layout.kind == "mc":
        return (view,)
    item = view.dtype.itemsize
    (n, c, l), (sn, sc, sl) = view.shape, view.strides
    strides = (sn // item, sc // item, sl // item)
    extent = 1 + (n - 1) * strides[0] + (c - 1) * strides[1] + (l - 1) * strides[2]
    return strided(view, (extent if view.size else 0,), (item,)), strides


def kernel_args(views, layout: Layout) -> tuple:
    """The leading arguments of a kernel that reads ``views``: each view's operands,
    then, for NCL kernels, (N, L)."""
    args = ()
    for v in views:
        args += operands(v, layout)
    return args + ((layout.n, layout.l),) if layout.kind == "ncl" else args


def input_view(a, name, layout: Layout, stream, copy=False):
    """The kernel view of an input; if its strides cannot be walked as (N, C, L) or
    (M, C), or ``copy`` (an output of the call overlaps it), the view of a device copy
    in the layout's memory order."""
    info = describe(a, name)
    geometry = None if copy else _view_geometry(info, layout)
    if geometry is not None:
        return strided(a, *geometry, info)
    _, tmp = empty(layout, info.dtype, stream)
    copy_strided(numba_array(a), tmp, stream)
    return kernel_view(tmp, name, layout)


def output_view(out, layout: Layout, dtype, stream):
    """(kernel view to write, array to copy it into afterwards or None) for ``out``."""
    geometry = _view_geometry(describe(out, "out"), layout)
    if geometry is not None:
        return strided(out, *geometry), None
    _, tmp = empty(layout, dtype, stream)
    return kernel_view(tmp, "out", layout), tmp


def _compress(shape, *strides):
    """Drop axes of extent 1 and merge neighbours that every stride set walks as one."""
    merged = []
    for e, *st in zip(shape, *strides):
        if e == 1:
            continue
        joins = bool(merged)
        if joins:
            for p, q in zip(merged[-1][1:], st):
                joins = joins and p == q * e
        if joins:
            merged[-1] = (merged[-1][0] * e, *st)
        else:
            merged.append((e, *st))
    return merged


@cuda.jit
def copy_4d(src, dst):
    """dst[...] = src[...] for two 4-D arrays of one shape and any strides."""
    n0, n1, n2, n3 = dst.shape
    total = n0 * n1 * n2 * n3
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        i3 = i % n3
        r = i // n3
        i2 = r % n2
        r //= n2
        i1 = r % n1
        dst[r // n1, i1, i2, i3] = src[r // n1, i1, i2, i3]


def copy_strided(src, dst, stream) -> None:
    """dst[...] = src[...] on the device, any strides (numba device arrays)."""
    axes = _compress(src.shape, src.strides, dst.strides)
    if len(axes) > 4:  # rare: peel the leading axis
        for i in range(src.shape[0]):
            copy_strided(src[i], dst[i], stream)
        return
    axes = [(1, 0, 0)] * (4 - len(axes)) + axes
    shape = tuple(a[0] for a in axes)
    total = math.prod(shape)
    if total == 0:
        return
    blocks = max(1, min(-(-total // BLOCK), 65535))
    launcher(copy_4d, blocks, BLOCK, stream)(
        strided(src, shape, tuple(a[1] for a in axes)),
        strided(dst, shape, tuple(a[2] for a in axes)),
    )


def empty(layout: Layout, dtype, stream, like=None):
    """A fresh array in the memory order of the layout (channels-last stays so); see
    ``allocate`` for what it returns."""
    shape = layout.shape
    item = np.dtype(dtype).itemsize
    if layout.kind == "ncl":
        moved = shape
    else:
        ax = layout.axis
        moved = shape[:ax] + shape[ax + 1 :] + (shape[ax],)
    dense = [item] * len(moved)
    for i in range(len(moved) - 2, -1, -1):
        dense[i] = dense[i + 1] * max(moved[i + 1], 1)
    if layout.kind == "ncl":
        strides = tuple(dense)
    else:
        strides = tuple(dense[:ax]) + (dense[-1],) + tuple(dense[ax:-1])
    return allocate(shape, strides, dtype, like, stream)


def allocate(shape, strides, dtype, like, stream):
    """A fresh array with the given shape and byte strides (a permutation of dense C
    order), as (the caller's array or None, a numba view of the same memory).

    PyTorch and CuPy callers (``like``) get memory from their library's allocator,
    returned as the first item; otherwise that is None and the memory is numba's
    (``as_result`` gives either as the caller's kind)."""
    library = type(like).__module__.split(".")[0] if like is not None else None
    dtype = np.dtype(dtype)
    item = dtype.itemsize
    if math.prod(shape) == 0 or library not in ("torch", "cupy") or _SIM:
        return None, _numba_allocate(shape, strides, dtype, stream)
    if library == "torch":
        import torch

        t = torch.empty_strided(
            shape, tuple([s // item for s in strides]), dtype=torch_dtype(_element_dtype(dtype)),
            device=like.device
        )
        return t, _view(t.data_ptr(), tuple(shape), tuple(strides), dtype)
    import cupy

    with cupy.cuda.Device(like.device.id):
        base = cupy.empty(math.prod(shape), dtype)
    a = cupy.lib.stride_tricks.as_strided(base, shape, strides)
    return a, strided(a, shape, strides)


def _numba_allocate(shape, strides, dtype, stream):
    dtype = _bits_dtype(dtype)
    if list(strides) == sorted(strides, reverse=True):  # C order (the common case)
        return cuda.device_array(tuple(shape), dtype, stream=stream)
    order = sorted(range(len(shape)), key=lambda i: -strides[i])
    base = cuda.device_array(tuple(shape[i] for i in order), dtype, stream=stream)
    if order == list(range(len(shape))):
        return base
    inverse = [order.index(i) for i in range(len(shape))]
    return strided(base, shape, tuple(base.strides[i] for i in inverse))


def as_result(fresh, like, index=None):
    """A fresh array from ``allocate`` (or its row ``index``) as ``like``'s kind."""
    native, view = fresh
    if native is not None:
        return native if index is None else native[index]
    return as_kind_of(like, view if index is None else view[index])


def as_kind_of(template, arr):
    """Return numba array ``arr`` as the same kind of array as ``template`` (zero copy;
    None: as it is), int16 bits as bfloat16."""
    bits = arr.dtype == _BITS
    module = type(template).__module__.split(".")[0]
    if module == "torch":
        import torch

        t = torch.as_tensor(arr, device=template.device)
        return t.view(torch.bfloat16) if bits else t
    arr = arr.view(bf16()) if bits else arr
    if module == "cupy":
        import cupy

        return cupy.asarray(arr)
    return arr
