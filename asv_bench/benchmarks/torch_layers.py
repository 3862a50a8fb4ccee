"""numbabn.torch's BatchNorm2d against torch.nn.BatchNorm2d, float32, CPU tensors (skipped
without PyTorch): a training step of the layer (forward, then backward of a fixed
gradient) and an inference call (eval mode under ``torch.no_grad``).

Aims (ratios to torch's time on the same machine, read side by side): the training step
at least 2x faster at 32x64x56x56 NCHW and 1.5x channels-last, and the 8x16x8x8 layer
within 1.5x of torch's time."""

from __future__ import annotations

# (N, C, H, W) and memory format of each case
CASES = {
    "nchw": ((32, 64, 56, 56), "contiguous_format"),
    "nhwc": ((32, 64, 56, 56), "channels_last"),
    "small": ((8, 16, 8, 8), "contiguous_format"),
}


class Layer:
    params = [["numbabn", "torch"], list(CASES)]
    param_names = ["impl", "case"]
    timeout = 300

    def setup(self, impl, case):
        try:
            import torch

            import numbabn.torch as nbt
        except ImportError:
            raise NotImplementedError("needs PyTorch") from None
        self.torch = torch
        shape, fmt = CASES[case]
        fmt = getattr(torch, fmt)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(shape, generator=gen).to(memory_format=fmt).requires_grad_()
        self.g = torch.randn(shape, generator=gen).to(memory_format=fmt)
        cls = nbt.BatchNorm2d if impl == "numbabn" else torch.nn.BatchNorm2d
        self.layer, self.frozen = cls(shape[1]), cls(shape[1]).eval()
        self.time_train_step(impl, case)  # (compiles, or loads from numba's cache)
        self.time_inference(impl, case)

    def time_train_step(self, *_):
        self.x.grad = None
        self.layer(self.x).backward(self.g)

    def time_inference(self, *_):
        with self.torch.no_grad():
            self.frozen(self.x)
