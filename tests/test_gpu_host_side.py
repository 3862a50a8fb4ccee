"""The host-side machinery of the GPU backend that needs no device: cached kernel
launchers, cached device views, PyTorch tensors described from their attributes.

On a real GPU these run on every call; the CUDA simulator takes other paths (its
kernels keep one configuration, its arrays are host memory), so they are checked
here with stand-ins, in the host test process.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import ON_DEVICE

cuda = pytest.importorskip("numba.cuda")
pytestmark = pytest.mark.skipif(ON_DEVICE, reason="the simulator takes the other paths")


class FakeKernel:
    """Records configurations; warns as numba-cuda does for small grids."""

    def __init__(self):
        self.configured = []

    def __getitem__(self, config):
        from numba.cuda.core.errors import NumbaPerformanceWarning

        warnings.warn(
            NumbaPerformanceWarning("Grid size 1 will likely result in GPU under-utilization"),
            stacklevel=2,
        )
        launch = object()
        self.configured.append((config, launch))
        return launch


class FakeStream:
    def __init__(self, handle):
        self.handle = handle


class NumbaLikeStream(FakeStream):
    def synchronize(self):
        pass


def test_launchers_are_configured_once_per_grid_block_and_stream():
    from numbabn import _gpu_launch

    kernel = FakeKernel()
    s0, s1 = FakeStream(0), FakeStream(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the occupancy warning must not escape
        a = _gpu_launch.launcher(kernel, (3, 2), 256, s0)
        assert _gpu_launch.launcher(kernel, (3, 2), 256, FakeStream(0)) is a  # same handle
        b = _gpu_launch.launcher(kernel, (3, 4), 256, s0)
        c = _gpu_launch.launcher(kernel, (3, 2), 256, s1)
    assert len({id(a), id(b), id(c)}) == 3
    assert [cfg for cfg, _ in kernel.configured] == [((3, 2), 256, s0), ((3, 4), 256, s0), ((3, 2), 256, s1)]


def test_streams_of_other_libraries_are_wrapped_once(monkeypatch):
    from numbabn import _gpu_launch

    made = []
    monkeypatch.setattr(_gpu_launch.cuda, "external_stream", lambda h: made.append(h) or FakeStream(h))
    monkeypatch.setattr(_gpu_launch, "_external", {})

    class TorchLikeStream:
        cuda_stream = 0xBEEF

    class ProtocolStream:
        def __cuda_stream__(self):
            return (0, 0xCAFE)

    class CupyLikeStream:
        __module__ = "cupy.cuda.stream"
        ptr = 0xF00D

    first = _gpu_launch.numba_stream(TorchLikeStream())
    assert _gpu_launch.numba_stream(TorchLikeStream()) is first
    assert made == [0xBEEF] and first.handle == 0xBEEF
    assert _gpu_launch.numba_stream(ProtocolStream()).handle == 0xCAFE
    assert _gpu_launch.numba_stream(CupyLikeStream()).handle == 0xF00D
    own = NumbaLikeStream(5)
    assert _gpu_launch.numba_stream(own) is own


class FakeContext:
    pass


@pytest.mark.parametrize(
    "shape,strides",
    [((4, 3, 10), (120, 40, 4)), ((6, 5), (20, 4)), ((4, 3, 10), (240, 80, 8))]
)
def test_views_point_at_the_given_memory_and_are_cached(shape, strides, monkeypatch):
    from numbabn import _gpu_arrays

    monkeypatch.setattr(_gpu_arrays.cuda, "current_context", lambda: FakeContext())
    monkeypatch.setattr(_gpu_arrays, "_VIEWS", {})
    dtype = np.dtype(np.float32)
    view = _gpu_arrays._view(0x10000, shape, strides, dtype)
    assert view.shape == shape and view.strides == strides and view.dtype == dtype
    assert view.device_ctypes_pointer.value == 0x10000
    span = sum((e - 1) * s for e, s in zip(shape, strides)) + 4
    assert view.gpu_data.size == span
    assert _gpu_arrays._view(0x10000, shape, strides, dtype) is view
    assert _gpu_arrays._view(0x20000, shape, strides, dtype) is not view
    contiguous = strides == tuple(np.empty(shape, dtype).strides)
    assert view._numba_type_.layout == ("C" if contiguous else "A")


def test_view_cache_is_bounded(monkeypatch):
    from numbabn import _gpu_arrays

    monkeypatch.setattr(_gpu_arrays.cuda, "current_context", lambda: FakeContext())
    monkeypatch.setattr(_gpu_arrays, "_VIEWS", {})
    for i in range(_gpu_arrays._VIEW_LIMIT + 10):
        _gpu_arrays._view(0x1000 + 64 * i, (4,), (4,), np.dtype(np.float32))
    assert len(_gpu_arrays._VIEWS) <= _gpu_arrays._VIEW_LIMIT


def test_cuda_tensors_are_described_from_their_attributes():
    torch = pytest.importorskip("torch")
    from numbabn import _validate

    class CudaTensor:  # what numbabn reads of a CUDA tensor
        __module__ = "torch"
        is_cuda = True

        def __init__(self, dtype, shape, strides, requires_grad=False):
            self.dtype, self.shape, self._strides = dtype, torch.Size(shape), strides
            self.requires_grad = requires_grad

        def stride(self):
            return self._strides

        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    info = _validate.describe(CudaTensor(torch.float16, (2, 3, 5), (15, 1, 3), True), "x")
    assert info == _validate.ArrayInfo(_validate.DEVICE, np.dtype(np.float16), (2, 3, 5), (30, 2, 6), True)
    with pytest.raises(TypeError, match="x must be"):  # a dtype numbabn does not take: the interface decides
        _validate.describe(CudaTensor(torch.int32, (2, 3), (3, 1)), "x")
    with pytest.raises(TypeError, match="must be a NumPy array or a CUDA array"):
        _validate.describe(torch.zeros(3), "x")  # a CPU tensor


def test_bfloat16_memory_is_viewed_as_its_bits(monkeypatch):
    """numba has no bfloat16: numbabn's views of bfloat16 memory (a CUDA tensor's, or
    fresh memory from torch's allocator) are int16 views of the same bytes, and go
    back to the caller as bfloat16."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    from numbabn import _gpu_arrays, _validate

    monkeypatch.setattr(_gpu_arrays.cuda, "current_context", lambda: FakeContext())
    monkeypatch.setattr(_gpu_arrays, "_VIEWS", {})
    bf16 = np.dtype(ml_dtypes.bfloat16)
    view = _gpu_arrays._view(0x10000, (4, 3), (12, 2), bf16)
    assert view.dtype == np.int16 and view.strides == (12, 2)
    assert view.device_ctypes_pointer.value == 0x10000
    assert _gpu_arrays.as_kind_of(None, view).dtype == bf16
    t, bits = _gpu_arrays.allocate((4, 3), (6, 2), np.int16, torch.zeros(1), None)
    assert t.dtype == torch.bfloat16 and t.stride() == (3, 1)
    assert bits.dtype == np.int16 and bits.device_ctypes_pointer.value == t.data_ptr()

    class CudaTensor:  # what numbabn reads of a CUDA tensor
        __module__ = "torch"
        is_cuda = True
        dtype, shape, requires_grad = torch.bfloat16, torch.Size((2, 3)), False

        def stride(self):
            return (3, 1)

    info = _validate.describe(CudaTensor(), "x")
    assert info == _validate.ArrayInfo(_validate.DEVICE, bf16, (2, 3), (6, 2), True)
    _validate._check_float(info, "x")  # taken


