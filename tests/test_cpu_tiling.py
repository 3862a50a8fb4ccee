"""How the channels-last (MC) elementwise passes lay out their per-channel constants.

``expand`` spreads per-channel values over the flat positions of a row (one per value,
planes of ``l`` values); the plain-store passes then take spans of whole rows several
at a time (``_block_span``). The functional tests check the passes' results; these
check the layout itself, exactly, on the odd periods the fast paths must get right.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU kernels only")

if not ON_DEVICE:
    from numbabn import _cpu_kernels


@pytest.mark.parametrize(
    "c,l,columns",
    [(3, 1, 1026), (512, 1, 1535), (1, 1, 77), (7, 1, 7), (4, 1, 3), (5, 7, 100), (5, 7, 20),
     (2, 3, 5), (3, 3, 1000), (256, 49, 13567)],
)
def test_expand_follows_its_definition(c, l, columns):
    """out[k, j] = per_channel[k, j % (C * l) // l], for periods shorter and longer than
    the row, and rows that end mid-period or mid-plane."""
    per_channel = np.random.default_rng(c * l).random((3, c))
    out = np.full((3, columns), np.nan)
    _cpu_kernels.expand(per_channel, l, out)
    j = np.arange(columns)
    np.testing.assert_array_equal(out, per_channel[:, j % (c * l) // l])


def test_block_span_is_whole_rows():
    span = _cpu_kernels._block_span.py_func
    assert span(1024, 3) == 1023 and span(1024, 24) == 1008 and span(1024, 1024) == 1024
    assert span(1024, 3136) == 3136  # one row when a row is longer than the span
    assert span(1024, _cpu_kernels._BLOCK_MAX_C + 1) == 0  # not blocked
