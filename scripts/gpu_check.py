"""Check and time the GPU kernels on a real CUDA device (needs torch with CUDA).

    PYTHONPATH=. python scripts/gpu_check.py [--quick] [--profile]

(``bash scripts/gpu_session.sh`` runs it, then the device-side tests on the GPU.)

1. Every operation against the float64 NumPy reference, NCHW and channels-last,
   float16/bfloat16/32/64, with PyTorch tensors, numba device arrays and CuPy arrays as
   inputs; parameters that require grad; a caller's stream; strided inputs and out=;
   a tensor of more than 2**31 elements when the card has the memory.
2. Two runs bitwise equal.
3. Times of train forward, eval forward and backward, float32, float16 and bfloat16, NCHW and
   channels-last, at 32x64x56x56 and 256x256x14x14, against PyTorch (cuDNN) and a
   device-to-device copy of the same bytes; one table of times and ratios.
   Floors: train forward 3 passes, eval 2, backward 5, at the copy's bandwidth; the
   fused relu(bn(x) + z) forward 4 and its backward with dresidual 7.

Two times per call: "gpu" is the device time of a call, measured with events
around calls queued behind a sleeping kernel (so the host's launch overhead is
hidden, as in a training step that keeps the GPU fed); "wall" is the host time per
call of a loop that synchronizes only at its end (bounded by Python overhead on
small data).

Each section reports and carries on if another fails; the exit status is 1 if any
check failed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import traceback

import numpy as np

if not hasattr(np, "row_stack"):  # numba-cuda 0.30 names it at import; NumPy 2.5 removed it
    np.row_stack = np.vstack

import torch  # noqa: E402
from numba import cuda  # noqa: E402

import numbabn  # noqa: E402
from numbabn import reference as ref  # noqa: E402

FAILED: list[str] = []


def section(name, fn, *args):
    t0 = time.perf_counter()
    try:
        ok = fn(*args)
    except Exception:
        traceback.print_exc()
        ok = False
    if ok is False:
        FAILED.append(name)
    verdict = "ok" if ok is not False else "FAILED"
    print(f"  [{name}: {verdict}, {time.perf_counter() - t0:.1f} s]", flush=True)


def _host(a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        return (a.float() if a.dtype == torch.bfloat16 else a).numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return a.copy_to_host()


def _batch(shape, layout, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g, dtype=torch.float32) * 2 + 1
    x = x + torch.linspace(-3, 3, shape[1], device="cuda").reshape(1, -1, *([1] * (len(shape) - 2)))
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def _err(a, r):
    a = _host(a).astype(np.float64)
    return float(np.abs(a - r).max() / (1 + np.abs(r).max()))


def check(shape, layout, dtype, kind="torch"):
    """Every operation on one batch against the float64 reference."""
    x = _batch(shape, layout, dtype)
    dy = _batch(shape, layout, dtype, seed=1)
    x0, dy0 = x.clone(), dy.clone()
    c = shape[1]
    w = torch.rand(c, device="cuda") + 0.5
    b = torch.rand(c, device="cuda") - 0.5
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    if dtype == torch.float64:
        w, b, rm, rv = w.double(), b.double(), rm.double(), rv.double()
    wh, bh = w.cpu().numpy(), b.cpu().numpy()
    conv = {"torch": lambda t: t, "numba": cuda.as_cuda_array, "cupy": _cupy}[kind]
    X, DY, W, B, RM, RV = (conv(t) for t in (x, dy, w, b, rm, rv))
    xh = x.double().cpu().numpy()
    dyh = dy.double().cpu().numpy()
    tol = {torch.float16: 4e-3, torch.bfloat16: 8e-3, torch.float32: 2e-5, torch.float64: 1e-11}[dtype]

    y = numbabn.batch_norm(X, RM, RV, W, B, training=True, momentum=0.2)
    yr, rmr, rvr = ref.batch_norm(xh, np.zeros(c), np.ones(c), wh, bh, True, 0.2)
    errs = {"train y": _err(y, yr), "running mean": _err(RM, rmr), "running var": _err(RV, rvr)}
    ye = numbabn.batch_norm(X, RM, RV, W, B)
    yer, _, _ = ref.batch_norm(xh, _host(RM), _host(RV), wh, bh)
    errs["eval y"] = _err(ye, yer)
    mean_s, var_s = numbabn.batch_stats(X)
    xr = xh.transpose(1, 0, 2, 3).reshape(c, -1)
    errs["stats"] = max(_err(mean_s, xr.mean(1)), _err(var_s, xr.var(1)))
    _, mean, invstd = numbabn.batch_norm_forward(X, W, B)
    dx, dw, db = numbabn.batch_norm_backward(DY, X, mean, invstd, W)
    dxr, dwr, dbr = ref.batch_norm_backward(dyh, xh, _host(mean), _host(invstd), wh)
    errs.update({"dx": _err(dx, dxr), "dweight": _err(dw, dwr), "dbias": _err(db, dbr)})
    dxe, _, _ = numbabn.batch_norm_backward(DY, X, mean, invstd, W, training=False)
    dxer, _, _ = ref.batch_norm_backward(dyh, xh, _host(mean), _host(invstd), wh, training=False)
    errs["eval dx"] = _err(dxe, dxer)
    ok = all(e <= 4 * tol for e in errs.values())
    kinds = {type(a).__module__.split(".")[0] for a in (y, ye, mean, invstd, dx, dw, db)}
    want = {"torch": "torch", "numba": "numba", "cupy": "cupy"}[kind]
    ok &= kinds == {want}
    y2 = numbabn.batch_norm(X, None, None, W, B, training=True)
    y3 = numbabn.batch_norm(X, None, None, W, B, training=True)
    dx2, _, _ = numbabn.batch_norm_backward(DY, X, mean, invstd, W)
    bitwise = np.array_equal(_host(y2), _host(y3)) and np.array_equal(_host(dx), _host(dx2))
    untouched = torch.equal(x, x0) and torch.equal(dy, dy0)
    layout_kept = True
    if kind == "torch" and layout == "nhwc":
        layout_kept = y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(
            memory_format=torch.channels_last)
    ok = ok and bitwise and untouched and layout_kept
    print(f"check {kind:<5} {layout} {str(dtype)[6:]:<7} {shape}: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
          + f"; kinds {sorted(kinds)}, bitwise repeatable {bitwise}, inputs untouched {untouched}, "
          f"layout kept {layout_kept} -> {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def _cupy(t):
    import cupy

    return cupy.asarray(t)


def check_params_requiring_grad():
    """nn.Parameter weight and bias (they require grad) are read as their data."""
    x = _batch((8, 16, 9, 7), "nchw", torch.float32)
    bn = torch.nn.BatchNorm2d(16).cuda()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    y = numbabn.batch_norm(x, rm, rv, bn.weight, bn.bias, training=True)
    yt = bn(x)
    err = max((y - yt).abs().max().item(), (rm - bn.running_mean).abs().max().item(),
              (rv - bn.running_var).abs().max().item())
    ok = err < 1e-5 and isinstance(y, torch.Tensor) and not y.requires_grad
    verdict = "ok" if ok else "FAILED"
    print(f"check nn.Parameter weight/bias: error vs torch (y, running stats) {err:.1e} -> {verdict}")
    return ok


def check_streams():
    """A caller's stream: numba, then torch."""
    x = _batch((8, 16, 9, 7), "nchw", torch.float32)
    yr, _, _ = ref.batch_norm(x.double().cpu().numpy(), training=True)
    s = cuda.stream()
    xn = cuda.as_cuda_array(x)
    y = numbabn.batch_norm(xn, training=True, stream=s)
    s.synchronize()
    e1 = _err(y, yr)
    ts = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(ts):
        y2 = numbabn.batch_norm(x, training=True, stream=ts)
    ts.synchronize()
    e2 = _err(y2, yr)
    ok = e1 < 1e-5 and e2 < 1e-5
    print(f"check stream=: numba stream {e1:.1e}, torch stream {e2:.1e} -> {'ok' if ok else 'FAILED'}")
    return ok


