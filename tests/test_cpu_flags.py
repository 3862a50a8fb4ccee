"""Every CPU kernel compiles with its own floating-point flags, whoever calls it first.

Numba compiles a function that states no fastmath flags with those of the call that
first needs it, and its disk cache then keeps that version for every later caller and
process. A helper without flags of its own therefore rounded differently depending on
which kernel a process happened to run first (``moments`` fused its variance into an
FMA when a contracting pass compiled it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels only")

if not ON_DEVICE:
    from numba.core.registry import CPUDispatcher

    from numbabn import _bench
    from numbabn._cpu import elementwise, formulas, fused, llvm, pieces, reduce, small, tasks

    MODULES = {
        m.__name__.rsplit(".", 1)[-1]: m
        for m in (_bench, elementwise, formulas, fused, llvm, pieces, reduce, small, tasks)
    }


def _dispatchers(module):
    return {
        name: obj for name, obj in vars(module).items()
        if isinstance(obj, CPUDispatcher) and obj.__module__ == module.__name__
    }


@pytest.mark.parametrize(
    "module", ["_bench", "elementwise", "formulas", "fused", "llvm", "pieces", "reduce", "small", "tasks"]
)
def test_functions_not_inlined_state_their_fastmath_flags(module):
    found = _dispatchers(MODULES[module])
    assert found
    missing = [
        name for name, d in found.items()
        if d.targetoptions.get("inline", "never") != "always" and "fastmath" not in d.targetoptions
    ]
    assert not missing, f"no fastmath flags of their own: {missing}"


@pytest.mark.parametrize(
    "module", ["elementwise", "formulas", "fused", "llvm", "pieces", "reduce", "small", "tasks"]
)
def test_kernels_build_no_cfunc_wrapper(module):
    """Nothing calls a kernel through a C function pointer (``tasks`` calls the native
    function by address): numba's cfunc wrapper would only add compile time."""
    found = _dispatchers(MODULES[module])
    built = [
        name for name, d in found.items()
        if d.targetoptions.get("inline", "never") != "always"
        and not d.targetoptions.get("no_cfunc_wrapper")
    ]
    assert not built, f"compile a cfunc wrapper: {built}"


_FIRST_A_CONTRACTING_PASS = textwrap.dedent(
    """
    import numpy as np
    from numbabn._cpu import formulas, small

    # The fused train forward (fastmath "contract") is the first caller of moments.
    x = np.random.default_rng(0).normal(1.0, 3.0, (3, 2, 40))
    small.forward_ncl(x, np.ones(2), np.zeros(2), 1e-5, np.empty((4, 2)), np.empty((3, 2)),
                        np.empty_like(x))
    rng = np.random.default_rng(1)
    s1, s2 = rng.uniform(-50, 50, 200), rng.uniform(400, 900, 200)  # variances > 0
    got = np.array([formulas.moments(a, b, 0.0, 7)[1] for a, b in zip(s1, s2)])
    # Python's float arithmetic rounds each operation: the formula without an FMA
    want = np.array([b / 7 - (a / 7) * (a / 7) for a, b in zip(s1, s2)])
    print(int(np.sum(got != want)))
    """
)


def test_moments_rounds_the_same_after_a_contracting_caller(tmp_path):
    """In a process with an empty kernel cache (so everything compiles afresh), the
    fused train forward runs first; ``moments`` must still round every operation."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    res = subprocess.run(
        [sys.executable, "-c", _FIRST_A_CONTRACTING_PASS],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0", f"{res.stdout.strip()} of 200 variances rounded differently"


def test_the_suite_keys_numbas_cache_on_the_kernel_sources():
    """The kernels inline code from other modules, and numba's cache keys a kernel on
    its own file only: the suite keeps its cache in a directory named after all the
    kernel sources (``conftest``), and numba must really be using it (pytest imports
    numba's config before any conftest runs)."""
    import numba

    from numbabn._cpu import reduce

    from conftest import _kernel_sources_digest

    where = os.environ["NUMBA_CACHE_DIR"]
    if os.path.basename(where) != _kernel_sources_digest():
        pytest.skip("NUMBA_CACHE_DIR was set by the caller")
    assert numba.config.CACHE_DIR == where
    assert reduce._sums_ncl._cache._cache_path.startswith(where)
