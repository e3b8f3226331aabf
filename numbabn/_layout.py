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

from dataclasses import dataclass
from functools import lru_cache
from math import prod

import numpy as np


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
    y3 = np.empty(layout.shape3, dtype=dtype)
    return y3, from_3d(y3, layout)


def from_3d(y3: np.ndarray, layout: Layout) -> np.ndarray:
    """Inverse of :func:`as_3d` for an array allocated in the collapsed order."""
    permuted_shape, inverse = _unpermute(layout.shape, layout.perm)
    if layout.perm == _identity(len(layout.perm)):
        return y3.reshape(permuted_shape)
    return y3.reshape(permuted_shape).transpose(inverse)


@lru_cache(maxsize=1024)
def _unpermute(shape, perm):
    return tuple(shape[a] for a in perm), tuple(sorted(range(len(perm)), key=perm.__getitem__))


@lru_cache(maxsize=64)
def _identity(ndim):
    return tuple(range(ndim))
