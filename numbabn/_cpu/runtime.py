"""The CPU backend's runtime (the twin of :mod:`numbabn._gpu.runtime`): the
thread-pool guard around kernel launches, and the cached constant arrays that
stand in for a missing weight or bias.

Concurrent calls are safe whatever Numba threading layer is in use.

Numba's ``omp`` and ``tbb`` layers accept parallel kernels launched from several
Python threads at once; the ``workqueue`` fallback (used where neither OpenMP nor
TBB is available) does not, and can abort the process.  Kernel launches go
through :func:`kernel_guard`, which serialises them only under ``workqueue``
and runs small inputs on the calling thread alone.
Numba prefers ``omp`` then ``tbb`` by default (``NUMBA_THREADING_LAYER``).
"""

import contextlib
import os
import threading
from functools import lru_cache

import numba
import numpy as np

from .. import _config

_lock = threading.RLock()
_layer_is_threadsafe = None  # unknown until the first parallel kernel has run


def threading_layer():
    """The layer Numba chose, or ``None`` before the first parallel launch."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


_unlocked = contextlib.nullcontext()  # reusable: it holds no state


_thread_count = []  # (get, set) from _numba_private, once the pool may start


def _thread_functions():
    if not _thread_count:
        from .._numba_private import thread_count_functions
        _thread_count.extend(thread_count_functions())
    return _thread_count


def num_threads():
    """Numba's thread count for the calling thread (``numba.get_num_threads``
    without its per-call pool check)."""
    return _thread_functions()[0]()


def kernel_guard(x=None):
    """Held around every CPU kernel launch.

    Serialises launches under ``workqueue`` (or while the layer is unknown), and
    runs inputs of at most ``SERIAL_MAX_ELEMS`` elements on the calling thread
    alone: waking the pool costs more than such a call (milliseconds when the
    other core is busy).  Results do not change, since the reduction partition
    never depends on the thread count.

    A plain function returning a context manager, not a generator: on every
    call of the public API, a large input under ``omp``/``tbb`` gets a shared
    no-op context (about 0.1 us instead of 2 us for a generator-based one).
    """
    lock = _lock_if_needed()
    if x is None or x.size > _config.SERIAL_MAX_ELEMS:
        return lock
    return _serial(lock)


class _serial:
    """``lock`` held, Numba's thread count 1 for this thread, restored after."""

    __slots__ = ("lock", "previous")

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        self.lock.__enter__()
        get, set_ = _thread_functions()
        self.previous = get()
        set_(1)
        return self

    def __exit__(self, *exc):
        try:
            _thread_functions()[1](self.previous)
        finally:
            self.lock.__exit__(*exc)
        return False


def _lock_if_needed():
    """A lock under ``workqueue`` (or while the layer is unknown), else a no-op
    context."""
    global _layer_is_threadsafe
    if _layer_is_threadsafe is None:
        layer = threading_layer()
        if layer is None:
            return _lock
        _layer_is_threadsafe = layer in ("omp", "tbb")
    return _unlocked if _layer_is_threadsafe else _lock


def prefer_passive_waiting():
    """Let Numba's idle OpenMP workers sleep at once instead of spinning.

    For code that interleaves Numba kernels with other multi-threaded work
    (NumPy's BLAS in the layers' GEMMs): spinning workers of one pool take the
    cores the other pool needs.  On the 2-core CI machine the ``cnn`` training
    step ran 1.35-1.7x faster with ``OMP_WAIT_POLICY=passive`` (e.g. 431 -> 729
    img/s; several runs, another job beside them at times).

    Sets ``OMP_WAIT_POLICY=passive`` unless the user chose a policy, and only
    before Numba's thread pool has started (OpenMP reads it once, when the
    runtime loads); an OpenMP runtime loaded later in the process (PyTorch's,
    say) reads it too.  Results do not change.  Returns whether it was set.
    """
    if "OMP_WAIT_POLICY" in os.environ or threading_layer() is not None:
        return False
    os.environ["OMP_WAIT_POLICY"] = "passive"
    return True


@lru_cache(maxsize=64)
def constant(n, dtype, fill):
    """``n`` values ``fill``: stands in for a missing weight or bias (kernels only read it)."""
    return np.full(n, fill, dtype)
