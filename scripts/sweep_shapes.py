"""The shapes the CPU sweep (``cpu_sweep.py``) and the paired build comparison
(``paired_builds.py``) run: from a BatchNorm1d batch to a large NCHW activation."""

# (shape, channel axis)
CASES = [
    ((32, 128), 1),
    ((256, 512), 1),
    ((256, 64, 4, 4), 1),
    ((32, 64, 7, 7), 1),
    ((64, 256, 7, 7), 1),
    ((64, 2048, 7, 7), 1),
    ((128, 64, 14, 14), 1),
    ((32, 32, 28, 28), 1),
    ((32, 16, 56, 56), 1),
    ((32, 64, 56, 56), 1),
    ((8, 3, 224, 224), 1),
    ((32, 28, 28, 32), -1),
    ((32, 14, 14, 256), -1),
    ((32, 56, 56, 64), -1),
]
