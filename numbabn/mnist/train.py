"""``numbabn-mnist``: train the ``cnn`` or ``mlp`` model on MNIST with numbabn's layers.

    numbabn-mnist --epochs 5                                          # cnn, Adam, batch 128
    numbabn-mnist --model mlp --no-bn --epochs 2 --out runs/mlp-nobn  # paper MLP without BN

MNIST comes with numbabn (see :func:`numbabn.mnist.data.find_mnist`); ``--data-dir``
reads another copy.  The progress bar (tqdm) and the curves (matplotlib) need
the ``train`` extra: ``pip install 'numbabn[train]'``.

On the first run, when Numba's on-disk cache lacks the run's kernels, the
trainer compiles them before the first batch, one kind of layer at a time with
a progress bar (:meth:`Trainer.warm_up`); ``numbabn-mnist --warmup`` does only
that, to fill the cache ahead of time.

Each epoch shows a progress bar, evaluates on the test set, and writes to
``--out``: ``metrics.json`` (final ``test_accuracy`` and a per-epoch
``history``), ``curves.png`` (loss and accuracy against epoch, per step and
per epoch) and ``checkpoint.npz`` (atomic; everything needed to continue with
``--resume`` and reach bitwise the same weights as an uninterrupted run).
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import _numba_private
from .._extras import require
from ..kit.losses import cross_entropy
from ..kit.optim import SGD, Adam
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .models import MODELS, NORMS, build_model
from .warmup import warm_up

EVAL_BATCH = 500

#: Said once, before the warm-up that compiles the kernels, when Numba's
#: on-disk cache lacks the run's kernels.
COMPILE_MESSAGE = "compiling kernels (first run only: Numba keeps them on disk for later runs)..."


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result (the checkpoint must match it to resume)."""

    model: str = "cnn"
    batch_norm: bool = True
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    limit_train: int | None = None
    lr_decay: float | None = None  # None: the model's default (cnn 0.7 per epoch, mlp 1)
    dropout: bool | None = None  # None: the model's default (cnn True, mlp False)
    shift: int | None = None  # augmentation: shift each training image by up to this many
    #                           pixels; None: the model's default (cnn 2, mlp 0)
    norm: str = "batch"  # "batch" or "renorm" (batch renormalization) in the BN places

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(MODELS)}.")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {sorted(NORMS)}.")
        spec = MODELS[self.model]  # resolve the defaults, so checkpoints record real values
        if self.lr_decay is None:
            object.__setattr__(self, "lr_decay", spec.lr_decay)
        if self.dropout is None:
            object.__setattr__(self, "dropout", spec.dropout)
        if self.shift is None:
            object.__setattr__(self, "shift", spec.shift)

    def epoch_lr(self, epoch):
        """The learning rate of epoch ``epoch`` (0-based): ``lr * lr_decay**epoch``."""
        return self.lr * self.lr_decay ** epoch

    def make_optimizer(self, params):
        if self.optimizer == "adam":
            return Adam(params, lr=self.lr)
        if self.optimizer == "sgd":
            return SGD(params, lr=self.lr)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adam or sgd.")


def prepare_images(images):
    """uint8 ``(N, 28, 28)`` images as float32 ``(N, 1, 28, 28)`` in [0, 1]."""
    return (np.asarray(images, np.float32) / np.float32(255.0))[:, None, :, :]


