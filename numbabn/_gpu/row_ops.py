"""GPU host drivers of the per-row norms: the twins of :mod:`numbabn._cpu.row_ops`
(same names and signatures), on numba device arrays, launching the kernels of
:mod:`numbabn._gpu.row_kernels`."""

from functools import lru_cache

import numpy as np
from numba import cuda

from .. import _config as cfg
from .. import _core
from . import row_kernels as k
from .._core import HI, NROWSTATS, RSTD, VAR, cdiv
from .layout import _contiguous
from .runtime import Kernel, check_threads, constant, dim3

_MOMENTS_PARTIALS = Kernel(k.moments_partials)
_MERGE_MOMENTS = Kernel(k.merge_moments)
_NORMALIZE = Kernel(k.normalize)
_BACKWARD_PARTIALS = Kernel(k.backward_partials)
_MERGE_BACKWARD = Kernel(k.merge_backward)
_DX_PASS = Kernel(k.dx_pass)
_GRAD_PARTIALS = Kernel(k.grad_partials)
_MERGE_GRADS = Kernel(k.merge_grads)
_TO_DTYPE = Kernel(k.to_dtype)


@lru_cache(maxsize=256)
def _plan(shape4, gmod, threads, items, chunk_elems):
    check_threads(threads, items, k.GPU_MAX_THREADS)
    N, M, G, K = shape4
    reduced = M * K
    chunk = threads * items
    grad_rows = max(1, chunk_elems // reduced)
    nbpg = cdiv((N * G) // gmod, grad_rows)
    return k.RowGeometry(chunk, cdiv(reduced, chunk), grad_rows, nbpg)


def plan(shape4, aff):
    return _plan(tuple(shape4), aff.gmod, cfg.GPU_THREADS, cfg.GPU_ITEMS_PER_THREAD,
                 cfg.CHUNK_ELEMS)


def _grid(n, threads):
    return dim3(max(1, cdiv(n, threads)))


def _cast(v64, dtype):
    out = cuda.device_array(v64.shape[0], dtype)
    threads = cfg.GPU_THREADS
    _TO_DTYPE.launch(_grid(v64.shape[0], threads), dim3(threads), v64, out)
    return out


def row_norm_train(x4, weight, bias, aff, eps, rms, y4):
    """See :func:`numbabn._cpu.row_ops.row_norm_train`; device arrays in and out."""
    N, M, G, K = x4.shape
    dtype = x4.dtype
    rows, MK = N * G, M * K
    geom = plan(x4.shape, aff)
    threads = cfg.GPU_THREADS
    block = dim3(threads)
    nparams = aff.gmod * aff.arow
    weight = constant(nparams, dtype, 1) if weight is None else weight
    bias = constant(nparams, dtype, 0) if bias is None else bias
    p = cuda.device_array((2, rows, geom.nch))
    coef = cuda.device_array((_core.NCOEFS, rows), dtype)
    stats = cuda.device_array((NROWSTATS, rows))
    _MOMENTS_PARTIALS.launch(dim3(rows * geom.nch), block, x4, geom, p)
    _MERGE_MOMENTS.launch(_grid(rows, threads), block, p, geom, MK, float(eps), bool(rms), coef,
                         stats)
    _NORMALIZE.launch(dim3(rows * geom.nch), block, x4, weight, bias, aff, coef, stats, geom, y4)
    return coef[HI], coef[RSTD], stats[VAR]  # HI, RSTD: the forward's rows in x's dtype


def row_norm_backward(dy4, x4, mean, rstd, weight, aff, rms, want_grads, dx4):
    """See :func:`numbabn._cpu.row_ops.row_norm_backward`; device arrays in and out."""
    N, M, G, K = x4.shape
    dtype = x4.dtype
    rows, MK = N * G, M * K
    geom = plan(x4.shape, aff)
    threads = cfg.GPU_THREADS
    block = dim3(threads)
    nparams = aff.gmod * aff.arow
    weight = constant(nparams, dtype, 1) if weight is None else weight
    hi = constant(rows, dtype, 0) if mean is None else _as_dtype(mean, dtype)
    rstd = _as_dtype(rstd, np.float64)
    p = cuda.device_array((3, rows, geom.nch))
    coef = cuda.device_array((_core.NCOEFS, rows), dtype)
    bstat = cuda.device_array((2, rows))
    _BACKWARD_PARTIALS.launch(dim3(rows * geom.nch), block, dy4, x4, hi, weight, aff, geom, p)
    _MERGE_BACKWARD.launch(_grid(rows, threads), block, p, geom, MK, hi, rstd, bool(rms), coef,
                          bstat)
    _DX_PASS.launch(dim3(rows * geom.nch), block, dy4, x4, weight, aff, coef, geom, dx4)
    if not want_grads:
        return None, None
    nblk = aff.gmod * geom.nbpg
    q = cuda.device_array((2, nblk, aff.arow))
    grads = cuda.device_array((2, nparams))
    _GRAD_PARTIALS.launch(_grid(nblk * aff.arow, threads), block, dy4, x4, aff, coef, bstat, geom, q)
    _MERGE_GRADS.launch(_grid(nparams, threads), block, q, geom, aff.arow, grads)
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
