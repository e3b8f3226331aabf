"""Cost of SyncBatchNorm against the local BatchNorm on the cnn's batch-norm shapes
(not a test; run by hand):

    mpiexec -n 2 python tests/distributed/mpi_scripts/bench_sync_bn.py [global batch, default 128]

Each rank holds half of the global batch, channels-last in memory as the cnn's
activations are, and uses one Numba thread.  Per shape: the median time of one
training forward + backward of BatchNorm2d/1d on the rank's rows alone (no
communication; what the ranks would do without synchronisation) and of
SyncBatchNorm on the same rows (two Allgathers each way), every repetition
started together (a barrier before each); and SyncBatchNorm on ``COMM_SELF``
(the split primitives and trivial one-rank collectives: what the passes cost
apart from the communication).  Rank 0 prints a table.
"""

import sys
import time

import numpy as np
from common import world

from mpi4py import MPI

from numbabn.distributed import SyncBatchNorm
from numbabn.layers import BatchNorm1d, BatchNorm2d

REPS = 40
def rows(n, c, hw):
    rng = np.random.default_rng(0)
    if hw is None:
        return rng.standard_normal((n, c)).astype(np.float32)
    return rng.standard_normal((n, hw, hw, c)).astype(np.float32).transpose(0, 3, 1, 2)


def timed(comm, layer, x, dy):
    times = []
    for i in range(REPS + 3):
        comm.Barrier()
        start = time.perf_counter()
        layer.forward(x)
        layer.backward(dy)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


if __name__ == "__main__":
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    n = batch // size
    table = []
    for name, c, hw in (("BatchNorm2d(32) at 26x26", 32, 26), ("BatchNorm2d(64) at 24x24", 64, 24),
                        ("BatchNorm1d(128)", 128, None)):
        x, dy = rows(n, c, hw), rows(n, c, hw)
        local = (BatchNorm2d if hw else BatchNorm1d)(c)
        t_local = timed(comm, local, x, dy)
        t_sync = timed(comm, SyncBatchNorm(c), x, dy)
        t_self = timed(comm, SyncBatchNorm(c, comm=MPI.COMM_SELF), x, dy)
        table.append((name, tuple(x.shape), t_local, t_self, t_sync))
    if rank == 0:
        print(f"{size} ranks, global batch {batch}, {n} rows per rank, 1 thread each; "
              f"median of {REPS} forward+backward (ms):")
        print(f"{'layer':26s} {'rank input':18s} {'local BN':>9s} {'Sync, 1 rank':>13s} "
              f"{'SyncBN':>9s} {'extra':>8s}")
        for name, shape, t_local, t_self, t_sync in table:
            print(f"{name:26s} {str(shape):18s} {t_local:9.3f} {t_self:13.3f} {t_sync:9.3f} "
                  f"{t_sync - t_local:+8.3f}")
