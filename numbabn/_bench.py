"""The main job (``python -m numbabn``): check against the reference, then time.

Every timing is taken in this one process, in rounds: each round runs a block of
repeats of every candidate, so slow drifts of the machine hit all of them alike, and
the table reports medians and ratios of medians. The bandwidth floor of an operation is what its
passes over the tensor cost at this machine's memory speed, measured now with a
parallel read (a sum) and a parallel copy of the same bytes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numba
import numpy as np
from numba import njit, prange

import numbabn
from numbabn import reference as ref
from numbabn._dtypes import as_dtype
from numbabn._interop import numpy_tensor
from numbabn._precompile import DTYPES


@njit(parallel=True, fastmath={"reassoc"}, cache=True)
def _read_pass(flat):
    acc = 0.0
    for i in prange(flat.size):
        acc += flat[i]
    return acc


@njit(parallel=True, cache=True, fastmath=False)
def _copy_pass(src, dst):
    for i in prange(src.size):
        dst[i] = src[i]


def _keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it to the OS.

    Otherwise every fresh output array of a large tensor is a new mapping whose pages
    fault on first touch, and that cost (several ms for 25 MB here) swamps all peers
    alike. A training loop in a tuned process (jemalloc, tcmalloc, or these settings)
    runs in this steady state. ``--system-malloc`` keeps the defaults.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m numbabn",
        description="Check numbabn against a float64 NumPy reference and time it against "
        "plain NumPy, PyTorch (when installed) and the memory-bandwidth floor.",
    )
    p.add_argument("--shape", default="32,64,56,56",
                   help="logical N,C[,spatial...] of the batch (default 32,64,56,56)")
    p.add_argument("--dtype", default=None, choices=DTYPES,  # (bfloat16 with ml_dtypes)
                   help="float32 unless given; with --precompile, the one dtype to compile")
    p.add_argument("--layout", default="nchw", choices=["nchw", "nhwc"],
                   help="nchw: channels at axis 1; nhwc: channels last (axis=-1)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numbabn and torch (default: all numba threads)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats (median reported)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default of returning large freed blocks to the OS")
    p.add_argument("--precompile", action="store_true",
                   help="only fill numba's cache with every CPU kernel, in every dtype or in "
                   "--dtype's (then exit)")
    args = p.parse_args(argv)
    args.dtypes = (args.dtype,) if args.dtype else DTYPES
    args.dtype = args.dtype or "float32"
    return args


def _make_inputs(args):
    logical = tuple(int(s) for s in args.shape.split(","))
    if len(logical) < 2:
        raise SystemExit("--shape needs at least N,C")
    dtype = as_dtype(args.dtype)
    if args.layout == "nhwc":
        shape, axis = (logical[0],) + logical[2:] + (logical[1],), -1
    else:
        shape, axis = logical, 1
    rng = np.random.default_rng(args.seed)
    c = logical[1]
    bcast = [1] * len(shape)
    bcast[axis] = c
    offsets = rng.uniform(-2, 2, c).reshape(bcast)
    x = (rng.standard_normal(shape, dtype=np.float32) * 1.5 + offsets).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, c).astype(np.float32)
    return x, dy, w, b, axis


def _check(x, dy, w, b, axis):
    """Max errors of every operation against the float64 reference; (lines, ok)."""
    c = x.shape[axis]
    tol = {np.float16: 4e-3, np.float32: 2e-5, np.float64: 1e-11}.get(x.dtype.type, 8e-3)  # else bfloat16
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y = numbabn.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
    yr, rmr, rvr = ref.batch_norm(x, np.zeros(c), np.ones(c), w, b, True, axis=axis)
    ye = numbabn.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    yer, _, _ = ref.batch_norm(x, rm, rv, w, b, False, axis=axis)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis)
    dx, dw, db = numbabn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    count = x.size // c

    def err(a, r, scale=1.0):
        a = np.asarray(a, np.float64)
        return float(np.max(np.abs(a - r) / (scale + np.abs(r))))

    rows = [
        ("train y", err(y, yr), tol),
        ("running_mean", err(rm, rmr), 1e-6),
        ("running_var", err(rv, rvr), 1e-6),
        ("eval y", err(ye, yer), tol),
        ("dx", err(dx, dxr), 4 * tol),
        ("dweight", err(dw, dwr, np.sqrt(count)), 1e-5),
        ("dbias", err(db, dbr, np.sqrt(count)), 1e-5),
    ]
    ok = all(e <= t for _, e, t in rows)
    lines = [f"  {name:<13} max rel. error {e:9.2e}  (limit {t:.0e})" for name, e, t in rows]
    return lines, ok


def _torch_cases(x, dy, w, b, axis, threads):
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(threads)
    xt, dyt = numpy_tensor(x), numpy_tensor(dy)
    if axis != 1:  # NHWC memory viewed as a channels_last NCHW tensor
        perm = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
        xt, dyt = xt.permute(perm), dyt.permute(perm)
    c = x.shape[axis]
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    rm, rv = torch.zeros(c), torch.ones(c)
    F = torch.nn.functional
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(xt, wt, bt, rm, rv, True, 0.1, 1e-5)
    mask = [True, True, True]
    zt = dyt.flip(0)  # a residual: another tensor of x's shape and memory order (a copy)
    yt = torch.relu(F.batch_norm(xt, rm, rv, wt, bt, True, 0.1, 1e-5) + zt)

    def relu_backward():
        g = torch.ops.aten.threshold_backward(dyt, yt, 0)
        return torch.ops.aten.native_batch_norm_backward(
            g, xt, wt, rm, rv, save_mean, save_invstd, True, 1e-5, mask
        )

    return {
        "train fwd": lambda: F.batch_norm(xt, rm, rv, wt, bt, True, 0.1, 1e-5),
        "eval fwd": lambda: F.batch_norm(xt, rm, rv, wt, bt, False, 0.1, 1e-5),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(
            dyt, xt, wt, rm, rv, save_mean, save_invstd, True, 1e-5, mask
        ),
        "+z, relu": lambda: torch.relu(F.batch_norm(xt, rm, rv, wt, bt, True, 0.1, 1e-5) + zt),
        "bwd relu": relu_backward,
    }


def _first_call_seconds():
    code = (
        "import time; t = time.perf_counter(); import numpy as np, numbabn; "
        "numbabn.batch_norm(np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5), training=True); "
        "print(time.perf_counter() - t)"
    )
    # The first run fills numba's on-disk cache if it is cold; the second is the figure.
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip())


def _tiny_calls(use_torch: bool) -> dict[str, float]:
    """Microseconds per call of train forward on a 2x3x4x5 float32 batch (running
    statistics, weight and bias): the fixed cost of a call, for numbabn and torch."""
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    vecs = [np.zeros(3, np.float32), np.ones(3, np.float32), np.ones(3, np.float32), np.zeros(3, np.float32)]
    fns = {"numbabn": lambda: numbabn.batch_norm(x, *vecs, True)}
    if use_torch:
        try:
            import torch
        except ImportError:
            pass
        else:
            xt, *vt = (torch.from_numpy(a.copy()) for a in (x, *vecs))
            fns["torch"] = lambda: torch.nn.functional.batch_norm(xt, *vt, True)
    out = {}
    for name, fn in fns.items():
        for _ in range(200):
            fn()
        batches = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            batches.append((time.perf_counter() - t0) / 200)
        out[name] = float(np.median(batches)) * 1e6
    return out


def _time_rounds(
    timers: dict, repeats: int, samples: dict, rounds: int = 3, warm: int = 3
) -> None:
    """Time each of ``timers`` ``repeats`` times into ``samples`` (seconds per call):
    ``warm`` untimed calls of each first (compilation, a library's lazy set-up, the
    first touch of the memory its outputs land in: PyTorch's first few backward calls
    here took three times its steady time), then ``rounds`` rounds of a block of
    repeats per candidate, so slow drifts of the machine hit all of them alike.
    Blocks, not single calls in turn: interleaving would let one library's idle
    OpenMP workers spin on the cores the next one needs. The plain NumPy peers get
    rounds of their own (the caller's second call): right after their 40 ms of
    single-threaded float64 temporaries, PyTorch's backward at 32x64x56x56 ran
    4.4-4.6 ms for several calls, against 3.2-3.4 ms after itself or numbabn, which
    flattered numbabn's ratio."""
    for fn in timers.values():
        for _ in range(warm):
            fn()
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for k, fn in timers.items():
            fn()  # the library's thread pool awake after the candidate before
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples.setdefault(k, []).append(time.perf_counter() - t0)


def _torch_layers(threads: int, repeats: int) -> None:
    """numbabn.torch's layers against torch's (``_bench_torch``), if PyTorch is here."""
    from numbabn import _bench_torch

    cases = _bench_torch.cases(threads)
    if not cases:
        return
    samples = {}
    _time_rounds({(c, p): fn for c, peers in cases.items() for p, fn in peers.items()}, repeats, samples)
    med = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
    print("\ntimes in ms, numbabn.torch against torch.nn.BatchNorm2d")
    print("\n".join(_bench_torch.report(cases, med)))


def _cases(x, dy, w, b, axis, threads, torch):
    """{op: {peer: call}}: numbabn (fresh output and ``out=``), NumPy and PyTorch."""
    c = x.shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis)
    y_out = np.empty_like(x)
    z = np.ascontiguousarray(np.flip(dy, 0))  # a residual in x's memory order, as torch's
    epi = {"axis": axis, "residual": z, "activation": "relu"}
    y_relu = numbabn.batch_norm(x, rm.copy(), rv.copy(), w, b, True, **epi)

    def numpy_relu_forward():
        y = ref.batch_norm(x, rm, rv, w, b, True, 0.1, axis=axis, dtype=None)[0]
        return np.maximum(y + z, 0, out=y)

    def numpy_relu_backward():
        g = np.where(y_relu > 0, dy, 0)
        return g, ref.batch_norm_backward(g, x, mean, invstd, w, axis=axis, dtype=None)

    cases = {
        "train fwd": {
            "numbabn": lambda: numbabn.batch_norm(x, rm, rv, w, b, True, 0.1, axis=axis),
            "out=": lambda: numbabn.batch_norm(x, rm, rv, w, b, True, 0.1, axis=axis, out=y_out),
            "numpy": lambda: ref.batch_norm(x, rm, rv, w, b, True, 0.1, axis=axis, dtype=None),
        },
        "eval fwd": {
            "numbabn": lambda: numbabn.batch_norm(x, rm, rv, w, b, False, axis=axis),
            "out=": lambda: numbabn.batch_norm(x, rm, rv, w, b, False, axis=axis, out=y_out),
            "numpy": lambda: ref.batch_norm(x, rm, rv, w, b, False, axis=axis, dtype=None),
        },
        "backward": {
            "numbabn": lambda: numbabn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis),
            "numpy": lambda: ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, dtype=None),
        },
        "+z, relu": {  # train forward with the fused epilogue relu(bn(x) + z)
            "numbabn": lambda: numbabn.batch_norm(x, rm, rv, w, b, True, **epi),
            "out=": lambda: numbabn.batch_norm(x, rm, rv, w, b, True, out=y_out, **epi),
            "numpy": numpy_relu_forward,
        },
        "bwd relu": {  # its backward, dresidual too
            "numbabn": lambda: numbabn.batch_norm_backward(
                dy, x, mean, invstd, w, axis=axis, activation="relu", y=y_relu, residual_grad=True
            ),
            "numpy": numpy_relu_backward,
        },
    }
    if torch:
        for op, fn in _torch_cases(x, dy, w, b, axis, threads).items():
            cases[op]["torch"] = fn
    return cases


