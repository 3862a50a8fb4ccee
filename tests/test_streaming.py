"""The CPU kernels' streamed (non-temporal store) path and output alignment.

Streaming normally starts at tensors of a quarter of the last-level cache; these tests
lower that threshold to 0 so that small tensors take it (and turn off the single-thread
path for small inputs, which never streams), and check that it gives bitwise the
results of plain stores, which the functional tests check against the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref

from helpers import DTYPES, ON_DEVICE, assert_close, channel_vector, mc_pass, random_batch, tune_cpu

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels only")

if not ON_DEVICE:
    from numbabn import _validate
    from numbabn._cpu import arrays, elementwise, plan, tuning

# NCL planes of whole vectors for every dtype (streamed), planes that are not (plain),
# channels-last with a channel count that is no divisor of the span, a single channel,
# short planes (run as flat rows of C * L values).
CASES = [
    ((50, 7, 9), 1),
    ((3, 4, 1504), 1),
    ((2, 3, 96), 1),
    ((2, 5, 1501), 1),
    ((1001, 24), 1),
    ((67, 5, 7), -1),
    ((13, 3, 11, 29), -1),
    ((4, 1, 640), 1),
    # rows of whole cache lines for every dtype: down the rows a line at a time
    ((67, 3, 32), -1),
    ((37, 4, 8), 1),
]


@pytest.fixture(autouse=True)
def _no_small_path(monkeypatch):
    if not ON_DEVICE:
        tune_cpu(monkeypatch, small_values_ncl=0, small_values_mc=0)


def _run(x, axis, threshold, monkeypatch):
    tune_cpu(monkeypatch, stream_min_bytes=threshold)
    c = x.shape[axis]
    w = channel_vector(c, np.float32, 1)
    b = channel_vector(c, np.float32, 2, -1, 1)
    rm = channel_vector(c, np.float32, 3, -1, 1)
    rv = channel_vector(c, np.float32, 4)
    dy = random_batch(x.shape, x.dtype, seed=5)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis)
    ye = numbabn.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    grads = numbabn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    grads_eval = numbabn.batch_norm_backward(dy, x, rm, invstd, w, axis=axis, training=False)
    return (y, ye, *grads, *grads_eval)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_streamed_equals_plain(shape, axis, dtype, monkeypatch):
    x = random_batch(shape, dtype, seed=0, per_channel_axis=axis)
    if axis == -1:
        x = np.ascontiguousarray(x)
    plain = _run(x, axis, 1 << 62, monkeypatch)
    streamed = _run(x, axis, 0, monkeypatch)
    for p, s in zip(plain, streamed):
        np.testing.assert_array_equal(s, p)
    yref, _, _ = ref.batch_norm_forward(x, channel_vector(x.shape[axis], np.float32, 1),
                                        channel_vector(x.shape[axis], np.float32, 2, -1, 1),
                                        axis=axis)
    assert_close(streamed[0], yref, dtype, factor=2)


def _epilogue_run(x, axis, threshold, monkeypatch):
    """The fused epilogue forward, and the backward through its ReLU (masked operands)."""
    tune_cpu(monkeypatch, stream_min_bytes=threshold)
    z = random_batch(x.shape, x.dtype, seed=6, loc=0.0)
    dy = random_batch(x.shape, x.dtype, seed=7)
    y, mean, invstd = numbabn.batch_norm_forward(x, axis=axis, residual=z, activation="relu")
    grads = numbabn.batch_norm_backward(dy, x, mean, invstd, axis=axis, activation="relu", y=y)
    return (y, *grads)


# float16 (widened and narrowed in the loops) and float32: the epilogue adds an addition
# and a select to loops that test_streamed_equals_plain checks for every dtype, and each
# dtype here compiles every streamed walk again.
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape,axis", CASES)
def test_streamed_epilogue_equals_plain(shape, axis, dtype, monkeypatch):
    """The vector loops' epilogue and masked operands (``llvm.formula``) give bitwise the
    njit walks' results."""
    x = random_batch(shape, dtype, seed=0, per_channel_axis=axis)
    if axis == -1:
        x = np.ascontiguousarray(x)
    plain = _epilogue_run(x, axis, 1 << 62, monkeypatch)
    streamed = _epilogue_run(x, axis, 0, monkeypatch)
    for p, s in zip(plain, streamed):
        np.testing.assert_array_equal(s, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("items", [0, 3])
@pytest.mark.parametrize("layout,c", [("ncl", 6), ("mc", 6), ("mc", 32)])
def test_kernels_stream_when_asked(layout, c, items, dtype):
    """The elementwise kernels with streamed=True, into outputs on a cache line or
    ``items`` values past one (MC rows of 32 values are whole cache lines for every
    dtype, and go down the rows a line at a time, several rows per sweep, over chunks
    of uneven length; past a line, in rows shifted onto line boundaries)."""
    rng = np.random.default_rng(7)
    offset = items * np.dtype(dtype).itemsize
    kshape = (2, c, 992) if layout == "ncl" else (1001, c)
    x = rng.standard_normal(kshape).astype(dtype)
    dy = rng.standard_normal(kshape).astype(dtype)
    ctype = np.float64 if dtype == np.float64 else np.float32
    params = rng.uniform(0.5, 1.5, (5, c)).astype(ctype)
    results = []
    for streamed in (False, True):
        y, dx = _misaligned(kshape, dtype, offset), _misaligned(kshape, dtype, offset)
        k = arrays.kernel_array
        if layout == "ncl":
            elementwise.ncl_segments[streamed](None, k(x), params, 2, 3, k(y))
            elementwise.ncl_segments[streamed](k(dy), k(x), params, 2, 3, k(dx))
        else:
            # spans of 64 elements: several per chunk, each starting mid-row
            mc_pass(None, k(x), params, 1, 64, 3, streamed, k(y))
            mc_pass(k(dy), k(x), params, 1, 64, 3, streamed, k(dx))
        results.append((y, dx))
    for p, s in zip(*results):
        np.testing.assert_array_equal(s, p)
    # and the plain results are the formula (checked in float64 against the inputs)
    assert_close(results[0][0], ref.with_constants(params, x), dtype, factor=4)
    assert_close(results[0][1], ref.with_constants(params, x, dy), dtype, factor=8)


def test_fresh_outputs_are_aligned(monkeypatch):
    tune_cpu(monkeypatch, stream_min_bytes=0)
    for shape, axis in [((3, 5, 7), 1), ((4, 6, 5), -1), ((2, 1), 1)]:
        x = random_batch(shape, np.float32)
        y = numbabn.batch_norm(x, None, None, training=True, axis=axis)
        assert y.__array_interface__["data"][0] % 64 == 0
        assert y.flags.writeable


def test_streaming_needs_alignment(monkeypatch):
    """A misaligned ``out=`` takes the plain path and is still right."""
    tune_cpu(monkeypatch, stream_min_bytes=0)
    x = random_batch((3, 4, 1504), np.float32, per_channel_axis=1)
    raw = np.empty(x.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64 + 4
    out = raw[start : start + x.nbytes].view(np.float32).reshape(x.shape)
    layout = _validate.plan_layout(_validate.describe(x, "x"), 1)
    assert plan.streamed(arrays.aligned_empty(x.shape, x.dtype), layout)
    assert not plan.streamed(out, layout)
    y = numbabn.batch_norm(x, None, None, training=True, out=out)
    assert y is out
    yref, _, _ = ref.batch_norm_forward(x)
    assert_close(out, yref, np.float32, factor=2)


def _misaligned(shape, dtype, offset):
    raw = np.empty(int(np.prod(shape)) * np.dtype(dtype).itemsize + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    return raw[start : start + raw.size - 128].view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((1001, 24), 1), ((67, 5, 7), -1), ((2, 3, 4100), 1)])
def test_misaligned_out_streams_and_equals_plain(shape, axis, dtype, monkeypatch):
    """Channels-last passes start their pieces at the output's first vector boundary;
    long NCL planes stream whatever the alignment."""
    x = np.ascontiguousarray(random_batch(shape, dtype, per_channel_axis=axis))
    results = []
    for threshold in (1 << 62, 0):
        tune_cpu(monkeypatch, stream_min_bytes=threshold)
        out = _misaligned(shape, dtype, 2 * np.dtype(dtype).itemsize)
        layout = _validate.plan_layout(_validate.describe(x, "x"), axis % x.ndim)
        assert plan.streamed(out, layout) == (threshold == 0)
        numbabn.batch_norm(x, None, None, training=True, axis=axis, out=out)
        results.append(out.copy())
    np.testing.assert_array_equal(results[1], results[0])


@pytest.mark.parametrize("shape,axis", [((3, 4, 1504), 1), ((2001, 24), 1)])
def test_streamed_in_place(shape, axis, monkeypatch):
    tune_cpu(monkeypatch, stream_min_bytes=0)
    x = random_batch(shape, np.float32, per_channel_axis=axis)
    expected = numbabn.batch_norm(x, None, None, training=True, axis=axis)
    dy = random_batch(shape, np.float32, seed=3)
    _, mean, invstd = numbabn.batch_norm_forward(x, axis=axis)
    dx_expected, _, _ = numbabn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    buf = arrays.aligned_empty(shape, np.float32)
    buf[...] = x
    assert numbabn.batch_norm(buf, None, None, training=True, axis=axis, out=buf) is buf
    np.testing.assert_array_equal(buf, expected)
    np.testing.assert_array_equal(dx_expected, numbabn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0])


