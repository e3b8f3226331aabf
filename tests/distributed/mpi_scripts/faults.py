"""Run under ``mpiexec -n 2``: faults of the distributed trainer.

    faults.py kill OUT     rank 1 is SIGKILLed in the 3rd step of epoch 2 (of 3)
    faults.py raise OUT    rank 1 raises an uncaught exception there instead
    faults.py resume OUT   resume from OUT's checkpoint, finish the 3 epochs, then train 3
                           epochs uninterrupted in OUT-straight and compare the two

The cnn with its dropout and shifts, on synthetic data, 6 steps per epoch."""

import os
import signal
import sys
import time

from common import emit, synthetic_data, world

from numbabn.mnist import distributed as dist
from numbabn.mnist.train import TrainConfig

CONFIG = TrainConfig(model="cnn", batch_size=16, limit_train=96, seed=5)
EPOCHS = 3
DATA = synthetic_data(n_train=96, n_test=32, seed=1)
STEPS_PER_EPOCH = 6


def make(comm, out):
    return dist.DistributedTrainer(CONFIG, DATA, out, comm=comm, progress=False, log=lambda s: None)


def fail_in_epoch_two(comm, how):
    real, calls = dist.shard_cross_entropy, [0]

    def step(logits, targets, count):
        calls[0] += 1
        if comm.Get_rank() == 1 and calls[0] == STEPS_PER_EPOCH + 3:
            emit(comm, event=how, time=time.time())
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("rank 1 fails on purpose")
        return real(logits, targets, count)

    dist.shard_cross_entropy = step


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    comm = world()
    if mode in ("kill", "raise"):
        fail_in_epoch_two(comm, mode)
        make(comm, out).run(EPOCHS)
        emit(comm, event="finished")  # not reached
    elif mode == "resume":
        resumed = make(comm, out)
        resumed.resume()
        start_epoch = resumed.epochs_done
        resumed.run(EPOCHS)
        straight = make(comm, out + "-straight")
        straight.run(EPOCHS)
        drop = ("epoch_seconds", "images_per_second", "eval_seconds")
        same_history = ([{k: v for k, v in h.items() if k not in drop} for h in resumed.history]
                        == [{k: v for k, v in h.items() if k not in drop} for h in straight.history])
        emit(comm, event="resumed", start_epoch=start_epoch, epochs_done=resumed.epochs_done,
             same_state=resumed.state_digest() == straight.state_digest(), same_history=same_history,
             digest=resumed.state_digest().hex())
