"""numba.cuda per-row kernels and host drivers: the twins of :mod:`numbabn._cpu.rows`.

Same host functions and signatures (``row_norm_train``, ``row_norm_backward``,
``update_instance_running_stats``) and the same layout surface (``as_4d``,
``empty_like_4d``, ``rows_to_kept``, ...) on numba device arrays; the input is
the ``(N, M, G, K)`` view of :func:`numbabn._layout.plan_rows`, the affine
parameters are indexed by the same :data:`numbabn._cpu.rows.Affine`.

A row's values are numbered ``f = m * K + k`` and cut into chunks of
``GPU_THREADS * GPU_ITEMS_PER_THREAD`` consecutive numbers; one block per
(row, chunk).  Phases, named as the CPU's:

* ``moments_partials``: float64 sums of a chunk about its first value, a fixed
  shared-memory tree, ``shifted_moments``;
* ``merge_moments``: one thread per row Chan-merges its chunks in chunk order
  and writes the row's statistics and coefficients (``invstd_of``,
  ``affine_coefs``; RMSNorm about 0);
* ``normalize``: ``y = xhat * w[a] + b[a]``, ``xhat = (x - HI) * SCALE + OFFSET``
  (one weight per value), or ``y = (x - HI) * s + o`` with the run's
  ``affine_coefs`` (runs sharing one weight);
* ``backward_partials`` / ``merge_backward``: float64 sums of ``g = dy * w``,
  ``g * (x - hi)``, ``x - hi`` per chunk, added per row in chunk order, then
  ``backward_coefs`` about the exact row mean;
* ``dx``: ``dx = (g + (x - HI) * XC_COEF + DY_SHIFT) * DX_SCALE``;
* ``grad_partials`` / ``merge_grads``: one thread per (parameter block, weight)
  sums ``dy * xhat`` and ``dy`` over the block's rows in order, then one thread
  per weight adds the blocks in order.

Every order depends on the shape only: results are bitwise reproducible (they
differ from the CPU's in the last bits: other chunks, a tree inside a chunk).
Kernels use shared memory and ``syncthreads`` only, so the CUDA simulator runs
them as they are.
"""

from collections import namedtuple
from functools import lru_cache
from math import prod

import numpy as np
from numba import cuda, float64

from .. import _config as cfg
from .. import _cache, _core
from .._config import GPU_JIT, GPU_MAX_THREADS
from .._core import DX_SCALE, DY_SHIFT, HI, INVSTD, M2, MEAN, OFFSET, SCALE, VAR, XC_COEF
from .._cpu import rows as _cpu_rows
from .layout import copy_into, strided_view

# The statistics core, compiled once as device functions in numbabn._gpu.kernels.
from .kernels import (affine_coefs, backward_coefs, chan_merge, invstd_of, shifted_moments,
                      sum_dy_xmu_about)

CENTER, NROWSTATS = _cpu_rows.CENTER, _cpu_rows.NROWSTATS
XHAT_SCALE, XHAT_OFFSET = _cpu_rows.XHAT_SCALE, _cpu_rows.XHAT_OFFSET

RowGeometry = namedtuple("RowGeometry", "chunk nch grad_rows nbpg")
"""``chunk`` values per block, ``nch`` chunks per row, ``grad_rows`` rows per
parameter block and ``nbpg`` parameter blocks per affine group."""


# --------------------------------------------------------------------------- #
# Device helpers
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _imin(a, b):
    return a if a < b else b


@cuda.jit(device=True, **GPU_JIT)
def _tree_sum(sh, nsums, t, nthreads):
    """Sum rows ``0 .. nsums-1`` of ``sh`` over the block (fixed tree); slot 0 gets the totals."""
    half = 1
    while half < nthreads:
        half *= 2
    half //= 2
    while half > 0:
        cuda.syncthreads()
        if t < half and t + half < nthreads:
            for q in range(nsums):
                sh[q, t] += sh[q, t + half]
        half //= 2
    cuda.syncthreads()


