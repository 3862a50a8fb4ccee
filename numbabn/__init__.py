"""numbabn: Numba-compiled batch normalization for NumPy and CUDA arrays.

Functions follow ``torch.nn.functional.batch_norm`` semantics, with a channel ``axis``
of your choice; NumPy arrays run on parallel CPU kernels, CUDA arrays (anything with
``__cuda_array_interface__``) on GPU kernels without leaving the device.
"""

from ._fold import fold
from ._functional import batch_norm, batch_norm_backward, batch_norm_forward, batch_stats
from ._module import BatchNorm
from ._precompile import precompile

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "__version__",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_stats",
    "fold",
    "precompile",
]
