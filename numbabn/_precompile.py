"""Fill numba's on-disk cache ahead of first use (``python -m numbabn --precompile``).

A first call in a process with an empty cache compiles the kernels its plan takes, which
costs seconds per operation. ``precompile`` runs every operation (the fused epilogue and
its backward included) over shapes that take every CPU plan (single-thread kernels,
fused per-channel passes, reductions cut into segments or runs, flat short planes,
channels-last rows), with plain and with streaming stores, for each dtype, in parallel
worker processes (numba writes its cache files atomically, so they may share it), and
returns the seconds it took.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

DTYPES = ("float16", "float32", "float64") + (
    ("bfloat16",) if importlib.util.find_spec("ml_dtypes") else ()
)
# (shape, axis): one of each plan (see ``tests/test_reproducible.py``).
_CASES = (
    ((4, 3, 5, 7), 1),
    ((64, 8, 14, 14), 1),
    ((2, 3, 40000), 1),
    ((7, 5, 97, 101), 1),
    ((300, 16, 4, 4), 1),
    ((64, 8, 8, 8), 1),
    ((64, 20, 20, 33), -1),
    ((4, 6, 6, 33), -1),
    ((1000, 300), 1),
    ((4, 8, 64, 64), 1),  # fused passes into streamed outputs (rows of 8 KB or more)
    ((40, 8200), 1),  # rows past block_max_c: bands
    ((16, 100, 7, 7), 1),  # flat planes past block_max_c: per-channel constants
    ((96, 16, 16, 32), -1),  # channels-last rows of whole cache lines
)
# A worker run with this cache share streams even these small outputs.
_STREAM_LLC_BYTES = 1 << 16


def run_cases(dtype: str) -> None:
    """Every operation on every case in ``dtype`` (a worker's job)."""
    import numpy as np

    import numbabn

    from ._dtypes import as_dtype

    dtype = as_dtype(dtype)
    for k, (shape, axis) in enumerate(_CASES):
        rng = np.random.default_rng(k)
        x = rng.standard_normal(shape).astype(dtype)
        c = shape[axis]
        rm, rv, w = np.zeros(c, dtype), np.ones(c, dtype), np.ones(c, dtype)
        y, mean, invstd = numbabn.batch_norm_forward(x, w, w, axis=axis)
        numbabn.batch_stats(x, axis=axis)
        numbabn.batch_norm(x, rm, rv, w, w, training=True, axis=axis)
        numbabn.batch_norm(x, rm, rv, w, w, axis=axis, out=np.empty_like(x))
        numbabn.batch_norm_backward(x, x, mean, invstd, w, axis=axis)
        numbabn.batch_norm_backward(x, x, mean, invstd, w, axis=axis, training=False)
        # the fused epilogue and the backward through its ReLU
        y, mean, invstd = numbabn.batch_norm_forward(x, axis=axis, residual=x, activation="relu")
        numbabn.batch_norm(x, rm, rv, axis=axis, residual=x, activation="relu")
        for training in (True, False):
            numbabn.batch_norm_backward(x, x, mean, invstd, axis=axis, training=training,
                                        activation="relu", y=y)
        numbabn.batch_norm_backward(x, x, mean, invstd, axis=axis, activation="relu", y=y,
                                    residual_grad=True)


def _jobs(dtypes) -> list[tuple[str, bool]]:
    return [(d, streamed) for d in dtypes for streamed in (False, True)]


def worker_env(streamed: bool) -> dict:
    """The environment of a worker: this process's, with a cache share that makes even
    the small cases stream when ``streamed``."""
    env = dict(os.environ)
    if streamed:
        env["NUMBABN_LLC_BYTES"] = str(_STREAM_LLC_BYTES)
    return env


def _start(dtype: str, streamed: bool) -> subprocess.Popen:
    code = f"from numbabn import _precompile; _precompile.run_cases({dtype!r})"
    return subprocess.Popen(
        [sys.executable, "-c", code], env=worker_env(streamed), stderr=subprocess.PIPE, text=True
    )


def _bar(done: int, total: int, seconds: float, stream) -> None:
    filled = 30 * done // total
    stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} jobs, {seconds:.1f} s")
    stream.flush()


def precompile(dtypes=DTYPES, processes: int | None = None, progress: bool = True) -> float:
    """Compile (or load) every CPU kernel for ``dtypes`` into numba's cache, in up to
    ``processes`` worker processes at once (default: the CPUs this process may use);
    ``progress`` draws a bar on stderr. Returns the seconds it took; RuntimeError if a
    worker failed."""
    from ._cpu.tuning import usable_cpus

    jobs = _jobs(dtypes)
    processes = max(1, processes or usable_cpus())
    t0, running, done, errors = time.perf_counter(), [], 0, []
    while jobs or running:
        while jobs and len(running) < processes:
            running.append(_start(*jobs.pop(0)))
        finished = running.pop(0)
        _, err = finished.communicate()
        if finished.returncode:
            errors.append(err[-2000:])
        done += 1
        if progress:
            _bar(done, done + len(jobs) + len(running), time.perf_counter() - t0, sys.stderr)
    if progress:
        sys.stderr.write("\n")
    if errors:
        raise RuntimeError("precompile worker failed:\n" + errors[0])
    return time.perf_counter() - t0