@pytest.mark.parametrize("shape,axis", [((2, 3, 4100), 1), ((2001, 24), 1)])
def test_unaligned_arrays_are_not_streamed(shape, axis, monkeypatch):
    """An array whose address is not a multiple of its item size (NumPy allows them)
    takes plain stores; aligned vector stores would fault on it."""
    tune_cpu(monkeypatch, stream_min_bytes=0)
    x = random_batch(shape, np.float32, per_channel_axis=axis)
    raw = np.zeros(x.nbytes + 1, np.uint8)
    out = np.frombuffer(raw.data, np.float32, x.size, offset=1).reshape(shape)
    assert not out.flags.aligned
    numbabn.batch_norm(x, None, None, training=True, axis=axis, out=out)
    yref, _, _ = ref.batch_norm(x, training=True, axis=axis)
    assert_close(out, yref, np.float32, factor=2)
    # and the kernels themselves, asked to stream into it, write plainly
    c = x.shape[axis]
    params = np.tile(np.array([[0.5], [0.0], [2.0], [1.0]], np.float32), (1, c))
    if x.ndim == 2:
        mc_pass(None, x, params, 1, 1024, 3, True, out)
    else:
        elementwise.ncl_segments[True](None, x, params, 2, 3, out)
    np.testing.assert_array_equal(out, (x - np.float32(0.5)) * np.float32(2) + np.float32(1))


