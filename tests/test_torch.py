"""numbabn.torch against PyTorch's own batch norm (CPU tensors), and numbabn's
functions on PyTorch CPU tensors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from helpers import ON_DEVICE

pytestmark = pytest.mark.skipif(ON_DEVICE, reason="CPU tensors")
torch = pytest.importorskip("torch")

import numbabn  # noqa: E402
import numbabn.torch as nbt  # noqa: E402


def _net(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8, momentum=None), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4), torch.nn.BatchNorm1d(4),
    ).to(dtype)


@pytest.mark.parametrize("channels_last", [False, True])
def test_converted_net_trains_as_torch(channels_last):
    """20 SGD steps of a small conv net, float64: losses, gradients, running statistics
    and num_batches_tracked equal to torch's within 1e-9; then eval outputs."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours, theirs = _net(torch.float64), _net(torch.float64)
    ours = nbt.convert(ours).to(memory_format=fmt)
    theirs = theirs.to(memory_format=fmt)
    assert sum(isinstance(m, (nbt.BatchNorm1d, nbt.BatchNorm2d)) for m in ours.modules()) == 3
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(5, 3, 6, 6, generator=gen, dtype=torch.float64).to(memory_format=fmt)
        target = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        losses = []
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            loss = ((model(x) - target) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-9)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-9)
        for opt in opts:
            opt.step()
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64).to(memory_format=fmt)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_opcheck(dtype, channels_last, training, affine):
    x = torch.randn(4, 3, 5, 5, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(3, dtype=dtype) if affine else None
    b = torch.rand(3, dtype=dtype) if affine else None
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    torch.library.opcheck(torch.ops.numbabn.batch_norm.default, (x, rm, rv, w, b, training, 0.1, 1e-5))
    if training:
        torch.library.opcheck(torch.ops.numbabn.batch_norm.default, (x, None, None, w, b, True, 0.1, 1e-5))


@pytest.mark.parametrize("training", [False, True])
def test_gradcheck(training):
    torch.manual_seed(2)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.rand(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return nbt.batch_norm(x, rm.clone(), rv.clone(), w, b, training)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck is not None


@pytest.mark.parametrize("training", [False, True])
def test_calls_without_autograd_and_with_match_torch(training):
    """Under no_grad, and on tensors none of which requires grad, no graph is recorded
    and the outputs and running statistics are torch's; with autograd the gradients are
    torch's."""
    torch.manual_seed(3)
    ours, theirs = nbt.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        for t in (*ours.parameters(), ours.running_mean):
            t.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    theirs.load_state_dict(ours.state_dict())
    ours.train(training), theirs.train(training)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        ys = ours(x), theirs(x)
    assert ys[0].grad_fn is None
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=1e-12)
    plain = nbt.batch_norm(x, ours.running_mean.clone(), ours.running_var.clone(), training=training)
    assert plain.grad_fn is None and not plain.requires_grad
    xs = [x.clone().requires_grad_() for _ in range(2)]
    g = torch.randn_like(x)
    for model, xi in zip((ours, theirs), xs):
        model(xi).backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=1e-12)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=1e-12)


def test_compiles_without_graph_break():
    """Under torch.compile the custom operator runs (eager calls take a lighter path):
    the same outputs, gradients and running statistics as torch's layer."""
    ours, theirs = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = torch.randn(4, 3, 5, 5) + step
        xs = [x.clone().requires_grad_() for _ in range(2)]
        g = torch.randn(4, 3, 5, 5)
        ys = [compiled(xs[0]), theirs(xs[1])]
        torch.testing.assert_close(ys[0], ys[1])
        for y in ys:
            y.backward(g)
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("cls,shape", [(nbt.BatchNorm1d, (6, 3)), (nbt.BatchNorm1d, (6, 3, 5)),
                                       (nbt.BatchNorm2d, (2, 3, 4, 5)), (nbt.BatchNorm3d, (2, 3, 2, 3, 4))])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_modules_match_torch(cls, shape, momentum, track):
    base = {nbt.BatchNorm1d: torch.nn.BatchNorm1d, nbt.BatchNorm2d: torch.nn.BatchNorm2d,
            nbt.BatchNorm3d: torch.nn.BatchNorm3d}[cls]
    kw = {"momentum": momentum, "track_running_stats": track}
    ours, theirs = cls(3, **kw), base(3, **kw)
    assert isinstance(ours, base)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for step in range(3):
        x = torch.randn(shape) + step
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))


def test_state_dict_round_trip_both_ways():
    theirs = torch.nn.BatchNorm2d(4)
    theirs(torch.randn(3, 4, 2, 2) * 3 + 1)
    ours = nbt.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    ours(torch.randn(3, 4, 2, 2))
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.state_dict(), ours.state_dict())


def test_convert_keeps_tensors_dtype_and_mode():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3).double().eval())
    bn = model[0]
    weight, running_mean = bn.weight, bn.running_mean
    assert nbt.convert(model) is model
    assert type(model[0]) is nbt.BatchNorm2d and model[0].weight is weight
    assert model[0].running_mean is running_mean and not model[0].training
    assert model[0].weight.dtype == torch.float64
    single = nbt.convert(torch.nn.BatchNorm1d(2))
    assert type(single) is nbt.BatchNorm1d


