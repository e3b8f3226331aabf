"""Kernel launches and device memory with as little host work as possible.

A call of this package runs one or two short kernels, so on small and
mid-sized inputs numba.cuda's host work per launch and per allocation, not the
GPU, sets its cost.  Four things here cut it:

* :class:`Kernel` launches a kernel through the compiled overload numba chose
  for the arguments.  ``kernel[grid, block](*args)`` types every argument on
  every call (``typeof`` builds a numba type per device array) before it
  launches; here the overload is found in a dict keyed by what fixes numba's
  typing of the arguments (an array's class, dtype, shape and strides; a
  scalar's Python type) and launched directly with numba's own launch
  configuration for ``[grid, block]`` (its normalised dimensions and default
  stream).  The first launch with a new key goes through the dispatcher as
  usual (typing, compiling or loading from the disk cache), then the overload
  it used is looked up.  Anything unusual (no such overload, a kernel numba
  marks launch-configuration sensitive, pre-launch callbacks) keeps the usual
  path.
* :func:`small_result` hands out fresh memory for the small per-feature tables a
  call returns (``mean``, ``invstd``, ``dweight``... are rows of one), cut in
  turn from slabs of ``GPU_RESULT_SLAB_BYTES`` instead of one device
  allocation (and later free, which synchronises the device) per call.  A table
  is never handed out twice: a slab is freed by numba once nothing cut from it
  is referenced, so keeping a result keeps at most its slab allocated.
* :func:`scratch` hands out device arrays for values that live within one call
  (the float64 block partials): one buffer per thread and CUDA context, grown
  as needed and reused by the next call instead of being allocated and freed
  every time.  Reuse is safe because every kernel runs on the calling thread's
  default stream, in order: a call's kernels finish with the buffer before the
  next call's first kernel starts.  Another thread gets its own buffer.
* :func:`counters` hands out the int32 tickets of the reductions' "last block
  done" merge (see :mod:`numbabn._gpu.feature_kernels`): per thread and CUDA context,
  allocated zeroed once (again when more are needed) and reused by every call;
  the last block of each group resets its counter to 0, so the workspace is
  zero again whenever a launch has finished.

The overload launch and the hand-made views behind slabs and scratch use
numba-cuda's private names, all in :mod:`numbabn._numba_private.cuda`, which checks
them once against the tested numba-cuda releases; otherwise every launch is a
plain ``kernel[grid, block](*args)``, every result table a
``cuda.device_array`` and every scratch view a slice and ``reshape`` of the
buffer (same results).  Under the CUDA simulator kernels are launched through
the dispatcher (the simulator has no compiled overloads), and slabs and
scratch are NumPy-backed.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
from numba import cuda

from .. import _config as cfg
from .._numba_private import cuda as _private

SIMULATOR = _private.SIMULATOR

# Argument types whose numba type depends on the Python type alone (the package
# passes small ints, float64 scalars and flags, and tuples of ints).
_SCALARS = frozenset({int, float, bool, np.float64, np.int64, np.bool_})

# Kernels keep at most this many argument signatures, and scratch at most this
# many shaped views, before starting afresh (a training loop sees a handful).


def dim3(d) -> tuple:
    """A grid or block size as the ``(x, y, z)`` triple numba launches with."""
    if isinstance(d, tuple):
        return tuple(int(n) for n in d) + (1,) * (3 - len(d))
    return (int(d), 1, 1)


def _arg_key(a):
    t = type(a)
    if t in _SCALARS:
        return t
    if issubclass(t, tuple):  # tuples and namedtuples (the launch geometry) of scalars
        return (t, *map(type, a))
    return (t, a.dtype, a.shape, a.strides)


_USE_DISPATCHER = object()  # an argument key whose launches go through the dispatcher

_KERNELS = weakref.WeakSet()  # every Kernel, for reset()


class Kernel:
    """A ``numba.cuda.jit`` kernel, launched as ``kernel.launch(grid, block, *args)``
    with ``grid`` and ``block`` from :func:`dim3`, on the default stream.

    Whether it launches compiled overloads directly or as
    ``dispatcher[grid, block](*args)`` is decided at its first launch
    (:func:`numbabn._numba_private.cuda.fast`); ``_fast`` holds the answer.
    """

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.__name__ = getattr(dispatcher, "__name__", "kernel")
        self._overloads = {}  # argument key -> compiled overload, or _USE_DISPATCHER
        self._configs = {}  # (grid, block) -> numba's launch configuration
        self._fast = None  # None: not decided yet
        _KERNELS.add(self)

    def launch(self, grid, block, *args):
        fast = self._fast
        if fast is None:
            fast = self._fast = not SIMULATOR and _private.fast("launch")
        if not fast:
            self.dispatcher[grid, block](*args)
            return
        config = self._configs.get((grid, block))
        if config is None:
            config = self._configs[grid, block] = _private.launch_config(self.dispatcher, grid,
                                                                         block)
        key = tuple(map(_arg_key, args))
        overload = self._overloads.get(key)
        if overload is None:
            config(*args)  # numba's usual path: types, compiles or loads, launches
            if len(self._overloads) >= cfg.GPU_MAX_SIGNATURES:
                self._overloads.clear()
            overload = _private.compiled_overload(self.dispatcher, args)
            self._overloads[key] = _USE_DISPATCHER if overload is None else overload
        elif overload is _USE_DISPATCHER or _private.has_callbacks(config):
            config(*args)
        else:
            _private.launch_compiled(overload, config, args)

    def reset(self):
        """Forget the path, configurations and overloads (decided again at the next launch)."""
        self._fast = None
        self._overloads.clear()
        self._configs.clear()

    def __repr__(self):
        return f"Kernel({self.__name__})"


def reset():
    """Decide the private paths again (:func:`numbabn._numba_private.cuda.reset`) and
    drop every kernel's launch state, scratch buffers, result slabs and counters."""
    _private.reset()
    for kernel in list(_KERNELS):
        kernel.reset()
    clear_scratch()


