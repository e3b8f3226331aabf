"""Device-array twin of :mod:`numbabn._layout`: ``(outer, C, inner)`` views of
numba device arrays, without host copies.

numba's ``DeviceNDArray`` cannot transpose beyond 2-D, so views are made by
hand: a new array over the same memory with permuted and merged strides
(:func:`strided_view`: on a GPU :func:`numbabn._numba_private.cuda.device_view`,
which shares the parent's device memory object and costs no CUDA driver call,
or, where numba-cuda's private names are not used, an array made by the public
``cuda.from_cuda_array_interface`` from the interface of the view).  When the
strides cannot be merged (stepped slices, say) the input is copied once, on the
device, by :func:`numbabn._gpu.feature_kernels.copy_strided`.  Objects that only expose
the CUDA array interface (CuPy arrays, PyTorch tensors) are wrapped once per
call by :func:`as_device_array`.

This module is what :func:`numbabn._layout.output_3d` calls for device arrays
(``as_3d``, ``empty_like_3d``, ``interface``, ``copy_into``).

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) device arrays are NumPy
arrays in host memory, and an interface's pointer is a host pointer; the same
code builds the views through NumPy's array interface (the simulator's own
array class, through :mod:`numbabn._numba_private.cuda`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from .. import _config as cfg
from .._layout import contiguous_strides, extent, interfaces_overlap
from .._numba_private import cuda as _private
from . import feature_kernels as k
from .runtime import Kernel, dim3

SIMULATOR = _private.SIMULATOR


class _Interface:
    """Holds an interface description (and its memory's owner) for NumPy."""

    def __init__(self, desc, owner):
        self.__array_interface__ = desc
        self.owner = owner


def interface(a) -> dict:
    """The CUDA array interface of a device array (shape, strides, typestr, data)."""
    if SIMULATOR and _private.is_device_ndarray(a):
        desc = dict(_private.sim_ndarray(a).__array_interface__)
    else:
        desc = dict(a.__cuda_array_interface__)
    if desc.get("strides") is None:
        itemsize = np.dtype(desc["typestr"]).itemsize
        desc["strides"] = contiguous_strides(tuple(desc["shape"]), itemsize)
    return desc


def partial_overlap(a, b) -> bool:
    """True when two device arrays share bytes without being the same view (see
    :func:`numbabn._layout.output_3d`)."""
    return a is not b and interfaces_overlap(interface(a), interface(b))


def from_interface(desc, owner):
    """A numba device array over the memory an interface describes (no copy)."""
    desc = dict(desc, version=3)
    if SIMULATOR:
        return _private.sim_array(np.asarray(_Interface(desc, owner)))
    return cuda.from_cuda_array_interface(desc, owner=owner, sync=True)


def as_device_array(a):
    """``a`` as a numba device array: itself, or a view of a CUDA-array-interface
    object (CuPy array, PyTorch CUDA tensor) that keeps the object alive."""
    if _private.is_device_ndarray(a):
        return a
    return from_interface(a.__cuda_array_interface__, owner=a)


def strided_view(a, shape, strides):
    """A view of device array ``a`` (same first element) with the given shape
    and byte strides."""
    if not SIMULATOR and _private.fast("views"):
        return _private.device_view(a, shape, strides)
    desc = interface(a)
    desc["shape"] = tuple(int(n) for n in shape)
    desc["strides"] = tuple(int(s) for s in strides)
    return from_interface(desc, owner=a)


def row(a, i):
    """Row ``i`` of a 2-D device array, as a 1-D view."""
    if not SIMULATOR and _private.fast("views"):
        return _private.device_view(a, a.shape[1:], a.strides[1:], offset=i * a.strides[0])
    return a[i]


def _merge(shape, strides):
    """Collapse axes into one ``(size, stride)`` if they form one strided run, else None."""
    axes = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not axes:
        return 1, 0
    for (n0, s0), (n1, s1) in zip(axes, axes[1:]):
        if s0 != s1 * n1:
            return None
    return math.prod(n for n, _ in axes), axes[-1][1]


@lru_cache(maxsize=1024)
def _view_3d(layout, strides):
    """``(shape3, strides3)`` of the ``(outer, C, inner)`` view of an array with
    this layout and these byte strides, or None where the axes do not merge."""
    perm = layout.perm
    shape = [layout.shape[a] for a in perm]
    strides = [strides[a] for a in perm]
    nouter = perm.index(layout.axis)
    outer = _merge(shape[:nouter], strides[:nouter])
    inner = _merge(shape[nouter + 1:], strides[nouter + 1:])
    if outer is None or inner is None:
        return None
    return (outer[0], shape[nouter], inner[0]), (outer[1], strides[nouter], inner[1])


def as_3d(x, layout, copy_ok: bool = True):
    """Return device array ``x`` as ``(outer, C, inner)``, a view whenever possible.

    With ``copy_ok=False`` returns ``None`` instead of copying.
    """
    view = _view_3d(layout, tuple(x.strides))
    if view is not None:
        return strided_view(x, *view)
    if not copy_ok:
        return None
    perm = layout.perm
    shape = [x.shape[a] for a in perm]
    strides = [x.strides[a] for a in perm]
    device_copy = cuda.device_array(tuple(shape), dtype=x.dtype)
    copy_into(device_copy, strided_view(x, shape, strides))
    return device_copy.reshape(layout.shape3)


@lru_cache(maxsize=1024)
def _caller_strides(layout, itemsize):
    """Byte strides, in the caller's axis order, of an array allocated in the
    collapsed (permuted, C-contiguous) order."""
    permuted_shape = tuple(layout.shape[a] for a in layout.perm)
    permuted_strides = contiguous_strides(permuted_shape, itemsize)
    strides = [0] * len(permuted_shape)
    for i, a in enumerate(layout.perm):
        strides[a] = permuted_strides[i]
    return tuple(strides)


def from_3d(y3, layout):
    """Inverse of :func:`as_3d` for an array allocated in the collapsed order."""
    return strided_view(y3, layout.shape, _caller_strides(layout, y3.dtype.itemsize))


def empty_like_3d(layout, dtype):
    """Allocate an output in the collapsed order; return ``(y3, y)`` (see
    :func:`numbabn._layout.empty_like_3d`)."""
    y3 = cuda.device_array(layout.shape3, dtype=dtype)
    return y3, from_3d(y3, layout)


# Where an output goes (out=, overlaps) is decided once for both backends by
# numbabn._layout.output_3d, with this module's as_3d, empty_like_3d, interface
# and copy_into.


def _flat(a):
    """A flat 1-D view spanning ``a``'s memory, the element offset of ``a[0, ...]``
    in it, and ``a``'s element strides."""
    desc = interface(a)
    lo, hi, _ = extent(desc)
    itemsize = np.dtype(desc["typestr"]).itemsize
    flat = from_interface(
        dict(desc, shape=((hi - lo) // itemsize,), strides=(itemsize,), data=(lo, False)),
        owner=a)
    start = (desc["data"][0] - lo) // itemsize
    return flat, start, tuple(int(s) // itemsize for s in desc["strides"])


def copy_into(dst, src):
    """``dst[...] = src`` for device arrays of one shape and dtype, any strides."""
    device_src, src_start, src_strides = _flat(src)
    device_dst, dst_start, dst_strides = _flat(dst)
    shape = tuple(int(n) for n in src.shape)
    threads = cfg.GPU_THREADS
    blocks = max(1, min(-(-int(np.prod(shape)) // threads), cfg.GPU_COPY_MAX_BLOCKS))
    _COPY_STRIDED.launch(dim3(blocks), dim3(threads), device_src, src_start, src_strides,
                         device_dst, dst_start, dst_strides, shape)


_COPY_STRIDED = Kernel(k.copy_strided)


# --------------------------------------------------------------------------- #
# The per-row views, on device arrays (views built from strides)
# --------------------------------------------------------------------------- #
def _is_contiguous(a):
    return tuple(a.strides) == contiguous_strides(tuple(a.shape), a.dtype.itemsize) or a.size <= 1


def _contiguous(a):
    """``a`` itself when C-contiguous, else a C-contiguous device copy."""
    if _is_contiguous(a):
        return a
    out = cuda.device_array(tuple(a.shape), a.dtype)
    copy_into(out, a)
    return out


def _permuted(a, perm):
    return (tuple(a.shape[i] for i in perm), tuple(a.strides[i] for i in perm))


def as_4d(x, layout, copy_ok=True):
    """See :func:`numbabn._layout.as_4d`."""
    shape, strides = _permuted(x, layout.perm)
    merged = [_merge([x.shape[a] for a in b], [x.strides[a] for a in b]) for b in layout.blocks]
    if all(m is not None for m in merged):
        return strided_view(x, layout.shape4, tuple(s for _, s in merged))
    if not copy_ok:
        return None
    out = cuda.device_array(shape, x.dtype)
    copy_into(out, strided_view(x, shape, strides))
    return strided_view(out, layout.shape4, contiguous_strides(layout.shape4, x.dtype.itemsize))


def _caller_view(a, shape, perm):
    """A C-contiguous array ``a`` of the permuted ``shape`` seen in the caller's axis order."""
    permuted_strides = contiguous_strides(tuple(shape[i] for i in perm), a.dtype.itemsize)
    strides = [0] * len(perm)
    for i, axis in enumerate(perm):
        strides[axis] = permuted_strides[i]
    return strided_view(a, tuple(shape), tuple(strides))


def empty_like_4d(layout, dtype):
    """See :func:`numbabn._layout.empty_like_4d`."""
    y4 = cuda.device_array(layout.shape4, dtype)
    return y4, _caller_view(y4, layout.shape, layout.perm)


def rows_to_kept(v, layout):
    """See :func:`numbabn._layout.rows_to_kept` (``v`` is C-contiguous)."""
    kept = layout.kept_perm
    return _caller_view(v, tuple(layout.shape[a] for a in range(layout.nkept)), kept)


def kept_to_rows(v, layout):
    """See :func:`numbabn._layout.kept_to_rows`."""
    rows = math.prod(v.shape)
    shape, strides = _permuted(v, layout.kept_perm)
    ordered = strided_view(v, shape, strides)
    return _contiguous(ordered).reshape(rows) if rows > 1 else strided_view(
        v, (1,), (v.dtype.itemsize,))


def split_axis(x, axis, parts):
    """``x`` with axis ``axis`` split into ``parts`` (a view)."""
    shape = tuple(x.shape[:axis]) + tuple(parts) + tuple(x.shape[axis + 1:])
    inner = x.strides[axis]
    split = []
    for n in reversed(parts):
        split.append(inner)
        inner *= n
    strides = tuple(x.strides[:axis]) + tuple(reversed(split)) + tuple(x.strides[axis + 1:])
    return strided_view(x, shape, strides)


def merge_axes(y, axis, count):
    """``y`` with axes ``axis .. axis + count - 1`` merged (a view when they
    form one strided run, else a C-contiguous copy)."""
    merged = _merge(y.shape[axis:axis + count], y.strides[axis:axis + count])
    if merged is None:
        y = _contiguous(y)
        merged = _merge(y.shape[axis:axis + count], y.strides[axis:axis + count])
    shape = tuple(y.shape[:axis]) + (merged[0],) + tuple(y.shape[axis + count:])
    strides = tuple(y.strides[:axis]) + (merged[1],) + tuple(y.strides[axis + count:])
    return strided_view(y, shape, strides)


def permute_flat(w, perm):
    """``w`` with its axes in ``perm`` order, flattened."""
    shape, strides = _permuted(w, perm)
    return _contiguous(strided_view(w, shape, strides)).reshape(math.prod(shape))


def unpermute_flat(flat, shape, perm):
    """Inverse of :func:`permute_flat` for an array of ``shape`` (a view)."""
    return _caller_view(flat, tuple(shape), perm)


def reshape_ones(v, shape):
    """``v`` with size-1 axes added or removed to make ``shape`` (a view)."""
    if tuple(v.shape) == tuple(shape):
        return v
    strides = iter(s for n, s in zip(v.shape, v.strides) if n != 1)
    new = tuple(v.dtype.itemsize if n == 1 else next(strides) for n in shape)
    return strided_view(v, tuple(shape), new)

