"""Every tunable of the CPU side in one object, ``TUNING``, and the machine facts they
start from.

Each field has a one-line reason; the measurements behind the values are in
docs/performance.md ("CPU tunables"). Plan-time fields (read in Python when a call
plans its passes) can be overridden by an environment variable ``NUMBABN_<FIELD>``
(upper case; sizes in bytes accept ``2e6``), read once at import: for example
``NUMBABN_LLC_BYTES`` (the cache share the thresholds count on) and
``NUMBABN_SMALL_VALUES_NCL`` / ``NUMBABN_SMALL_VALUES_MC`` (the limits of the
single-thread kernels). Compile-time fields (``COMPILED``) are frozen into the kernels
numba keeps in its disk cache, so they are not read from the environment.

Plan decisions that fix the order of a reduction's additions follow the shape alone,
never the thread count (results are then the same on any number of threads): they are
made as for ``plan_threads`` threads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform


def _llc_bytes(default: int = 32 << 20) -> int:
    """Size of the largest cache of CPU 0 (Linux sysfs), or ``default``."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KM")) * scale)
    except (OSError, ValueError):
        return default
    return best or default


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup (v2) CPU
    quota (a container's ``--cpus``), not the machine's count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def cache_share(llc: int, cpus: int, per_cpu: int) -> int:
    """The last-level cache the thresholds count on: ``llc`` bytes, at most ``per_cpu``
    for each of the ``cpus`` this process may use (a VM's sysfs shows the whole
    socket's cache, shared with other guests)."""
    return min(llc, per_cpu * cpus)


X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# Streaming stores are measured on x86-64 only; elsewhere every store is plain.
STREAMING = X86_64

LLC_PER_CPU = 16 << 20  # cache counted per usable CPU at most (VMs show the socket's)


@dataclasses.dataclass(frozen=True)
class Tunables:
    # --- the work split ---
    tasks_per_thread: int = 4  # tasks per thread, so uneven tasks still balance
    min_task_elements: int = 4096  # a task smaller than this costs more than it saves
    plan_threads: int = 2  # thread count the shape-only decisions assume (reproducibility)
    mc_span: int = 1024  # elements per span of the channels-last elementwise passes
    # --- the single-thread kernels (waking the pool costs more below these) ---
    small_values_ncl: int = 1 << 16
    small_values_mc: int = 1 << 18
    # --- the fused per-channel passes (a channel's slab re-read from cache) ---
    fuse_max_bytes_forward: int = 2 << 20  # x slab that stays in L2/L3
    fuse_max_bytes_backward: int = 4 << 20  # dy + x slab
    fuse_min_row_bytes: int = 2048  # shorter rows fuse only when x fits the cache share
    fuse_long_row_bytes: int = 6 << 10  # rows this long fuse at any tensor size
    fuse_any_slab_row_bytes_forward: int = 12 << 10  # forward rows that fuse at any slab
    # --- short NCL planes viewed as flat rows of C * L values ---
    flat_max_plane: int = 64  # elementwise: longer planes loop per plane
    flat_max_period: int = 1 << 17  # elementwise: values per sample at most
    flat_max_plane_sums: int = 16  # reductions: their float64 partials are per column
    flat_max_period_sums: int = 4096
    plane_loop_min: int = 64  # plain stores: planes this long go back to the plane loop
    plane_min_values: int = 16  # planes this long take per-channel constants (2 per vector)
    sweep: bool = True  # NCL reductions read a run of samples in memory order
    # --- channels-last elementwise traversals ---
    block_max_c: int = 4096  # longer rows are cut into bands instead of blocked spans
    wide_band: int = 2048  # columns per band (its constants stay in L1)
    line_row_bytes: int = 512  # streamed line sweeps: bytes of rows per sweep
    line_max_row_bytes: int = 2048  # streamed: longest rows walked as lines
    line_row_bytes_plain: int = 4096  # plain stores: longer sweeps share constants more
    line_max_row_bytes_plain: int = 512
    # --- streaming stores ---
    llc_bytes: int = 32 << 20  # the cache share (machine: ``cache_share``)
    stream_min_bytes: int = 8 << 20  # outputs this large stream (a quarter of llc_bytes)
    stream_min_row_bytes: int = 8192  # unaligned NCL planes stream only from this length
    align: int = 64  # fresh outputs that may stream start on a cache line

    def small_values(self, kind: str) -> int:
        return self.small_values_ncl if kind == "ncl" else self.small_values_mc

    def fuse_max_bytes(self, which: str) -> int:
        return self.fuse_max_bytes_forward if which == "forward" else self.fuse_max_bytes_backward

    def fuse_any_slab_row_bytes(self, which: str) -> float:
        return self.fuse_any_slab_row_bytes_forward if which == "forward" else math.inf


# Compile-time constants of the kernels (not overridable: the disk cache keeps them).
COMPILED = {
    "grain": 16,  # work pieces start on multiples of this many elements (a vector or more)
    "prefetch_blocks": 64,  # fused rows prefetch this many cache lines ahead into L2
    "block_normalize": 4,  # spans of one blocked normalize step (constants loaded once)
    "block_grad": 2,  # spans of one blocked grad_input step (more spilled registers)
}


def _setting(name: str, default):
    """Field ``name``'s value from ``NUMBABN_<NAME>`` if set, else ``default``."""
    text = os.environ.get("NUMBABN_" + name.upper(), "").strip()
    if not text:
        return default
    if isinstance(default, bool):
        return text.lower() not in ("0", "false", "no", "off")
    return int(float(text))


def from_environment() -> Tunables:
    """The defaults, the machine's cache share, then the environment's overrides."""
    base = Tunables()
    llc = _setting("llc_bytes", cache_share(_llc_bytes(), usable_cpus(), LLC_PER_CPU))
    machine = {"llc_bytes": llc, "stream_min_bytes": llc // 4}
    return Tunables(**{
        f.name: _setting(f.name, machine.get(f.name, getattr(base, f.name)))
        for f in dataclasses.fields(Tunables)
    })


TUNING = from_environment()
