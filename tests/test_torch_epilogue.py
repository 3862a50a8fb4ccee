"""numbabn.torch's fused epilogue, relu(bn(x) + residual), against torch's composition
of BatchNorm2d, addition and ReLU (CPU tensors)."""

from __future__ import annotations

import copy

import pytest

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU tensors")
torch = pytest.importorskip("torch")

import numbabn.torch as nbt  # noqa: E402


class _Block(torch.nn.Module):
    """A residual block: conv-BN-ReLU, conv-BN, + input, ReLU; with numbabn's layers
    the second BN takes the residual and the ReLU as its epilogue."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused
        self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        if fused:
            self.bn1 = nbt.BatchNorm2d(4, activation="relu")
            self.bn2 = nbt.BatchNorm2d(4, activation="relu")
        else:
            self.bn1, self.bn2 = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        if self.fused:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_residual_block_trains_as_torch(channels_last):
    """20 SGD steps, float64: losses, gradients and buffers equal within 1e-9."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    theirs = _Block(False).double().to(memory_format=fmt)
    ours = _Block(True).double().to(memory_format=fmt)
    ours.load_state_dict(theirs.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ours, theirs)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64).to(memory_format=fmt)
        losses = []
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            loss = (model(x) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-9)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-9, msg=name)
        for opt in opts:
            opt.step()
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=1e-9)
    ours.eval(), theirs.eval()
    x = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck_with_residual(training, activation):
    torch.manual_seed(3)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.rand(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def f(x, z, w, b):
        return nbt.batch_norm(x, rm.clone(), rv.clone(), w, b, training, residual=z,
                              activation=activation)

    assert torch.autograd.gradcheck(f, (x, z, w, b))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_opcheck_with_epilogue(channels_last, training):
    x, z = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(3), torch.rand(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    op = torch.ops.numbabn.batch_norm.default
    torch.library.opcheck(op, (x, rm, rv, w, b, training, 0.1, 1e-5, z, "relu"))
    torch.library.opcheck(op, (x, rm, rv, w, b, training, 0.1, 1e-5, None, "relu"))


def test_compiles_with_epilogue():
    """Under torch.compile: outputs and gradients (residual's included) as torch's."""
    ours, theirs = nbt.BatchNorm2d(3, activation="relu"), torch.nn.BatchNorm2d(3)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x, z, g = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    zs = [z.clone().requires_grad_() for _ in range(2)]
    ys = [compiled(xs[0], zs[0]), torch.relu(theirs(xs[1]) + zs[1])]
    torch.testing.assert_close(ys[0], ys[1])
    for y in ys:
        y.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(zs[0].grad, zs[1].grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


def test_convert_fuses_relu():
    torch.manual_seed(4)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1),
        torch.nn.ReLU(),
    )
    plain = copy.deepcopy(net)
    nbt.convert(net, fuse_relu=True)
    assert net[1].activation == "relu" and isinstance(net[2], torch.nn.Identity)
    assert net[4].activation is None and isinstance(net[6], torch.nn.ReLU)
    x = torch.randn(5, 3, 7, 7)
    torch.testing.assert_close(net(x), plain(x))
    assert nbt.convert(copy.deepcopy(plain))[1].activation is None  # only when asked


def test_epilogue_errors():
    with pytest.raises(ValueError, match="activation"):
        nbt.BatchNorm2d(3, activation="gelu")
    bn = nbt.BatchNorm2d(3, activation="relu")
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="shape"):
        bn(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    torch.testing.assert_close(bn.state_dict(), before)
    with pytest.raises(ValueError, match="epilogue"):
        nbt.SyncBatchNorm(3, activation="relu")