def _owning_array(shape, dtype, freed):
    """A numba device array that owns (stand-in) memory: releasing it is recorded."""
    from numba.cuda.cudadrv import driver
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = driver.MemoryPointer(
        FakeContext(), driver.binding.CUdeviceptr(0x40000), size=size, finalizer=lambda: freed.append(1)
    )
    return DeviceNDArray(shape, np.empty(shape, dtype).strides, dtype, gpu_data=memory)


def test_views_of_numba_allocations_hold_their_memory(monkeypatch):
    """A channels-last result or a temporary that numba allocates is handed on as a
    permuted view; the view must keep the allocation alive (the H100 run found a
    cached, non-owning view there: its memory was freed under it)."""
    import gc

    from numbabn import _gpu_arrays

    monkeypatch.setattr(_gpu_arrays.cuda, "current_context", lambda: FakeContext())
    monkeypatch.setattr(_gpu_arrays, "_VIEWS", {})
    freed = []
    monkeypatch.setattr(
        _gpu_arrays.cuda, "device_array", lambda shape, dtype, stream=0: _owning_array(shape, dtype, freed)
    )
    shape, strides = (2, 3, 4, 5), (240, 4, 60, 12)  # channels-last float32
    result = _gpu_arrays._numba_allocate(shape, strides, np.float32, 0)
    assert result.shape == shape and result.strides == strides
    flat = _gpu_arrays.strided(result, (120,), (4,))  # as kernels take it
    del result
    gc.collect()
    assert freed == []
    assert flat.device_ctypes_pointer.value == 0x40000
    del flat
    gc.collect()
    assert freed == [1]
    assert _gpu_arrays._VIEWS == {}  # views of numba's memory are not cached


