"""The simulator's repairs (``simulator.py``) keep its semantics: one shared array per
call site and block, whichever thread asks first."""

import os

import numpy as np
import pytest
from numba import cuda, float64, int32

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="numba's CUDA simulator"
)


def test_shared_arrays_per_call_site_and_block():
    seen = []

    @cuda.jit
    def kernel(out):
        a = cuda.shared.array(8, float64)
        b = cuda.shared.array(8, int32)
        a[cuda.threadIdx.x] = cuda.threadIdx.x
        cuda.syncthreads()
        seen.append((cuda.blockIdx.x, id(a), id(b)))
        if cuda.threadIdx.x == 0:
            out[cuda.blockIdx.x] = a.sum()

    out = np.zeros(3)
    kernel[3, 8](out)
    assert (out == 28).all()
    for block in range(3):
        arrays = {(a, b) for blk, a, b in seen if blk == block}
        assert len(arrays) == 1  # every thread of the block, the same two arrays
        a, b = arrays.pop()
        assert a != b
