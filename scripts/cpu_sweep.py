"""numbabn against PyTorch on the CPU over a range of float32 shapes (needs torch).

The main job (``python -m numbabn``) times one shape in depth; this sweep shows where
numbabn stands across the sizes a CNN meets, from a BatchNorm1d batch to a large NCHW
activation. For each shape and operation it alternates blocks of calls of the two
libraries (with a pause between blocks, so one library's idle OpenMP threads have
stopped spinning before the other runs), takes the fastest call of each block, and
reports the median over rounds of the per-round ratio torch / numbabn (> 1: numbabn
faster) with numbabn's median time.

Usage: PYTHONPATH=. python scripts/cpu_sweep.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import torch

import numbabn
from numbabn._bench import _keep_freed_memory, _torch_cases

from sweep_shapes import CASES


def _block(fn, calls: int) -> float:
    time.sleep(0.2)
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _ops(shape, axis, rng, threads):
    """(numbabn call, PyTorch call) per operation; PyTorch's as the main job makes them."""
    c = shape[axis]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w, b = rng.random(c, dtype=np.float32), rng.random(c, dtype=np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis)
    theirs = _torch_cases(x, dy, w, b, axis, threads)
    ours = {
        "train fwd": lambda: numbabn.batch_norm(x, rm, rv, w, b, True, axis=axis),
        "eval fwd": lambda: numbabn.batch_norm(x, rm, rv, w, b, False, axis=axis),
        "backward": lambda: numbabn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis),
    }
    return {op: (ours[op], theirs[op]) for op in ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="calls per block")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    _keep_freed_memory()
    rng = np.random.default_rng(0)
    print(f"{threads} threads, torch {torch.__version__}, float32; "
          "numbabn median time (us) and median ratio torch / numbabn")
    print("| shape | axis | MB | train | | eval | | backward | |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, axis in CASES:
        cells = []
        for ours, theirs in _ops(shape, axis, rng, threads).values():
            mine, ratio = [], []
            for r in range(args.rounds):
                pair = (ours, theirs) if r % 2 == 0 else (theirs, ours)
                t = {fn: _block(fn, args.calls) for fn in pair}
                mine.append(t[ours])
                ratio.append(t[theirs] / t[ours])
            cells += [f"{np.median(mine) * 1e6:.0f}", f"{np.median(ratio):.2f}x"]
        mb = np.prod(shape) * 4 / 1e6
        print(f"| {'x'.join(map(str, shape))} | {axis} | {mb:.1f} | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
