"""One rank of the numbabn.torch.SyncBatchNorm test (``test_torch.py``): its slice of a
batch against one torch.nn.BatchNorm2d over the whole batch.

usage: python sync_worker.py RANK WORLD INIT_FILE
"""

import sys

import torch
import torch.distributed as dist

import numbabn.torch as nbt

rank, world, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
cuts = {2: [0, 3, 8], 3: [0, 5, 5, 8]}[world]  # uneven; with 3 ranks the middle one is empty
lo, hi = cuts[rank], cuts[rank + 1]
torch.manual_seed(0)
whole = torch.randn(8, 4, 5, 5, dtype=torch.float64) * 2 + 1
grad = torch.randn(8, 4, 5, 5, dtype=torch.float64)
reference = torch.nn.BatchNorm2d(4).double()
ours = nbt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4).double()), sync=True)[0]
assert type(ours) is nbt.SyncBatchNorm
with torch.no_grad():
    for layer in (reference, ours):
        layer.weight.copy_(torch.linspace(0.5, 1.5, 4))
        layer.bias.copy_(torch.linspace(-1, 1, 4))
for step in range(2):
    x = whole.clone().requires_grad_()
    y = reference(x)
    y.backward(grad)
    mine = whole[lo:hi].clone().requires_grad_()
    ours.weight.grad = ours.bias.grad = None
    y_mine = ours(mine)
    y_mine.backward(grad[lo:hi])
    torch.testing.assert_close(y_mine, y[lo:hi], rtol=0, atol=1e-12)
    torch.testing.assert_close(mine.grad, x.grad[lo:hi], rtol=0, atol=1e-12)
    for g, expected in ((ours.weight.grad, reference.weight.grad), (ours.bias.grad, reference.bias.grad)):
        total = g.clone()
        dist.all_reduce(total)  # what DDP does with each rank's share
        torch.testing.assert_close(total, expected, rtol=0, atol=1e-10)
    reference.weight.grad = reference.bias.grad = None
    torch.testing.assert_close(ours.running_mean, reference.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=0, atol=1e-12)
    assert int(ours.num_batches_tracked) == step + 1
ours.eval(), reference.eval()
torch.testing.assert_close(ours(whole[lo:hi]), reference(whole)[lo:hi], rtol=0, atol=1e-12)
dist.destroy_process_group()
print("rank", rank, "ok")
