"""Which backend runs a call: NumPy arrays go to the CPU kernels, device arrays
(numba.cuda arrays, or anything with ``__cuda_array_interface__``: CuPy arrays,
PyTorch CUDA tensors) to the GPU kernels.

:mod:`numbabn._gpu`, and with it ``numba.cuda``, is imported only when a device
array is first seen, so a CPU-only install never touches the CUDA driver.
"""

from __future__ import annotations

import contextlib
from collections import namedtuple

import numpy as np

from ._cpu import feature_ops as _cpu_feature_ops
from ._cpu import half as _cpu_half
from ._cpu import layout as _cpu_layout
from ._cpu import row_ops as _cpu_row_ops
from ._cpu.runtime import kernel_guard

Backend = namedtuple("Backend", "name feature_ops row_ops layout guard half")
"""One backend's twin modules: ``feature_ops``, batch norm's per-feature
operations (:mod:`numbabn._cpu.feature_ops`); ``row_ops``, the family's per-row
operations (:mod:`numbabn._cpu.row_ops`); ``layout``, the views of that
backend's arrays (:mod:`numbabn._cpu.layout`); ``guard(x)``, a context manager
held around kernel launches on input ``x`` (:func:`numbabn._cpu.runtime.kernel_guard`);
``half``, float16/bfloat16 to and from float32 (:mod:`numbabn._cpu.half`)."""

CPU = Backend("cpu", _cpu_feature_ops, _cpu_row_ops, _cpu_layout, kernel_guard, _cpu_half)
_GPU = []


def is_device_array(a) -> bool:
    """A numba device array (or the simulator's) or a CUDA-array-interface object.

    A PyTorch CUDA tensor that requires grad raises its own RuntimeError here
    (detach it first); CPU tensors and NumPy arrays are host arrays.
    """
    cls = type(a)
    if cls is np.ndarray:  # the common case, answered without two attribute look-ups
        return False
    return bool(getattr(cls, "__cuda_ndarray__", False)) or hasattr(
        a, "__cuda_array_interface__")


def gpu() -> Backend:
    if not _GPU:
        from ._gpu import feature_ops, half, layout, row_ops

        _GPU.append(Backend("gpu", feature_ops, row_ops, layout, contextlib.nullcontext, half))
    return _GPU[0]


def select(arrays: dict):
    """Choose the backend from where the first array lives; return it and the
    arrays in order, device arrays as numba device arrays (views, no copies).

    Every other array that is not None must live in the same place: a mix of
    host and device arrays raises ``TypeError`` naming the offending argument.
    """
    names = list(arrays)
    first = names[0]
    if not is_device_array(arrays[first]):
        for name in names[1:]:
            if arrays[name] is not None and is_device_array(arrays[name]):
                raise TypeError(
                    f"{name} is a GPU array ({type(arrays[name]).__name__}) but {first} is "
                    f"a host array ({type(arrays[first]).__name__}); pass all arrays on the "
                    f"same device, e.g. {name}.copy_to_host() or numba.cuda.to_device({first})."
                )
        return CPU, list(arrays.values())
    backend = gpu()
    converted = []
    for name in names:
        a = arrays[name]
        if a is not None and not is_device_array(a):
            raise TypeError(
                f"{name} is a host array ({type(a).__name__}) but {first} is a GPU array "
                f"({type(arrays[first]).__name__}); pass all arrays on the same device, "
                f"e.g. numba.cuda.to_device({name})."
            )
        converted.append(None if a is None else backend.layout.as_device_array(a))
    return backend, converted
