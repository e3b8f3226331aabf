"""View any array as ``(outer, C, inner)`` around its feature axis, without copying.

Batch norm reduces over every axis except the feature axis, and the order in
which those axes are visited does not change the result.  So the non-feature axes
are sorted by stride: those with a larger stride than the feature axis become
``outer``, the others ``inner``.  A C-contiguous NCHW array becomes
``(N, C, H*W)``, an NHWC array (or a transposed view of NCHW data) becomes
``(N*H*W, C, 1)``, a Fortran-ordered ``(N, C)`` becomes ``(1, C, N)``; all are
views.  Only arrays whose strides cannot be merged (stepped slices, say) are
copied, once, into the same axis order.

``inner == 1`` selects the channel-contiguous kernel family, ``inner > 1`` the
NCHW-like family.
"""

from __future__ import annotations

import mmap
import sys
import threading
from dataclasses import dataclass
from functools import cached_property, lru_cache
from math import prod

import numpy as np

from . import _config as cfg


@dataclass(frozen=True)
class Layout:
    """How an N-d array maps onto ``(outer, C, inner)``.

    ``perm`` orders the original axes as outer axes, the feature axis, inner
    axes; ``shape3`` is the collapsed shape.
    """

    shape: tuple
    axis: int
    perm: tuple
    shape3: tuple

    @property
    def channels_last(self) -> bool:
        return self.shape3[2] == 1

    @property
    def count(self) -> int:
        """Number of values per feature (the reduction size)."""
        return self.shape3[0] * self.shape3[2]


def plan_layout(x: np.ndarray, axis: int) -> Layout:
    """Choose the axis order that lets ``x`` be viewed as ``(outer, C, inner)``."""
    return _plan_layout(x.shape, x.strides, axis)


@lru_cache(maxsize=1024)
def _plan_layout(shape, strides, axis):
    # Memoised: a training loop sees the same few shapes and strides every step.
    strides = tuple(abs(s) for s in strides)
    feature_stride = strides[axis]
    others = [a for a in range(len(shape)) if a != axis]
    # Size-1 axes have meaningless strides; keep them in front (outer).
    ones = [a for a in others if shape[a] == 1]
    rest = sorted((a for a in others if shape[a] != 1), key=lambda a: -strides[a])
    outer = ones + [a for a in rest if strides[a] > feature_stride]
    inner = [a for a in rest if strides[a] <= feature_stride]
    perm = tuple(outer + [axis] + inner)
    n_outer = prod(shape[a] for a in outer)
    n_inner = prod(shape[a] for a in inner)
    return Layout(shape, axis, perm, (n_outer, shape[axis], n_inner))


# --------------------------------------------------------------------------- #
# Fresh outputs.  The kernels write every value of an output, so a fresh one is
# page-faulted in by its first write: the kernel zeroes each new page, 51 MB of
# them cost as much as the kernel's own work.  Below glibc's largest mmap
# threshold (32 MiB on 64-bit) malloc reuses freed memory, which faults nothing
# in a loop; larger outputs get a fresh mapping every time.  So outputs of at
# least ``_config.LARGE_OUTPUT_BYTES`` are mapped here instead:
#
# * aligned to 2 MiB and advised for transparent huge pages whole (NumPy
#   advises from the page after malloc's header, which leaves the first 2 MiB
#   and the tail on 4 KiB pages: 281-792 faults for 51 MB instead of 25);
# * kept for reuse, at most ``_config.POOL_BUFFERS`` of them and
#   ``_config.POOL_BYTES`` in all: a
#   mapping is handed out again only when nothing but the pool refers to it
#   (every array or buffer over its memory holds a reference to its base
#   array, which sys.getrefcount sees; counted under a lock, and never on a
#   free-threaded build, whose counts are not exact), so a reused output has
#   no page to fault in.  Outputs are written whole before they are returned,
#   so where the memory comes from changes no result.
# --------------------------------------------------------------------------- #
HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
_MAP_PRIVATE = getattr(mmap, "MAP_PRIVATE", None)
_pool = []  # base arrays (uint8, over a whole mapping) of outputs handed out, oldest first
_pool_lock = threading.Lock()


def _refs(seq, i):
    """``sys.getrefcount`` of ``seq[i]``, counted the same way for every caller."""
    return sys.getrefcount(seq[i])


_ONLY_LISTED = _refs([object()], 0)  # the count of an object that only a list holds
_POOLING = getattr(sys, "_is_gil_enabled", lambda: True)()


