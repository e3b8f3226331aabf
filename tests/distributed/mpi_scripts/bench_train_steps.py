"""Trainer throughput, one process against N (not a test; run by hand):

    python tests/distributed/mpi_scripts/bench_train_steps.py                       # one process
    mpiexec -n 2 python tests/distributed/mpi_scripts/bench_train_steps.py          # two, data parallel

The cnn (its defaults: dropout, shifts, Adam) on the shipped MNIST, global batch
128, STEPS steps after 3 warm-up steps; prints the median and the fastest step
time as images per second (the fastest is the least disturbed by other work on a
shared machine).  Threads: as the trainer sets them (under mpiexec, one per core
per process; alone, set NUMBA_NUM_THREADS / OPENBLAS_NUM_THREADS to choose).
"""

import os
import sys
import time

import numpy as np

from numbabn.mnist.data import load_mnist
from numbabn.mnist.train import TrainConfig, Trainer

STEPS = 30
BATCH = 128


def main():
    config = TrainConfig(model="cnn", batch_size=BATCH, limit_train=BATCH * (STEPS + 3))
    data = load_mnist()
    out = f"/tmp/numbabn-bench-train-{os.getpid()}"
    if "PMI_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        from common import world

        from numbabn.mnist.distributed import DistributedTrainer

        comm = world()
        trainer = DistributedTrainer(config, data, out, comm=comm, progress=False, log=lambda s: None)
        rank, size = comm.Get_rank(), comm.Get_size()
    else:
        trainer = Trainer(config, data, out, progress=False, log=lambda s: None)
        rank, size = 0, 1
    stamps = []
    step = trainer.optimizer.step

    def timed_step(grads):
        step(grads)
        stamps.append(time.perf_counter())

    trainer.optimizer.step = timed_step
    trainer.train_epoch(0, 1)
    steps = np.diff(stamps[2:])  # after 3 warm-up steps
    if rank == 0:
        import numba

        print(f"{size} process{'es' if size > 1 else ''}, {numba.get_num_threads()} Numba thread(s) each: "
              f"{len(steps)} steps of {BATCH}: median {BATCH / np.median(steps):.0f} img/s, "
              f"fastest {BATCH / steps.min():.0f} img/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
