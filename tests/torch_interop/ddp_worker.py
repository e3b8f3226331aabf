"""Run by test_torch_sync.py: two processes (torch.multiprocessing.spawn) on
gloo over 127.0.0.1, each saving what it saw to ``<outdir>/rank<r>.pt``.

    python ddp_worker.py <outdir> <port>

``train``: DistributedDataParallel over a model converted with
``numbabn.torch.convert_sync_batchnorm`` (float64), each rank on half of every
batch; rank 0 also trains the stock model on whole batches, the reference.
``bad``: a bad input on one rank, then good calls, on one SyncBatchNorm.
"""

import copy
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5, bias=False),
        nn.BatchNorm1d(5, momentum=None), nn.ReLU(), nn.Linear(5, 3)).double()


def batches(n=3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 5, generator=gen, dtype=torch.float64) * 2 + 0.5,
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def train(rank):
    import numbabn.torch as nbt
    from torch.nn.parallel import DistributedDataParallel as DDP

    mine = nbt.convert_sync_batchnorm(model())
    assert isinstance(mine[1], nbt.SyncBatchNorm)
    ddp = DDP(mine)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    result = {"outputs": [], "input_grads": []}
    rows = slice(4 * rank, 4 * rank + 4)
    if rank == 0:  # the reference: stock layers on the whole batch, one process
        ref = model()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        result["ref_outputs"], result["ref_input_grads"] = [], []
    for x, t in batches():
        xl = x[rows].clone().requires_grad_()
        opt.zero_grad()
        out = ddp(xl)
        nn.functional.cross_entropy(out, t[rows]).backward()  # DDP averages the two halves
        opt.step()
        result["outputs"].append(out.detach())
        result["input_grads"].append(xl.grad / WORLD)  # d(whole-batch mean loss)/dx
        if rank == 0:
            xr = x.clone().requires_grad_()
            ref_opt.zero_grad()
            out = ref(xr)
            nn.functional.cross_entropy(out, t).backward()
            ref_opt.step()
            result["ref_outputs"].append(out.detach())
            result["ref_input_grads"].append(xr.grad)
    result["state"] = copy.deepcopy(mine.state_dict())
    if rank == 0:
        result["ref_state"] = ref.state_dict()
    mine.eval()
    with torch.no_grad():
        result["eval"] = mine(batches(1)[0][0])
    return result


def bad(rank):
    import numbabn.torch as nbt

    bn = nbt.SyncBatchNorm(4, dtype=torch.float64)
    good = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    cases = {
        "channels": torch.randn(3, 5, 5, dtype=torch.float64) if rank == 1 else good,
        "dtype": good.float() if rank == 0 else good,
        "ndim": good[:, :, 0] if rank == 1 else good,  # 2-D is fine: (N, C)
        "empty": good[:0] if rank == 1 else good,       # N = 0 on one rank is fine
        "too_few": good[:1, :, :1],                     # 2 values per channel in all: fine
        "one_value": good[:1, :, :1] if rank == 0 else good[:0],
    }
    result = {}
    for name, x in cases.items():
        try:
            y = bn(x.requires_grad_() if x.dtype == torch.float64 else x)
            y.sum().backward()
            result[name] = ("ok", y.detach(), bn.running_mean.clone())
        except Exception as e:  # noqa: BLE001 - recorded for the test
            result[name] = (type(e).__name__, str(e))
    return result


def run(rank, outdir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        result = {"train": train(rank), "bad": bad(rank)}
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    outdir, port = sys.argv[1], int(sys.argv[2])
    torch.multiprocessing.spawn(run, args=(outdir, port), nprocs=WORLD)
