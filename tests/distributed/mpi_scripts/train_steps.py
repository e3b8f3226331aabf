"""Run under ``mpiexec -n 2``: one epoch of the distributed trainer for each of
CONFIGS on synthetic data (dropout off); each rank prints the global step losses
and a digest of its parameters, buffers and optimizer state."""

from common import emit, synthetic_data, world

from numbabn.mnist.train import TrainConfig

# The paper's MLP (3 BatchNorm1d, SGD): 20 steps.  The cnn (2 BatchNorm2d, 1 BatchNorm1d,
# random shifts): 3 steps only, since its training amplifies rounding differences within a
# few steps (one process alone, with each batch's rows reversed, departs by 1e-2 relative
# within 20 SGD steps and 2e-3 with Adam; measured on 640 MNIST images).
CONFIGS = {
    "mlp": TrainConfig(model="mlp", batch_size=32, limit_train=640, optimizer="sgd", lr=0.5, seed=3),
    "cnn": TrainConfig(model="cnn", batch_size=32, limit_train=96, dropout=False, optimizer="sgd",
                       lr=0.01, seed=3),
}

if __name__ == "__main__":
    import sys

    import numba

    from numbabn.mnist.distributed import DistributedTrainer

    comm = world()
    results = {}
    for name, config in CONFIGS.items():
        trainer = DistributedTrainer(config, synthetic_data(), sys.argv[1], comm=comm, progress=False,
                                     log=lambda s: None)
        trainer.train_epoch(0, 1)
        trainer.check_replicas()  # raises on every rank if the replicas differ
        results[name] = {"losses": trainer.step_losses, "digest": trainer.state_digest().hex()}
    emit(comm, results=results, threads=numba.get_num_threads())
