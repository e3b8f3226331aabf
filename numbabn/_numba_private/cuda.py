"""Every use of a private numba-cuda name by the GPU backend, in one place.

numba-cuda documents kernel launches (``kernel[grid, block](*args)``), device
allocations (``cuda.device_array``, ``cuda.to_device``), views of memory
described by an array interface (``cuda.from_cuda_array_interface``,
``cuda.as_cuda_array``), contexts (``cuda.current_context``,
``cuda.require_context``) and the ``DeviceNDArray`` class with its slicing and
``reshape``.  To cut host work per call (see :mod:`numbabn._gpu.runtime`), the
GPU backend also uses names it does not document, in two groups:

* ``"launch"``: launching a kernel's compiled overload directly: the
  dispatcher's ``configure``, ``typeof_pyval`` and ``overloads``, the launch
  configuration's ``griddim``, ``blockdim``, ``stream``, ``sharedmem`` and
  ``pre_launch_callbacks``, the overload's ``launch`` and
  ``launch_config_sensitive`` (:func:`launch_config`, :func:`compiled_overload`,
  :func:`launch_compiled`);
* ``"views"``: device arrays built by hand over another array's memory, without
  a CUDA driver call: ``DeviceNDArray(shape, strides, dtype, stream=,
  gpu_data=)`` over a ``MemoryPointer`` cut from the array's ``gpu_data``
  (``device_pointer_value``, ``context``) on a GPU, the simulator's
  ``FakeCUDAArray`` over a slice of the NumPy array it wraps (``_ary``) under
  the CUDA simulator (:func:`device_view`, :func:`cut`).

Each group is decided once, at its first use (:func:`fast`): the release that
provides ``numba.cuda`` must lie in :data:`TESTED` and the names must be there.
Otherwise numbabn takes the public path, with bitwise the same results (only
host time differs): plain ``kernel[grid, block](*args)`` launches;
``cuda.device_array`` for result tables; slicing and ``reshape`` for scratch
views; ``cuda.from_cuda_array_interface`` (and ``DeviceNDArray`` indexing) for
strided views.  The fallback is reported once per group: a ``RuntimeWarning`` on
a GPU, a ``logging`` message (logger ``numbabn``) under the simulator.

Unconditional, presence-checked only (there is no public alternative):

* the simulator's ``FakeCUDAArray`` and ``_ary`` to wrap memory described by an
  array interface and to read a simulated array's interface (:func:`sim_array`,
  :func:`sim_ndarray`, :func:`is_device_ndarray`): the simulator has no
  ``from_cuda_array_interface``;
* for the test that compiles every kernel to PTX without a GPU:
  :func:`nvvm_available` and :func:`assume_compute_capability` (which replaces
  ``numba.cuda.dispatcher.get_current_device``).

(The on-disk cache's folder, ``dispatcher._cache._cache_path``, is read through
:mod:`numbabn._numba_private`, for the CPU and GPU kernels alike.)
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import inspect
import logging
import warnings

import numba
from numba import cuda
from numba.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)

# Releases, (major, minor) inclusive, whose private names above were checked, per
# provider of numba.cuda.  On a GPU: numba-cuda 0.30.x, the last release verified
# on a real GPU (numba's own, deprecated, numba.cuda never was).  Under the
# simulator: what this repository's tests run on.
TESTED = {
    "gpu": {"numba-cuda": ((0, 30), (0, 30))},
    "simulator": {"numba": ((0, 68), (0, 68)), "numba-cuda": ((0, 30), (0, 30))},
}

GROUPS = ("launch", "views")

logger = logging.getLogger("numbabn")

_decided: dict = {}  # group -> bool
_reported: set = set()


def _parse(version: str):
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except (AttributeError, ValueError):
        return None


def provider() -> tuple:
    """``(distribution, (major, minor) or None)`` of what provides ``numba.cuda``:
    the NVIDIA ``numba-cuda`` package, or Numba's built-in target."""
    if getattr(cuda, "implementation", None) == "NVIDIA":
        try:
            version = importlib.metadata.version("numba-cuda")
        except Exception:  # noqa: BLE001 - no metadata: ask the package
            version = getattr(importlib.import_module("numba_cuda"), "__version__", "")
        return "numba-cuda", _parse(version)
    return "numba", _parse(numba.__version__)


