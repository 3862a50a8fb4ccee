"""The main job's PyTorch part: numbabn.torch's layers against torch's under autograd.

Times, for 2-D batch norm layers of both libraries, a forward and backward under autograd
(NCHW and channels_last at 32x64x56x56, and a tiny 8x16x8x8 layer; and relu(bn(x) + z),
numbabn's fused epilogue against torch's three steps), and a whole training step
(forward, loss, backward, SGD update) of a small ResNet of conv-BN-ReLU blocks, batch 16
at 56x56, built twice from the same seed: with torch's layers and converted to numbabn's
(also with the blocks' ReLUs and residual additions fused into their batch norms).
Timed in rounds, as the main job's other peers.
"""

from __future__ import annotations

from functools import partial


def _resnet(torch, width=32, nbt=None):
    """A small ResNet: a stem and two residual blocks of conv-BN-ReLU, then a head; with
    ``nbt`` (numbabn.torch), every BN-ReLU pair and each block's BN, addition and ReLU
    are numbabn layers with the fused epilogue."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
            )
            if nbt is not None:
                nbt.convert(self.body, fuse_relu=True)
                self.body[4].activation = "relu"

        def forward(self, x):
            if nbt is not None:
                return self.body[4](self.body[:4](x), x)
            return torch.relu(self.body(x) + x)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        Block(width), Block(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )
    return model if nbt is None else nbt.convert(model, fuse_relu=True)


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
    shape = (32, 64, 56, 56)
    x = torch.randn(shape).requires_grad_()
    z, g = torch.randn(shape).requires_grad_(), torch.randn(shape)
    fused, plain = nbt.BatchNorm2d(64, activation="relu"), torch.nn.BatchNorm2d(64)

    def epilogue_step(layer):
        x.grad = z.grad = None
        layer(x, z).backward(g)

    out["relu(bn+z) NCHW 32x64x56x56"] = {
        "numbabn": partial(epilogue_step, fused),
        "torch": partial(epilogue_step, lambda x, z: torch.relu(plain(x) + z)),
    }
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
    out["ResNet step, fused epilogues"] = {
        "numbabn": trainer(_resnet(torch, nbt=nbt)),
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