def empty(shape: tuple, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` (C order); large arrays on whole huge pages,
    from the pool when a mapping of that size is free."""
    dtype = np.dtype(dtype)
    count = prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < cfg.LARGE_OUTPUT_BYTES or _MADV_HUGEPAGE is None or _MAP_PRIVATE is None:
        return np.empty(shape, dtype)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    with _pool_lock:
        for i in range(len(_pool)):
            if _pool[i].nbytes == size + HUGE_PAGE and _refs(_pool, i) == _ONLY_LISTED:
                return _output(_pool[i], count, dtype, shape)
        try:
            buf = mmap.mmap(-1, size + HUGE_PAGE, flags=_MAP_PRIVATE)
            buf.madvise(_MADV_HUGEPAGE)
        except (OSError, ValueError):
            return np.empty(shape, dtype)
        base = np.frombuffer(buf, np.uint8)
        y = _output(base, count, dtype, shape)
        if _POOLING and size <= cfg.POOL_BYTES:
            _pool.append(base)
            _trim_pool()
        return y


def _output(base, count, dtype, shape):
    """The first 2 MiB-aligned ``count`` values of ``base`` (its views' base)."""
    start = -base.__array_interface__["data"][0] % HUGE_PAGE
    return base[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def _trim_pool():
    """Drop mappings beyond ``_config.POOL_BUFFERS`` / ``POOL_BYTES``, free ones first, then the
    oldest (an output in use stays valid: it is unmapped with its last view)."""
    while (len(_pool) > cfg.POOL_BUFFERS
           or sum(b.nbytes for b in _pool) > cfg.POOL_BYTES + len(_pool) * HUGE_PAGE):
        free = [i for i in range(len(_pool)) if _refs(_pool, i) == _ONLY_LISTED]
        del _pool[free[0] if free else 0]


class HostPlan:
    """What the public API needs of a NumPy input on every call, for one
    ``(shape, strides, axis)``: its :class:`Layout`, how to view any array of
    that shape and those strides as ``(outer, C, inner)`` without a copy, and
    how to allocate an output like it.  Built once by :func:`host_plan` and
    cached by :mod:`numbabn.functional` (only for inputs viewable without a
    copy: the others take the general path).
    """

    __slots__ = ("layout", "shape3", "count", "vector_shape", "direct", "perm", "pshape",
                 "inverse")

    def __init__(self, layout: Layout, direct: bool):
        self.layout = layout
        self.shape3 = layout.shape3
        self.count = layout.count
        self.vector_shape = (layout.shape3[1],)
        self.direct = direct  # x.reshape(shape3) is the view (see as_3d)
        self.perm = layout.perm
        self.pshape, inverse = _unpermute(layout.shape, layout.perm)
        self.inverse = None if layout.perm == _identity(len(layout.perm)) else inverse

    def view(self, a: np.ndarray) -> np.ndarray:
        """:func:`as_3d` of an array with the plan's shape and strides."""
        if self.direct:
            return a.reshape(self.shape3)
        return a.transpose(self.perm).reshape(self.shape3)

    def empty(self, dtype):
        """:func:`empty_like_3d`: ``(y3, y)``."""
        y3 = empty(self.shape3, dtype)
        y = y3.reshape(self.pshape)
        return y3, (y if self.inverse is None else y.transpose(self.inverse))


def host_plan(x: np.ndarray, layout: Layout):
    """The :class:`HostPlan` of ``x`` (planned as ``layout``), or None when ``x``
    cannot be viewed as 3-D without a copy."""
    if layout.perm == _identity(x.ndim) and x.flags.c_contiguous:
        return HostPlan(layout, True)
    try:
        np.reshape(x.transpose(layout.perm), layout.shape3, copy=False)
    except ValueError:
        return None
    return HostPlan(layout, False)


def as_3d(x: np.ndarray, layout: Layout, copy_ok: bool = True):
    """Return ``x`` as an ``(outer, C, inner)`` array, a view whenever possible.

    With ``copy_ok=False`` returns ``None`` instead of copying.
    """
    if layout.perm == _identity(x.ndim) and x.flags.c_contiguous:
        return x.reshape(layout.shape3)
    xp = x.transpose(layout.perm)
    try:
        return np.reshape(xp, layout.shape3, copy=False)
    except ValueError:
        if not copy_ok:
            return None
        return np.ascontiguousarray(xp).reshape(layout.shape3)


def empty_like_3d(layout: Layout, dtype):
    """Allocate an output in the collapsed order; return ``(y3, y)``.

    ``y`` is the same memory seen with the caller's shape, so its strides follow
    the input's memory order (like ``np.empty_like(x, order='K')``).
    """
    y3 = empty(layout.shape3, dtype)
    return y3, from_3d(y3, layout)


def from_3d(y3: np.ndarray, layout: Layout) -> np.ndarray:
    """Inverse of :func:`as_3d` for an array allocated in the collapsed order."""
    permuted_shape, inverse = _unpermute(layout.shape, layout.perm)
    if layout.perm == _identity(len(layout.perm)):
        return y3.reshape(permuted_shape)
    return y3.reshape(permuted_shape).transpose(inverse)


def output_3d(arrays, x, layout, out=None, inputs=None):
    """Return ``(y3, y, finish)`` for an operation on ``x`` that writes an array
    like ``x``: where kernels write (``(outer, C, inner)``), what to return, and
    a callback that copies into ``out`` when ``out`` could not be written
    directly, else None.

    ``out`` (already checked: shape and dtype of ``x``, writeable) is written
    directly when it is viewable as 3-D without a copy and overlaps none of
    ``inputs`` (default ``(x,)``) other than by being that very array (``out=x``,
    ``out=dy``: each value is read before it is written).  Otherwise the kernels
    write a temporary and ``finish`` copies it into ``out``, as if every input
    were read first.

    ``arrays`` is the backend's layout module: this one for NumPy arrays,
    :mod:`numbabn._gpu.layout` for device arrays.  It provides ``as_3d``,
    ``empty_like_3d``, ``partial_overlap(a, b)`` and ``copy_into(dst, src)``.
    """
    if out is None:
        y3, y = arrays.empty_like_3d(layout, x.dtype)
        return y3, y, None
    inputs = (x,) if inputs is None else inputs
    out3 = arrays.as_3d(out, layout, copy_ok=False)
    if out3 is not None and not any(arrays.partial_overlap(out, a) for a in inputs):
        return out3, out, None
    y3, y = arrays.empty_like_3d(layout, x.dtype)
    return y3, out, lambda: arrays.copy_into(out, y)


def partial_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two NumPy arrays share bytes without being the same view (see
    :func:`output_3d`).  ``np.may_share_memory`` is a bounds check, as
    :func:`interfaces_overlap` is for device arrays; the array interface is only
    read when the bounds meet (``out=x``, say)."""
    if a is b or not np.may_share_memory(a, b):
        return False
    return interfaces_overlap(a.__array_interface__, b.__array_interface__)


def copy_into(dst: np.ndarray, src: np.ndarray):
    """``dst[...] = src`` (see :func:`output_3d`)."""
    np.copyto(dst, src)


def extent(desc):
    """``(lo, hi, view)`` of an array interface (NumPy's or CUDA's): the byte range
    ``[lo, hi)`` its elements span (empty for an empty array), and
    ``(pointer, shape, strides)``, equal for two descriptions of the same view."""
    shape = tuple(int(n) for n in desc["shape"])
    itemsize = np.dtype(desc["typestr"]).itemsize
    strides = desc.get("strides")
    strides = contiguous_strides(shape, itemsize) if strides is None else tuple(
        int(s) for s in strides)
    lo = hi = desc["data"][0]
    if 0 not in shape:
        for n, s in zip(shape, strides):
            lo += min(0, (n - 1) * s)
            hi += max(0, (n - 1) * s)
        hi += itemsize
    return lo, hi, (desc["data"][0], shape, strides)


def interfaces_overlap(desc_a, desc_b):
    """True when the arrays two array interfaces (NumPy's or CUDA's) describe
    share bytes without being the same view (same first element, shape and
    strides)."""
    lo_a, hi_a, view_a = extent(desc_a)
    lo_b, hi_b, view_b = extent(desc_b)
    if hi_a <= lo_b or hi_b <= lo_a:
        return False
    return view_a != view_b


@lru_cache(maxsize=1024)
def contiguous_strides(shape, itemsize):
    """Byte strides of a C-contiguous array."""
    strides = []
    step = itemsize
    for n in reversed(tuple(shape)):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


@lru_cache(maxsize=1024)
def _unpermute(shape, perm):
    return tuple(shape[a] for a in perm), tuple(sorted(range(len(perm)), key=perm.__getitem__))


@lru_cache(maxsize=64)
def _identity(ndim):
    return tuple(range(ndim))


# --------------------------------------------------------------------------- #
# Per-row layouts: layer, group, instance and RMS norm reduce each *row* (the
# kept axes' index) over the trailing axes.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class RowLayout:
    """How an N-d array maps onto the per-row view ``(N, M, G, K)``.

    The first ``nkept`` axes are kept (they index rows), the others reduced.
    Axes sorted by decreasing stride form at most four runs that alternate
    kept, reduced, kept, reduced: ``blocks`` lists them (an empty block has
    size 1); the last reduced run is K, the innermost.  Row ``n * G + g``
    holds the values ``x4[n, :, g, :]``, so a C-contiguous array is
    ``(1, 1, rows, reduced)``, a transposed 2-D one ``(1, reduced, rows, 1)``
    and a channels-last group norm input ``(N, G, C/G, H, W)`` is
    ``(N, H*W, G, C/G)``.  ``perm`` is
    size-1 axes first, then the blocks in order; rows are numbered in the
    memory order of the kept axes (see :func:`rows_to_kept`).
    """

    shape: tuple
    nkept: int
    perm: tuple
    blocks: tuple
    shape4: tuple

    @property
    def rows(self) -> int:
        return self.shape4[0] * self.shape4[2]

    @property
    def reduced(self) -> int:
        """Values per row."""
        return self.shape4[1] * self.shape4[3]

    @cached_property
    def kept_perm(self) -> tuple:
        """The kept axes in row-numbering order."""
        return tuple(a for a in self.perm if a < self.nkept)

    @cached_property
    def reduced_perm(self) -> tuple:
        """The reduced axes in the order of a row's flat index ``m * K + k``."""
        return tuple(a for a in self.perm if a >= self.nkept)

    @cached_property
    def kept_view(self) -> tuple:
        """``(sizes, inverse)``: the kept axes' sizes in row-numbering order, and
        the transpose that puts them back in axis order (:func:`rows_to_kept`)."""
        return _unpermute(self.shape, self.kept_perm)

    @cached_property
    def kept_in_order(self) -> bool:
        """Whether rows are numbered in the kept axes' own order (then
        :func:`rows_to_kept` is a reshape)."""
        return self.kept_view[1] == _identity(len(self.kept_view[1]))

    @cached_property
    def unpermuted(self) -> tuple:
        """:func:`_unpermute` of the shape by ``perm`` (:func:`empty_like_4d`)."""
        return _unpermute(self.shape, self.perm)


def plan_rows(shape, strides, nkept: int) -> RowLayout:
    """Choose the ``(N, M, G, K)`` view of an array of this ``shape`` and these
    ``strides`` whose rows are the first ``nkept`` axes: from the strides when
    they allow one, else the logical order (which :func:`as_4d` then copies
    into)."""
    return _plan_rows(tuple(shape), tuple(strides), nkept)


def plan_rows_logical(shape, nkept: int) -> RowLayout:
    """The ``(1, 1, rows, reduced)`` plan of a C-contiguous array of ``shape``."""
    return _plan_rows(tuple(shape), None, nkept)


@lru_cache(maxsize=1024)
def _plan_rows(shape, strides, nkept):
    ndim = len(shape)
    ones = [a for a in range(ndim) if shape[a] == 1]
    rest = [a for a in range(ndim) if shape[a] != 1]
    runs = []
    if strides is not None:
        # Stable sort: equal strides (zero, broadcast) keep their logical order.
        for a in sorted(rest, key=lambda a: -abs(strides[a])):
            reduced = a >= nkept
            if runs and runs[-1][0] == reduced:
                runs[-1][1].append(a)
            else:
                runs.append((reduced, [a]))
        if len(runs) > (4 if not runs or runs[-1][0] else 3):
            runs = None
    if strides is None or runs is None:
        runs = [(False, [a for a in rest if a < nkept]), (True, [a for a in rest if a >= nkept])]
        runs = [(r, axes) for r, axes in runs if axes]
    # The runs end in K (the last reduced run, innermost) or in G (a kept run).
    last = 3 if not runs or runs[-1][0] else 2
    blocks = [(), (), (), ()]
    for i, (_, axes) in enumerate(runs):
        blocks[last - len(runs) + 1 + i] = tuple(axes)
    perm = tuple(ones) + sum(blocks, ())
    shape4 = tuple(prod(shape[a] for a in b) for b in blocks)
    return RowLayout(shape, nkept, perm, tuple(blocks), shape4)


def as_4d(x: np.ndarray, layout: RowLayout, copy_ok: bool = True):
    """``x`` as its ``(N, M, G, K)`` view, copied into ``layout.perm`` order
    when the strides do not merge (``None`` then, with ``copy_ok=False``)."""
    if layout.perm == _identity(x.ndim) and x.flags.c_contiguous:
        return x.reshape(layout.shape4)
    xp = x.transpose(layout.perm)
    try:
        return np.reshape(xp, layout.shape4, copy=False)
    except ValueError:
        if not copy_ok:
            return None
        return np.ascontiguousarray(xp).reshape(layout.shape4)


def empty_like_4d(layout: RowLayout, dtype):
    """Allocate an output in ``layout.perm`` order; return ``(y4, y)`` with ``y``
    the same memory in the caller's axis order."""
    permuted_shape, inverse = layout.unpermuted
    y4 = empty(layout.shape4, dtype)
    return y4, y4.reshape(permuted_shape).transpose(inverse)


def rows_to_kept(v, layout: RowLayout):
    """A per-row vector (row order) as an array of the kept axes' shape."""
    sizes, inverse = layout.kept_view
    if layout.kept_in_order:
        return v.reshape(sizes)
    return v.reshape(sizes).transpose(inverse)


def kept_to_rows(v, layout: RowLayout):
    """Inverse of :func:`rows_to_kept`: an array of the kept axes' shape as a
    1-D vector in row order (a view when possible)."""
    return v.transpose(layout.kept_perm).reshape(-1)
