"""Make concurrent calls safe whatever Numba threading layer is in use.

Numba's ``omp`` and ``tbb`` layers accept parallel kernels launched from several
Python threads at once; the ``workqueue`` fallback (used where neither OpenMP nor
TBB is available) does not, and can abort the process.  Kernel launches go
through :func:`kernel_guard`, which serialises them only under ``workqueue``.
Numba prefers ``omp`` then ``tbb`` by default (``NUMBA_THREADING_LAYER``).
"""

import contextlib
import threading

import numba

_lock = threading.RLock()
_layer_is_threadsafe = None  # unknown until the first parallel kernel has run


def threading_layer():
    """The layer Numba chose, or ``None`` before the first parallel launch."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def kernel_guard():
    """A context manager: a lock under ``workqueue`` (or while unknown), else nothing."""
    global _layer_is_threadsafe
    if _layer_is_threadsafe is None:
        layer = threading_layer()
        if layer is None:
            return _lock
        _layer_is_threadsafe = layer in ("omp", "tbb")
    return contextlib.nullcontext() if _layer_is_threadsafe else _lock
