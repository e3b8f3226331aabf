"""Data-parallel batch norm across processes and machines, on MPI (mpi4py).

* :func:`sync_batch_norm_train` / :func:`sync_batch_norm_backward`: batch norm
  of the batch made of every rank's rows, each rank holding its own rows;
* :class:`SyncBatchNorm` and :func:`convert_sync_batchnorm`: the layer, and the
  swap of a model's BatchNorm layers for it;
* :func:`abort_on_uncaught_exception`, :func:`abort`, :func:`allreduce_in_rank_order`,
  :func:`set_threads_per_rank`: what a data-parallel program needs around them;
* ``numbabn-mnist --distributed`` (:mod:`numbabn.mnist.distributed`) trains
  under ``mpiexec -n N``.

Every function takes ``comm=None``, meaning ``MPI.COMM_WORLD``.  mpi4py is
imported on first use, not by ``import numbabn`` or ``import
numbabn.distributed``; without it the first call raises ImportError saying
``pip install -e '.[mpi]'``.

Guarantees: every rank gets bitwise the same statistics, sums and running
statistics (partials are gathered with ``Allgather`` and combined in rank
order, never with the MPI library's own reduction order); a bad input on one
rank raises the same :class:`CollectiveError` (a ValueError/TypeError) on every
rank instead of a hang.  NumPy (CPU) arrays only.
"""

from ._comm import (
    CollectiveError,
    CollectiveRuntimeError,
    CollectiveTypeError,
    CollectiveValueError,
    abort,
    abort_on_uncaught_exception,
    allreduce_in_rank_order,
    set_threads_per_rank,
)
from .batchnorm import (
    SyncBatchNorm,
    convert_sync_batchnorm,
    sync_batch_norm_backward,
    sync_batch_norm_train,
)

__all__ = [
    "sync_batch_norm_train",
    "sync_batch_norm_backward",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "CollectiveError",
    "CollectiveValueError",
    "CollectiveTypeError",
    "CollectiveRuntimeError",
    "abort",
    "abort_on_uncaught_exception",
    "allreduce_in_rank_order",
    "set_threads_per_rank",
]
