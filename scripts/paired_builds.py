"""Time this tree's CPU operations against another commit's, side by side in one process.

The other build is taken from git (``git archive REV numbabn``) into a temporary
directory and imported as ``numbabn_base``; for each shape of the main job and the
sweep (``scripts/cpu_sweep.py``) and each operation the two builds' calls alternate in
blocks (order shuffled each round), and the median over rounds of base time / this
time is reported (> 1: this tree is faster). float32, fresh outputs, the process's
thread count.

Usage: PYTHONPATH=. python scripts/paired_builds.py REV [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

import numbabn

from sweep_shapes import CASES

MAIN = [((32, 64, 56, 56), 1), ((32, 56, 56, 64), -1), ((8, 16, 8, 8), 1), ((2, 3, 4, 5), 1)]


def extract(rev: str) -> str:
    """A new directory holding the package at ``rev`` (``numbabn/`` in it)."""
    root = tempfile.mkdtemp(prefix="numbabn-base-")
    archive = os.path.join(root, "base.tar")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["git", "archive", "-o", archive, rev, "numbabn"], check=True, cwd=repo)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def _base(rev: str):
    """The package at ``rev``, imported as ``numbabn_base``."""
    root = extract(rev)
    os.rename(os.path.join(root, "numbabn"), os.path.join(root, "numbabn_base"))
    sys.path.insert(0, root)
    import numbabn_base

    return numbabn_base


def _ops(lib, x, axis):
    c = x.shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, mean, invstd = lib.batch_norm_forward(x, axis=axis)
    return {
        "train": lambda: lib.batch_norm(x, rm, rv, training=True, axis=axis),
        "eval": lambda: lib.batch_norm(x, rm, rv, axis=axis),
        "backward": lambda: lib.batch_norm_backward(x, x, mean, invstd, axis=axis),
    }


def _block(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    base = _base(args.rev)
    rng = np.random.default_rng(0)
    print(f"| shape | axis | op | this (us) | {args.rev} (us) | {args.rev} / this |")
    print("|---|---|---|---|---|---|")
    for shape, axis in MAIN + [c for c in CASES if c not in MAIN]:
        x = rng.standard_normal(shape, dtype=np.float32)
        calls = max(3, min(2000, int(2e7 // x.size)))
        this, other = _ops(numbabn, x, axis), _ops(base, x, axis)
        for op in this:
            ratios, times = [], []
            for _ in range(args.rounds):
                pair = [(this[op], "this"), (other[op], "base")]
                random.shuffle(pair)
                got = {name: _block(fn, calls) for fn, name in pair}
                ratios.append(got["base"] / got["this"])
                times.append((got["this"], got["base"]))
            t_this, t_base = np.median(times, axis=0) * 1e6
            dims = "x".join(map(str, shape))
            print(
                f"| {dims} | {axis} | {op} | {t_this:.1f} | {t_base:.1f} | "
                f"{np.median(ratios):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
