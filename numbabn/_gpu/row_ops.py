"""GPU host drivers of the per-row norms: the twins of :mod:`numbabn._cpu.row_ops`
(same names and signatures), on numba device arrays, launching the kernels of
:mod:`numbabn._gpu.row_kernels`."""

from functools import lru_cache

import numpy as np
from numba import cuda

from .. import _config as cfg
from .. import _core
from .._core import INVSTD, MEAN, NROWSTATS, VAR
from .layout import _contiguous
from .row_kernels import (RowGeometry, backward_partials, dx_pass, grad_partials, merge_backward,
                          merge_grads, merge_moments, moments_partials, normalize, to_dtype)


def _cdiv(a, b):
    return -(-a // b)


@lru_cache(maxsize=256)
def _plan(shape4, gmod, threads, items, chunk_elems):
    N, M, G, K = shape4
    reduced = M * K
    chunk = threads * items
    grad_rows = max(1, chunk_elems // reduced)
    nbpg = _cdiv((N * G) // gmod, grad_rows)
    return RowGeometry(chunk, _cdiv(reduced, chunk), grad_rows, nbpg)


def plan(shape4, aff):
    return _plan(tuple(shape4), aff.gmod, cfg.GPU_THREADS, cfg.GPU_ITEMS_PER_THREAD,
                 cfg.CHUNK_ELEMS)


def _grid(n, threads):
    return max(1, _cdiv(n, threads))


@lru_cache(maxsize=64)
def _constant(n, dtype, fill):
    # Stands in for a missing weight or bias; kernels only read it.
    return cuda.to_device(np.full(n, fill, dtype))


def _cast(v64, dtype):
    out = cuda.device_array(v64.shape[0], dtype)
    threads = cfg.GPU_THREADS
    to_dtype[_grid(v64.shape[0], threads), threads](v64, out)
    return out


def row_norm_train(x4, weight, bias, aff, eps, rms, y4):
    """See :func:`numbabn._cpu.row_ops.row_norm_train`; device arrays in and out."""
    N, M, G, K = x4.shape
    dtype = x4.dtype
    rows, MK = N * G, M * K
    geom = plan(x4.shape, aff)
    threads = cfg.GPU_THREADS
    nparams = aff.gmod * aff.arow
    weight = _constant(nparams, dtype, 1) if weight is None else weight
    bias = _constant(nparams, dtype, 0) if bias is None else bias
    p = cuda.device_array((2, rows, geom.nch))
    coef = cuda.device_array((_core.NCOEFS, rows), dtype)
    stats = cuda.device_array((NROWSTATS, rows))
    moments_partials[rows * geom.nch, threads](x4, geom, p)
    merge_moments[_grid(rows, threads), threads](p, geom, MK, float(eps), bool(rms), coef, stats)
    normalize[rows * geom.nch, threads](x4, weight, bias, aff, coef, stats, geom, y4)
    return _cast(stats[MEAN], dtype), _cast(stats[INVSTD], dtype), stats[VAR]


def row_norm_backward(dy4, x4, mean, rstd, weight, aff, rms, want_grads, dx4):
    """See :func:`numbabn._cpu.row_ops.row_norm_backward`; device arrays in and out."""
    N, M, G, K = x4.shape
    dtype = x4.dtype
    rows, MK = N * G, M * K
    geom = plan(x4.shape, aff)
    threads = cfg.GPU_THREADS
    nparams = aff.gmod * aff.arow
    weight = _constant(nparams, dtype, 1) if weight is None else weight
    hi = _constant(rows, dtype, 0) if mean is None else _as_dtype(mean, dtype)
    rstd = _as_dtype(rstd, np.float64)
    p = cuda.device_array((3, rows, geom.nch))
    coef = cuda.device_array((_core.NCOEFS, rows), dtype)
    bstat = cuda.device_array((2, rows))
    backward_partials[rows * geom.nch, threads](dy4, x4, hi, weight, aff, geom, p)
    merge_backward[_grid(rows, threads), threads](p, geom, MK, hi, rstd, bool(rms), coef, bstat)
    dx_pass[rows * geom.nch, threads](dy4, x4, weight, aff, coef, geom, dx4)
    if not want_grads:
        return None, None
    nblk = aff.gmod * geom.nbpg
    q = cuda.device_array((2, nblk, aff.arow))
    grads = cuda.device_array((2, nparams))
    grad_partials[_grid(nblk * aff.arow, threads), threads](dy4, x4, aff, coef, bstat, geom, q)
    merge_grads[_grid(nparams, threads), threads](q, geom, aff.arow, grads)
    return _cast(grads[0], dtype), _cast(grads[1], dtype)


def _as_dtype(v, dtype):
    if v.dtype == dtype:
        return v
    return _cast(v, dtype) if v.ndim == 1 else _cast(_contiguous(v).reshape(-1), dtype)


def update_instance_running_stats(running_mean, running_var, mean, var, count, momentum):
    """As the CPU's, through the host: the statistics are ``C`` values each."""
    rm, rv = running_mean.copy_to_host(), running_var.copy_to_host()
    _core.update_instance_running_stats(rm, rv, _contiguous(mean).copy_to_host(),
                                            _contiguous(var).copy_to_host(), count, momentum)
    running_mean.copy_to_device(rm)
    running_var.copy_to_device(rv)