def test_views_of_borrowed_memory_stay_cached(monkeypatch):
    from numbabn import _gpu_arrays

    monkeypatch.setattr(_gpu_arrays.cuda, "current_context", lambda: FakeContext())
    monkeypatch.setattr(_gpu_arrays, "_VIEWS", {})
    dtype = np.dtype(np.float32)
    view = _gpu_arrays._view(0x10000, (4, 3, 10), (120, 40, 4), dtype)
    flat = _gpu_arrays.strided(view, (120,), (4,))
    assert _gpu_arrays.strided(view, (120,), (4,)) is flat
    assert flat.device_ctypes_pointer.value == 0x10000


def _argument_samples(monkeypatch):
    """Kernel arguments of every kind numbabn passes: device arrays of each dtype and
    rank, C-contiguous, strided, transposed, with extents of 1 and 0; scalars; tuples."""
    from numba.cuda.cudadrv import devices

    from numbabn import _gpu_arrays

    monkeypatch.setattr(_gpu_arrays.cuda, "current_context", lambda: FakeContext())
    monkeypatch.setattr(devices, "get_context", lambda: FakeContext())  # empty arrays ask
    monkeypatch.setattr(_gpu_arrays, "_VIEWS", {})
    arrays = []
    for dtype in (np.float16, np.float32, np.float64, np.int32, np.int16):  # int16: bfloat16
        item = np.dtype(dtype).itemsize
        for shape, strides in (
            ((7,), (1,)), ((7,), (2,)), ((1,), (5,)), ((0,), (1,)),
            ((8, 3), (3, 1)), ((8, 3), (1, 8)), ((8, 3), (6, 1)), ((1, 3), (9, 1)), ((8, 1), (1, 1)),
            ((2, 3, 5), (15, 5, 1)), ((2, 3, 5), (15, 1, 3)), ((1, 3, 5), (99, 5, 1)), ((2, 0, 5), (0, 5, 1)),
        ):
            arrays.append(_gpu_arrays._view(0x1000, shape, tuple(s * item for s in strides), np.dtype(dtype)))
    scalars = [0, 7, 2**40, 1e-5, 0.1, True, np.float16(0.5), np.float32(0), np.float64(3.25), np.int32(3)]
    tuples = [(3, 4), (1, 2, 3), (0, 0, 0), (5, 7)]
    return arrays + scalars + tuples


def test_argument_kinds_decide_numba_types(monkeypatch):
    """The direct launch path keys compiled kernels by ``_kind``: two arguments of one
    kind must get one numba type."""
    from numbabn import _gpu_kernels as K
    from numbabn import _gpu_launch

    seen = {}
    for a in _argument_samples(monkeypatch):
        kind = _gpu_launch._kind(a)
        assert kind is not None, a
        ty = K.stats_ncl.typeof_pyval(a)
        assert seen.setdefault(kind, ty) == ty, (a, kind, ty, seen[kind])
    assert len(set(seen.values())) >= 20  # the samples do differ


