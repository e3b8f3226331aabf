"""CPU host drivers: choose the kernel family and path, allocate, call one kernel.

Every function takes arrays already validated and viewed as ``(outer, C, inner)``
by :mod:`numbabn.functional`; outputs of the input's shape are written into the
``y3``/``dx3`` arrays given.  Per-feature results come back in the input's dtype.
The GPU backend (``numbabn._gpu.ops``) has the same functions and signatures.

Each operation is a single kernel call (see :mod:`numbabn._cpu.kernels` for the
fused and two-phase paths); this module only plans the chunk grid, which
depends on the shape alone, and allocates.
"""

from functools import lru_cache

import numpy as np
from numba import get_num_threads

from .._config import CHUNK_ELEMS, FUSE_BYTES, FUSE_MIN_TASKS, NC_COLS, NC_STREAM_MIN_BYTES
from . import kernels as k


class _Plan:
    """The fixed chunk grid and path for one ``(outer, C, inner)`` shape.

    NCHW-like (``inner > 1``): a chunk is ``rows`` x ``cols`` of one feature's
    ``(outer, inner)`` plane, and ``fused`` says whether one task per feature
    may read its inputs (``nread`` arrays of this shape) and keep them in cache
    for the output pass.  Channel-contiguous (``inner == 1``): a chunk is
    ``rows`` rows of a block of ``cols`` columns; never fused; ``by_row`` says
    whether the backward sums take one row at a time (``NC_STREAM_MIN_BYTES``).
    """

    __slots__ = ("channels_last", "rows", "cols", "nchunks", "fused", "by_row")

    def __init__(self, shape3, itemsize, nread):
        outer, nfeat, inner = shape3
        self.channels_last = inner == 1
        if self.channels_last:
            self.cols = min(nfeat, NC_COLS)
            self.rows = max(1, CHUNK_ELEMS // self.cols)
            self.nchunks = -(-outer // self.rows)  # row blocks
            self.fused = False
            self.by_row = self.cols == nfeat and nread * outer * nfeat * itemsize > NC_STREAM_MIN_BYTES
        else:
            self.cols = min(inner, CHUNK_ELEMS)
            self.rows = max(1, CHUNK_ELEMS // self.cols)
            self.nchunks = -(-outer // self.rows) * -(-inner // self.cols)
            task_bytes = nread * outer * inner * itemsize
            self.fused = nfeat >= FUSE_MIN_TASKS and task_bytes <= FUSE_BYTES
            self.by_row = False


@lru_cache(maxsize=256)
def _plan(shape3, itemsize, nread):
    return _Plan(shape3, itemsize, nread)


def _as2d(a3):
    return a3.reshape(a3.shape[0], a3.shape[1])


def _param(v, nfeat, dtype, fill):
    return _constant(nfeat, dtype, fill) if v is None else v


@lru_cache(maxsize=64)
def _constant(nfeat, dtype, fill):
    # Stands in for a missing weight or bias; kernels only read it.
    return np.full(nfeat, fill, dtype)


# Scratch arguments the fused paths never touch.
_NO_PARTIALS = np.empty((1, 1))
_NO_PARTIALS3 = np.empty((1, 1, 1))



@lru_cache(maxsize=8)
def _no_output(dtype, ndim):
    return np.empty((1,) * ndim, dtype)


def _affine_setup(x3, weight, bias):
    """What the forward and normalize kernels share: the plan, weight and bias
    (1 and 0 when missing) and scratch for the per-feature coefficients."""
    nfeat, dtype = x3.shape[1], x3.dtype
    plan = _plan(x3.shape, dtype.itemsize, 1)
    return (plan, _param(weight, nfeat, dtype, 1), _param(bias, nfeat, dtype, 0),
            np.empty((3, nfeat), dtype))


def _forward(x3, weight, bias, eps, y3):
    """Run the forward kernel; ``y3=None`` computes the statistics only.
    Returns ``stats``: rows mean, invstd, var in float64."""
    nfeat = x3.shape[1]
    dtype = x3.dtype
    plan, weight, bias, coef = _affine_setup(x3, weight, bias)
    stats = np.empty((3, nfeat))
    write_y = y3 is not None
    if plan.channels_last:
        shape = (plan.nchunks, nfeat)
        p1, p2 = np.empty(shape), np.empty(shape)
        y2 = _as2d(y3) if write_y else _no_output(dtype, 2)
        k.forward_nc(_as2d(x3), weight, bias, eps, plan.rows, plan.cols, write_y,
                     get_num_threads(), p1, p2, coef, stats, y2)
    else:
        shape = (nfeat, plan.nchunks)
        p1, p2 = (_NO_PARTIALS,) * 2 if plan.fused else (np.empty(shape), np.empty(shape))
        y3 = y3 if write_y else _no_output(dtype, 3)
        k.forward_nchw(x3, weight, bias, eps, plan.rows, plan.cols, plan.fused, write_y,
                       get_num_threads(), p1, p2, coef, stats, y3)
    return stats


def _cast(dtype, *vectors):
    """Cast float64 results to the output dtype; a variance beyond float32's range
    (data near 1e30) becomes inf, which is its correct float32 value."""
    with np.errstate(over="ignore"):
        return tuple(v.astype(dtype) for v in vectors)


def batch_stats(x3):
    stats = _forward(x3, None, None, 1.0, None)
    return _cast(x3.dtype, stats[0], stats[2])


def normalize(x3, mean, var, weight, bias, eps, y3):
    plan, weight, bias, coef = _affine_setup(x3, weight, bias)
    if plan.channels_last:
        k.normalize_nc(_as2d(x3), mean, var, weight, bias, eps, plan.rows, coef, _as2d(y3))
    else:
        runs = max(1, CHUNK_ELEMS // x3.shape[2])
        k.normalize_nchw(x3, mean, var, weight, bias, eps, runs, coef, y3)


def batch_norm_train(x3, weight, bias, eps, y3):
    """Normalise with batch statistics; return ``(mean, invstd)`` in x's dtype and
    the biased ``var`` in float64: it only feeds the running-stat update, where
    momentum may bring a variance beyond float32's range back into it."""
    stats = _forward(x3, weight, bias, eps, y3)
    return (*_cast(x3.dtype, stats[0], stats[1]), stats[2])


def batch_norm_backward(dy3, x3, mean, invstd, weight, dx3):
    """Write dx into ``dx3``; return ``(dweight, dbias)`` (None without weight).

    The saved ``mean`` may have been rounded to float32; the kernel also sums
    ``x - mean`` to recover the exact batch mean (see ``kernels._backward_coefs``).
    """
    nfeat = x3.shape[1]
    dtype = x3.dtype
    plan = _plan(x3.shape, dtype.itemsize, 2)
    w = _param(weight, nfeat, dtype, 1)
    coef = np.empty((4, nfeat), dtype)
    dwb = np.empty((2, nfeat), dtype)
    if plan.channels_last:
        p = np.empty((3, plan.nchunks, nfeat))
        k.backward_nc(_as2d(dy3), _as2d(x3), mean, invstd, w, plan.rows, plan.cols, plan.by_row,
                      get_num_threads(), p, coef, dwb, _as2d(dx3))
    else:
        p = _NO_PARTIALS3 if plan.fused else np.empty((3, nfeat, plan.nchunks))
        k.backward_nchw(dy3, x3, mean, invstd, w, plan.rows, plan.cols, plan.fused,
                        get_num_threads(), p, coef, dwb, dx3)
    if weight is None:
        return None, None
    return dwb[0], dwb[1]


def _f64(v):
    return np.asarray(v, dtype=np.float64)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    unbiased = _f64(var) * (count / (count - 1))
    keep = 1.0 - momentum
    with np.errstate(over="ignore"):  # beyond float32's range, inf is the right value
        running_mean[...] = keep * _f64(running_mean) + momentum * _f64(mean)
        running_var[...] = keep * _f64(running_var) + momentum * unbiased
