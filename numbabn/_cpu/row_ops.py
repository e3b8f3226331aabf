"""CPU host drivers of the per-row norms (layer, group, instance and RMS norm):
plan a shape, allocate the tables, call the kernels of
:mod:`numbabn._cpu.row_kernels`.  The GPU twins, :mod:`numbabn._gpu.row_ops`,
have the same names and signatures."""

from functools import lru_cache

import numpy as np

from .. import _config as cfg
from .. import _core
from .runtime import constant, is_small
from .._core import HI, NROWSTATS, RSTD, VAR, compute_dtype
from . import half, row_kernels
from .row_kernels import RowGeometry


@lru_cache(maxsize=256)
def _plan(shape4, itemsize, nread, tunables):
    _, M, _, K = shape4
    chunk, fuse_bytes, fuse_min_tasks, bwd_block = tunables
    rows = shape4[0] * shape4[2]
    reduced = M * K
    kcols = min(K, chunk)
    mrows = max(1, chunk // kcols)
    fused = rows >= fuse_min_tasks and nread * reduced * itemsize <= fuse_bytes
    grad_rows = max(1, chunk // reduced)
    return RowGeometry(mrows, kcols, int(fused), grad_rows, bwd_block)


def _tunables():
    """The tunables of :mod:`numbabn._config` a row geometry depends on, as they are now."""
    return cfg.CHUNK_ELEMS, cfg.FUSE_BYTES, cfg.FUSE_MIN_TASKS, cfg.BWD_BLOCK


def plan(shape4, itemsize, nread):
    """The geometry of one ``(N, M, G, K)`` shape reading ``nread`` arrays, with
    the tunables of :mod:`numbabn._config` as they are now."""
    return _plan(tuple(shape4), itemsize, nread, _tunables())


@lru_cache(maxsize=8)
def _dummy(ndim, dtype=np.float64):
    return np.empty((1,) * ndim, dtype)


def _kernels(x4):
    """The kernels for ``x4``: the serial twins for small inputs
    (:func:`runtime.is_small`), else the parallel ones."""
    return row_kernels.serial if is_small(x4) else row_kernels


def _one_run(aff, M, K):
    """Whether each row is one run of values with consecutive weights (layer
    and RMS norm of contiguous rows): :func:`row_kernels._one_run`."""
    return M == 1 and aff.adiv == 1 and aff.arow == K


def _nparams(aff):
    return aff.gmod * aff.arow


def _channels_last(aff, *arrays):
    """The (N, M, C) views of ``arrays`` (N, M, G, K) when each sample is one
    (M, C) block with channels innermost and channel ``g * K + k`` takes
    weight ``g * K + k`` (channels-last group and instance norm, with K < M
    runs too short for the run kernels); else None."""
    N, M, G, K = arrays[0].shape
    if M < 2 or K > cfg.CL_MAX_RUN or aff.gmod != G or aff.arow != K or (K > 1 and aff.adiv != 1):
        return None
    views = []
    for a in arrays:
        isz = a.dtype.itemsize
        sn, sm, sg, sk = a.strides
        if not (sk == isz or K == 1) or sg != K * isz or sm != G * K * isz:
            return None
        views.append(a.reshape(N, M, G * K))  # merges (G, K): a view, never a copy
    return views


def _whole_runs(aff, *arrays):
    """The (N, G, K) views of ``arrays`` (N, 1, G, K) when each row is
    ``aff.arow`` contiguous runs of ``aff.adiv`` values sharing a weight (group
    and instance norm of NCHW data); else None."""
    N, M, G, K = arrays[0].shape
    if M != 1 or aff.adiv < 2 or K != aff.arow * aff.adiv:
        return None
    if any(a.strides[3] != a.dtype.itemsize for a in arrays):
        return None
    return [a[:, 0] for a in arrays]


_routes = {}  # (shapes, strides, itemsize, aff, tunables) -> (route, geom)


def _forward_route(x4, y4, aff):
    """Which forward kernel runs ``x4`` (``"cl"``, ``"chunks"``, ``"one_run"``,
    ``"runs"`` or ``"rows"``) and its geometry: what depends only on the shape,
    the strides, ``aff`` and the tunables, kept per key."""
    tunables = _tunables()
    key = (x4.shape, x4.strides, y4.strides, x4.dtype.itemsize, aff, tunables)
    found = _routes.get(key)
    if found is not None:
        return found
    _, M, _, K = x4.shape
    geom = _plan(x4.shape, x4.dtype.itemsize, 1, tunables)
    if _channels_last(aff, x4, y4) is not None:
        route = "cl"
    elif not geom.fused:
        route = "chunks"
    elif _one_run(aff, M, K):
        route = "one_run"
    elif _whole_runs(aff, x4, y4) is not None:
        route = "runs"
    else:
        route = "rows"
    if len(_routes) >= 256:
        _routes.clear()
    _routes[key] = found = (route, geom)
    return found


def row_norm_train(x4, weight, bias, aff, eps, rms, y4):
    """Normalise each row of ``x4`` into ``y4``; return per row (row order) the
    centre (the mean; 0 for RMS norm) and ``rstd`` in x's dtype (float32 for
    half inputs, whose values the kernels read and write directly), and the
    biased variance in float64.  ``weight`` and ``bias`` (or None) have
    ``gmod * arow`` values laid out as ``aff`` indexes them."""
    N, M, G, K = x4.shape
    dtype = compute_dtype(x4.dtype)
    rows = N * G
    route, geom = _forward_route(x4, y4, aff)
    x4, y4 = half.bits_view(x4), half.bits_view(y4)
    k = _kernels(x4)
    nparams = _nparams(aff)
    weight = constant(nparams, dtype, 1) if weight is None else weight
    bias = constant(nparams, dtype, 0) if bias is None else bias
    coef = np.empty((_core.NCOEFS, rows), dtype)
    stats = np.empty((NROWSTATS, rows))
    args = (x4, weight, bias, aff, float(eps), bool(rms), geom, True)
    if route == "cl":
        x3, y3 = _channels_last(aff, x4, y4)
        k.forward_cl(x3, weight, bias, G, float(eps), bool(rms), True, coef, stats, y3)
    elif route == "chunks":
        p = np.empty((2, rows, _nchunks_host(geom, M, K)))
        k.forward_chunks(*args, p, coef, stats, y4)
    elif route == "one_run":
        k.forward_one_run(*args, coef, stats, y4)
    elif route == "runs":
        k.forward_runs(*args, coef, stats, y4)
    else:
        k.forward_rows(*args, coef, stats, y4)
    return coef[HI], coef[RSTD], stats[VAR]


def _nchunks_host(geom, M, K):
    return -(-M // geom.mrows) * -(-K // geom.kcols)


def row_norm_backward(dy4, x4, mean, rstd, weight, aff, rms, want_grads, dx4):
    """Write dx into ``dx4``; return float64-accumulated ``(dweight, dbias)`` in
    x's dtype (float32 for half inputs, whose values the kernels read and write
    directly), laid out as ``aff`` indexes them (None, None without ``want_grads``).

    ``mean`` (None for RMSNorm) and ``rstd``: per row, row order, x's dtype
    (float32 for half inputs) or float64, as the forward returned them.
    """
    N, M, G, K = x4.shape
    dtype = compute_dtype(x4.dtype)
    rows = N * G
    geom = plan(x4.shape, x4.dtype.itemsize, 2)
    dy4, x4, dx4 = half.bits_view(dy4), half.bits_view(x4), half.bits_view(dx4)
    k = _kernels(x4)
    nparams = _nparams(aff)
    weight = constant(nparams, dtype, 1) if weight is None else weight
    hi = np.zeros(rows, dtype) if mean is None else mean.astype(dtype, copy=False)
    rstd = rstd.astype(np.float64, copy=False)
    coef = np.empty((_core.NCOEFS, rows), dtype)
    bstat = np.empty((2, rows))
    grads = np.empty((2, nparams)) if want_grads else _dummy(2)
    runs = _whole_runs(aff, dy4, x4, dx4)
    cl = None if runs is not None else _channels_last(aff, dy4, x4, dx4)
    if runs is not None:
        q = np.empty((2, rows, aff.arow)) if want_grads else _dummy(3)
        k.backward_runs(runs[0], runs[1], hi, rstd, weight, aff, bool(rms), bool(want_grads),
                      cfg.BWD_BLOCK, coef, bstat, q, grads, runs[2])
    elif cl is not None:
        q = np.empty((2, N, G * K)) if want_grads else _dummy(3)
        k.backward_cl(cl[0], cl[1], hi, rstd, weight, G, bool(rms), bool(want_grads),
                      cfg.BWD_NC_ROWS, coef, bstat, q, grads, cl[2])
    else:
        nblk = aff.gmod * -(-(rows // aff.gmod) // geom.grad_rows)
        q = np.empty((2, nblk, aff.arow)) if want_grads else _dummy(3)
        args = (dy4, x4, hi, rstd, weight, aff, bool(rms), geom, bool(want_grads), coef, bstat, q,
                grads, dx4)
        if geom.fused and _one_run(aff, M, K):
            k.backward_one_run(*args)
        else:
            if not geom.fused:
                p = np.empty((3, rows, _nchunks_host(geom, M, K)))
                k.backward_sums(dy4, x4, hi, rstd, weight, aff, bool(rms), geom, p, coef, bstat)
            k.backward(*args)
    if not want_grads:
        return None, None
    if dtype != grads.dtype:
        narrowed = np.empty(grads.shape, dtype)
        k.narrow(grads, narrowed)
        grads = narrowed
    return grads[0], grads[1]


update_instance_running_stats = _core.update_instance_running_stats
