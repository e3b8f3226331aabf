"""``numbabn-mnist --distributed``: data-parallel training under ``mpiexec``.

    mpiexec -n 2 numbabn-mnist --distributed --epochs 5

Each global batch of ``--batch-size`` images (the batches of a one-process run:
same shuffles, same augmentation shifts) is split across the ranks in
contiguous, disjoint shards; the model's BatchNorm layers become
:class:`~numbabn.distributed.SyncBatchNorm`, so N ranks train on the batches of
one process.  Each step makes one gradient collective: every rank's gradients
(of the *global* mean loss, so shards may differ in size) and its loss and
accuracy sums travel in one flat buffer (``Allgather``) and are added in rank
order, so the replicas stay bitwise identical; a parameter checksum is compared
after every epoch.  Evaluation is sharded too.  Rank 0 alone shows the progress
bar and writes ``metrics.json``, ``curves.png`` and the checkpoint (atomically;
the same format as a one-process run, which can load it).

Faults end the whole job: a bad setup or checkpoint on any rank is reported by
every rank (exit status 2); any other exception, or Ctrl-C, aborts the job
(``comm.Abort``) after rank 0 says where the last complete checkpoint is.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback

import numpy as np

from .._extras import require
from ..distributed import _comm
from ..distributed._comm import CollectiveError, CollectiveRuntimeError
from ..distributed.batchnorm import convert_sync_batchnorm
from ..kit import Dropout
from ..kit.losses import log_softmax
from . import options
from . import train as T


def shard_bounds(n, size, rank):
    """``(lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items
    (``np.array_split``'s split: the first ``n % size`` shares have one more)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def shard_cross_entropy(logits, targets, global_count):
    """This shard's loss *sum* and the gradient of the global mean loss:
    ``(softmax - onehot) / global_count``, computed as
    :func:`numbabn.kit.losses.cross_entropy` does for a whole batch, so each row's
    gradient has the bits of a one-process run with the same logits."""
    logp = log_softmax(logits)
    rows = np.arange(len(targets))
    loss_sum = -float(np.sum(logp[rows, targets], dtype=np.float64))
    dlogits = np.exp(logp)
    dlogits[rows, targets] -= 1.0
    dlogits /= global_count
    return loss_sum, dlogits


class GradientReducer:
    """Sum gradients (and a few float64 metrics) over the ranks with ONE
    ``Allgather`` of a flat byte buffer, added in rank order in float64 and
    written back in place: bitwise the same result on every rank."""

    def __init__(self, comm, grads, n_metrics):
        self.comm = comm
        self.n_metrics = n_metrics
        self.layout = []
        offset = 8 * n_metrics
        for key, g in grads.items():
            self.layout.append((key, g.dtype, g.size, offset))
            offset += -(-g.nbytes // 8) * 8  # 8-byte aligned
        self.send = np.zeros(offset, np.uint8)
        self.recv = np.empty((comm.Get_size(), offset), np.uint8)

    def __call__(self, grads, metrics):
        """Replace each of ``grads`` by its sum over the ranks; return the summed ``metrics``."""
        head = 8 * self.n_metrics
        self.send[:head].view(np.float64)[:] = metrics
        for key, dtype, size, offset in self.layout:
            self.send[offset:offset + size * dtype.itemsize].view(dtype)[:] = grads[key].reshape(-1)
        self.comm.Allgather(self.send, self.recv)
        for key, dtype, size, offset in self.layout:
            rows = self.recv[:, offset:offset + size * dtype.itemsize].view(dtype)
            grads[key][...] = _comm.sum_rows(rows).reshape(grads[key].shape)
        return _comm.sum_rows(self.recv[:, :head].view(np.float64))


class _PresetShifts:
    """Stands in for the shift generator in :func:`numbabn.mnist.train.random_shifts`:
    returns this shard's columns of offsets drawn for the whole global batch."""

    def __init__(self, offsets):
        self.offsets = offsets

    def integers(self, low, high, size):
        if tuple(size) != self.offsets.shape:
            raise RuntimeError(f"random_shifts drew {size} offsets, expected {self.offsets.shape}.")
        return self.offsets


def _all_layers(layer):
    yield layer
    for child in getattr(layer, "layers", None) or []:
        yield from _all_layers(child)


def _quiet(*args, **kwargs):
    pass


def _processes(n):
    return f"{n} process{'es' if n != 1 else ''}"


class DistributedTrainer(T.Trainer):
    """:class:`numbabn.mnist.train.Trainer` on every rank of ``comm``, data parallel.

    Construct it on every rank with the same arguments (collective: rank 0's
    initial parameters are broadcast).  Dropout masks come from a generator
    per (seed, epoch, rank), so a resumed run draws the masks of an
    uninterrupted one.

    Attributes (besides the Trainer's)
    ----------------------------------
    rank, size : int
    step_losses : list of float
        The global batch losses of the last epoch (what a one-process run reports).
    """

    def __init__(self, config, data, out_dir, comm=None, progress=True, log=print):
        self.comm = _comm.resolve(comm)
        self.rank, self.size = _comm.rank_and_size(self.comm)
        root = self.rank == 0
        super().__init__(config, data, out_dir, progress=progress and root, log=log if root else _quiet)
        convert_sync_batchnorm(self.model, self.comm)
        self._dropouts = [layer for layer in _all_layers(self.model) if isinstance(layer, Dropout)]
        self._reducer = GradientReducer(self.comm, self.model.grads, n_metrics=2)
        self.step_losses = []
        self.broadcast_state()

    # -- state ---------------------------------------------------------------- #
    def broadcast_state(self):
        """Give every rank rank 0's parameters, buffers, optimizer state, epoch
        count, history and generator state (collective)."""
        info = None
        if self.rank == 0:
            info = {"epochs_done": self.epochs_done, "history": self.history,
                    "rng_state": self.rng.bit_generator.state}
        info = self.comm.bcast(info, root=0)
        for get, put in ((self.model.state_dict, self.model.load_state_dict),
                         (self.optimizer.state_dict, self.optimizer.load_state_dict)):
            state = get()  # fresh contiguous copies, received into in place
            for key in sorted(state):
                self.comm.Bcast(state[key].reshape(-1), root=0)
            if self.rank != 0:
                put(state)
        if self.rank != 0:
            self.epochs_done, self.history = info["epochs_done"], info["history"]
            self.rng.bit_generator.state = info["rng_state"]

    def resume(self):
        """Rank 0 loads the checkpoint (so it need only exist there) and every
        rank gets its state; a missing or damaged checkpoint raises a
        :class:`CollectiveError` on every rank."""
        error = None
        if self.rank == 0:
            try:
                super().resume()
            except Exception as e:  # noqa: BLE001 -- reported to every rank
                error = e
        _comm.agree_ok(self.comm, error, "loading the checkpoint")
        self.broadcast_state()

    def state_digest(self):
        """SHA-256 of the parameters, buffers and optimizer state."""
        h = hashlib.sha256()
        for state in (self.model.state_dict(), self.optimizer.state_dict()):
            for key in sorted(state):
                h.update(key.encode())
                h.update(np.ascontiguousarray(state[key]).tobytes())
        return h.digest()

    def check_replicas(self):
        """Raise :class:`CollectiveRuntimeError` on every rank if any rank's
        state differs from rank 0's (one ``Allgather`` of 32-byte digests)."""
        digests = _comm.allgather_rows(self.comm, np.frombuffer(self.state_digest(), np.uint8))
        odd = [r for r in range(self.size) if not np.array_equal(digests[r], digests[0])]
        if odd:
            raise CollectiveRuntimeError(
                f"the replicas diverged: the parameters of rank(s) {odd} differ from rank 0's "
                f"after epoch {self.epochs_done + 1}; stopping before saving a checkpoint.",
                ranks=odd)

    def save(self):
        if self.rank == 0:
            super().save()

    def write_reports(self):
        if self.rank == 0:
            super().write_reports()

    def metrics(self):
        return {**super().metrics(), "processes": self.size}

    # -- training ------------------------------------------------------------- #
    def train_epoch(self, epoch, n_epochs):
        cfg = self.config
        # Every rank needs at least one image (layers refuse empty batches): only a
        # last global batch smaller than the number of ranks is left out.
        batches = [b for b in T.epoch_batches(len(self.train_y), cfg.batch_size, cfg.seed, epoch)
                   if b.size >= self.size]
        self.optimizer.lr = cfg.epoch_lr(epoch)
        shifts = np.random.default_rng([cfg.seed, epoch, 1])
        for layer in self._dropouts:
            layer.rng = np.random.default_rng([cfg.seed, epoch, 2, self.rank])
        self._compile_if_cold(ahead=False)
        if self.progress:
            tqdm = require("tqdm", "The trainer's progress bar", otherwise="pass progress=False").tqdm
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{n_epochs} ({_processes(self.size)})",
                       unit="batch", leave=False)
        else:
            bar = T._NoProgress(batches)
        self.step_losses = []
        step_accuracies = []
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        for i, idx in enumerate(bar):
            lo, hi = shard_bounds(len(idx), self.size, self.rank)
            mine = idx[lo:hi]
            x, y = self.train_x[mine], self.train_y[mine]
            if cfg.shift:  # the global batch's offsets, as one process draws them
                offsets = shifts.integers(0, 2 * cfg.shift + 1, size=(2, len(idx)))
                x = T.random_shifts(x, cfg.shift, _PresetShifts(offsets[:, lo:hi]))
            logits = self.model.forward(x)
            local_loss, dlogits = shard_cross_entropy(logits, y, len(idx))
            self.model.backward(dlogits, input_grad=False)
            local_correct = int(np.sum(logits.argmax(axis=1) == y))
            batch_loss, batch_correct = self._reducer(self.model.grads, [local_loss, local_correct])
            self.optimizer.step(self.model.grads)
            self.step_losses.append(batch_loss / len(idx))
            step_accuracies.append(round(batch_correct) / len(idx))
            loss_sum += batch_loss
            correct += int(round(batch_correct))
            seen += len(idx)
            if i % 10 == 0 or i == len(batches) - 1:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
        seconds = time.perf_counter() - start
        bar.close()
        return {"lr": self.optimizer.lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                "epoch_seconds": seconds, "images_per_second": seen / seconds,
                "step_losses": list(self.step_losses), "step_accuracies": step_accuracies}

    def evaluate(self):
        """Test loss and accuracy, each rank evaluating a contiguous shard."""
        n = len(self.test_y)
        lo, hi = shard_bounds(n, self.size, self.rank)
        sums = [0.0, 0.0]
        if hi > lo:
            loss, accuracy = T.evaluate(self.model, self.test_x[lo:hi], self.test_y[lo:hi])
            sums = [loss * (hi - lo), round(accuracy * (hi - lo))]
        total = _comm.allreduce_in_rank_order(self.comm, sums)
        return total[0] / n, total[1] / n

    def run(self, epochs):
        """Train until ``epochs`` epochs are done (collective)."""
        for epoch in range(self.epochs_done, epochs):
            record = {"epoch": epoch + 1, **self.train_epoch(epoch, epochs)}
            start = time.perf_counter()
            record["test_loss"], record["test_accuracy"] = self.evaluate()
            record["eval_seconds"] = time.perf_counter() - start
            self.check_replicas()
            self.history.append(record)
            self.epochs_done = epoch + 1
            self.save()
            self.write_reports()
            self.log(f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} "
                     f"acc {record['train_accuracy']:.4f} | test loss {record['test_loss']:.4f} "
                     f"acc {record['test_accuracy']:.4f} | {record['epoch_seconds']:.1f} s, "
                     f"{record['images_per_second']:.0f} img/s ({_processes(self.size)})")
        return self.metrics()


# --------------------------------------------------------------------------- #
# The command.
# --------------------------------------------------------------------------- #
def _setup_local(args, rank, size):
    """This rank's part of the setup: settings, data, output folder."""
    if rank == 0:  # only rank 0 draws the bar and the curves
        options.require_train_extra(progress=not args.no_progress)
    config = options.config_from_args(args)
    options.check_device(args.device)
    if getattr(config, "norm", "batch") != "batch":
        raise ValueError(f"--distributed synchronises batch norm only (SyncBatchNorm); "
                         f"--norm {config.norm} has no synchronised version.")
    for name, value in (("--batch-size", config.batch_size), ("--limit-train", config.limit_train)):
        if value is not None and value < size:
            raise ValueError(f"{name} {value} is smaller than the {size} processes; each process "
                             f"needs at least one image of every batch.")
    from .data import load_mnist

    data = load_mnist(data_dir=args.data_dir)
    out_dir = args.out or os.path.join("runs", f"mnist-{config.model}")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    return config, data, out_dir


def _interrupted(comm, trainer, rank):
    """Ctrl-C (mpiexec passes SIGINT to every rank): say where the last
    checkpoint is, then end the whole job (a rank blocked in a collective would
    not see the signal)."""
    done = 0 if trainer is None else trainer.epochs_done
    where = (f"the last complete checkpoint ({done} epoch{'s' if done != 1 else ''}) is "
             f"{trainer.checkpoint_path}; continue with --resume" if done else "no epoch was completed")
    if rank != 0:
        time.sleep(2.0)  # rank 0 says it and aborts; if it cannot (blocked), this rank does
    print(f"\ninterrupted: {where}.", file=sys.stderr, flush=True)
    _comm.abort(comm, 130)


def main(args):
    """``numbabn-mnist --distributed`` with parsed ``args`` (run under
    ``mpiexec -n N``, every rank with the same arguments); returns the exit status."""
    try:
        comm = _comm.mpi().COMM_WORLD
    except ImportError as e:
        print(f"numbabn-mnist: error: --distributed: {e}", file=sys.stderr)
        return 2
    rank, size = _comm.rank_and_size(comm)
    _comm.abort_on_uncaught_exception(comm)
    _comm.set_threads_per_rank(comm)
    trainer = None
    try:
        parts, error = None, None
        try:
            parts = _setup_local(args, rank, size)
        except Exception as e:  # noqa: BLE001 -- reported to every rank
            error = e
        _comm.agree_ok(comm, error, "the trainer's setup")
        trainer = DistributedTrainer(*parts, comm=comm, progress=not args.no_progress)
        if args.resume:
            trainer.resume()
            trainer.log(f"resuming from {trainer.checkpoint_path} after epoch {trainer.epochs_done}")
        metrics = trainer.run(args.epochs)
    except CollectiveError as e:  # raised on every rank alike: a clean exit everywhere
        if rank == 0:
            print(f"numbabn-mnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _interrupted(comm, trainer, rank)
    except Exception as e:  # noqa: BLE001 -- this rank alone: the others must not wait for it
        print(f"numbabn-mnist: error on rank {rank} of {size}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        if not isinstance(e, (ValueError, OSError, RuntimeError)):
            traceback.print_exc()
        _comm.abort(comm, 2)
    if rank == 0:
        print(f"test accuracy {metrics['test_accuracy']:.4f} ({_processes(size)}); metrics, curves and "
              f"checkpoint in {trainer.out_dir}")
    return 0