def version_tested() -> bool:
    """Whether the installed ``numba.cuda`` is a release in :data:`TESTED`."""
    name, version = provider()
    span = TESTED["simulator" if SIMULATOR else "gpu"].get(name)
    return version is not None and span is not None and span[0] <= version <= span[1]


def _names_present(group: str) -> bool:
    if group == "launch":
        if SIMULATOR:
            return False  # the simulator's kernels have no compiled overloads
        from numba.cuda import dispatcher as d

        kernel = getattr(d, "_Kernel", None)
        dispatcher = getattr(d, "CUDADispatcher", None)
        return (callable(getattr(kernel, "launch", None))
                and all(callable(getattr(dispatcher, n, None))
                        for n in ("configure", "typeof_pyval", "__getitem__")))
    if group == "views":
        if SIMULATOR:
            import numpy as np

            cls = _sim_class()
            return cls is not None and isinstance(getattr(cls(np.zeros(1)), "_ary", None),
                                                  np.ndarray)
        from numba.cuda.cudadrv import devicearray, driver

        array = getattr(devicearray, "DeviceNDArray", None)
        pointer = getattr(driver, "MemoryPointer", None)
        if array is None or pointer is None or not hasattr(pointer, "device_pointer_value"):
            return False
        try:
            array_params = inspect.signature(array.__init__).parameters
            pointer_params = inspect.signature(pointer.__init__).parameters
        except (TypeError, ValueError):
            return False
        return ({"shape", "strides", "dtype", "stream", "gpu_data"} <= set(array_params)
                and {"context", "pointer", "size", "owner"} <= set(pointer_params))
    raise ValueError(group)


def fast(group: str) -> bool:
    """Whether the private path ``group`` (``"launch"`` or ``"views"``) is taken:
    decided at the first call, reported once when it is not."""
    ok = _decided.get(group)
    if ok is None:
        ok = _decided[group] = version_tested() and _names_present(group)
        if not ok:
            _report(group)
    return ok


def _span_text(span):
    lo, hi = span
    return f"{lo[0]}.{lo[1]}" + ("" if hi == lo else f" to {hi[0]}.{hi[1]}")


def _report(group):
    if group in _reported:
        return
    _reported.add(group)
    name, version = provider()
    shown = "of unknown version" if version is None else ".".join(map(str, version))
    tested = ", ".join(f"{n} {_span_text(span)}" for n, span in
                       TESTED["simulator" if SIMULATOR else "gpu"].items())
    why = ("its private names for these are missing" if version_tested() else
           f"numbabn's use of its private names was tested on {tested} only")
    msg = (f"numbabn: numba.cuda comes from {name} {shown}; {why}: numbabn takes the "
           f"public path for {group!r} (same results, more host time per call).")
    if SIMULATOR:
        logger.info(msg)
    else:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def reset():
    """Forget the decisions (tests: after changing what :func:`version_tested` sees)."""
    _decided.clear()
    _reported.clear()


# --------------------------------------------------------------------------- #
# "launch": a kernel's compiled overload, launched directly
# --------------------------------------------------------------------------- #
def launch_config(dispatcher, grid, block):
    """numba's launch configuration for ``dispatcher[grid, block]`` (callable
    with the arguments: numba's usual path)."""
    return dispatcher.configure(grid, block)


def has_callbacks(config) -> bool:
    """Whether the configuration has pre-launch callbacks (then numba's path)."""
    return bool(getattr(config, "pre_launch_callbacks", None))


def compiled_overload(dispatcher, args):
    """The compiled overload numba has for these arguments' types, where it can
    be launched directly; else None."""
    argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
    overload = getattr(dispatcher, "overloads", {}).get(argtypes)
    if (overload is None or not callable(getattr(overload, "launch", None))
            or getattr(overload, "launch_config_sensitive", False)):
        return None
    return overload


def launch_compiled(overload, config, args):
    """Launch ``overload`` as ``config`` would, on its stream."""
    overload.launch(args, config.griddim, config.blockdim, config.stream, config.sharedmem)