# --------------------------------------------------------------------------- #
# Device memory: per-thread, per-context state
# --------------------------------------------------------------------------- #
class _PerContext(threading.local):
    def __init__(self):
        # id(context) -> entry whose first item is the context, held so that its
        # id is not reused while the entry lives.
        self.by_context = {}

    def get(self):
        ctx = None if SIMULATOR else cuda.current_context()
        entry = self.by_context.get(id(ctx))
        return ctx, (entry if entry is not None and entry[0] is ctx else None)


_scratch = _PerContext()  # entry: [context, flat float64 buffer, {shape: view}]
_slabs = _PerContext()  # entry: [context, uint8 slab, bytes handed out]
_counters = _PerContext()  # entry: [context, int32 array of zeros]
_constants = _PerContext()  # entry: [context, {(n, dtype, fill): device array}]

_ALIGN = 256  # bytes; what cudaMalloc guarantees


def small_result(shape, dtype):
    """A fresh C-contiguous device array for a small result returned to the
    caller, cut from this thread's current slab (or allocated on its own when
    larger than a quarter of a slab)."""
    shape = tuple(shape)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    slab_bytes = cfg.GPU_RESULT_SLAB_BYTES
    if nbytes > slab_bytes // 4 or not _private.fast("views"):
        return cuda.device_array(shape, dtype)
    ctx, entry = _slabs.get()
    if entry is None or entry[2] + nbytes > slab_bytes:
        entry = [ctx, cuda.device_array(slab_bytes, np.uint8), 0]
        _slabs.by_context[id(ctx)] = entry
    slab, offset = entry[1], entry[2]
    entry[2] = offset + -(-nbytes // _ALIGN) * _ALIGN
    return _private.cut(slab, offset, shape, dtype)


def scratch(shape):
    """A C-contiguous float64 device array of ``shape`` whose contents are
    undefined and which the next call on this thread may overwrite: for values
    produced and consumed within one call, never for anything returned."""
    shape = tuple(shape)
    ctx, entry = _scratch.get()
    if entry is not None:
        view = entry[2].get(shape)
        if view is not None:
            return view
    size = math.prod(shape)
    if entry is None or entry[1].size < size:
        # Grow to the largest request so far (rounded up to 4 KiB).
        capacity = max(size, 0 if entry is None else entry[1].size)
        entry = [ctx, cuda.device_array(-(-capacity // cfg.GPU_SCRATCH_GRAIN) * cfg.GPU_SCRATCH_GRAIN, np.float64), {}]
        _scratch.by_context[id(ctx)] = entry
    view = _reshape_prefix(entry[1], shape, size)
    if len(entry[2]) >= cfg.GPU_MAX_SCRATCH_VIEWS:
        entry[2].clear()
    entry[2][shape] = view
    return view


def _reshape_prefix(flat, shape, size):
    """The first ``size`` elements of a flat device array, as a C-order ``shape``."""
    if _private.fast("views"):
        return _private.cut(flat, 0, shape, flat.dtype)
    return flat[:size].reshape(shape)


def counters(n):
    """An int32 device array of at least ``n`` zeros for the tickets of a
    "last block done" reduction, which leaves it zeroed when it finishes.  The
    same array for every call on this thread and CUDA context (reuse is safe
    for the reason :func:`scratch` gives); a larger one, zeroed, when more are
    needed."""
    ctx, entry = _counters.get()
    if entry is None or entry[1].shape[0] < n:
        size = -(-max(n, 1) // cfg.GPU_SCRATCH_GRAIN) * cfg.GPU_SCRATCH_GRAIN
        entry = [ctx, cuda.to_device(np.zeros(size, np.int32))]
        _counters.by_context[id(ctx)] = entry
    return entry[1]


def constant(n, dtype, fill):
    """A device array of ``n`` values ``fill`` (a missing weight or bias: kernels
    only read it), kept per thread and CUDA context."""
    ctx, entry = _constants.get()
    if entry is None:
        entry = [ctx, {}]
        _constants.by_context[id(ctx)] = entry
    key = (int(n), np.dtype(dtype).str, fill)
    array = entry[1].get(key)
    if array is None:
        if len(entry[1]) >= cfg.GPU_MAX_SCRATCH_VIEWS:
            entry[1].clear()
        array = entry[1][key] = cuda.to_device(np.full(int(n), fill, dtype))
    return array


def check_threads(threads, items, max_threads, unroll=1):
    """Refuse launch settings the kernels were not compiled for: their shared
    memory holds ``max_threads`` slots per row (the ``GPU_MAX_THREADS`` the
    kernel module read when it was imported, not the config's value now)."""
    if threads > max_threads or items % unroll:
        raise ValueError(
            f"GPU_THREADS ({threads}) must be at most GPU_MAX_THREADS ({max_threads}) "
            f"and GPU_ITEMS_PER_THREAD ({items}) a multiple of GPU_UNROLL ({unroll}), "
            f"the values the kernels were compiled with.")


def clear_scratch():
    """Drop this thread's scratch buffers, result slabs, counters and constants
    (their memory goes when nothing uses it)."""
    _constants.by_context.clear()
    _scratch.by_context.clear()
    _slabs.by_context.clear()
    _counters.by_context.clear()
