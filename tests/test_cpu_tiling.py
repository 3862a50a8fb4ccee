"""How the channels-last (MC) elementwise passes lay out their per-channel constants.

``pieces.expand`` spreads per-channel values over the flat positions of a row (one per
value, planes of ``l`` values); the plain-store passes then take spans of whole rows
several at a time (``elementwise.mc_spans``), and rows too long for that in bands
(``mc_bands``). Flat NCL rows of planes of at least ``plane_min_values`` values instead
choose each lane's constants from its channel's (``mc_planes``).
The functional tests check the passes' results; these
check the layout itself, exactly, on the odd periods the fast paths must get right.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from helpers import ON_DEVICE, assert_close, mc_pass

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels only")

if not ON_DEVICE:
    import numbabn.reference as ref
    from numbabn._cpu import elementwise, pieces, plan, small, tuning


if not ON_DEVICE:
    from numba import njit

    from numbabn._cpu import formulas

    @njit
    def _flat_and_write(a, i, v):
        f = formulas.flat(a)
        if f.size:
            f[i] = v
        return f


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (4, 0), (1,)])
def test_flat_views_the_array(shape, dtype):
    """``formulas.flat`` (``llvm.flat_view``, the walks' flat rows):
    the array's memory as 1-D, written through, and keeping the array alive."""
    a = np.arange(int(np.prod(shape))).astype(dtype).reshape(shape)
    want = a.reshape(-1).copy()
    i = want.size // 2
    if want.size:
        want[i] = 9
    f = _flat_and_write(a, i, 9)
    assert f.shape == (a.size,) and f.dtype == a.dtype
    np.testing.assert_array_equal(f, want)
    np.testing.assert_array_equal(a.reshape(-1), want)
    del a
    np.testing.assert_array_equal(f.copy(), want)  # (the view holds the memory)


@pytest.mark.parametrize(
    "c,l,columns",
    [(3, 1, 1026), (512, 1, 1535), (1, 1, 77), (7, 1, 7), (4, 1, 3), (5, 7, 100), (5, 7, 20),
     (2, 3, 5), (3, 3, 1000), (256, 49, 13567)],
)
def test_expand_follows_its_definition(c, l, columns):
    """out[k, j] = per_channel[k, j % (C * l) // l], for periods shorter and longer than
    the row, and rows that end mid-period or mid-plane."""
    per_channel = np.random.default_rng(c * l).random((3, c))
    out = np.full((3, columns), np.nan)
    pieces.expand(per_channel, l, out)
    j = np.arange(columns)
    np.testing.assert_array_equal(out, per_channel[:, j % (c * l) // l])


def test_block_span_is_whole_rows():
    def span(c):  # the blocked span of the plain-store spans, None if banded
        kernel, work = plan._mc_route(SimpleNamespace(n=8, c=c), (1, 1024, 1), 4, False, False)
        return work[2] if kernel is elementwise.mc_spans[False] else None

    assert span(3) == 1023 and span(24) == 1008 and span(1024) == 1024
    assert span(3136) == 3136  # one row when a row is longer than the span
    assert span(tuning.TUNING.block_max_c + 1) is None  # bands


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("m,c,l", [(7, 4099, 1), (11, 521, 9), (3, 9000, 1), (2, 5, 1000)])
@pytest.mark.parametrize("nchunk", [1, 3, 8])
def test_wide_rows_in_bands(m, c, l, nchunk, dtype):
    """Rows of more than ``block_max_c`` values (true channels, l == 1, or flat NCL planes
    of l values) are cut into bands of rows and columns; every element is written
    once, with its own column's constants."""
    columns = c * l
    assert columns > tuning.TUNING.block_max_c
    rng = np.random.default_rng(columns + nchunk)
    x = rng.standard_normal((m, columns)).astype(dtype)
    dy = rng.standard_normal((m, columns)).astype(dtype)
    ctype = np.float64 if dtype == np.float64 else np.float32
    params = rng.uniform(0.5, 1.5, (5, c)).astype(ctype)
    k = (lambda a: a.view(np.uint16)) if dtype == np.float16 else (lambda a: a)
    y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
    mc_pass(None, k(x), params[:4].copy(), l, 1024, nchunk, False, k(y))
    mc_pass(k(dy), k(x), params, l, 1024, nchunk, False, k(dx))
    planes = (m, c, l)  # a channel's constants cover l adjacent columns
    expected_y = ref.with_constants(params, x.reshape(planes)).reshape(x.shape)
    expected_dx = ref.with_constants(params, x.reshape(planes), dy.reshape(planes)).reshape(x.shape)
    assert_close(y, expected_y, dtype, factor=2)
    assert_close(dx, expected_dx, dtype, factor=4)


def test_wide_grid_covers_each_element_once():
    grid, task = plan._wide_grid, elementwise.band_task.py_func
    for nchunk, m, c in [(8, 64, 12544), (8, 3, 4100), (1, 5, 100352), (8, 64, 4704), (3, 1, 5000)]:
        nb, nrc = grid(nchunk, m, c)
        hits = np.zeros((m, c), np.int64)
        for t in range(nb * nrc):
            r0, r1, c0, c1 = task(t, nb, nrc, m, c)
            assert c0 % 16 == 0 and (c1 == c or c1 % 16 == 0)  # cuts on 64-byte boundaries
            hits[r0:r1, c0:c1] += 1
        assert (hits == 1).all()
        assert nb * nrc >= min(nchunk, m * nb)


def _aligned_rows(m, columns, dtype, offset):
    """An (m, columns) array that starts ``offset`` elements past a cache line."""
    item = np.dtype(dtype).itemsize
    raw = np.empty((m * columns + offset) * item + 64, np.uint8)
    start = -raw.ctypes.data % 64 + offset * item
    return raw[start : start + m * columns * item].view(dtype).reshape(m, columns)


def _plane_references(x, dy, params, m, c, l, k):
    """y and dx of flat rows of C planes of l values, from the per-plane loops, where
    each plane has its channel's constants as scalars."""
    y_ref, dx_ref = np.empty_like(x), np.empty_like(x)
    x3, dy3 = k(x).reshape(m, c, l), k(dy).reshape(m, c, l)
    small.elementwise_ncl(None, x3, params[:4].copy(), k(y_ref).reshape(m, c, l))
    for n in range(m):
        for ch in range(c):
            elementwise.span_plain(
                dy3[n, ch], x3[n, ch], tuple(params[:, ch]), k(dx_ref).reshape(m, c, l)[n, ch]
            )
    return y_ref, dx_ref


def _plane_case(m, c, l, dtype):
    rng = np.random.default_rng(c * l + m)
    x = rng.normal(1.0, 3.0, (m, c * l)).astype(dtype)
    dy = rng.standard_normal((m, c * l)).astype(dtype)
    ctype = np.float64 if dtype == np.float64 else np.float32
    params = rng.uniform(-1.5, 1.5, (5, c)).astype(ctype)
    k = (lambda a: a.view(np.uint16)) if dtype == np.float16 else (lambda a: a)
    return x, dy, params, k


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("m,c,l", [(3, 7, 49), (5, 33, 16), (2, 9, 17), (4, 5, 64), (1, 3, 25)])
@pytest.mark.parametrize("streamed", [False, True])
def test_short_planes_match_the_plane_kernels(m, c, l, streamed, dtype):
    """Flat rows of C planes of l values (``elementwise.planes``), in pieces that start
    and end anywhere (mid-plane, across rows), written from any alignment: bitwise what
    the per-plane loops give."""
    assert l >= tuning.TUNING.plane_min_values
    x, dy, params, k = _plane_case(m, c, l, dtype)
    y_ref, dx_ref = _plane_references(x, dy, params, m, c, l, k)
    total = x.size
    for cuts in ([0, total], [0, 1, l + 3, total // 2 + 5, total], [0, total - 17, total]):
        for offset in (0, 1, 3):
            y, dx = _aligned_rows(m, c * l, dtype, offset), _aligned_rows(m, c * l, dtype, offset)
            y[...], dx[...] = np.nan, np.nan
            xf, gf, yf, df = (k(a).reshape(-1) for a in (x, dy, y, dx))
            for i0, i1 in zip(cuts[:-1], cuts[1:]):
                elementwise.planes(None, xf, yf, params[:4].copy(), l, i0, i1, streamed)
                elementwise.planes(gf, xf, df, params, l, i0, i1, streamed)
            how = f"pieces {cuts}, offset {offset}"
            np.testing.assert_array_equal(k(y), k(y_ref), err_msg=f"y, {how}")
            np.testing.assert_array_equal(k(dx), k(dx_ref), err_msg=f"dx, {how}")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("nchunk", [1, 3, 8])
def test_mc_passes_take_short_planes_per_channel(nchunk, streamed, dtype):
    """The mc passes on rows past ``block_max_c`` values of 7x7 planes (the per-channel
    path, streamed or not), and on short rows streamed."""
    for m, c, l in [(3, 85, 49), (4, 7, 25)]:
        x, dy, params, k = _plane_case(m, c, l, dtype)
        item = np.dtype(dtype).itemsize
        rows = SimpleNamespace(n=m, c=c * l)
        route = plan._mc_route(rows, (l, 1024, nchunk), item, streamed, False)
        assert (route[0] is elementwise.mc_planes[streamed]) == (
            streamed or (c * l > tuning.TUNING.block_max_c and item >= 4)
        )
        y_ref, dx_ref = _plane_references(x, dy, params, m, c, l, k)
        y, dx = _aligned_rows(m, c * l, dtype, 0), _aligned_rows(m, c * l, dtype, 0)
        mc_pass(None, k(x), params[:4].copy(), l, 1024, nchunk, streamed, k(y))
        mc_pass(k(dy), k(x), params, l, 1024, nchunk, streamed, k(dx))
        np.testing.assert_array_equal(k(y), k(y_ref))
        np.testing.assert_array_equal(k(dx), k(dx_ref))


def test_route_order():
    """Per-channel planes, then bands, then lines, then spans: flat planes of 16 values
    whose rows are whole cache lines take the planes when streamed (lines otherwise)."""
    rows = SimpleNamespace(n=300, c=16 * 16)  # 300x16x4x4, float32 rows of 1 KB
    assert plan._mc_route(rows, (16, 1024, 8), 4, True, True)[0] is elementwise.mc_planes[True]
    assert plan._mc_route(rows, (1, 1024, 8), 4, True, True)[0] is elementwise.mc_lines[True]
    assert plan._mc_route(rows, (1, 1024, 8), 4, True, False)[0] is elementwise.mc_spans[True]
    wide = SimpleNamespace(n=40, c=8192)
    assert plan._mc_route(wide, (1, 1024, 8), 4, False, True)[0] is elementwise.mc_bands


def test_plane_at():
    at = elementwise.plane_at.py_func
    assert at(0, 98, 49) == (0, 49) and at(48, 98, 49) == (0, 1) and at(49, 98, 49) == (1, 49)
    assert at(97, 98, 49) == (1, 1) and at(98, 98, 49) == (0, 49) and at(150, 98, 49) == (1, 46)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("m,c,l", [(3, 7, 64), (2, 5, 49), (4, 3, 196), (1, 2, 1001)])
@pytest.mark.parametrize("nseg,nchunk", [(1, 1), (1, 5), (3, 4), (2, 64)])
def test_ncl_plain_segments_match_the_plane_loops(m, c, l, nseg, nchunk, dtype):
    """``ncl_segments`` with plain stores (the segment loops compiled whole), any split
    of the planes into segments and runs: bitwise what the per-plane loops give."""
    x, dy, params, k = _plane_case(m, c, l, dtype)
    y_ref, dx_ref = _plane_references(x, dy, params, m, c, l, k)
    y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
    x3, g3, y3, d3 = (k(a).reshape(m, c, l) for a in (x, dy, y, dx))
    elementwise.ncl_segments[False](None, x3, params[:4].copy(), nseg, nchunk, y3)
    elementwise.ncl_segments[False](g3, x3, params, nseg, nchunk, d3)
    np.testing.assert_array_equal(k(y), k(y_ref))
    np.testing.assert_array_equal(k(dx), k(dx_ref))


@pytest.mark.parametrize("shape", [(16, 24, 8, 8), (16, 24, 7, 7)])
def test_plain_planes_of_64_take_the_plane_loops(monkeypatch, shape):
    """8x8 planes with plain stores run the NCL kernels (``plane_loop_min``), 7x7
    planes the flat rows; either way eval and backward are bitwise what the flat rows
    give."""
    from numbabn import _validate, batch_norm, batch_norm_backward

    from helpers import tune_cpu

    # the parallel passes, not the single-thread kernels
    tune_cpu(monkeypatch, threads=lambda: 2, small_values_ncl=0, small_values_mc=0)
    info = _validate.describe(np.empty(shape, np.float32), "x")
    made = plan.make(_validate.plan_layout(info, 1), 2, 4)
    assert not made.small and made.elem.kind == "mc"
    assert bool(made.plane_work) == (shape[-1] == 8)
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    stats = (rng.normal(2.0, 1.0, c).astype(np.float32), rng.uniform(4, 9, c).astype(np.float32))
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)

    def run():
        y = batch_norm(x, *stats, w, training=False)
        return (y, *batch_norm_backward(dy, x, stats[0], 1 / np.sqrt(stats[1]), w))

    got = run()
    tune_cpu(monkeypatch, plane_loop_min=1000)  # flat rows for every plane length
    for a, b in zip(got, run()):
        np.testing.assert_array_equal(a, b)