# --------------------------------------------------------------------------- #
# "views": device arrays over another array's memory
# --------------------------------------------------------------------------- #
class _Holder:
    """The owner of a sub-range of device memory: holds the memory object it was
    cut from, so that memory stays allocated while the sub-range is in use."""

    __slots__ = ("memory",)

    def __init__(self, memory):
        self.memory = memory


def sub_memory(memory, offset, size):
    """A numba memory pointer to ``size`` bytes of ``memory`` from ``offset`` on.

    Made like numba's pointers to foreign (CUDA-array-interface) memory: a plain
    pointer whose owner keeps the parent alive.  Cheaper than ``memory.view``,
    which registers a reference-counting finalizer per view.
    """
    from numba.cuda.cudadrv.driver import MemoryPointer

    pointer = ctypes.c_void_p(memory.device_pointer_value + offset)
    return MemoryPointer(memory.context, pointer, size, owner=_Holder(memory))


def device_view(a, shape, strides, offset=0, dtype=None):
    """A ``DeviceNDArray`` (of ``a``'s dtype, or ``dtype``) over ``a``'s device
    memory from byte ``offset`` on (GPU only).  It holds ``a``'s memory object,
    and with it whatever keeps that memory alive."""
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    gpu_data = a.gpu_data
    if offset:
        gpu_data = sub_memory(gpu_data, offset, gpu_data.size - offset)
    return DeviceNDArray(tuple(shape), tuple(strides), a.dtype if dtype is None else dtype,
                         stream=a.stream, gpu_data=gpu_data)


def cut(flat, offset, shape, dtype):
    """A C-contiguous view of ``shape`` and ``dtype`` over the 1-D device array
    ``flat`` (a GPU's or the simulator's) from byte ``offset`` on."""
    import numpy as np

    from .._layout import contiguous_strides

    dtype = np.dtype(dtype)
    if SIMULATOR:
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        base = sim_ndarray(flat).view(np.uint8)
        return sim_array(base[offset:offset + nbytes].view(dtype).reshape(shape))
    return device_view(flat, shape, contiguous_strides(tuple(shape), dtype.itemsize), offset,
                       dtype)


# --------------------------------------------------------------------------- #
# The simulator's device arrays (presence-checked; no public alternative)
# --------------------------------------------------------------------------- #
def _sim_class():
    try:
        from numba.cuda.cudadrv.devicearray import FakeCUDAArray  # the simulator's
    except ImportError:
        return None
    return FakeCUDAArray


def sim_array(ndarray):
    """A simulated device array over the NumPy array ``ndarray`` (no copy)."""
    cls = _sim_class()
    if cls is None:
        raise RuntimeError("this numba.cuda simulator has no FakeCUDAArray; numbabn cannot "
                           "wrap memory described by an array interface under it")
    return cls(ndarray)


def sim_ndarray(a):
    """The NumPy array a simulated device array wraps."""
    ndarray = getattr(a, "_ary", None)
    if ndarray is None:
        raise RuntimeError("this numba.cuda simulator's device arrays have no _ary")
    return ndarray


_device_array_classes = []  # [the class], once known


def is_device_ndarray(a) -> bool:
    """Whether ``a`` is a numba device array (a ``DeviceNDArray``, the
    documented class, or the simulator's ``FakeCUDAArray``), not another
    CUDA-array-interface object."""
    if not _device_array_classes:
        if SIMULATOR:
            cls = _sim_class()
        else:
            from numba.cuda.cudadrv.devicearray import DeviceNDArray as cls
        _device_array_classes.append(cls)
    cls = _device_array_classes[0]
    return cls is not None and isinstance(a, cls)


# --------------------------------------------------------------------------- #
# Tests: compiling to PTX without a GPU
# --------------------------------------------------------------------------- #
def nvvm_available() -> bool:
    """Whether the CUDA toolkit's NVVM can be loaded."""
    from numba.cuda.cudadrv import nvvm

    return bool(nvvm.is_available())


def assume_compute_capability(cc):
    """Make numba's dispatcher see a device of compute capability ``cc`` (device
    functions ask the current device for it while compiling): for PTX compiles
    in a process without a GPU."""
    import types

    import numba.cuda.dispatcher

    numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(
        compute_capability=tuple(cc))
