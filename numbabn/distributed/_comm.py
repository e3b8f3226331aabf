"""MPI plumbing shared by numbabn.distributed: the lazy mpi4py import, the
collective agreement that turns a bad input on one rank into the same error on
every rank, sums in rank order, and process-level fault handling.

Nothing here imports mpi4py at module import time: only :func:`mpi` does, when
a function needs ``MPI.COMM_WORLD`` or ``MPI.COMM_TYPE_SHARED``.  A
communicator passed in explicitly is used through its methods alone
(``Get_rank``, ``Get_size``, ``Allgather``, ``Bcast``, ``bcast``, ``Abort``).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import zlib

import numpy as np

INSTALL_HINT = "pip install -e '.[mpi]' (from a clone; or pip install 'numbabn[mpi]')"


def mpi():
    """``mpi4py.MPI``, imported on first use; ImportError with the fix when missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            f"numbabn.distributed needs mpi4py and an MPI library ({e}). Install numbabn's "
            f"'mpi' extra: {INSTALL_HINT}.") from e
    return MPI


def resolve(comm):
    """``comm``, or ``MPI.COMM_WORLD`` when it is None."""
    return mpi().COMM_WORLD if comm is None else comm


# --------------------------------------------------------------------------- #
# Errors every rank raises together.
# --------------------------------------------------------------------------- #
class CollectiveError(Exception):
    """Raised on every rank of a collective call at once, with the same message.

    ``ranks`` lists the ranks whose input (or state) was at fault.  Since every
    rank raises it at the same call, a program may catch it and carry on, or
    exit normally on every rank; no rank is left waiting in a collective.
    """

    def __init__(self, message, ranks=()):
        super().__init__(message)
        self.ranks = list(ranks)


class CollectiveValueError(CollectiveError, ValueError):
    """A :class:`CollectiveError` about a bad value (a ValueError too)."""


class CollectiveTypeError(CollectiveError, TypeError):
    """A :class:`CollectiveError` about a bad type (a TypeError too)."""


class CollectiveRuntimeError(CollectiveError, RuntimeError):
    """A :class:`CollectiveError` about the ranks' state (a RuntimeError too)."""


_ERROR_CODES = {ValueError: 1, TypeError: 2}
_CODE_CLASS = {1: CollectiveValueError, 2: CollectiveTypeError, 3: CollectiveRuntimeError}

# The descriptor every rank contributes to an agreement: int64 fields, then a
# fixed-size UTF-8 message (the local error, truncated).
FIELDS = ("status", "op", "nfeat", "dtype", "ndim", "axis", "weight", "bias", "eps", "count",
          "check")
_F = {name: i for i, name in enumerate(FIELDS)}
_MSG_BYTES = 240
_HEAD = 8 * len(FIELDS)

OPS = {1: "sync_batch_norm_train", 2: "sync_batch_norm_backward", 3: "the trainer's setup",
       4: "loading the checkpoint", 5: "the replica check"}
_OP_CODE = {name: code for code, name in OPS.items()}
DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}
_DTYPE_NAMES = {0: "another dtype", 1: "float32", 2: "float64"}


def rank_and_size(comm):
    return comm.Get_rank(), comm.Get_size()


