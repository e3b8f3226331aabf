"""The ``numbabn-mnist`` command's options: the parser, the :class:`TrainConfig`
they give, and the checks every process makes before loading data (shared by
the one-process command, :mod:`numbabn.mnist.cli`, and the distributed trainer,
:mod:`numbabn.mnist.distributed`)."""

from __future__ import annotations

import argparse

from .._extras import require
from .models import MODELS
from .train import TrainConfig


def build_parser():
    parser = argparse.ArgumentParser(
        prog="numbabn-mnist", description="Train a small network on MNIST with numbabn's layers.")
    parser.add_argument("--model", choices=sorted(MODELS),
                        help="default: cnn (with --warmup: both models)")
    parser.add_argument("--no-bn", action="store_true", help="leave out the batch-norm layers")
    parser.add_argument("--norm", choices=["batch", "renorm"], default="batch",
                        help="batch norm, or batch renormalization for small batches")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, help="default: 128 (cnn), 60 (mlp)")
    parser.add_argument("--lr", type=float, help="default: 1e-3 (cnn), 0.5 (mlp)")
    parser.add_argument("--lr-decay", type=float, metavar="GAMMA",
                        help="multiply the learning rate by GAMMA after each epoch; default: 0.7 (cnn), 1 (mlp)")
    parser.add_argument("--no-dropout", action="store_true",
                        help="leave out the cnn's two Dropout layers (the mlp has none)")
    parser.add_argument("--shift", type=int, metavar="PIXELS",
                        help="augment: shift each training image by up to PIXELS in each direction; "
                             "default: 2 (cnn), 0 (mlp)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], help="default: adam (cnn), sgd (mlp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train", type=int, metavar="N", help="train on the first N images only")
    parser.add_argument("--data-dir", help="MNIST folder (default: $NUMBABN_DATA, else ~/.cache/numbabn/mnist "
                                           "when it holds the four files, else the copy shipped with numbabn)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/mnist-<model>)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.npz")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--warmup", action="store_true",
                        help="only compile the kernels this run would need (training and evaluation; "
                             "both models unless --model is given) into Numba's on-disk cache, print "
                             "each group's time, and exit: no training, no output folder (for container "
                             "images and CI caches)")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training on every process of an MPI job: "
                             "mpiexec -n N numbabn-mnist --distributed (needs the 'mpi' extra)")
    return parser


def config_from_args(args, model=None):
    """The :class:`TrainConfig` of ``args``, for ``model`` if given, else for
    ``args.model`` (``cnn`` when that is not set)."""
    model = model or args.model or "cnn"
    spec = MODELS[model]
    if args.epochs < 1 or (args.batch_size is not None and args.batch_size < 2) \
            or (args.limit_train is not None and args.limit_train < 2):
        raise ValueError("--epochs must be >= 1, --batch-size and --limit-train >= 2.")
    if args.shift is not None and not 0 <= args.shift <= 8:
        raise ValueError(f"--shift must be between 0 and 8 pixels; got {args.shift}.")
    if args.lr_decay is not None and not 0.0 < args.lr_decay <= 1.0:
        raise ValueError(f"--lr-decay must be in (0, 1]; got {args.lr_decay}.")
    return TrainConfig(
        model=model, batch_norm=not args.no_bn,
        batch_size=args.batch_size or spec.batch_size,
        lr=args.lr if args.lr is not None else spec.lr,
        optimizer=args.optimizer or spec.optimizer,
        seed=args.seed, limit_train=args.limit_train,
        lr_decay=args.lr_decay if args.lr_decay is not None else spec.lr_decay,
        dropout=spec.dropout and not args.no_dropout,
        shift=args.shift if args.shift is not None else spec.shift,
        norm=args.norm,
    )


def check_device(device):
    """Refuse ``cuda`` with a clear message (the layers run on NumPy/CPU)."""
    if device == "cpu":
        return
    import importlib.util

    if importlib.util.find_spec("numbabn._gpu") is None:
        raise RuntimeError("--device cuda needs numbabn's GPU backend (numbabn._gpu with numba-cuda), "
                           "which is not installed here; use --device cpu.")
    raise RuntimeError("--device cuda: the layer API (convolutions, linear layers) runs on the CPU only; "
                       "numbabn's GPU backend covers the functional batch-norm API. Use --device cpu.")


def require_train_extra(progress):
    """Fail before loading data when the ``train`` extra is missing."""
    if progress:
        require("tqdm", "numbabn-mnist's progress bar", otherwise="run with --no-progress")
    require("matplotlib", "numbabn-mnist's loss and accuracy curves")