def epoch_batches(n_images, batch_size, seed, epoch):
    """The epoch's shuffled mini-batches (index arrays), from a seed derived from
    ``(seed, epoch)`` so any epoch can be replayed alone.  A final batch of one
    image is dropped (batch norm cannot train on it)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_images)
    batches = [order[i:i + batch_size] for i in range(0, n_images, batch_size)]
    return [b for b in batches if b.size >= 2]


def batch_sizes(n, batch_size, smallest):
    """The distinct sizes, largest first, of ``n`` items cut in order into
    batches of ``batch_size`` (the last one shorter), leaving out sizes below
    ``smallest`` (:func:`epoch_batches` drops a last batch of one)."""
    sizes = {min(n, batch_size), n % batch_size if n > batch_size else 0}
    return sorted((s for s in sizes if s >= smallest), reverse=True)


def random_shifts(images, max_shift, rng):
    """Each ``(1, H, W)`` image moved by its own random offset in
    ``[-max_shift, max_shift]`` pixels along each axis, zero filled (data
    augmentation; a copy, the input is unchanged)."""
    n, _, height, width = images.shape
    p = max_shift
    padded = np.zeros((n, height + 2 * p, width + 2 * p), images.dtype)
    padded[:, p:p + height, p:p + width] = images[:, 0]
    top, left = rng.integers(0, 2 * p + 1, size=(2, n))
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]


def evaluate(model, images, labels):
    """Mean loss and accuracy over a data set, in eval mode (restores training mode)."""
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for i in range(0, len(labels), EVAL_BATCH):
            logits = model.forward(images[i:i + EVAL_BATCH])
            y = labels[i:i + EVAL_BATCH]
            total_loss += cross_entropy(logits, y)[0] * len(y)
            correct += int(np.sum(logits.argmax(axis=1) == y))
    finally:
        model.train()
    return total_loss / len(labels), correct / len(labels)


class Trainer:
    """Train a model on in-memory data, writing metrics, curves and checkpoints to ``out_dir``.

    Parameters
    ----------
    config : TrainConfig
    data : tuple
        ``(train_images, train_labels, test_images, test_labels)`` as
        :func:`numbabn.mnist.data.load_mnist` returns them (uint8 images, int labels).
    out_dir : str
    progress : bool, default True
        Show a tqdm progress bar per epoch (needs the ``train`` extra).
    log : callable, default print
        Receives one summary line per epoch; and when the kernels are not in
        Numba's cache yet, :data:`COMPILE_MESSAGE` and the lines of
        :meth:`warm_up` before the first batch.

    Constructing a trainer changes no environment variables (the
    ``numbabn-mnist`` command sets its own in :func:`cli`).

    Attributes
    ----------
    epochs_done : int
        Epochs completed and saved in the checkpoint.
    history : list of dict
        Per-epoch metrics.
    """

    def __init__(self, config, data, out_dir, progress=True, log=print):
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        self.log = log
        train_x, train_y, test_x, test_y = data
        n = len(train_y) if config.limit_train is None else min(config.limit_train, len(train_y))
        self.train_x, self.train_y = prepare_images(train_x[:n]), np.asarray(train_y[:n], np.int64)
        self.test_x, self.test_y = prepare_images(test_x), np.asarray(test_y, np.int64)
        self.rng = np.random.default_rng(config.seed)
        self.model = build_model(config.model, self.rng, batch_norm=config.batch_norm,
                                 dropout=config.dropout, norm=config.norm)
        self.optimizer = config.make_optimizer(self.model.params)
        self.epochs_done = 0
        self.history = []
        self._compile_checked = False

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.npz")

    # -- checkpoints ---------------------------------------------------------- #
    def _meta(self):
        return {"model": self.config.model, "config": asdict(self.config)}

    def save(self):
        arrays = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        arrays.update({f"optim.{k}": v for k, v in self.optimizer.state_dict().items()})
        meta = dict(self._meta(), epochs_done=self.epochs_done, history=self.history,
                    rng_state=self.rng.bit_generator.state)
        save_checkpoint(self.checkpoint_path, arrays, meta)

    def resume(self):
        """Load the checkpoint in ``out_dir``; raises :class:`CheckpointError` if it
        is missing, damaged, or was written for other settings."""
        arrays, meta = load_checkpoint(self.checkpoint_path, expect=self._meta())
        try:
            self.model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
            self.optimizer.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("optim.")})
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.checkpoint_path} does not fit the {self.config.model} model: {e}") from e
        self.rng.bit_generator.state = meta["rng_state"]
        self.epochs_done = int(meta["epochs_done"])
        self.history = list(meta["history"])

    # -- training ------------------------------------------------------------- #
    def train_epoch(self, epoch, n_epochs):
        batches = epoch_batches(len(self.train_y), self.config.batch_size, self.config.seed, epoch)
        self.optimizer.lr = self.config.epoch_lr(epoch)
        shifts = np.random.default_rng([self.config.seed, epoch, 1])
        loss_sum, correct, seen = 0.0, 0, 0
        step_losses, step_accuracies = [], []
        self._compile_if_cold()
        if self.progress:
            tqdm = require("tqdm", "The trainer's progress bar", otherwise="pass progress=False").tqdm
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{n_epochs}", unit="batch", leave=False)
        else:
            bar = _NoProgress(batches)
        start = time.perf_counter()
        for i, idx in enumerate(bar):
            x, y = self.train_x[idx], self.train_y[idx]
            if self.config.shift:
                x = random_shifts(x, self.config.shift, shifts)
            logits = self.model.forward(x)
            loss, dlogits = cross_entropy(logits, y)
            self.model.backward(dlogits, input_grad=False)  # the images need no gradient
            self.optimizer.step(self.model.grads)
            batch_correct = int(np.sum(logits.argmax(axis=1) == y))
            loss_sum += loss * len(y)
            step_losses.append(float(loss))
            step_accuracies.append(batch_correct / len(y))
            correct += batch_correct
            seen += len(y)
            if i % 10 == 0 or i == len(batches) - 1:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
        seconds = time.perf_counter() - start
        bar.close()
        return {"lr": self.optimizer.lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                "epoch_seconds": seconds, "images_per_second": seen / seconds,
                "step_losses": step_losses, "step_accuracies": step_accuracies}

    def _compile_if_cold(self, ahead=True):
        """Once, before the first batch: on a cold cache, log :data:`COMPILE_MESSAGE`
        and compile the kernels with :meth:`warm_up` (``ahead=False``: the
        message alone, for the distributed trainer, whose synchronised batch
        norms would talk to the other processes)."""
        if not self._compile_checked:
            self._compile_checked = True
            if not kernels_cached(kernel_sources(self.config)):
                self.log(COMPILE_MESSAGE)
                if ahead:
                    self.warm_up()

    def warm_batch_sizes(self):
        """The distinct sizes of the run's training batches (a full batch, and a
        last smaller one) and of its evaluation batches, each largest first."""
        return (batch_sizes(len(self.train_y), self.config.batch_size, smallest=2),
                batch_sizes(len(self.test_y), EVAL_BATCH, smallest=1))

    def warm_up(self, progress=None, helper=None):
        """Compile (or load from Numba's cache) every kernel this run needs:
        a training step and an evaluation, layer by layer, at each of
        :meth:`warm_batch_sizes`, on copies of the model and optimizer (see
        :func:`numbabn.mnist.warmup.warm_up`).  Leaves the model, optimizer and
        generators as they were, so the run's results are the same bits.

        Parameters
        ----------
        progress : bool, optional
            A progress bar with a step per group; default: the trainer's ``progress``.
        helper : bool, optional
            Compile the backward passes in a second process (default: with two
            or more CPUs); see :mod:`numbabn.mnist.warmup`.

        Returns
        -------
        numbabn.mnist.warmup.WarmupTimes
        """
        train_sizes, eval_sizes = self.warm_batch_sizes()
        shifts = np.random.default_rng(0)  # a generator of its own: the run's streams are untouched
        train_batches = []
        for size in train_sizes:
            x = self.train_x[:size].copy()  # layers may write in place: never into the data set
            if self.config.shift:
                x = random_shifts(x, self.config.shift, shifts)
            train_batches.append((x, self.train_y[:size]))
        eval_batches = [(self.test_x[:size].copy(), self.test_y[:size]) for size in eval_sizes]
        return warm_up(self.model, self.optimizer, train_batches, eval_batches,
                       progress=self.progress if progress is None else progress, log=self.log,
                       helper=helper)

    def run(self, epochs):
        """Train until ``epochs`` epochs are done (continuing from :attr:`epochs_done`)."""
        for epoch in range(self.epochs_done, epochs):
            record = {"epoch": epoch + 1, **self.train_epoch(epoch, epochs)}
            start = time.perf_counter()
            record["test_loss"], record["test_accuracy"] = evaluate(self.model, self.test_x, self.test_y)
            record["eval_seconds"] = time.perf_counter() - start
            self.history.append(record)
            self.epochs_done = epoch + 1
            self.save()
            self.write_reports()
            self.log(f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} "
                     f"acc {record['train_accuracy']:.4f} | test loss {record['test_loss']:.4f} "
                     f"acc {record['test_accuracy']:.4f} | {record['epoch_seconds']:.1f} s, "
                     f"{record['images_per_second']:.0f} img/s")
        return self.metrics()

    # -- reports -------------------------------------------------------------- #
    def metrics(self):
        last = self.history[-1] if self.history else {}
        return {"model": self.config.model, "config": asdict(self.config),
                "epochs_done": self.epochs_done, "n_train": int(len(self.train_y)),
                "test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
                "history": self.history}

    def write_reports(self):
        path = os.path.join(self.out_dir, "metrics.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.metrics(), f, indent=2)
        os.replace(tmp, path)
        plot_curves(self.history, os.path.join(self.out_dir, "curves.png"),
                    title=f"numbabn {self.config.model}" + ("" if self.config.batch_norm else " (no BN)"))


class _NoProgress:
    """The batches, with the few tqdm methods ``train_epoch`` calls doing nothing."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def kernel_sources(config):
    """Source files of the Numba kernels a run of ``config`` compiles (``cache=True``):
    the batch-norm kernels with BN (the statistics core of ``_core`` compiles
    inside them and has no cache entries of its own), the convolution, pooling
    and ReLU kernels for the cnn, Adam's kernel for Adam.  (The mlp without BN
    and with SGD has none.)"""
    from .._cpu import feature_kernels
    from ..kit import optim
    from ..kit._kernels import activation, dropout, im2col, pooling, tiles

    sources = []
    if config.batch_norm:
        sources.append(feature_kernels.__file__)
    if config.model == "cnn":
        sources += [im2col.__file__, pooling.__file__, activation.__file__]
        if tiles.DIRECT_CONV_CPU:
            sources.append(tiles.__file__)
        if config.dropout is not False:
            sources.append(dropout.__file__)
    if config.optimizer == "adam":
        sources.append(optim.__file__)
    return sources


def kernels_cached(sources):
    """Whether Numba's on-disk cache holds kernels of every file in ``sources``.

    A cheap look at the file system, without compiling or loading anything: each
    source needs an index file (``<module>.<function>-<line>.py<ver>.nbi``) no
    older than the source, where Numba keeps its cache: ``$NUMBA_CACHE_DIR``
    when set, else the source's ``__pycache__`` or the user-wide Numba cache.
    An index can still lack a signature, so this may miss a partial compile;
    it never reads as cold once a run has cached its kernels.
    """
    for source in sources:
        places = _numba_private.cache_places(source)
        stem = os.path.splitext(os.path.basename(source))[0]
        source_time = os.stat(source).st_mtime
        indexes = [p for place in places for p in glob.glob(os.path.join(glob.escape(place), f"{stem}.*.nbi"))]
        if not any(os.stat(p).st_mtime >= source_time for p in indexes):
            return False
    return True


def smoothed(values, span):
    """Exponential moving average of ``values`` with ``alpha = 2 / (span + 1)``,
    started at the first value (the smoothed per-step loss of the curves)."""
    alpha = 2.0 / (max(1, span) + 1.0)
    out, level = [], None
    for v in values:
        level = v if level is None else level + alpha * (v - level)
        out.append(level)
    return out


def _per_step(history, key):
    """The per-step values ``key`` of every epoch, at x = fractional epoch
    (step ``i`` of ``n`` in epoch ``e`` at ``e - 1 + (i + 1) / n``), and the
    most steps of an epoch."""
    xs, ys, per_epoch = [], [], 0
    for h in history:
        values = h.get(key) or []  # absent in checkpoints of older runs
        xs += [h["epoch"] - 1 + (i + 1) / len(values) for i in range(len(values))]
        ys += values
        per_epoch = max(per_epoch, len(values))
    return xs, ys, per_epoch


def plot_curves(history, path, title=""):
    """Loss and accuracy against epoch, as a PNG (needs matplotlib, from the
    ``train`` extra).  Each panel has the per-step training figure (faint) and
    its moving average (span a tenth of an epoch), the per-epoch training
    figure (dots) and the per-epoch test figure (squares, dashed), on an axis
    from epoch 0, so a one-epoch run shows its curves and where its epoch ended."""
    matplotlib = require("matplotlib", "The trainer's loss and accuracy curves")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, step_key, name in ((ax_loss, "loss", "step_losses", "cross-entropy loss"),
                                       (ax_acc, "accuracy", "step_accuracies", "accuracy")):
        steps_x, steps_y, per_epoch = _per_step(history, step_key)
        if steps_y:
            ax.plot(steps_x, steps_y, "-", color="C0", alpha=0.25, linewidth=0.8, label="train, per step")
            ax.plot(steps_x, smoothed(steps_y, per_epoch // 10), "-", color="C0", label="train, moving average")
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o", color="C0", label="train, epoch")
        ax.plot(epochs, [h[f"test_{metric}"] for h in history], "s--", color="C1", label="test, epoch")
        ax.set(xlabel="epoch", ylabel=name, title=metric)
        ax.set_xlim(0, max(epochs, default=1) + 0.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        if len(epochs) > 2:  # whole epochs; fewer get fractional ticks
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
