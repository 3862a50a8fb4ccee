"""The main job's PyTorch part: numbabn.torch's layers against torch's under autograd.

Times, for 2-D batch norm layers of both libraries, a forward and backward under autograd
(NCHW and channels_last at 32x64x56x56, and a tiny 8x16x8x8 layer), and a whole
training step (forward, loss, backward, SGD update) of a small ResNet of conv-BN-ReLU
blocks, batch 16 at 56x56, built twice from the same seed: with torch's layers and
converted to numbabn's. Timed in rounds, as the main job's other peers.
"""

from __future__ import annotations

from functools import partial


def _resnet(torch, width=32):
    """A small ResNet: a stem and two residual blocks of conv-BN-ReLU, then a head."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
            )

        def forward(self, x):
            return torch.relu(self.body(x) + x)

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        Block(width), Block(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )


def cases(threads: int) -> dict:
    """{case: {"numbabn": fn, "torch": fn}}; empty without PyTorch."""
    try:
        import torch

        import numbabn.torch as nbt
    except ImportError:
        return {}
    torch.set_num_threads(threads)
    out = {}
    for name, shape, fmt in [
        ("layer NCHW 32x64x56x56", (32, 64, 56, 56), torch.contiguous_format),
        ("layer NHWC 32x64x56x56", (32, 64, 56, 56), torch.channels_last),
        ("layer 8x16x8x8", (8, 16, 8, 8), torch.contiguous_format),
    ]:
        x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
        g = torch.randn(shape).to(memory_format=fmt)

        def step(layer, x=x, g=g):
            x.grad = None
            layer(x).backward(g)

        layers = {"numbabn": nbt.BatchNorm2d(shape[1]), "torch": torch.nn.BatchNorm2d(shape[1])}
        out[name] = {peer: partial(step, layer) for peer, layer in layers.items()}
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 56, 56, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)

    def trainer(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()

        return step

    out["ResNet step 16x3x56x56"] = {
        "numbabn": trainer(nbt.convert(_resnet(torch))),
        "torch": trainer(_resnet(torch)),
    }
    return out


def report(cases: dict, med: dict) -> list[str]:
    """Table lines from the medians ``med[(case, peer)]`` (ms)."""
    lines = [f"{'under autograd (fwd + bwd)':<26} {'numbabn':>9} {'torch':>9} {'x torch':>8}"]
    for case in cases:
        nb, th = med[(case, "numbabn")], med[(case, "torch")]
        lines.append(f"{case:<26} {nb:9.3f} {th:9.3f} {th / nb:7.2f}x")
    return lines

