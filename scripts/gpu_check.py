"""Check and time the GPU kernels on a real CUDA device (needs torch with CUDA).

    PYTHONPATH=. python scripts/gpu_check.py [--quick]

1. Every operation against the float64 NumPy reference, NCHW and channels-last,
   float16/32/64, on large inputs; a tensor of more than 2**31 elements when the card
   has the memory (statistics compared with torch.var_mean in float64).
2. Two runs bitwise equal.
3. Times of train forward, eval forward and backward, float32 and float16, NCHW and
   channels-last, at 32x64x56x56 and 256x256x14x14, against PyTorch (cuDNN) and a
   device-to-device copy of the same bytes; one table of times and ratios.
   Floors: train forward 3 passes, eval 2, backward 5, at the copy's bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from numba import cuda

import numbabn
from numbabn import reference as ref


def _t(a):
    return a.detach() if isinstance(a, torch.Tensor) else a


def _host(a):
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else a.copy_to_host()


def _batch(shape, layout, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g, dtype=torch.float32) * 2 + 1
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def check(shape, layout, dtype):
    x = _batch(shape, layout, dtype)
    dy = _batch(shape, layout, dtype, seed=1)
    c = shape[1]
    w = torch.rand(c, device="cuda") + 0.5
    b = torch.rand(c, device="cuda") - 0.5
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    xh = x.float().cpu().numpy().astype(np.float64) if dtype == torch.float16 else x.cpu().numpy()
    tol = {torch.float16: 4e-3, torch.float32: 2e-5, torch.float64: 1e-11}[dtype]
    y = numbabn.batch_norm(x, rm, rv, w, b, training=True)
    yr, rmr, rvr = ref.batch_norm(xh, np.zeros(c), np.ones(c), w.cpu().numpy(), b.cpu().numpy(), True)
    errs = {"train y": np.abs(_host(y) - yr).max() / (1 + np.abs(yr).max()),
            "running_var": np.abs(_host(rv) - rvr).max()}
    ye = numbabn.batch_norm(x, rm, rv, w, b)
    yer, _, _ = ref.batch_norm(xh, rm.cpu().numpy(), rv.cpu().numpy(), w.cpu().numpy(), b.cpu().numpy())
    errs["eval y"] = np.abs(_host(ye) - yer).max() / (1 + np.abs(yer).max())
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b)
    dx, dw, db = numbabn.batch_norm_backward(dy, x, mean, invstd, w)
    dyh = dy.float().cpu().numpy().astype(np.float64)
    dxr, dwr, dbr = ref.batch_norm_backward(dyh, xh, _host(mean), _host(invstd), w.cpu().numpy())
    errs["dx"] = np.abs(_host(dx) - dxr).max() / (1 + np.abs(dxr).max())
    errs["dweight"] = np.abs(_host(dw) - dwr).max() / (1 + np.abs(dwr).max())
    y2 = numbabn.batch_norm(x, None, None, w, b, training=True)
    dx2, _, _ = numbabn.batch_norm_backward(dy, x, mean, invstd, w)
    bitwise = torch.equal(y2, numbabn.batch_norm(x, None, None, w, b, training=True)) and torch.equal(dx, dx2)
    ok = all(e <= 4 * tol for k, e in errs.items() if k != "running_var") and errs["running_var"] < 1e-5
    print(f"check {layout} {str(dtype)[6:]} {shape}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
          + f", bitwise repeatable: {bitwise} -> {'ok' if ok and bitwise else 'FAILED'}")
    return ok and bitwise


def check_huge():
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 2**20
    if free < 3 * 2 * n:
        print(f"skip >2**31 check: {free / 2**30:.0f} GiB free")
        return True
    x = torch.randn((1, 4, n // 4), device="cuda", dtype=torch.float16) + 3
    mean, var = numbabn.batch_stats(x)
    vr, mr = torch.var_mean(x.double(), dim=(0, 2), unbiased=False)
    err = max((mean.double() - mr).abs().max().item(), ((var.double() - vr) / vr).abs().max().item())
    print(f"check > 2**31 elements ({x.numel()}): stats error {err:.1e} -> {'ok' if err < 1e-5 else 'FAILED'}")
    del x
    return err < 1e-5


def check_strided():
    """Inputs and out= whose strides need a device copy (rows with a gap after them)."""
    big = _batch((8, 12, 17, 20), "nchw", torch.float32, seed=3)
    x = big[..., :19]
    out = torch.full_like(big, -7.0)
    y = numbabn.batch_norm(x, training=True, out=out[..., :19])
    yr, _, _ = ref.batch_norm(x.cpu().numpy(), training=True)
    err = np.abs(out[..., :19].cpu().numpy() - yr).max()
    gaps = bool((out[..., 19] == -7.0).all())
    ok = err < 1e-5 and gaps and y.data_ptr() == out.data_ptr()
    print(f"check strided input and out=: error {err:.1e}, gaps untouched: {gaps} -> {'ok' if ok else 'FAILED'}")
    return ok


def _wall(fn, reps=2000):
    """Host wall time per call (us) of a call on tiny data, synchronizing at the end."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def _time(fn, reps=50):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return float(np.median(times))


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
    copy = _time(lambda: buf.copy_(x))
    rows = {
        "train fwd": (_time(lambda: numbabn.batch_norm(x, rm, rv, w, b, True)),
                      _time(lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True)), 1.5 * copy),
        "eval fwd": (_time(lambda: numbabn.batch_norm(x, rm, rv, w, b)),
                     _time(lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b)), copy),
        "backward": (_time(lambda: numbabn.batch_norm_backward(dy, x, mean, invstd, w)),
                     _time(lambda: torch.autograd.grad(yt, (xg, wt, bt), dy, retain_graph=True)), 2.5 * copy),
    }
    for op, (nb, tt, floor) in rows.items():
        print(f"{layout:<5} {str(dtype)[6:]:<8} {'x'.join(map(str, shape)):<14} {op:<10} {nb:9.1f} {tt:9.1f} "
              f"{floor:9.1f} {tt / nb:8.2f}x {floor / nb:8.0%}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), "| numba-cuda device:", cuda.get_current_device().name)
    ok = True
    for layout in ("nchw", "nhwc"):
        for dtype in (torch.float16, torch.float32, torch.float64):
            ok &= check((16, 24, 33, 35), layout, dtype)
    ok &= check_strided()
    ok &= check_huge()
    tiny = torch.randn(2, 3, 4, 5, device="cuda")
    tw, tb = torch.ones(3, device="cuda"), torch.zeros(3, device="cuda")
    trm, trv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    for name, fn, peer in [
        ("train forward", lambda: numbabn.batch_norm(tiny, trm, trv, tw, tb, True),
         lambda: torch.nn.functional.batch_norm(tiny, trm, trv, tw, tb, True)),
        ("eval forward", lambda: numbabn.batch_norm(tiny, trm, trv, tw, tb),
         lambda: torch.nn.functional.batch_norm(tiny, trm, trv, tw, tb)),
    ]:
        print(f"2x3x4x5 {name}: {_wall(fn):.1f} us per call (torch {_wall(peer):.1f} us), wall time")
    print(f"\n{'layout':<5} {'dtype':<8} {'shape':<14} {'op':<10} {'numbabn':>9} {'torch':>9} {'floor':>9} "
          f"{'x torch':>9} {'of floor':>8}   (us)")
    shapes = [(32, 64, 56, 56)] if args.quick else [(32, 64, 56, 56), (256, 256, 14, 14)]
    for shape in shapes:
        for layout in ("nchw", "nhwc"):
            for dtype in (torch.float32, torch.float16):
                bench(shape, layout, dtype)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
