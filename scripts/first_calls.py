"""First calls with numba's cache empty: the seconds of a train forward (with running
statistics), an eval forward and a backward, in that order, each the first of its kind
in a fresh process with a fresh, empty cache directory, for NCHW and channels-last
32x64x56x56 float32 (or ``--shape``). With ``--rev``, the processes of this tree and of
that commit alternate (its package taken from git by ``paired_builds.extract``), so
that both see the same phases of the machine. ``--top K`` also prints, per operation,
the K compilations that took longest, each by its own time (its nested compilations
taken out), from numba's compile events.

Usage: python scripts/first_calls.py [--rev REV] [--runs 3] [--top 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from paired_builds import extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in the measured process: times each first call, and each compilation's own time.
_CHILD = r"""
import collections, json, sys, time
import numpy as np
from numba.core import event

shape, channels_last, top = json.loads(sys.argv[1])
own, stack = collections.defaultdict(float), []

class Compilations(event.Listener):
    def on_start(self, ev):
        stack.append([time.perf_counter(), 0.0])

    def on_end(self, ev):
        t0, nested = stack.pop()
        took = time.perf_counter() - t0
        if stack:
            stack[-1][1] += took
        f = getattr(ev.data["dispatcher"], "py_func", ev.data["dispatcher"])
        own[f"{f.__module__}.{f.__qualname__}"] += took - nested

event.register("numba:compile", Compilations())
import numbabn

x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
axis = 1
if channels_last:
    x, axis = np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1
c = x.shape[axis]
w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
ops = {
    "train": lambda: numbabn.batch_norm_forward(
        x, w, b, running_mean=rm, running_var=rv, momentum=0.1, axis=axis),
    "eval": lambda: numbabn.batch_norm(x, rm, rv, w, b, False, axis=axis),
}
result = {}
for name in ("train", "eval", "backward"):
    own.clear()
    t0 = time.perf_counter()
    if name == "backward":
        numbabn.batch_norm_backward(x, x, mean, invstd, w, axis=axis)
    elif name == "train":
        _, mean, invstd = ops[name]()
    else:
        ops[name]()
    result[name] = time.perf_counter() - t0
    result[name + " compilations"] = sorted(own.items(), key=lambda kv: -kv[1])[:top]
print(json.dumps(result))
"""


def _measure(path: str, shape, channels_last: bool, top: int) -> dict:
    env = dict(os.environ, PYTHONPATH=path, NUMBA_CACHE_DIR=tempfile.mkdtemp(prefix="nb-cache-"))
    arg = json.dumps([list(shape), channels_last, top])
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, arg], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", help="a commit to alternate with")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--top", type=int, default=0)
    p.add_argument("--shape", default="32,64,56,56", help="NCHW shape")
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    builds = [("this", ROOT)] + ([(args.rev, extract(args.rev))] if args.rev else [])
    print("| build | layout | train | eval | backward | all three |")
    print("|---|---|---|---|---|---|")
    for _ in range(args.runs):
        for layout, channels_last in (("NCHW", False), ("channels-last", True)):
            for name, path in builds:
                r = _measure(path, shape, channels_last, args.top)
                total = r["train"] + r["eval"] + r["backward"]
                print(f"| {name} | {layout} | {r['train']:.2f} | {r['eval']:.2f} | "
                      f"{r['backward']:.2f} | {total:.2f} |", flush=True)
                for op in ("train", "eval", "backward"):
                    for fn, took in r[op + " compilations"]:
                        print(f"    {op}: {took:.2f} s {fn}")


if __name__ == "__main__":
    main()
