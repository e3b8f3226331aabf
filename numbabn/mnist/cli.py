"""The ``numbabn-mnist`` command: train one model in this process, or, with
``--distributed``, on every process of an MPI job (:mod:`numbabn.mnist.distributed`);
with ``--warmup``, only compile the kernels into Numba's on-disk cache."""

from __future__ import annotations

import os
import sys

from .._cpu.runtime import prefer_passive_waiting
from .._extras import MissingExtraError
from . import options
from .models import MODELS
from .train import Trainer


# Idle workers of NumPy's BLAS (after each GEMM) and of Numba's OpenMP pool spin
# for a while before sleeping, and the training step alternates the two on the
# same cores.  On the 2-core CI machine the cnn step ran at 633 img/s with both
# spinning, 762 with both sleeping at once (the 64-channel BatchNorm2d forward
# went from 13 ms to 4 ms).  Results are the same bits either way.
QUIET_THREAD_POOLS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "passive"}


def cli():
    """The ``numbabn-mnist`` console script: :func:`main` with quiet thread pools.

    The only place the trainer changes environment variables.  OpenBLAS reads
    ``OPENBLAS_THREAD_TIMEOUT`` once, when NumPy loads it, which has happened by
    the time this runs; so, unless the variable is set, the command starts
    itself again once (``python -m numbabn.mnist.cli``) with the settings of
    :data:`QUIET_THREAD_POOLS` that the user has not set.  When it is set (the
    restarted process, or the user's choice), ``OMP_WAIT_POLICY=passive`` is
    still set unless the user chose a policy (before Numba's pool starts).
    """
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        env = {**QUIET_THREAD_POOLS, **os.environ}
        os.execve(sys.executable, [sys.executable, "-m", "numbabn.mnist.cli", *sys.argv[1:]], env)
    prefer_passive_waiting()  # the step interleaves Numba kernels and BLAS GEMMs
    sys.exit(main())


def main(argv=None):
    """Entry point of ``numbabn-mnist`` (through :func:`cli`); returns the exit
    status (130 after Ctrl-C)."""
    args = options.build_parser().parse_args(argv)
    if args.warmup:
        return warmup_main(args)
    if args.distributed:  # the logic lives in numbabn.mnist.distributed
        from .distributed import main as distributed_main

        return distributed_main(args)
    trainer = None
    try:
        options.require_train_extra(progress=not args.no_progress)
        trainer = _setup(args)
        metrics = trainer.run(args.epochs)
    except (ValueError, RuntimeError, OSError, MissingExtraError) as e:
        print(f"numbabn-mnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = 0 if trainer is None else trainer.epochs_done
        where = (f"the last complete checkpoint ({done} epoch{'s' if done != 1 else ''}) is "
                 f"{trainer.checkpoint_path}; continue with --resume" if done else "no epoch was completed")
        print(f"\ninterrupted: {where}.", file=sys.stderr)
        return 130
    print(f"test accuracy {metrics['test_accuracy']:.4f}; metrics, curves and checkpoint in {trainer.out_dir}")
    return 0


def warmup_main(args):
    """``numbabn-mnist --warmup``: compile (or load from the cache) every kernel
    a run with these options would need, for ``--model`` or both models, printing
    each group's time; trains nothing and writes no output folder.  Returns the
    exit status."""
    try:
        if args.distributed or args.resume:
            raise ValueError("--warmup compiles the one-process trainer's kernels and exits; "
                             "leave out --distributed and --resume.")
        options.require_train_extra(progress=not args.no_progress)
        models = [args.model] if args.model else sorted(MODELS)
        configs = [options.config_from_args(args, model) for model in models]
        options.check_device(args.device)
        from .data import load_mnist

        data = load_mnist(data_dir=args.data_dir)
        for config in configs:
            trainer = Trainer(config, data, out_dir=None, progress=not args.no_progress)
            train_sizes, eval_sizes = trainer.warm_batch_sizes()
            print(f"{config.model}: a training step on batches of {_sizes(train_sizes)} and an "
                  f"evaluation on batches of {_sizes(eval_sizes)}")
            trainer.warm_up()
    except (ValueError, RuntimeError, OSError, MissingExtraError) as e:
        print(f"numbabn-mnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: what compiled so far stays in the cache.", file=sys.stderr)
        return 130
    return 0


def _sizes(sizes):
    return " and ".join(str(s) for s in sizes)


def _setup(args):
    config = options.config_from_args(args)
    options.check_device(args.device)
    from .data import load_mnist

    data = load_mnist(data_dir=args.data_dir)
    out_dir = args.out or os.path.join("runs", f"mnist-{config.model}")
    os.makedirs(out_dir, exist_ok=True)
    trainer = Trainer(config, data, out_dir, progress=not args.no_progress)
    if args.resume:
        trainer.resume()
        print(f"resuming from {trainer.checkpoint_path} after epoch {trainer.epochs_done}")
    return trainer


if __name__ == "__main__":
    cli()  # the command's restart runs this; OPENBLAS_THREAD_TIMEOUT is set by then, so no second one