def agree(comm, op, describe_local):
    """Exchange one descriptor per rank (ONE ``Allgather``) and raise on every
    rank if any rank's local check failed or the ranks are in different ops.

    Parameters
    ----------
    comm : communicator
    op : str, a value of :data:`OPS`
    describe_local : callable returning a dict of :data:`FIELDS` entries (ints)
        Runs this rank's checks; any ``Exception`` it raises is reported to
        every rank (a ValueError as :class:`CollectiveValueError`, a TypeError
        as :class:`CollectiveTypeError`, anything else as
        :class:`CollectiveRuntimeError`), chained to the local one here.

    Returns
    -------
    table : dict of field name to int64 ndarray ``(P,)``, every rank's value in rank order
    """
    rank, size = rank_and_size(comm)
    fields = np.zeros(len(FIELDS), np.int64)
    fields[_F["op"]] = _OP_CODE[op]
    message, local_error = b"", None
    try:
        for name, value in describe_local().items():
            fields[_F[name]] = int(value)
    except Exception as e:  # noqa: BLE001 -- every local failure must reach the other ranks
        local_error = e
        fields[_F["status"]] = next((c for cls, c in _ERROR_CODES.items() if isinstance(e, cls)), 3)
        message = f"{type(e).__name__}: {e}".encode("utf-8", "replace")[:_MSG_BYTES]
    send = np.zeros(_HEAD + _MSG_BYTES, np.uint8)
    send[:_HEAD] = fields.view(np.uint8)
    send[_HEAD:_HEAD + len(message)] = np.frombuffer(message, np.uint8)
    recv = np.empty((size, send.size), np.uint8)
    comm.Allgather(send, recv)
    values = np.ascontiguousarray(recv[:, :_HEAD]).view(np.int64)  # (P, len(FIELDS))
    table = {name: values[:, i].copy() for name, i in _F.items()}

    ops = table["op"]
    if np.any(ops != ops[0]):
        names = ", ".join(f"rank {r} in {OPS.get(int(o), 'an unknown call')}" for r, o in enumerate(ops))
        raise CollectiveRuntimeError(
            f"the ranks are in different collective calls ({names}): every rank must make the "
            f"same numbabn.distributed calls in the same order (the same layers in the same mode).",
            ranks=[r for r in range(size) if ops[r] != ops[0]]) from local_error
    bad = [r for r in range(size) if table["status"][r]]
    if bad:
        def text(r):
            return bytes(recv[r, _HEAD:]).rstrip(b"\0").decode("utf-8", "replace")
        detail = "; ".join(f"rank {r}: {text(r)}" for r in bad[:4])
        more = f" (and {len(bad) - 4} more ranks)" if len(bad) > 4 else ""
        who = f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
        cls = _CODE_CLASS[int(table["status"][bad[0]])]
        raise cls(f"{op} failed on {who} of {size}, so every rank stops here. {detail}{more}",
                  ranks=bad) from local_error
    return table


def require_same(table, field, what, op, error=CollectiveValueError, show=str):
    """Raise ``error`` on every rank when ``table[field]`` is not the same on all ranks."""
    values = table[field]
    if np.all(values == values[0]):
        return
    odd = [r for r in range(values.size) if values[r] != values[0]]
    listing = ", ".join(f"rank {r}: {show(int(v))}" for r, v in enumerate(values))
    raise error(f"{op}: the ranks disagree on {what} ({listing}); every rank must pass the same.",
                ranks=odd)


def dtype_name(code):
    return _DTYPE_NAMES.get(code, "another dtype")


def fingerprint(*arrays):
    """A 32-bit checksum of arrays' dtypes, shapes and bytes (to compare ranks' inputs)."""
    h = 0
    for a in arrays:
        a = np.ascontiguousarray(a)
        h = zlib.crc32(f"{a.dtype.str}{a.shape}".encode(), h)
        h = zlib.crc32(a.view(np.uint8).reshape(-1), h)
    return h


def agree_ok(comm, error, op):
    """Every rank learns whether any rank's ``error`` (an exception or None) is
    set, and raises the first one as a :class:`CollectiveError` if so."""
    def describe():
        if error is not None:
            raise error
        return {}
    agree(comm, op, describe)


# --------------------------------------------------------------------------- #
# Reductions in rank order: the same bits on every rank, whatever the MPI
# library's reduction algorithm.
# --------------------------------------------------------------------------- #
def allgather_rows(comm, row):
    """Every rank's 1-D ``row`` (same length and dtype everywhere), as a
    ``(P, len(row))`` array in rank order (one ``Allgather``)."""
    row = np.ascontiguousarray(row)
    out = np.empty((comm.Get_size(), row.size), row.dtype)
    comm.Allgather(row, out)
    return out


