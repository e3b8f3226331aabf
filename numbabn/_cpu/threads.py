"""Make concurrent calls safe whatever Numba threading layer is in use.

Numba's ``omp`` and ``tbb`` layers accept parallel kernels launched from several
Python threads at once; the ``workqueue`` fallback (used where neither OpenMP nor
TBB is available) does not, and can abort the process.  Kernel launches go
through :func:`kernel_guard`, which serialises them only under ``workqueue``
and runs small inputs on the calling thread alone.
Numba prefers ``omp`` then ``tbb`` by default (``NUMBA_THREADING_LAYER``).
"""

import contextlib
import threading

import numba

from .._config import SERIAL_MAX_ELEMS

_lock = threading.RLock()
_layer_is_threadsafe = None  # unknown until the first parallel kernel has run


def threading_layer():
    """The layer Numba chose, or ``None`` before the first parallel launch."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


@contextlib.contextmanager
def kernel_guard(x=None):
    """Held around every CPU kernel launch.

    Serialises launches under ``workqueue`` (or while the layer is unknown), and
    runs inputs of at most ``SERIAL_MAX_ELEMS`` elements on the calling thread
    alone: waking the pool costs more than such a call (milliseconds when the
    other core is busy).  Results do not change, since the reduction partition
    never depends on the thread count.
    """
    small = x is not None and x.size <= SERIAL_MAX_ELEMS
    with _lock_if_needed():
        if not small:
            yield
            return
        previous = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            yield
        finally:
            numba.set_num_threads(previous)


def _lock_if_needed():
    """A lock under ``workqueue`` (or while the layer is unknown), else nothing."""
    global _layer_is_threadsafe
    if _layer_is_threadsafe is None:
        layer = threading_layer()
        if layer is None:
            return _lock
        _layer_is_threadsafe = layer in ("omp", "tbb")
    return contextlib.nullcontext() if _layer_is_threadsafe else _lock
