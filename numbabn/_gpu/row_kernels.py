"""numba.cuda per-row kernels and host drivers: the twins of :mod:`numbabn._cpu.row_ops`.

Same host functions and signatures (``row_norm_train``, ``row_norm_backward``,
``update_instance_running_stats``) and the same layout surface (``as_4d``,
``empty_like_4d``, ``rows_to_kept``, ...) on numba device arrays; the input is
the ``(N, M, G, K)`` view of :func:`numbabn._layout.plan_rows`, the affine
parameters are indexed by the same :data:`numbabn._core.Affine`.

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

import numpy as np
from numba import cuda, float64

from .. import _cache, _core
from .._config import GPU_JIT, GPU_MAX_THREADS
from .._core import (CENTER, DX_SCALE, DY_SHIFT, HI, INVSTD, OFFSET, SCALE, XC_COEF, XHAT_OFFSET,
                     XHAT_SCALE)

# The statistics core, compiled once as device functions in numbabn._gpu.feature_kernels.
from .feature_kernels import (_imin, _tree_sum, affine_coefs, backward_coefs, chan_merge,
                              invstd_of, shifted_moments, store_statistics, sum_dy_xmu_about)

RowGeometry = namedtuple("RowGeometry", "chunk nch grad_rows nbpg")
"""``chunk`` values per block, ``nch`` chunks per row, ``grad_rows`` rows per
parameter block and ``nbpg`` parameter blocks per affine group."""


_store_forward = _core.row_forward_writer(cuda.jit(device=True, **GPU_JIT), invstd_of,
                                          affine_coefs, store_statistics, np.float64)
"""Row ``r``'s statistics and coefficients: the CPU's ``_store_forward``, compiled here."""


# --------------------------------------------------------------------------- #
# Device helpers
# --------------------------------------------------------------------------- #
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
    _tree_sum(sh, 2, t, t, nthreads, 1)
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
    _store_forward(r, cnt, mean, m2, eps, rms, coef, stats)


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
    _tree_sum(sh, 3, t, t, nthreads, 1)
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


_cache.check(globals())  # GPU_MAX_THREADS is compiled in: the cache is keyed on it
