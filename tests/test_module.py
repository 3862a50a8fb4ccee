"""BatchNorm: running statistics over several steps, modes, momentum conventions."""

from __future__ import annotations

import numpy as np
import pytest

import numbabn
import numbabn.reference as ref

from helpers import ON_DEVICE, assert_close, random_batch, to_host, to_side


def _steps(bn, batches, training=True):
    outs = []
    for x in batches:
        bn.train(training)
        outs.append(to_host(bn(to_side(x))))
    return outs


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("axis", [1, -1])
def test_training_steps_track_running_stats(momentum, axis):
    c = 3
    shape = (4, c, 5) if axis == 1 else (4, 5, c)
    batches = [random_batch(shape, np.float64, seed=s, per_channel_axis=axis) for s in range(4)]
    bn = numbabn.BatchNorm(c, momentum=momentum, axis=axis, dtype=np.float64)
    outs = _steps(bn, batches)
    rm, rv = np.zeros(c), np.ones(c)
    for step, (x, y) in enumerate(zip(batches, outs), start=1):
        factor = 1.0 / step if momentum is None else momentum
        yref, rm, rv = ref.batch_norm(x, rm, rv, training=True, momentum=factor, axis=axis)
        assert_close(y, yref, np.float64)
    assert bn.num_batches_tracked == 4
    assert_close(bn.running_mean, rm, np.float64)
    assert_close(bn.running_var, rv, np.float64)
    if momentum is None:
        # The cumulative average of four equal-size batches is their plain mean.
        means = [ref.batch_stats(x, axis)[0] for x in batches]
        assert_close(bn.running_mean, np.mean(means, axis=0), np.float64)


def test_eval_uses_running_stats_and_does_not_update():
    bn = numbabn.BatchNorm(3)
    x = random_batch((8, 3, 4), np.float32, seed=3, per_channel_axis=1)
    bn(to_side(x))
    rm, rv = to_host(bn.running_mean).copy(), to_host(bn.running_var).copy()
    bn.eval()
    assert bn.training is False
    x2 = random_batch((2, 3, 4), np.float32, seed=4)
    y = bn(to_side(x2))
    yref, _, _ = ref.batch_norm(x2, rm, rv, training=False)
    assert_close(y, yref, np.float32)
    np.testing.assert_array_equal(to_host(bn.running_mean), rm)
    assert bn.num_batches_tracked == 1


def test_initial_state():
    bn = numbabn.BatchNorm(5)
    assert bn.training
    for name, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
        a = getattr(bn, name)
        assert a.dtype == np.float32 and a.shape == (5,)
        np.testing.assert_array_equal(a, value)
    assert bn.num_batches_tracked == 0
    assert "BatchNorm(5" in repr(bn)


def test_track_running_stats_false_uses_batch_stats_in_both_modes():
    bn = numbabn.BatchNorm(3, track_running_stats=False, affine=False)
    assert bn.running_mean is None and bn.weight is None
    x = random_batch((6, 3, 4), np.float32, seed=5, per_channel_axis=1)
    yref, _, _ = ref.batch_norm(x, training=True)
    assert_close(bn(to_side(x)), yref, np.float32)
    bn.eval()
    assert_close(bn(to_side(x)), yref, np.float32)
    dy = random_batch(x.shape, np.float32, seed=6)
    _, mean, invstd = ref.batch_norm_forward(x)
    dxr, _, _ = ref.batch_norm_backward(dy, x, mean, invstd, training=True)
    assert_close(bn.backward(to_side(dy)), dxr, np.float32, factor=4)
    assert bn.weight_grad is None and bn.num_batches_tracked == 0


@pytest.mark.parametrize("training", [True, False])
def test_backward_sets_gradients(training):
    c = 4
    bn = numbabn.BatchNorm(c, dtype=np.float64)
    bn.weight[...] = np.linspace(0.5, 2, c)
    bn.bias[...] = np.linspace(-1, 1, c)
    warm = random_batch((5, c, 3), np.float64, seed=7, per_channel_axis=1)
    bn(to_side(warm))
    bn.train(training)
    x = random_batch((5, c, 3), np.float64, seed=8, per_channel_axis=1)
    dy = random_batch(x.shape, np.float64, seed=9)
    rm, rv = to_host(bn.running_mean).copy(), to_host(bn.running_var).copy()
    bn(to_side(x))
    dx = bn.backward(to_side(dy))
    w = to_host(bn.weight)
    if training:
        _, mean, invstd = ref.batch_norm_forward(x, eps=bn.eps)
    else:
        mean, invstd = rm, 1 / np.sqrt(rv + bn.eps)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, w, training=training)
    assert_close(dx, dxr, np.float64)
    assert_close(bn.weight_grad, dwr, np.float64, scale=4)
    assert_close(bn.bias_grad, dbr, np.float64, scale=4)


def test_float16_input_with_float32_parameters():
    bn = numbabn.BatchNorm(3)
    x = random_batch((8, 3, 5), np.float16, seed=10, per_channel_axis=1)
    y = to_host(bn(to_side(x)))
    assert y.dtype == np.float16
    yref, rm, rv = ref.batch_norm(x, np.zeros(3), np.ones(3), training=True)
    assert_close(y, yref, np.float16)
    assert_close(bn.running_var, rv, np.float32)


@pytest.mark.skipif(ON_DEVICE, reason="torch oracle runs on the CPU")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_torch_batchnorm2d(momentum):
    torch = pytest.importorskip("torch")
    c = 4
    tb = torch.nn.BatchNorm2d(c, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        tb.weight.copy_(torch.linspace(0.5, 2, c, dtype=torch.float64))
        tb.bias.copy_(torch.linspace(-1, 1, c, dtype=torch.float64))
    bn = numbabn.BatchNorm(c, momentum=momentum, dtype=np.float64)
    bn.weight[...] = tb.weight.detach().numpy()
    bn.bias[...] = tb.bias.detach().numpy()
    for step in range(3):
        x = random_batch((3, c, 5, 7), np.float64, seed=20 + step, per_channel_axis=1)
        dy = random_batch(x.shape, np.float64, seed=30 + step)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = tb(xt)
        yt.backward(torch.from_numpy(dy))
        y = bn(x)
        dx = bn.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(bn.weight_grad, tb.weight.grad.numpy(), rtol=1e-9)
        np.testing.assert_allclose(bn.bias_grad, tb.bias.grad.numpy(), rtol=1e-9)
        tb.weight.grad = None
        tb.bias.grad = None
    np.testing.assert_allclose(bn.running_mean, tb.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, tb.running_var.numpy(), rtol=1e-12)
    assert bn.num_batches_tracked == int(tb.num_batches_tracked)
    tb.eval()
    bn.eval()
    x = random_batch((2, c, 3, 3), np.float64, seed=40)
    np.testing.assert_allclose(bn(x), tb(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-12)


def test_reset_running_stats_after_steps():
    c = 3
    bn = numbabn.BatchNorm(c, dtype=np.float32)
    for s in range(2):
        bn(to_side(random_batch((4, c, 5), np.float32, seed=s, per_channel_axis=1)))
    assert bn.num_batches_tracked == 2
    assert not np.allclose(to_host(bn.running_mean), 0)  # the steps moved them
    kind = type(bn.running_mean)
    bn.reset_running_stats()
    assert type(bn.running_mean) is kind  # reset in place, on the side they live on
    assert np.array_equal(to_host(bn.running_mean), np.zeros(c, np.float32))
    assert np.array_equal(to_host(bn.running_var), np.ones(c, np.float32))
    assert bn.num_batches_tracked == 0