def check_strided():
    """Inputs and out= whose strides need a device copy (rows with a gap after them)."""
    big = _batch((8, 12, 17, 20), "nchw", torch.float32, seed=3)
    x = big[..., :19]
    out = torch.full_like(big, -7.0)
    y = numbabn.batch_norm(x, training=True, out=out[..., :19])
    yr, _, _ = ref.batch_norm(x.double().cpu().numpy(), training=True)
    err = _err(out[..., :19], yr)
    gaps = bool((out[..., 19] == -7.0).all())
    xt = x.transpose(0, 2)  # axis 1 stays the channel axis; strides not walkable
    yt = numbabn.batch_norm(xt, training=True)
    yrt, _, _ = ref.batch_norm(xt.double().cpu().numpy(), training=True)
    err2 = _err(yt, yrt)
    ok = err < 1e-5 and gaps and y.data_ptr() == out.data_ptr() and err2 < 1e-5
    print(f"check strided: gapped input and out= {err:.1e} (gaps untouched: {gaps}), transposed {err2:.1e} "
          f"-> {'ok' if ok else 'FAILED'}")
    return ok


def check_negative_strides():
    big = _batch((8, 12, 17, 20), "nchw", torch.float32, seed=4)
    xn = cuda.as_cuda_array(big)[:, :, :, ::-1]
    yn = numbabn.batch_norm(xn, training=True)
    yrn, _, _ = ref.batch_norm(torch.flip(big, dims=(3,)).double().cpu().numpy(), training=True)
    err = _err(yn, yrn)
    print(f"check negative strides (numba view): {err:.1e} -> {'ok' if err < 1e-5 else 'FAILED'}")
    return err < 1e-5


