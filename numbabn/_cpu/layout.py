"""The CPU backend's layout surface: NumPy views of any memory layout, the twin
of :mod:`numbabn._gpu.layout` (device arrays).  The per-feature views
(``as_3d``, ``empty_like_3d``, ``from_3d``) and per-row views (``as_4d``,
``empty_like_4d``, ``kept_to_rows``, ``rows_to_kept``) come from
:mod:`numbabn._layout`, which plans them; the axis reshapes the family's
functions need follow."""

from math import prod

from .._layout import (as_3d, as_4d, copy_into, empty_like_3d, empty_like_4d,  # noqa: F401
                       from_3d, kept_to_rows, partial_overlap, rows_to_kept)


def split_axis(x, axis, parts):
    """``x`` with axis ``axis`` split into ``parts`` (a view)."""
    return x.reshape(x.shape[:axis] + tuple(parts) + x.shape[axis + 1:])


def merge_axes(y, axis, count):
    """``y`` with axes ``axis .. axis + count - 1`` merged into one."""
    size = prod(y.shape[axis:axis + count])
    return y.reshape(y.shape[:axis] + (size,) + y.shape[axis + count:])


def permute_flat(w, perm):
    """``w`` with its axes in ``perm`` order, flattened (a view when it can be)."""
    return w.transpose(perm).reshape(-1)


def unpermute_flat(flat, shape, perm):
    """Inverse of :func:`permute_flat` for an array of ``shape``."""
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return flat.reshape(tuple(shape[a] for a in perm)).transpose(inverse)


def reshape_ones(v, shape):
    """``v`` with size-1 axes added or removed to make ``shape`` (a view)."""
    return v.reshape(shape)
