"""Helpers of the scripts that tests/distributed/test_distributed.py runs under ``mpiexec``."""

import hashlib
import json
import os
import sys

import numpy as np

MARK = "RESULT "


def world():
    """COMM_WORLD, one thread per core this rank owns, and an uncaught
    exception ending the whole job (no rank left waiting)."""
    from numbabn.distributed import abort_on_uncaught_exception, set_threads_per_rank

    comm = abort_on_uncaught_exception()
    set_threads_per_rank(comm)
    return comm


def emit(comm, **fields):
    """Record this rank's results as one JSON line: appended to
    ``$NUMBABN_MPI_RESULTS/rank-<rank>.jsonl`` when that folder is set (what the
    test reads: the ranks' stdout lines can interleave), else printed."""
    line = json.dumps({"rank": comm.Get_rank(), **fields})
    folder = os.environ.get("NUMBABN_MPI_RESULTS")
    if folder:
        with open(os.path.join(folder, f"rank-{comm.Get_rank()}.jsonl"), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    else:
        print(MARK + line, flush=True)
        sys.stdout.flush()


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def rel_err(actual, ref):
    """max |actual - ref| / max |ref| (float64)."""
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    if actual.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - ref)) / max(np.max(np.abs(ref)), 1e-300))


def synthetic_data(n_train=640, n_test=64, seed=0):
    """uint8 images and labels, as numbabn.mnist.data.load_mnist returns them."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.uint8))
