"""Every GPU kernel compiles to PTX for every dtype (the simulator does no type checks)."""

from __future__ import annotations

import pytest

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="PTX is compiled in the host test run")

cuda = pytest.importorskip("numba.cuda")
from numba import types  # noqa: E402

# bfloat16 data and per-channel vectors reach the kernels as int16 bits (``_half``).
DATA = {"float16": types.float16, "bfloat16": types.int16, "float32": types.float32,
        "float64": types.float64}
VECTORS = [types.float32, types.float64]
CCS = [(8, 0), (9, 0)]


def _arr(dtype, ndim):
    return types.Array(dtype, ndim, "A")


def _signatures(data, vec):
    from numbabn import _gpu_kernels  # noqa: F401  (imported for the kernels below)

    stat = types.float64 if data == types.float64 else types.float32
    v = _arr(vec, 1)
    part, counter = _arr(types.float64, 3), _arr(types.int32, 1)
    # The distributed path asks for float64 per-channel rows whatever the data dtype.
    red = _arr(types.float64 if vec == types.float64 else stat, 2)
    chan = _arr(stat, 2)
    i, f = types.int64, types.float64
    # NCL kernels take each array as a flat view plus its (sN, sC, sL) element strides,
    # and (N, L).
    flat, st, nl = _arr(data, 1), types.UniTuple(i, 3), types.UniTuple(i, 2)
    return {
        "stats_ncl": (flat, st, nl, v, v, v, v, i, f, f, part, counter, red),
        "stats_mc": (_arr(data, 2), v, v, v, v, i, f, f, part, counter, red),
        "grad_sums_ncl": (flat, st, flat, st, nl, v, v, v, i, part, counter, red),
        "grad_sums_mc": (_arr(data, 2), _arr(data, 2), v, v, v, i, part, counter, red),
        "grad_sums_relu_ncl": (flat, st, flat, st, flat, st, flat, st, nl, v, v, v, i, part,
                               counter, red, i),
        "grad_sums_relu_mc": (*[_arr(data, 2)] * 4, v, v, v, i, part, counter, red, i),
        "normalize_ncl": (flat, st, nl, chan, stat, flat, st),
        "normalize_mc": (_arr(data, 2), chan, stat, _arr(data, 2)),
        "grad_input_ncl": (flat, st, flat, st, nl, chan, stat, flat, st),
        "grad_input_mc": (_arr(data, 2), _arr(data, 2), chan, stat, _arr(data, 2)),
        "grad_input_relu_ncl": (flat, st, flat, st, flat, st, nl, chan, stat, flat, st),
        "grad_input_relu_mc": (*[_arr(data, 2)] * 3, chan, stat, _arr(data, 2)),
        "epilogue_ncl": (flat, st, flat, st, nl, chan, stat, flat, st, i),
        "epilogue_mc": (_arr(data, 2), _arr(data, 2), chan, stat, _arr(data, 2), i),
        "eval_params": (v, v, v, v, i, f, chan),  # _gpu_reduce
        "copy_4d": (_arr(data, 4), _arr(data, 4)),  # _gpu_arrays
        "fold_scale": (_arr(data, 1), _arr(types.float64, 1), i, i, _arr(data, 1)),  # _gpu_fold
    }


KERNELS = list(_signatures(types.float32, types.float32))


class _Target:
    """Stands in for the current device: numba-cuda compiles the device functions a
    kernel calls for the current device's compute capability, and there is no device
    here. compile_ptx itself takes the capability as an argument."""

    def __init__(self, cc):
        self.compute_capability = cc


# Every kernel for every dtype pair on the newest capability; the older one for float32
# only (a fault specific to it and to one dtype has not been seen; each compile costs).
MATRIX = [(data, vec, CCS[-1]) for data in DATA for vec in VECTORS] + [
    ("bfloat16", types.int16, CCS[-1])
] + [("float32", types.float32, cc) for cc in CCS[:-1]]


# The device functions' compilations by (function, compute capability): numba-cuda keys
# them by signature alone, so each capability has its own (compiled afresh for every
# test, they were most of this file's 160 s).
_DEVICE_OVERLOADS: dict = {}


def _id(v):
    return f"sm{v[0]}{v[1]}" if isinstance(v, tuple) else str(v)


def _cases():
    """(kernel, data, vec, cc) over MATRIX, each signature once: a kernel that takes no
    per-channel vectors has the same signature for either ``vec``."""
    cases, seen = [], set()
    for data, vec, cc in MATRIX:
        for name, sig in _signatures(DATA[data], vec).items():
            if (name, sig, cc) not in seen:
                seen.add((name, sig, cc))
                cases.append(pytest.param(name, data, vec, cc, id="-".join(
                    _id(v) for v in (name, data, vec, cc))))
    return sorted(cases, key=lambda case: KERNELS.index(case.values[0]))


@pytest.mark.parametrize("name,data,vec,cc", _cases())
def test_kernel_compiles_to_ptx(name, data, vec, cc, monkeypatch):
    from numba.cuda import dispatcher

    from numbabn import _gpu_arrays, _gpu_fold, _gpu_kernels, _gpu_reduce

    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Target(cc))
    functions = {**vars(_gpu_reduce), **vars(_gpu_kernels)}.values()
    for fn in functions:  # device functions: compiled for this cc, kept for its other tests
        if isinstance(fn, dispatcher.CUDADispatcher) and fn.targetoptions.get("device"):
            monkeypatch.setattr(fn, "overloads", _DEVICE_OVERLOADS.setdefault((fn, cc), {}))

    sig = _signatures(DATA[data], vec)[name]
    kernel = {"fold_scale": _gpu_fold._scale, "eval_params": _gpu_reduce.eval_params,
              "copy_4d": _gpu_arrays.copy_4d}.get(name) or getattr(_gpu_kernels, name)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