def _print_table(cases, floors, med, mb) -> None:
    """The main job's table: median ms per op and peer, floors and speed-ups."""
    has_torch = any("torch" in p for p in cases.values())
    head = f"{'op':<10} {'numbabn':>9} {'out=':>9} {'numpy':>9}"
    head += f" {'torch':>9}" if has_torch else ""
    head += f" {'floor':>9} {'x numpy':>8}" + (f" {'x torch':>8}" if has_torch else "") + f" {'of floor':>9}"
    print(f"\ntimes in ms (read pass {med['read']:.3f} ms = {mb / med['read']:.1f} GB/s, "
          f"copy {med['copy']:.3f} ms = {2 * mb / med['copy']:.1f} GB/s moved)")
    print(head)
    for op in cases:
        reads, copies = floors[op]
        floor = reads * med["read"] + copies * med["copy"]
        nb = med[(op, "numbabn")]
        nb_out = med.get((op, "out="))
        row = f"{op:<10} {nb:9.3f} " + (f"{nb_out:9.3f}" if nb_out else f"{'-':>9}")
        row += f" {med[(op, 'numpy')]:9.3f}"
        if has_torch:
            row += f" {med[(op, 'torch')]:9.3f}"
        row += f" {floor:9.3f} {med[(op, 'numpy')] / nb:7.2f}x"
        if has_torch:
            row += f" {med[(op, 'torch')] / nb:7.2f}x"
        row += f" {floor / min(nb, nb_out or nb):8.0%}"
        print(row)
    print("out=: numbabn writing into a preallocated output; x numpy / x torch: speed-up of "
          "numbabn (fresh output) over that peer; of floor: floor time / best numbabn time")
    print("floors: train fwd = read + copy, eval fwd = copy, backward = 3 reads + copy, "
          "+z, relu = 2 reads + copy, bwd relu = 3 reads + 2 copies")


