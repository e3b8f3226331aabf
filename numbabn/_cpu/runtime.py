"""The CPU backend's runtime (the twin of :mod:`numbabn._gpu.runtime`): the
thread-pool guard around kernel launches, and the cached constant arrays that
stand in for a missing weight or bias.

Concurrent calls are safe whatever Numba threading layer is in use.

Numba's ``omp`` and ``tbb`` layers accept parallel kernels launched from several
Python threads at once; the ``workqueue`` fallback (used where neither OpenMP nor
TBB is available) does not, and can abort the process.  Kernel launches go
through :func:`kernel_guard`, which serialises them only under ``workqueue``.
Small inputs run the serial twins of the kernels (:func:`serial_kernels`) on
the calling thread alone.
Numba prefers ``omp`` then ``tbb`` by default (``NUMBA_THREADING_LAYER``).
"""

import contextlib
import os
import threading
import types
from functools import lru_cache
from types import SimpleNamespace

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


def astype(a, dtype):
    """``a.astype(dtype)``."""
    return a.astype(dtype)


# ``a.astype(dtype)`` with overflow to inf silenced (a value beyond float32's
# range becomes inf, its correct float32 value).  np.errstate as a decorator
# keeps its state per call (NumPy >= 2.0: thread and context safe) and saves
# building a context manager on every call.
astype_quiet = np.errstate(over="ignore")(astype)


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
    """Held around every CPU kernel launch: serialises launches under
    ``workqueue`` (or while the layer is unknown); a shared no-op context under
    ``omp``/``tbb``.  (Small inputs need nothing here: they run the serial twins,
    see :func:`serial_kernels`.)

    A plain function returning a context manager, not a generator: on every
    call of the public API it costs about 0.1 us instead of 2 us.
    """
    return _lock_if_needed()


def is_small(x):
    """Whether ``x`` runs on the calling thread alone (the serial twins):
    at most ``SERIAL_MAX_ELEMS`` values, where waking the pool costs more than
    the work (milliseconds when the other core is busy)."""
    return x.size <= _config.SERIAL_MAX_ELEMS


_declared = {}  # Python functions compiled outside their module (serial twins, the
# statistics core) -> their jit options


def _jit_options(func):
    """The options of the kernel-module dispatcher compiling ``func`` (a
    serial twin's and the statistics core's included); ``None`` if it is none
    of ours."""
    for obj in func.__globals__.values():
        if getattr(obj, "py_func", None) is func:
            return obj.targetoptions
    return _declared.get(func)


def compile_core(func):
    """A function of the statistics core (:mod:`numbabn._core`) compiled for
    the CPU: strict, and inlined as :func:`inline_in_serial_code` says."""
    kernel = numba.njit(inline=inline_in_serial_code, **_config.CPU_HELPER_STRICT)(func)
    _declared[func] = kernel.targetoptions
    return kernel


def inline_in_serial_code(expr, caller_ir, callee_ir):
    """Numba's ``inline=`` cost model for the kernels' helpers: a helper is
    inlined into a caller compiled without ``parallel`` and with the same
    fast-math flags, and called as a function of its own anywhere else.

    Numba compiles every function it calls on its own (typing, lowering, LLVM
    optimisation, machine code) and then links it into each caller, whose
    module LLVM optimises and emits again with the callee in it; a parallel
    kernel does that twice more (its outlined loop body, then itself).  A
    helper tree compiled as one function (the first strict helper a kernel
    calls, with everything strict below it inlined) goes through that once,
    and the parallel kernel's loop body stays one call.  Inlining keeps each
    operation's flags only where the flags are the same, hence the rule; a
    parallel caller keeps its loop body small (its outlining copies and
    re-types all of it).  A helper with branches on an optional argument being
    None is not given this model: Numba prunes those branches by the types of
    a function's own arguments, and an inlined argument is a local.
    """
    caller = _jit_options(caller_ir.func_id.func)
    callee = _jit_options(callee_ir.func_id.func)
    # (``parallel`` is Numba's options object, or a dict Numba may have
    # emptied as it read it: only False, or no option, means serial.)
    if caller is None or callee is None or caller.get("parallel", False) is not False:
        return False
    return _flags(caller) == _flags(callee)


def _flags(options):
    fastmath = options.get("fastmath", False)
    return frozenset(fastmath) if isinstance(fastmath, (set, frozenset)) else bool(fastmath)


def serial_kernels(namespace):
    """The kernels of a kernel module for small inputs, by name: each Numba
    dispatcher of ``namespace``, with every ``parallel=True`` one replaced by its
    serial twin (the same Python function compiled without ``parallel``, where
    ``prange`` is ``range``).

    A first call on a small input then compiles no parallel loop (Numba
    outlines each ``prange`` into a function of its own and optimises and
    emits it separately: about 0.7 s of LLVM work each), and a call runs no
    thread-pool code.  A twin runs the same callees, compiled once for both, in
    the same order; the reduction partition never depends on the threads, so a
    result is the same whichever twin computes it
    (tests/cpu/test_concurrency.py).  The twin is named ``<name>_serial``: Numba
    names its on-disk cache entries after the function, not its flags, so the
    two must not share a name.
    """
    options = {k: v for k, v in _config.CPU_JIT_PARALLEL.items() if k != "parallel"}
    out = {}
    for name, obj in namespace.items():
        if not hasattr(obj, "py_func"):
            continue
        if obj.targetoptions.get("parallel") and obj.py_func.__module__ == namespace["__name__"]:
            f = obj.py_func
            twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial",
                                      f.__defaults__, f.__closure__)
            twin.__qualname__ = f.__qualname__ + "_serial"
            twin.__doc__ = f.__doc__
            obj = numba.njit(**{**options, "fastmath": obj.targetoptions["fastmath"]})(twin)
            _declared[twin] = obj.targetoptions
        out[name] = obj
    return SimpleNamespace(**out)


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