@cuda.jit(device=True, **GPU_JIT)
def _value(x, n, g, f, K):
    m = f // K
    return x[n, m, g, f - m * K]


@cuda.jit(device=True, **GPU_JIT)
def _weight_index(r, f, aff):
    return (r % aff.gmod) * aff.arow + (f // aff.adiv) % aff.arow


@cuda.jit(device=True, **GPU_JIT)
def _block_chunk(x, geom):
    """Row ``r = n * G + g`` and the value numbers ``[f0, f1)`` of this block."""
    G = x.shape[2]
    MK = x.shape[1] * x.shape[3]
    r = cuda.blockIdx.x // geom.nch
    c = cuda.blockIdx.x - r * geom.nch
    f0 = c * geom.chunk
    return r, r // G, r % G, c, f0, _imin(f0 + geom.chunk, MK)


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #
@cuda.jit(**GPU_JIT)
def moments_partials(x, geom, p):
    """``p[0, r, c], p[1, r, c]`` = mean and M2 of chunk ``c`` of row ``r``."""
    K = x.shape[3]
    r, n, g, c, f0, f1 = _block_chunk(x, geom)
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    pivot = np.float64(_value(x, n, g, f0, K))
    s1 = 0.0
    s2 = 0.0
    for f in range(f0 + t, f1, nthreads):
        d = np.float64(_value(x, n, g, f, K)) - pivot
        s1 += d
        s2 += d * d
    sh = cuda.shared.array((2, GPU_MAX_THREADS), float64)
    sh[0, t] = s1
    sh[1, t] = s2
    _tree_sum(sh, 2, t, nthreads)
    if t == 0:
        p[0, r, c], p[1, r, c] = shifted_moments(f1 - f0, pivot, sh[0, 0], sh[1, 0])


@cuda.jit(**GPU_JIT)
def merge_moments(p, geom, MK, eps, rms, coef, stats):
    """One thread per row: its chunks' moments merged in chunk order, then the
    statistics and the coefficients of ``xhat = (x - HI) * SCALE + OFFSET``."""
    r = cuda.grid(1)
    if r >= p.shape[1]:
        return
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for c in range(geom.nch):
        nb = np.float64(_imin(geom.chunk, MK - c * geom.chunk))
        cnt, mean, m2 = chan_merge(cnt, mean, m2, nb, p[0, r, c], p[1, r, c])
    var = m2 / cnt
    if rms:
        center = 0.0
        invstd = invstd_of(var + mean * mean, eps)
    else:
        center = mean
        invstd = invstd_of(var, eps)
    stats[MEAN, r] = mean
    stats[INVSTD, r] = invstd
    stats[VAR, r] = var
    stats[M2, r] = m2
    stats[CENTER, r] = center
    coef[HI, r] = center
    coef[SCALE, r], coef[OFFSET, r] = affine_coefs(center, np.float64(coef[HI, r]), invstd,
                                                   1.0, 0.0)


@cuda.jit(**GPU_JIT)
def normalize(x, weight, bias, aff, coef, stats, geom, y):
    K = x.shape[3]
    r, n, g, _, f0, f1 = _block_chunk(x, geom)
    hi = coef[HI, r]
    s0 = coef[SCALE, r]
    o0 = coef[OFFSET, r]
    for f in range(f0 + cuda.threadIdx.x, f1, cuda.blockDim.x):
        m = f // K
        k = f - m * K
        a = _weight_index(r, f, aff)
        v = x[n, m, g, k]
        if aff.adiv == 1:
            y[n, m, g, k] = ((v - hi) * s0 + o0) * weight[a] + bias[a]
        else:
            s, o = affine_coefs(stats[CENTER, r], np.float64(hi), stats[INVSTD, r],
                                np.float64(weight[a]), np.float64(bias[a]))
            y[n, m, g, k] = (v - hi) * y.dtype.type(s) + y.dtype.type(o)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #
@cuda.jit(**GPU_JIT)
def backward_partials(dy, x, hi, weight, aff, geom, p):
    """Float64 ``sum(g)``, ``sum(g * (x - hi))``, ``sum(x - hi)`` (``g = dy * w``)
    of chunk ``c`` of row ``r`` into ``p[:, r, c]``."""
    K = x.shape[3]
    r, n, g, c, f0, f1 = _block_chunk(x, geom)
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    h = np.float64(hi[r])
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for f in range(f0 + t, f1, nthreads):
        m = f // K
        k = f - m * K
        gv = np.float64(dy[n, m, g, k]) * np.float64(weight[_weight_index(r, f, aff)])
        d = np.float64(x[n, m, g, k]) - h
        s1 += gv
        s2 += gv * d
        s3 += d
    sh = cuda.shared.array((3, GPU_MAX_THREADS), float64)
    sh[0, t] = s1
    sh[1, t] = s2
    sh[2, t] = s3
    _tree_sum(sh, 3, t, nthreads)
    if t == 0:
        p[0, r, c] = sh[0, 0]
        p[1, r, c] = sh[1, 0]
        p[2, r, c] = sh[2, 0]


@cuda.jit(**GPU_JIT)
def merge_backward(p, geom, MK, hi, rstd, rms, coef, bstat):
    """One thread per row: chunk sums added in order, then the coefficients of dx
    about the exact row mean and of the float64 ``xhat`` (as the CPU's
    ``_store_backward``)."""
    r = cuda.grid(1)
    if r >= p.shape[1]:
        return
    sg = 0.0
    sgx = 0.0
    sx = 0.0
    for c in range(geom.nch):
        sg += p[0, r, c]
        sgx += p[1, r, c]
        sx += p[2, r, c]
    cnt = np.float64(MK)
    h = np.float64(hi[r])
    if rms:
        mean = 0.0
        sum_g = 0.0
        sum_gxmu = sgx
    else:
        mean = h + sx / cnt
        sum_g = sg
        sum_gxmu = sum_dy_xmu_about(sg, sgx, h, mean)
    coef[HI, r] = mean
    hi2 = np.float64(coef[HI, r])
    coef[DX_SCALE, r], coef[XC_COEF, r], coef[DY_SHIFT, r] = backward_coefs(
        cnt, sum_g, sum_gxmu, mean, hi2, rstd[r], 1.0)
    bstat[XHAT_SCALE, r], bstat[XHAT_OFFSET, r] = affine_coefs(mean, hi2, rstd[r], 1.0, 0.0)


@cuda.jit(**GPU_JIT)
def dx_pass(dy, x, weight, aff, coef, geom, dx):
    K = x.shape[3]
    r, n, g, _, f0, f1 = _block_chunk(x, geom)
    hi = coef[HI, r]
    a = coef[DX_SCALE, r]
    b = coef[XC_COEF, r]
    d = coef[DY_SHIFT, r]
    for f in range(f0 + cuda.threadIdx.x, f1, cuda.blockDim.x):
        m = f // K
        k = f - m * K
        w = weight[_weight_index(r, f, aff)]
        dx[n, m, g, k] = (dy[n, m, g, k] * w + (x[n, m, g, k] - hi) * b + d) * a


@cuda.jit(**GPU_JIT)
def grad_partials(dy, x, aff, coef, bstat, geom, q):
    """One thread per (parameter block, weight j of the group): ``sum(dy * xhat)``
    and ``sum(dy)`` over the block's rows, each row's values with weight j in order."""
    G, K = x.shape[2], x.shape[3]
    MK = x.shape[1] * K
    u = cuda.grid(1)
    if u >= q.shape[1] * aff.arow:
        return
    blk = u // aff.arow
    j = u - blk * aff.arow
    group = blk // geom.nbpg
    t0 = (blk - group * geom.nbpg) * geom.grad_rows
    t1 = _imin(t0 + geom.grad_rows, (x.shape[0] * G) // aff.gmod)
    tw = 0.0
    tb = 0.0
    for t in range(t0, t1):
        r = t * aff.gmod + group
        n = r // G
        g = r - n * G
        h = np.float64(coef[HI, r])
        xs = bstat[XHAT_SCALE, r]
        xo = bstat[XHAT_OFFSET, r]
        seg = j
        while seg * aff.adiv < MK:  # runs seg = j, j + arow, ... hold weight j
            for f in range(seg * aff.adiv, _imin((seg + 1) * aff.adiv, MK)):
                m = f // K
                k = f - m * K
                gv = np.float64(dy[n, m, g, k])
                tw += gv * ((np.float64(x[n, m, g, k]) - h) * xs + xo)
                tb += gv
            seg += aff.arow
    q[0, blk, j] = tw
    q[1, blk, j] = tb


@cuda.jit(**GPU_JIT)
def merge_grads(q, geom, arow, grads):
    """One thread per affine index: its group's block partials added in block order."""
    a = cuda.grid(1)
    if a >= grads.shape[1]:
        return
    group = a // arow
    j = a - group * arow
    tw = 0.0
    tb = 0.0
    for i in range(geom.nbpg):
        tw += q[0, group * geom.nbpg + i, j]
        tb += q[1, group * geom.nbpg + i, j]
    grads[0, a] = tw
    grads[1, a] = tb


@cuda.jit(**GPU_JIT)
def to_dtype(src, dst):
    """``dst[i] = src[i]`` (float64 results to the input's dtype)."""
    i = cuda.grid(1)
    if i < dst.shape[0]:
        dst[i] = src[i]


# =========================================================================== #
# Host drivers (the same as numbabn._cpu.rows's)
# =========================================================================== #
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
    """See :func:`numbabn._cpu.rows.row_norm_train`; device arrays in and out."""
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
    """See :func:`numbabn._cpu.rows.row_norm_backward`; device arrays in and out."""
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
    _cpu_rows.update_instance_running_stats(rm, rv, _contiguous(mean).copy_to_host(),
                                            _contiguous(var).copy_to_host(), count, momentum)
    running_mean.copy_to_device(rm)
    running_var.copy_to_device(rv)


# --------------------------------------------------------------------------- #
# The layout surface, on device arrays (views built from strides)
# --------------------------------------------------------------------------- #
def _contiguous_strides(shape, itemsize):
    strides = []
    step = itemsize
    for n in reversed(tuple(shape)):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def _is_contiguous(a):
    return tuple(a.strides) == _contiguous_strides(a.shape, a.dtype.itemsize) or a.size <= 1


def _contiguous(a):
    """``a`` itself when C-contiguous, else a C-contiguous device copy."""
    if _is_contiguous(a):
        return a
    out = cuda.device_array(tuple(a.shape), a.dtype)
    copy_into(out, a)
    return out


def _merge(shape, strides):
    """``(size, stride)`` of axes that form one strided run, else None."""
    axes = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not axes:
        return 1, 0
    for (n0, s0), (n1, s1) in zip(axes, axes[1:]):
        if s0 != s1 * n1:
            return None
    return prod(n for n, _ in axes), axes[-1][1]


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
    return strided_view(out, layout.shape4, _contiguous_strides(layout.shape4, x.dtype.itemsize))


def _caller_view(a, shape, perm):
    """A C-contiguous array ``a`` of the permuted ``shape`` seen in the caller's axis order."""
    permuted_strides = _contiguous_strides(tuple(shape[i] for i in perm), a.dtype.itemsize)
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
    rows = prod(v.shape)
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
    return _contiguous(strided_view(w, shape, strides)).reshape(prod(shape))


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


_cache.check(globals())  # GPU_MAX_THREADS is compiled in: the cache is keyed on it
