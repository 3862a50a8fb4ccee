"""Digests of numbabn's CPU outputs over a matrix of dtypes, layouts, shapes and output
alignments, to show that a change of structure leaves every result bitwise the same.

The shapes are picked to reach every plan the CPU side has (small one-thread kernels,
fused per-channel passes, segments, spans, blocks, lines, planes, streamed stores).

Usage:
    PYTHONPATH=. python scripts/bitwise_matrix.py record FILE    # digests of this tree
    PYTHONPATH=. python scripts/bitwise_matrix.py compare FILE   # exit 1 on any difference
    (--dtypes bfloat16: that dtype's matrix; bfloat16 needs ml_dtypes)

scripts/results/bitwise-7373b6e.json holds the digests of commit 7373b6e (before the
CPU side became a package); bitwise-bfloat16-ffd72cd.json those of bfloat16 at ffd72cd.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

import numbabn
from numbabn._dtypes import as_dtype

# (shape, channel axis)
SHAPES = [
    ((2, 3, 4, 5), 1),
    ((5, 7, 9, 11), 1),
    ((4, 3, 33, 35), 1),
    ((64, 256, 7, 7), 1),
    ((16, 64, 28, 28), 1),
    ((8, 3, 224, 224), 1),
    ((32, 64, 56, 56), 1),
    ((64, 2048, 7, 7), 1),
    ((32, 128), 1),
    ((1000, 3), 1),
    ((256, 512), 1),
    ((7, 4099), 1),
    ((4, 9, 11, 3), -1),
    ((8, 30, 30, 5), -1),
    ((16, 17, 19, 48), -1),
    ((32, 28, 28, 32), -1),
    ((32, 14, 14, 256), -1),
    ((32, 56, 56, 64), -1),
    ((64, 56, 56, 24), -1),
]
DTYPES = ["float16", "float32", "float64"]
ALIGNS = ["fresh", "aligned", "shifted"]  # out=None; out= at a 64-byte boundary; one item past


def _out(shape, dtype, how):
    if how == "fresh":
        return None
    item = np.dtype(dtype).itemsize
    n = int(np.prod(shape))
    buf = np.empty(n * item + 128, np.uint8)
    start = (-buf.ctypes.data) % 64 + (item if how == "shifted" else 0)
    return buf[start : start + n * item].view(dtype).reshape(shape)


def _digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _case(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 20).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (rng.random(c) + 0.5).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = (rng.random(c) + 0.5).astype(dtype)
    return x, dy, w, b, rm, rv


def matrix(dtypes=DTYPES) -> dict[str, str]:
    out = {}
    for si, (shape, axis) in enumerate(SHAPES):
        for di, dtype in enumerate(dtypes):
            dt = as_dtype(dtype)
            x, dy, w, b, rm, rv = _case(shape, axis, dt, 100 * si + di)
            key = f"{'x'.join(map(str, shape))}|{axis}|{dtype}"
            rm1, rv1 = rm.copy(), rv.copy()
            y, mean, invstd = numbabn.batch_norm_forward(
                x, w, b, 1e-5, axis=axis, running_mean=rm1, running_var=rv1
            )
            for name, a in zip(("y", "mean", "invstd", "rm", "rv"), (y, mean, invstd, rm1, rv1)):
                out[f"{key}|forward|{name}"] = _digest(a)
            for training in (True, False):
                dx, dw, db = numbabn.batch_norm_backward(
                    dy, x, mean, invstd, w, axis=axis, training=training
                )
                for name, a in zip(("dx", "dw", "db"), (dx, dw, db)):
                    out[f"{key}|backward-{training}|{name}"] = _digest(a)
            for how in ALIGNS:
                for training in (True, False):
                    rm2, rv2 = rm.copy(), rv.copy()
                    y = numbabn.batch_norm(
                        x, rm2, rv2, w, b, training=training, axis=axis,
                        out=_out(shape, dt, how),
                    )
                    out[f"{key}|norm-{training}-{how}|y"] = _digest(y)
                    out[f"{key}|norm-{training}-{how}|rm"] = _digest(rm2)
        print(f"{shape} axis={axis} done", file=sys.stderr, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["record", "compare"])
    p.add_argument("file")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    args = p.parse_args()
    got = matrix(args.dtypes.split(","))
    if args.mode == "record":
        with open(args.file, "w") as f:
            json.dump(got, f, indent=0, sort_keys=True)
        print(f"{len(got)} digests written to {args.file}")
        return 0
    with open(args.file) as f:
        want = json.load(f)
    bad = sorted(k for k in want if got.get(k) != want[k])
    for k in bad[:40]:
        print("differs:", k)
    print(f"{len(want) - len(bad)} of {len(want)} outputs bitwise equal")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