def main(argv=None) -> int:
    args = _parse(argv)
    if args.precompile:
        from numbabn import precompile

        seconds = precompile(dtypes=args.dtypes)
        print(f"numbabn {numbabn.__version__}: CPU kernels ({', '.join(args.dtypes)}) compiled or "
              f"loaded in {seconds:.1f} s")
        return 0
    steady = False if args.system_malloc else _keep_freed_memory()
    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    x, dy, w, b, axis = _make_inputs(args)
    mb = x.nbytes / 1e6
    print(f"numbabn {numbabn.__version__}: x {x.shape} {x.dtype} {args.layout.upper()} "
          f"({mb:.1f} MB), {threads} threads, median of {args.repeats}, "
          f"allocator: {'freed memory reused' if steady else 'system default'}")
    lines, ok = _check(x, dy, w, b, axis)
    print("check against the float64 NumPy reference:")
    print("\n".join(lines))
    print("  -> " + ("all within limits" if ok else "FAILED"))

    flat = x.reshape(-1)
    flat = flat.view(np.uint16) if x.dtype.itemsize == 2 else flat  # numba has no 16-bit floats
    dst = np.empty_like(flat)
    cases = _cases(x, dy, w, b, axis, threads, not args.no_torch)
    passes = {"read": lambda: _read_pass(flat), "copy": lambda: _copy_pass(flat, dst)}
    # (reads, copies); "+z, relu": x and z read, y written; "bwd relu": dy, y and x read
    # for the sums, dresidual and x for dx, dresidual and dx written
    floors = {"train fwd": (1, 1), "eval fwd": (0, 1), "backward": (3, 1), "+z, relu": (2, 1),
              "bwd relu": (3, 2)}

    fast, slow = dict(passes), {}
    for op, peers in cases.items():
        for peer, fn in peers.items():
            (slow if peer == "numpy" else fast)[(op, peer)] = fn
    samples = {}
    _time_rounds(fast, args.repeats, samples)
    _time_rounds(slow, args.repeats, samples)
    med = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}

    _print_table(cases, floors, med, mb)
    if not args.no_torch:
        _torch_layers(threads, args.repeats)
    tiny = _tiny_calls(not args.no_torch)
    print("2x3x4x5 train forward, per call: "
          + ", ".join(f"{name} {us:.0f} us" for name, us in tiny.items()))
    print(f"first call in a fresh process (import + run, warm cache): {_first_call_seconds():.2f} s")
    return 0 if ok else 1