def check_huge():
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 2**20
    if free < 8 * 2 * n:
        print(f"skip >2**31 check: {free / 2**30:.0f} GiB free")
        return None
    x = torch.randn((2, 4, n // 8), device="cuda", dtype=torch.float16) + 3
    y, mean, invstd = numbabn.batch_norm_forward(x)
    xs = x.double()
    vr, mr = torch.var_mean(xs, dim=(0, 2), unbiased=False)
    del xs
    var_err = ((1 / invstd.double() ** 2 - 1e-5 - vr) / vr).abs().max().item()
    err = max((mean.double() - mr).abs().max().item(), var_err)
    # the last values of the last plane: indices beyond 2**31
    tail = x[1, 3, -1000:].double()
    yr = (tail - mr[3]) / torch.sqrt(vr[3] + 1e-5)
    yerr = (y[1, 3, -1000:].double() - yr).abs().max().item()
    ok = err < 1e-5 and yerr < 4e-3 * (1 + yr.abs().max().item())
    print(f"check > 2**31 elements ({x.numel()}): stats error {err:.1e}, y error at the end {yerr:.1e} "
          f"-> {'ok' if ok else 'FAILED'}")
    return ok


def _wall(fn, reps=1000):
    """Host time per call (us) of a loop that synchronizes only at its end."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


_SLEEP_CYCLES = 100_000_000


def _gpu(fn, reps=20, trials=5):
    """Device time per call (us): calls queued behind a sleeping kernel, so that host
    overhead does not show; median over trials. Results are kept alive within a
    trial so that no memory is released (and no synchronization happens) meanwhile."""
    for _ in range(3):
        fn()
    times = []
    hidden = True
    for _ in range(trials):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(_SLEEP_CYCLES)
        start.record()
        t0 = time.perf_counter()
        keep = [fn() for _ in range(reps)]
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        if host * 1e3 > 0.9 * _sleep_ms:
            hidden = False
        times.append(start.elapsed_time(end) * 1e3 / reps)
        del keep
    return float(np.median(times)), hidden


def _sleep_time():
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(_SLEEP_CYCLES)
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


_sleep_ms = 0.0


def tiny_overhead(profile):
    tiny = torch.randn(2, 3, 4, 5, device="cuda")
    tw, tb = torch.ones(3, device="cuda"), torch.zeros(3, device="cuda")
    trm, trv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    _, mean, invstd = numbabn.batch_norm_forward(tiny)
    dy = torch.randn_like(tiny)
    xn = cuda.as_cuda_array(tiny)
    rows = [
        ("train forward", lambda: numbabn.batch_norm(tiny, trm, trv, tw, tb, True),
         lambda: torch.nn.functional.batch_norm(tiny, trm, trv, tw, tb, True)),
        ("eval forward", lambda: numbabn.batch_norm(tiny, trm, trv, tw, tb),
         lambda: torch.nn.functional.batch_norm(tiny, trm, trv, tw, tb)),
        ("backward", lambda: numbabn.batch_norm_backward(dy, tiny, mean, invstd, tw),
         lambda: torch.ops.aten.native_batch_norm_backward(dy, tiny, tw, None, None, mean, invstd, True, 1e-5,
                                                           [True, True, True])),
        ("train forward, numba arrays", lambda: numbabn.batch_norm(xn, training=True),
         lambda: torch.nn.functional.batch_norm(tiny, None, None, None, None, True)),
    ]
    for name, fn, peer in rows:
        print(f"2x3x4x5 {name}: {_wall(fn):.1f} us per call wall time (torch {_wall(peer):.1f} us)",
              flush=True)
    for name, fn, peer in rows:
        gpu, hidden = _gpu(fn, reps=50)
        gpu_t, _ = _gpu(peer, reps=50)
        print(f"2x3x4x5 {name}: {gpu:.1f} us per call device time{'' if hidden else ' (host-bound)'}, "
              f"torch {gpu_t:.1f} us; Python calls per call: {_python_calls(fn)} "
              f"(torch {_python_calls(peer)})", flush=True)
    if profile:
        _overhead_parts(tiny, trm, trv, tw, tb)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            numbabn.batch_norm(tiny, trm, trv, tw, tb, True)
        torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
        print("\n".join(s.getvalue().splitlines()[:60]))
    return True


def _python_calls(fn) -> int:
    """Function calls (Python and C) that one call of ``fn`` makes, as a profiler
    sees them: with the host time per call, where the host time of a call goes."""
    fn()
    count = [0]

    def tracer(frame, event, arg):
        if event in ("call", "c_call"):
            count[0] += 1

    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count[0]


def _overhead_parts(x, rm, rv, w, b):
    """Host time of the pieces of a tiny train-forward call (us per call)."""
    from numbabn import _gpu, _gpu_arrays, _gpu_launch, _validate
    from numbabn import _gpu_kernels as K

    def per_call(fn, reps=3000):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6

    chk = _validate.batch_norm_args(x, rm, rv, w, b, True, 0.1, 1e-5, 1, None)
    stream = _gpu_launch.numba_stream(None)
    xv = _gpu_arrays.input_view(x, "x", chk.layout, stream)
    fresh = _gpu._chan(3, np.dtype(np.float32), stream, x)
    grid, block = _gpu._elementwise_grid(chk.layout)
    y = torch.empty_like(x)
    yv = _gpu_arrays.kernel_view(y, "y", chk.layout)
    launch = _gpu_launch.launcher(K.normalize_ncl, grid, block, stream)
    zero = np.float32(0)
    args = (*_gpu_arrays.kernel_args((xv,), chk.layout), fresh[1], zero,
            *_gpu_arrays.operands(yv, chk.layout))
    parts = {
        "validation": lambda: _validate.batch_norm_args(x, rm, rv, w, b, True, 0.1, 1e-5, 1, None),
        "input view (cached)": lambda: _gpu_arrays.input_view(x, "x", chk.layout, stream),
        "chan allocation": lambda: _gpu._chan(3, np.dtype(np.float32), stream, x),
        "output allocation": lambda: _gpu_arrays.empty(chk.layout, np.dtype(np.float32), stream, x),
        "launcher lookup": lambda: _gpu_launch.launcher(K.normalize_ncl, grid, block, stream),
        "kernel arguments": lambda: (*_gpu_arrays.kernel_args((xv,), chk.layout), fresh[1], zero,
                                     *_gpu_arrays.operands(yv, chk.layout)),
        "launch (normalize)": lambda: launch(*args),
        "torch.empty_like": lambda: torch.empty_like(x),
    }
    for name, fn in parts.items():
        print(f"  part {name:<22} {per_call(fn):7.1f} us", flush=True)
    torch.cuda.synchronize()
    _launch_paths(per_call, launch, args, grid, block, stream)


def _launch_paths(per_call, launch, args, grid, block, stream):
    """Host time of one launch of the normalize kernel, with its arguments ready,
    down several paths: numbabn's ``Launch`` (direct after the first), numba's
    configured dispatcher, the compiled kernel's own launch (no dispatch on argument
    types), and cuda.core's launch with the arguments already converted (what is
    left below numba)."""
    from numba.cuda import dispatcher as nd

    configured = launch.configured
    disp = configured.dispatcher
    argtypes = tuple(disp.typeof_pyval(a) for a in args)
    kern = disp.overloads[argtypes]
    kernelargs = []
    for t, v in zip(kern.argument_types, args):
        kern._prepare_args(t, v, configured.stream, [], kernelargs)
    if nd.CUDA_CORE_GE_1_0:
        config = nd.LaunchConfig(grid=grid, block=block, shmem_size=0, is_cooperative=False)
    else:
        config = nd.LaunchConfig(grid=grid, block=block, shmem_size=0, cooperative_launch=False)
    cukernel = kern._codelibrary.get_cufunc().kernel
    paths = {
        "numbabn Launch": lambda: launch(*args),
        "numba dispatcher": lambda: configured(*args),
        "typeof of the args": lambda: tuple(disp.typeof_pyval(a) for a in args),
        "compiled kernel .launch": lambda: kern.launch(args, grid, block, configured.stream, 0),
        "argument conversion": lambda: [kern._prepare_args(t, v, stream, [], [])
                                        for t, v in zip(kern.argument_types, args)],
        "cuda.core launch": lambda: nd.launch(configured.stream, config, cukernel, *kernelargs),
    }
    for name, fn in paths.items():
        try:
            print(f"  launch path {name:<24} {per_call(fn):7.1f} us", flush=True)
        except Exception as exc:  # a probe: report and go on
            print(f"  launch path {name:<24} failed: {exc!r}", flush=True)
    torch.cuda.synchronize()


def bench(shape, layout, dtype):
    x = _batch(shape, layout, dtype)
    dy = _batch(shape, layout, dtype, seed=1)
    c = shape[1]
    w, b = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    buf = torch.empty_like(x)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b)
    xg = x.clone().requires_grad_(True)
    wt, bt = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    yt = torch.nn.functional.batch_norm(xg, None, None, wt, bt, True)
    z = _batch(shape, layout, dtype, seed=2)
    zg = z.clone().requires_grad_(True)
    y = numbabn.batch_norm(x, None, None, w, b, True, residual=z, activation="relu")
    yr = torch.relu(torch.nn.functional.batch_norm(xg, None, None, wt, bt, True) + zg)
    copy, _ = _gpu(lambda: buf.copy_(x))
    ops = {
        "train fwd": (lambda: numbabn.batch_norm(x, rm, rv, w, b, True),
                      lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True), 1.5),
        "eval fwd": (lambda: numbabn.batch_norm(x, rm, rv, w, b),
                     lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b), 1.0),
        "backward": (lambda: numbabn.batch_norm_backward(dy, x, mean, invstd, w),
                     lambda: torch.autograd.grad(yt, (xg, wt, bt), dy, retain_graph=True), 2.5),
        # relu(bn(x) + z): reads x twice and z, writes y; its backward with dresidual
        # reads dy, y, x and writes dresidual, then reads it and x and writes dx.
        "fused fwd": (lambda: numbabn.batch_norm(x, rm, rv, w, b, True, residual=z, activation="relu"),
                      lambda: torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, True) + z),
                      2.0),
        "fused bwd": (lambda: numbabn.batch_norm_backward(dy, x, mean, invstd, w, activation="relu",
                                                          y=y, residual_grad=True),
                      lambda: torch.autograd.grad(yr, (xg, wt, bt, zg), dy, retain_graph=True), 3.5),
    }
    for op, (nb, tt, passes) in ops.items():
        g_nb, hid_nb = _gpu(nb)
        g_tt, hid_tt = _gpu(tt)
        w_nb, w_tt = _wall(nb, 100), _wall(tt, 100)
        floor = passes * copy
        note = "" if hid_nb and hid_tt else "  (host-bound: launch overhead not hidden)"
        size = "x".join(map(str, shape))
        print(f"{layout:<5} {str(dtype)[6:]:<8} {size:<14} {op:<10} {g_nb:9.1f} {g_tt:9.1f} "
              f"{floor:9.1f} {g_tt / g_nb:8.2f}x {floor / g_nb:8.0%} {w_nb:9.1f} {w_tt:9.1f}{note}",
              flush=True)
    return True


def blocks_per_sm_ab():
    """Device time of the reductions' two operations at several blocks per SM (the
    grid size knob of ``numbabn._gpu``), side by side in one run."""
    from numbabn import _gpu as backend

    default = backend._BLOCKS_PER_SM
    shapes = (("nhwc", (32, 64, 56, 56)), ("nchw", (32, 64, 56, 56)), ("nhwc", (256, 256, 14, 14)))
    for layout, shape in shapes:
        x = _batch(shape, layout, torch.float32)
        dy = _batch(shape, layout, torch.float32, seed=1)
        _, mean, invstd = numbabn.batch_norm_forward(x)
        cells = []
        for k in (2, 4, 8, 16):
            backend._BLOCKS_PER_SM = k
            try:
                fwd, _ = _gpu(lambda x=x: numbabn.batch_norm_forward(x))
                bwd, _ = _gpu(lambda a=(dy, x, mean, invstd): numbabn.batch_norm_backward(*a))
            finally:
                backend._BLOCKS_PER_SM = default
            cells.append(f"{k}/SM: fwd {fwd:6.1f} bwd {bwd:6.1f}")
        print(f"{layout} f32 {'x'.join(map(str, shape))} (us): " + " | ".join(cells), flush=True)
    return True


def main():
    global _sleep_ms
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile the tiny call")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args()
    dev = cuda.get_current_device()
    print(torch.cuda.get_device_name(), "| numba-cuda device:", dev.name, "| SMs:", dev.MULTIPROCESSOR_COUNT,
          "| torch", torch.__version__, flush=True)
    if not args.skip_checks:
        for layout in ("nchw", "nhwc"):
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                section(f"check {layout} {dtype}", check, (16, 24, 33, 35), layout, dtype)
        section("check large nchw", check, (32, 64, 56, 56), "nchw", torch.float32)
        section("check large nhwc", check, (32, 64, 56, 56), "nhwc", torch.float16)
        section("check numba arrays", check, (8, 40, 17, 13), "nhwc", torch.float32, "numba")
        section("check numba arrays nchw", check, (8, 40, 17, 13), "nchw", torch.float16, "numba")
        section("check cupy arrays", check, (8, 40, 17, 13), "nchw", torch.float32, "cupy")
        section("check parameters", check_params_requiring_grad)
        section("check streams", check_streams)
        section("check strided", check_strided)
        section("check negative strides", check_negative_strides)
        section("check huge", check_huge)
    _sleep_ms = _sleep_time()
    section("tiny overhead", tiny_overhead, args.profile)
    print(f"\n(sleep kernel {_sleep_ms:.1f} ms; gpu = device time per call, wall = host time per call)")
    print(f"{'layout':<5} {'dtype':<8} {'shape':<14} {'op':<10} {'numbabn':>9} {'torch':>9} {'floor':>9} "
          f"{'x torch':>9} {'of floor':>8} {'nb wall':>9} {'th wall':>9}   (us)", flush=True)
    shapes = [(32, 64, 56, 56)] if args.quick else [(32, 64, 56, 56), (256, 256, 14, 14)]
    for shape in shapes:
        for layout in ("nchw", "nhwc"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                section(f"bench {shape} {layout} {dtype}", bench, shape, layout, dtype)
    section("blocks per SM", blocks_per_sm_ab)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