def test_module_errors_change_nothing():
    bn = nbt.BatchNorm2d(3)
    with pytest.raises(RuntimeError):
        bn(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError):
        bn(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError):  # torch's own check of the input's rank
        bn(torch.randn(2, 3, 3))
    assert int(bn.num_batches_tracked) == 0
    torch.testing.assert_close(bn.running_mean, torch.zeros(3))
    torch.testing.assert_close(bn.running_var, torch.ones(3))


def test_numbabn_functions_take_cpu_tensors():
    """Tensor in, tensor out; running statistics updated in the tensors' memory; out
    honoured; statistics and running update in one call (batch_norm_forward)."""
    x = torch.randn(4, 3, 5, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    y = numbabn.batch_norm(x, rm, rv, training=True)
    expected = torch.nn.functional.batch_norm(x, rm2, rv2, training=True)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(rm, rm2), torch.testing.assert_close(rv, rv2)
    out = torch.empty_like(x)
    assert numbabn.batch_norm(x, rm, rv, out=out) is out
    xl = x.to(memory_format=torch.channels_last)
    y, mean, invstd = numbabn.batch_norm_forward(xl, running_mean=rm, running_var=rv, momentum=0.5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rm, 0.5 * rm2 + 0.5 * x.mean(dim=(0, 2, 3)))
    dx, dw, db = numbabn.batch_norm_backward(torch.ones_like(x), x, mean, invstd)
    assert all(isinstance(t, torch.Tensor) for t in (dx, dw, db))
    mean, var = numbabn.batch_stats(x)
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False))
    with pytest.raises(TypeError, match="NumPy array or a CUDA array"):
        numbabn.batch_norm(x, [0.0] * 3, rv, training=True)


_ORDERS = {
    "torch first": "import torch; torch.set_num_threads(1); import numbabn, numpy as np; "
                   "numbabn.batch_norm(np.ones((16, 16, 48, 48), np.float32), training=True)",
    "numbabn first": "import numbabn, numpy as np; "
                     "numbabn.batch_norm(np.ones((16, 16, 48, 48), np.float32), training=True); "
                     "import torch; torch.set_num_threads(1); "
                     "numbabn.batch_norm(np.ones((16, 16, 48, 48), np.float32), training=True)",
    "through numbabn.torch": "import torch; torch.set_num_threads(1); torch.get_num_threads(); "
                             "import numbabn.torch as nbt; nbt.BatchNorm2d(16)(torch.ones(16, 16, 48, 48))",
}


@pytest.mark.parametrize("order", list(_ORDERS))
def test_torch_thread_count_unchanged(order):
    """In a fresh process, whichever library runs first: torch keeps the thread count
    it was given."""
    script = _ORDERS[order] + "; import torch; print(torch.get_num_threads())"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"


def test_numbabn_uses_at_most_torchs_threads():
    import numba

    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(1)
        real = numba.set_num_threads

        def spy(n):
            seen.append(n)
            real(n)

        numba.set_num_threads = spy
        nbt.batch_norm(torch.randn(16, 16, 48, 48), None, None, training=True)
    finally:
        numba.set_num_threads = real
        torch.set_num_threads(before)
    if numba.config.NUMBA_NUM_THREADS > 1:
        assert seen and seen[0] == 1
    assert np.all(np.asarray(seen) <= numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("world", [2, 3])
def test_sync_batch_norm_over_gloo(world, tmp_path):
    """SyncBatchNorm on 2 and 3 gloo ranks (uneven slices, one empty) equals one
    BatchNorm2d over the whole batch: outputs, dx, running statistics, and dweight/dbias
    once all-reduced."""
    import os

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sync_worker.py")
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, worker, str(r), str(world), str(init)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def test_float16_layer_matches_torch():
    ours, theirs = nbt.BatchNorm2d(4).half(), torch.nn.BatchNorm2d(4).half()
    x = torch.randn(3, 4, 5, 5).half()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [ours(xs[0]), theirs(xs[1])]
    g = torch.randn_like(x)
    for y in ys:
        y.backward(g)
    tol = {"rtol": 4e-3, "atol": 4e-3}
    torch.testing.assert_close(ys[0], ys[1], **tol)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol)
    assert ours.weight.grad.dtype == torch.float16
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)


def _randomize_statistics(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen, dtype=torch.float64))


def test_fold_a_sequential_model():
    """``nbt.fold``: each BatchNorm after a Conv, ConvTranspose or Linear in an
    ``nn.Sequential`` folded into it (with and without a layer bias), the eval-mode
    outputs equal within 1e-10 (float64); a training-mode model is refused."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, bias=False), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(6, 5, 3), nbt.BatchNorm2d(5), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(5, 4, 1), torch.nn.BatchNorm2d(4)),
        torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 7), torch.nn.BatchNorm1d(7),
    ).to(torch.float64)
    _randomize_statistics(model, 4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="eval mode"):
        nbt.fold(model)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert nbt.fold(model) is model
        got = model(x)
    kinds = [type(m) for m in model.modules()]
    assert torch.nn.Identity in kinds and not any(
        issubclass(k, torch.nn.modules.batchnorm._BatchNorm) for k in kinds
    )
    assert model[0].bias is not None  # a bias was added where the layer had none
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