def sum_rows(rows):
    """``rows[0] + rows[1] + ...`` added in that order (float64 for float input)."""
    total = np.array(rows[0], dtype=np.float64)
    for row in rows[1:]:
        total += row
    return total


def allreduce_in_rank_order(comm, values):
    """Sum of every rank's float64 ``values`` added in rank order: bitwise the
    same result on every rank (``Allgather`` then an ordered sum, not
    ``Allreduce``, whose order the MPI library chooses)."""
    return sum_rows(allgather_rows(comm, np.asarray(values, np.float64).reshape(-1)))


# --------------------------------------------------------------------------- #
# Process-level faults and thread counts.
# --------------------------------------------------------------------------- #
def abort_on_uncaught_exception(comm=None, status=1):
    """Make an uncaught exception on any rank end the whole job.

    Installs a ``sys.excepthook`` that prints the traceback prefixed with the
    rank, then calls ``comm.Abort(status)``: without it, a rank that dies of
    an exception leaves the others waiting in their next collective for ever
    (MPICH's ``mpiexec`` only cleans up after a rank *killed* by a signal).
    Returns the communicator.
    """
    comm = resolve(comm)
    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            rank, size = rank_and_size(comm)
            text = "".join(traceback.format_exception(kind, value, tb))
            sys.stderr.write("".join(f"[rank {rank}/{size}] {line}\n" for line in text.splitlines()))
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 -- abort whatever happens
            previous(kind, value, tb)
        finally:
            abort(comm, 130 if issubclass(kind, KeyboardInterrupt) else status)

    sys.excepthook = hook
    return comm


ABORT_FORWARD_S = 0.5


def abort(comm, status):
    """End the whole job with exit status ``status``: ``comm.Abort``, then
    ``os._exit`` (MPICH's ``MPI_Abort`` can return before the process manager
    kills the process, and nothing more may run here meanwhile).

    The streams are flushed, then the process waits ``ABORT_FORWARD_S``:
    MPICH's process manager forwards a rank's output through a pipe, and an
    abort that follows a write at once can tear the job down before the
    traceback reaches ``mpiexec``'s stderr (seen as an empty stderr, about
    one run in three, on a 2-core VM)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    time.sleep(ABORT_FORWARD_S)
    try:
        comm.Abort(status)
    finally:
        os._exit(status)


def local_size(comm):
    """How many ranks of ``comm`` share this machine (``COMM_TYPE_SHARED``)."""
    try:
        node = comm.Split_type(mpi().COMM_TYPE_SHARED, key=comm.Get_rank())
    except (AttributeError, NotImplementedError, ImportError):
        return comm.Get_size()
    try:
        return node.Get_size()
    finally:
        node.Free()


def cores_available():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads_per_rank(comm=None):
    """One Numba thread (and one BLAS thread) per core this rank owns: the
    machine's cores divided by the ranks on this machine.  Returns the count.

    Numba's pool is set with ``numba.set_num_threads``; the BLAS pools with
    ``threadpoolctl`` (:func:`set_blas_threads`).
    """
    import numba

    comm = resolve(comm)
    threads = max(1, cores_available() // max(1, local_size(comm)))
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    set_blas_threads(threads)
    return threads


def set_blas_threads(n):
    """Limit every BLAS library loaded in this process (NumPy's OpenBLAS, MKL,
    BLIS) to ``n`` threads, through ``threadpoolctl`` (the ``mpi`` extra);
    False when no BLAS library is loaded."""
    from .._extras import require

    threadpoolctl = require("threadpoolctl", "Setting the BLAS thread count", extra="mpi")
    return bool(threadpoolctl.threadpool_limits(limits=int(n), user_api="blas"))