@pytest.mark.skipif(not ON_DEVICE and not tuning.STREAMING, reason="x86-64 only")
@pytest.mark.parametrize("bits", [np.uint16, np.int16, np.float32, np.float64])
def test_streamed_stores_are_non_temporal(bits):
    """The machine code of the streamed span, and of the fused backward's loop that
    writes dresidual through a ReLU, stores with x86's non-temporal ``movnt*`` for every
    element type the kernels see (float16 as uint16 bits, bfloat16 as int16 bits); the
    plain ones do not. (LLVM dropped the hint of 16-bit stores: ``llvm._opaque``.)"""
    import numba

    from numbabn._cpu import fused, vector

    k = (np.float64(0.5),) * 4 if bits == np.float64 else (np.float32(0.5),) * 4
    x, y = np.zeros(64, bits), np.zeros(64, bits)
    x3, r3 = np.zeros((2, 1, 64), bits), np.zeros((2, 1, 64), bits)
    calls = [
        (elementwise.span_streamed, True, (None, x, k, y)),
        (elementwise.span_plain, False, (None, x, k, y)),
        (fused.written_streamed, True, ((x3, x3), x3, 0, 0.0, np.zeros(vector.ACC_SIZE), r3)),
        (fused.written_plain, False, ((x3, x3), x3, 0, 0.0, np.zeros(vector.ACC_SIZE), r3)),
    ]
    for kernel, streams, args in calls:
        # (compiled here, not loaded from the disk cache, whose machine code numba hides)
        fresh = numba.njit(fastmath=kernel.targetoptions["fastmath"])(kernel.py_func)
        fresh(*args)
        asm = fresh.inspect_asm(fresh.signatures[0])
        assert ("movnt" in asm) is streams, (kernel, bits)


def test_no_streaming_where_it_is_untested(monkeypatch):
    """On CPUs other than x86-64 (``tuning.STREAMING`` False) no pass streams, however
    large its output; results stay those of the plain stores."""
    x = random_batch((8, 4, 1024), np.float32, seed=7)
    layout = _validate.plan_layout(_validate.describe(x, "x"), 1)
    tune_cpu(monkeypatch, stream_min_bytes=0)
    y = arrays.aligned_empty(x.shape, x.dtype)
    assert plan.streamed(y, layout) is tuning.STREAMING
    streamed = _run(x, 1, 0, monkeypatch)
    monkeypatch.setattr(plan, "STREAMING", False)
    assert not plan.streamed(y, layout)
    plain = _run(x, 1, 0, monkeypatch)
    for a, b in zip(streamed, plain):
        assert a.tobytes() == b.tobytes()


def test_cache_share_settings():
    """The cache share counts the CPUs this process may use (its affinity mask), and
    NUMBABN_LLC_BYTES overrides it."""
    import os
    import subprocess
    import sys

    assert 1 <= tuning.usable_cpus() <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert tuning.usable_cpus() <= len(os.sched_getaffinity(0))
    script = (
        "from numbabn._cpu import tuning; t = tuning.TUNING; "
        "print(t.llc_bytes, t.stream_min_bytes, t.small_values_ncl, t.sweep)"
    )
    env = {**os.environ, "NUMBABN_LLC_BYTES": "12e6", "NUMBABN_SMALL_VALUES_NCL": "100"}
    env["NUMBABN_SWEEP"] = "0"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["12000000", "3000000", "100", "False"], done.stderr
