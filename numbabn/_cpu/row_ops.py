"""CPU host drivers of the per-row norms (layer, group, instance and RMS norm):
plan a shape, allocate the tables, call the kernels of
:mod:`numbabn._cpu.row_kernels`.  The GPU twins, :mod:`numbabn._gpu.row_ops`,
have the same names and signatures."""

from functools import lru_cache

import numpy as np

from .. import _config as cfg
from .. import _core
from .runtime import constant
from .._core import INVSTD, MEAN, NROWSTATS, VAR
from .row_kernels import RowGeometry, backward, forward


@lru_cache(maxsize=256)
def _plan(shape4, itemsize, nread, tunables):
    _, M, _, K = shape4
    chunk, fuse_bytes, fuse_min_tasks = tunables
    rows = shape4[0] * shape4[2]
    reduced = M * K
    kcols = min(K, chunk)
    mrows = max(1, chunk // kcols)
    fused = rows >= fuse_min_tasks and nread * reduced * itemsize <= fuse_bytes
    grad_rows = max(1, chunk // reduced)
    return RowGeometry(mrows, kcols, int(fused), grad_rows)


def plan(shape4, itemsize, nread):
    """The geometry of one ``(N, M, G, K)`` shape reading ``nread`` arrays, with
    the tunables of :mod:`numbabn._config` as they are now."""
    return _plan(tuple(shape4), itemsize, nread,
                 (cfg.CHUNK_ELEMS, cfg.FUSE_BYTES, cfg.FUSE_MIN_TASKS))


@lru_cache(maxsize=8)
def _dummy(ndim, dtype=np.float64):
    return np.empty((1,) * ndim, dtype)


def _nparams(aff):
    return aff.gmod * aff.arow


def row_norm_train(x4, weight, bias, aff, eps, rms, y4):
    """Normalise each row of ``x4`` into ``y4``; return per-row ``(mean, rstd)``
    in x's dtype (row order) and the biased variance in float64.  ``weight`` and
    ``bias`` (or None) have ``gmod * arow`` values laid out as ``aff`` indexes them."""
    N, M, G, K = x4.shape
    dtype = x4.dtype
    rows = N * G
    geom = plan(x4.shape, dtype.itemsize, 1)
    nparams = _nparams(aff)
    weight = constant(nparams, dtype, 1) if weight is None else weight
    bias = constant(nparams, dtype, 0) if bias is None else bias
    coef = np.empty((_core.NCOEFS, rows), dtype)
    stats = np.empty((NROWSTATS, rows))
    p = _dummy(3) if geom.fused else np.empty((2, rows, _nchunks_host(geom, M, K)))
    forward(x4, weight, bias, aff, float(eps), bool(rms), geom, True, p, coef, stats, y4)
    with np.errstate(over="ignore"):
        return stats[MEAN].astype(dtype), stats[INVSTD].astype(dtype), stats[VAR]


def _nchunks_host(geom, M, K):
    return -(-M // geom.mrows) * -(-K // geom.kcols)


def row_norm_backward(dy4, x4, mean, rstd, weight, aff, rms, want_grads, dx4):
    """Write dx into ``dx4``; return float64-accumulated ``(dweight, dbias)`` in
    x's dtype, laid out as ``aff`` indexes them (None, None without ``want_grads``).

    ``mean`` (None for RMSNorm) and ``rstd``: per row, row order, x's dtype or
    float64, as the forward returned them.
    """
    N, M, G, K = x4.shape
    dtype = x4.dtype
    rows = N * G
    geom = plan(x4.shape, dtype.itemsize, 2)
    nparams = _nparams(aff)
    weight = constant(nparams, dtype, 1) if weight is None else weight
    hi = np.zeros(rows, dtype) if mean is None else mean.astype(dtype, copy=False)
    rstd = rstd.astype(np.float64, copy=False)
    coef = np.empty((_core.NCOEFS, rows), dtype)
    bstat = np.empty((2, rows))
    p = _dummy(3) if geom.fused else np.empty((3, rows, _nchunks_host(geom, M, K)))
    nblk = aff.gmod * -(-(rows // aff.gmod) // geom.grad_rows)
    q = np.empty((2, nblk, aff.arow)) if want_grads else _dummy(3)
    grads = np.empty((2, nparams)) if want_grads else _dummy(2)
    backward(dy4, x4, hi, rstd, weight, aff, bool(rms), geom, bool(want_grads), p, coef, bstat,
             q, grads, dx4)
    if not want_grads:
        return None, None
    with np.errstate(over="ignore"):
        return grads[0].astype(dtype), grads[1].astype(dtype)


update_instance_running_stats = _core.update_instance_running_stats