def test_parameters_are_packed_as_numba_packs_them(monkeypatch):
    from numba.cuda.dispatcher import _Kernel

    from numbabn import _gpu_kernels as K
    from numbabn import _gpu_launch

    class Compiled:  # what numba's _prepare_args uses of its kernel
        extensions = []
        _prepare_args = _Kernel._prepare_args

    for a in _argument_samples(monkeypatch):
        ty = K.stats_ncl.typeof_pyval(a)
        mine, numbas = [], []
        _gpu_launch._packer(ty)(a, mine)
        Compiled()._prepare_args(ty, a, 0, [], numbas)
        assert _gpu_launch._same_params(mine, numbas), (a, mine, numbas)
    assert not _gpu_launch._same_params([ctypes_value(1.0)], [ctypes_value(2.0)])
    assert not _gpu_launch._same_params([1, 2], [1, 3])


def ctypes_value(v):
    import ctypes

    return ctypes.c_double(v)


def test_launches_go_direct_after_numbas_first(monkeypatch):
    """The first launch of a kind of arguments is numba's; later ones pack the
    parameters here and call cuda.core's launch, with numba's stream and config."""
    from numba.cuda.dispatcher import _Kernel

    from numbabn import _gpu_kernels as K
    from numbabn import _gpu_launch

    args = [a for a in _argument_samples(monkeypatch)][:3]
    types = tuple(K.stats_ncl.typeof_pyval(a) for a in args)

    class Library:
        def get_cufunc(self):
            class Func:
                kernel = "the compiled kernel"
            return Func()

    class Compiled:
        extensions = []
        debug = cooperative = False
        argument_types = types
        _codelibrary = Library()
        _prepare_args = _Kernel._prepare_args

    class Dispatcher:
        specialized = False
        extensions = None
        _launch_config_sensitive = False
        overloads = {types: Compiled()}
        typeof_pyval = staticmethod(K.stats_ncl.typeof_pyval)

    class Configured:
        dispatcher = Dispatcher()
        griddim, blockdim, sharedmem = (3, 2, 1), (256, 1, 1), 0
        stream = "numba's stream"
        pre_launch_callbacks = []
        calls = 0

        def _is_kernel_launch_config_sensitive(self):
            return False

        def __call__(self, *a):
            Configured.calls += 1

    launched = []
    monkeypatch.setattr(_gpu_launch, "_current_context", lambda: 1)
    monkeypatch.setattr(_gpu_launch, "_CORE", [lambda *a: launched.append(a)])
    monkeypatch.setattr(_gpu_launch, "_launch_config", lambda c: ("config", c.griddim, c.blockdim))
    launch = _gpu_launch.Launch(Configured())
    launch(*args)
    assert Configured.calls == 1 and launched == []
    launch(*args)
    assert Configured.calls == 1 and len(launched) == 1
    stream, config, kernel, *params = launched[0]
    expected = ("numba's stream", ("config", (3, 2, 1), (256, 1, 1)), "the compiled kernel")
    assert (stream, config, kernel) == expected
    expected = []
    for t, a in zip(types, args):
        Compiled()._prepare_args(t, a, 0, [], expected)
    assert _gpu_launch._same_params(params, expected)
    launch(*args[:2], np.float64(1.0))  # another kind of arguments: numba's again
    assert Configured.calls == 2 and len(launched) == 1


def test_unknown_arguments_have_no_kind():
    from numbabn import _gpu_launch

    assert _gpu_launch._kind(object()) is None
    assert _gpu_launch._kind((1, object())) is None  # nested too: numba decides
    assert _gpu_launch._kind((1, 2)) == (tuple, int, int)
    assert _gpu_launch._kind(np.float32(1)) is np.float32
