"""The task loops of the CPU passes (``_cpu.tasks``): a serial kernel packs its tasks'
arguments and runs them through the one parallel launcher, which calls each task by
address. Every task index runs once, with the arguments as packed (arrays of any
layout, tuples, None, scalars); a kernel that packs other types than ``launch`` was
told raises before any task runs; functions are called at the address of their own
machine code for the arguments' types."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels only")

if not ON_DEVICE:
    from numba import njit

    from numbabn._cpu import tasks

    @njit
    def _task(t, out, pair, scale, none):
        a, b = pair
        out[t] += (a[t] + b[t]) * scale + (0.0 if none is None else 1.0)

    @njit
    def _kernel(go, out, pair, scale):
        out[:] = 0.0  # (before the tasks: the kernel's own serial code)
        tasks.run(go, out.size, (out, pair, scale, None))
        out[0] += 0.5  # (after them)


@pytest.mark.parametrize("size", [1, 2, 37])
def test_each_task_runs_once_on_the_packed_arguments(size):
    a, b = np.arange(2.0 * size)[::2], np.arange(size, dtype=np.float64) ** 2
    out = np.full(size, np.nan)
    tasks.launch(_kernel, _task, (out, (a, b), 3.0, None), out, (a, b), 3.0)
    expected = (a + b) * 3.0
    expected[0] += 0.5
    np.testing.assert_array_equal(out, expected)


def test_tasks_run_on_every_thread_count():
    from numba import get_num_threads, set_num_threads

    a, b = np.arange(64.0), np.ones(64)
    before = get_num_threads()
    try:
        for n in range(1, before + 1):
            set_num_threads(n)
            out = np.zeros(64)
            tasks.parallel(_task, 64, out, (a, b), 2.0, None)
            np.testing.assert_array_equal(out, (a + b) * 2.0)
    finally:
        set_num_threads(before)


def test_a_kernel_packing_other_types_raises_before_running_a_task():
    out = np.zeros(5)
    pair = (np.ones(5), np.ones(5))
    told = (out.astype(np.float32), pair, 3.0, None)  # the kernel packs float64
    with pytest.raises(TypeError, match="other types"):
        tasks.launch(_kernel, _task, told, out, pair, 3.0)
    np.testing.assert_array_equal(out, 0.0)  # (the kernel's first line ran, no task)


def test_each_layout_of_an_array_has_its_own_address():
    """``tasks.address``: the machine code for the arguments' types, so a strided view
    never runs the contiguous code; a function whose result a call would drop is
    refused."""

    @njit
    def scaled_sum(out, pair, scale, none):
        a, b = pair
        for i in range(out.size):
            out[i] = (a[i] + b[i]) * scale

    a, b = np.arange(12.0), np.arange(12.0) ** 2
    contiguous = tasks.address(scaled_sum, (np.empty(6), (a, b), 3.0, None))
    strided = tasks.address(scaled_sum, (np.empty(12)[::2], (a, b), 3.0, None))
    assert contiguous != strided
    assert tasks.address(scaled_sum, (np.empty(7), (a, b), 2.0, None)) == contiguous
    with pytest.raises(TypeError, match="returns a value"):
        tasks.address(njit(lambda a: a[0]), (a,))
