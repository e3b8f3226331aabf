"""numba.cuda kernels.  Private: inputs are validated and shaped by ``ops.py``.

The twins of :mod:`numbabn._cpu.kernels`, by name.  Two families, chosen by the
layout of ``x`` seen as ``(outer, C, inner)``:

* ``*_nchw`` (``inner > 1``): a block handles ``GPU_THREADS * items`` consecutive
  values of one feature (its ``outer`` runs of ``inner`` contiguous values seen
  as one sequence); consecutive threads read consecutive addresses;
* ``*_nc`` (``inner == 1``, channel-contiguous): a 2-D block of
  ``(features, rows)`` threads; a warp reads a contiguous run of features of a
  row, and each thread keeps one feature for the whole block.

Both families use the same partition for reductions and elementwise passes, so
a launch shape (``ops._Plan``) serves the whole call.

Numerics
--------
* Statistics accumulate in float64, on purpose, whatever the input dtype, and
  about a *pivot*: each block subtracts its chunk's first value before summing
  ``d`` and ``d*d``, so the cancellation in ``M2 = sum(d*d) - sum(d)**2 / n`` is
  bounded by the chunk (4096 values), not by the data's mean.  Block partials
  (count, mean, M2) are merged with Chan's formula in a fixed tree; every order
  depends on the shape only, so results are bitwise reproducible.
* Elementwise passes compute in the input dtype (no float64 in float32 kernels).
  The mean is subtracted first, as ``(x - shift_hi) - shift_lo`` with the float64
  mean split into two values of the input dtype: ``x - shift_hi`` is exact when
  ``x`` is near the mean, which is what keeps ``1e4 + 1e-2*randn`` accurate in
  float32 (a float32 mean alone would be off by up to 5% of the spread).
* No warp shuffles: reductions use shared memory and ``syncthreads`` only, so the
  CUDA simulator runs exactly these kernels.
* Kernels never check anything.  A NaN stays in its feature: NaN-safe selects
  (never ``max``/``min`` on data) and no fast-math flags.
"""

import math

import numpy as np
from numba import cuda, float64

from .._config import GPU_JIT, GPU_MAX_THREADS, GPU_UNROLL

# Rows of the per-feature parameter table ``params`` (shape (NPARAMS, C), in the
# input dtype) that the reductions write and the elementwise passes read:
#   forward:  y  = ((x - SHIFT_HI) - SHIFT_LO) * XC_SCALE + OFFSET
#   backward: dx = dy * DY_SCALE + ((x - SHIFT_HI) - SHIFT_LO) * XC_SCALE + OFFSET
# The last rows hold the per-feature results returned to the caller.
SHIFT_HI, SHIFT_LO, XC_SCALE, OFFSET, DY_SCALE = 0, 1, 2, 3, 4
MEAN, INVSTD, VAR = 5, 6, 7            # forward results
DWEIGHT, DBIAS = 5, 6                  # backward results
NPARAMS = 8


# --------------------------------------------------------------------------- #
# Block-level reductions over shared memory.  ``lane`` counts the threads being
# reduced together (0 .. nlanes-1); they sit ``stride`` slots apart in the
# buffers, so an NC block reduces over its rows separately for each feature.
# The tree is fixed by ``nlanes``: deterministic.
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _tree_sum3(sh0, sh1, sh2, slot, lane, nlanes, stride):
    """Sum three buffers over the lanes; lane 0's slots get the totals."""
    half = 1
    while half < nlanes:
        half *= 2
    half //= 2
    while half > 0:
        cuda.syncthreads()
        if lane < half and lane + half < nlanes:
            other = slot + half * stride
            sh0[slot] += sh0[other]
            sh1[slot] += sh1[other]
            sh2[slot] += sh2[other]
        half //= 2
    cuda.syncthreads()


@cuda.jit(device=True, **GPU_JIT)
def _chan(n, m, q, nb, mb, qb):
    """Chan et al.'s merge of (count, mean, M2) with (nb, mb, qb)."""
    if nb == 0.0:
        return n, m, q
    if n == 0.0:
        return nb, mb, qb
    total = n + nb
    d = mb - m
    return total, m + d * (nb / total), q + qb + d * d * (n * nb / total)


@cuda.jit(device=True, **GPU_JIT)
def _tree_chan(shn, shm, shq, t, nthreads):
    """Chan-merge (count, mean, M2) over a 1-D block; thread 0 gets the total."""
    half = 1
    while half < nthreads:
        half *= 2
    half //= 2
    while half > 0:
        cuda.syncthreads()
        if t < half and t + half < nthreads:
            o = t + half
            shn[t], shm[t], shq[t] = _chan(shn[t], shm[t], shq[t], shn[o], shm[o], shq[o])
        half //= 2
    cuda.syncthreads()


@cuda.jit(device=True, **GPU_JIT)
def _imin(a, b):
    """Integer minimum (the ``min`` builtin is not used in kernels)."""
    return a if a < b else b


# --------------------------------------------------------------------------- #
# Walking one feature's values in an NCHW block.  Value number i of feature c is
# x[i // inner, c, i % inner]; a thread visits i = start + t, + nthreads, ...
# and steps (r, j) with a carry instead of dividing for every value.
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _nchw_block(nchunks, inner, total, items):
    """This block's feature, first and last+1 value numbers."""
    c = cuda.blockIdx.x // nchunks
    k = cuda.blockIdx.x - c * nchunks
    start = k * cuda.blockDim.x * items
    stop = _imin(start + cuda.blockDim.x * items, total)
    return c, k, start, stop


@cuda.jit(device=True, **GPU_JIT)
def _step(r, j, dr, dj, inner):
    j += dj
    r += dr
    if j >= inner:
        j -= inner
        r += 1
    return r, j


@cuda.jit(device=True, **GPU_JIT)
def _nc_block(nfeat, nrows, rows_per_block):
    """This block's feature for this thread, the clamped feature to load, row range."""
    ntiles = (nfeat + cuda.blockDim.x - 1) // cuda.blockDim.x
    rb = cuda.blockIdx.x // ntiles
    tile = cuda.blockIdx.x - rb * ntiles
    c = tile * cuda.blockDim.x + cuda.threadIdx.x
    r0 = rb * rows_per_block
    r1 = _imin(r0 + rows_per_block, nrows)
    return c, _imin(c, nfeat - 1), rb, r0, r1


# --------------------------------------------------------------------------- #
# Per-feature statistics: partial (mean, M2) per block, then a fixed-order merge
# that also fills the parameter table.
# --------------------------------------------------------------------------- #
@cuda.jit(**GPU_JIT)
def stats_partials_nchw(x, items, partials):
    """partials[0, k, c], partials[1, k, c] = mean, M2 of chunk k of feature c."""
    outer, nfeat, inner = x.shape
    c, k, start, stop = _nchw_block(partials.shape[1], inner, outer * inner, items)
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    r0 = start // inner
    j0 = start - r0 * inner
    pivot = np.float64(x[r0, c, j0])
    i = start + t
    r = i // inner
    j = i - r * inner
    dr = nthreads // inner
    dj = nthreads - dr * inner
    vals = cuda.local.array(GPU_UNROLL, x.dtype)
    s1 = 0.0
    s2 = 0.0
    for _ in range(0, items, GPU_UNROLL):
        for u in range(GPU_UNROLL):  # loads first: GPU_UNROLL requests in flight
            ok = i + u * nthreads < stop
            vals[u] = x[r if ok else r0, c, j if ok else j0]
            r, j = _step(r, j, dr, dj, inner)
        for u in range(GPU_UNROLL):
            d = np.float64(vals[u]) - pivot
            if i + u * nthreads >= stop:
                d = 0.0
            s1 += d
            s2 += d * d
        i += GPU_UNROLL * nthreads
    sh1 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh2 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh3 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh1[t] = s1
    sh2[t] = s2
    sh3[t] = 0.0
    _tree_sum3(sh1, sh2, sh3, t, t, nthreads, 1)
    if t == 0:
        _store_partial(partials, k, c, stop - start, pivot, sh1[0], sh2[0])


@cuda.jit(**GPU_JIT)
def stats_partials_nc(x, rows_per_block, partials):
    """As ``stats_partials_nchw`` with k the row block, for channel-contiguous x."""
    nrows, nfeat, _ = x.shape
    c, cl, rb, r0, r1 = _nc_block(nfeat, nrows, rows_per_block)
    ty = cuda.threadIdx.y
    nty = cuda.blockDim.y
    pivot = np.float64(x[r0, cl, 0])
    vals = cuda.local.array(GPU_UNROLL, x.dtype)
    s1 = 0.0
    s2 = 0.0
    for r in range(r0 + ty, r0 + rows_per_block, GPU_UNROLL * nty):
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            vals[u] = x[ru if ru < r1 else r0, cl, 0]
        for u in range(GPU_UNROLL):
            d = np.float64(vals[u]) - pivot
            if r + u * nty >= r1:
                d = 0.0
            s1 += d
            s2 += d * d
    slot = ty * cuda.blockDim.x + cuda.threadIdx.x
    sh1 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh2 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh3 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh1[slot] = s1
    sh2[slot] = s2
    sh3[slot] = 0.0
    _tree_sum3(sh1, sh2, sh3, slot, ty, nty, cuda.blockDim.x)
    if ty == 0 and c < nfeat:
        _store_partial(partials, rb, c, r1 - r0, pivot, sh1[slot], sh2[slot])


@cuda.jit(device=True, **GPU_JIT)
def _store_partial(partials, k, c, count, pivot, s1, s2):
    n = np.float64(count)
    m2 = s2 - s1 * (s1 / n)
    if m2 < 0.0:  # rounding; a NaN fails the test and stays NaN
        m2 = 0.0
    partials[0, k, c] = pivot + s1 / n
    partials[1, k, c] = m2


@cuda.jit(**GPU_JIT)
def merge_partials(partials, chunk, total, weight, bias, has_weight, has_bias, eps, params):
    """One block per feature: Chan-merge the chunk partials (chunk k holds
    ``min(chunk, total - k*chunk)`` values), then fill ``params`` (forward rows)."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    n = 0.0
    m = 0.0
    q = 0.0
    for k in range(t, partials.shape[1], nthreads):  # each thread in chunk order
        nb = np.float64(_imin(chunk, total - k * chunk))
        n, m, q = _chan(n, m, q, nb, partials[0, k, c], partials[1, k, c])
    shn = cuda.shared.array(GPU_MAX_THREADS, float64)
    shm = cuda.shared.array(GPU_MAX_THREADS, float64)
    shq = cuda.shared.array(GPU_MAX_THREADS, float64)
    shn[t] = n
    shm[t] = m
    shq[t] = q
    _tree_chan(shn, shm, shq, t, nthreads)
    if t == 0:
        _store_forward_params(c, shm[0], shq[0] / shn[0], weight, bias, has_weight,
                              has_bias, eps, params)


@cuda.jit(device=True, **GPU_JIT)
def _forward_scale(c, var, weight, has_weight, eps):
    """``invstd`` and the scale of ``x - mean`` for feature c, in float64 (as the CPU)."""
    invstd = 1.0 / math.sqrt(var + eps)
    scale = invstd * np.float64(weight[c]) if has_weight else invstd
    return invstd, scale


@cuda.jit(device=True, **GPU_JIT)
def _store_forward_params(c, mean, var, weight, bias, has_weight, has_bias, eps, params):
    """Per-feature float64 maths, stored in the input dtype."""
    invstd, scale = _forward_scale(c, var, weight, has_weight, eps)
    offset = np.float64(bias[c]) if has_bias else 0.0
    params[SHIFT_HI, c] = mean
    params[SHIFT_LO, c] = mean - np.float64(params[SHIFT_HI, c])
    params[XC_SCALE, c] = scale
    params[OFFSET, c] = offset
    params[MEAN, c] = mean
    params[INVSTD, c] = invstd
    params[VAR, c] = var


@cuda.jit(device=True, **GPU_JIT)
def _eval_params(c, mean, var, weight, bias, has_weight, has_bias, eps, out):
    """Eval mode: ``out[:4]`` (a local array of the input dtype) = the forward
    rows SHIFT_HI, SHIFT_LO, XC_SCALE, OFFSET of feature ``c`` from the given mean
    and var: the values ``_store_forward_params`` would store, without a table."""
    m = np.float64(mean[c])
    _, scale = _forward_scale(c, np.float64(var[c]), weight, has_weight, eps)
    out[0] = m
    out[1] = m - np.float64(out[0])
    out[2] = scale
    out[3] = np.float64(bias[c]) if has_bias else 0.0


# --------------------------------------------------------------------------- #
# Elementwise affine transform, in the input dtype:
#   y = ((x - SHIFT_HI) - SHIFT_LO) * XC_SCALE + OFFSET         (affine_*, normalize_*)
#   dx = dy * DY_SCALE + ((x - SHIFT_HI) - SHIFT_LO) * XC_SCALE + OFFSET (affine2_*)
# The ``_*_block`` device functions do one block's share; the kernels differ in
# where the per-feature values come from (the parameter table, or mean and var).
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _affine_block_nchw(x, c, start, stop, items, hi, lo, scale, offset, y):
    inner = x.shape[2]
    nthreads = cuda.blockDim.x
    r0 = start // inner
    j0 = start - r0 * inner
    i = start + cuda.threadIdx.x
    r = i // inner
    j = i - r * inner
    dr = nthreads // inner
    dj = nthreads - dr * inner
    vals = cuda.local.array(GPU_UNROLL, x.dtype)
    for _ in range(0, items, GPU_UNROLL):
        rs, js = r, j
        for u in range(GPU_UNROLL):
            ok = i + u * nthreads < stop
            vals[u] = x[r if ok else r0, c, j if ok else j0]
            r, j = _step(r, j, dr, dj, inner)
        for u in range(GPU_UNROLL):
            if i + u * nthreads < stop:
                y[rs, c, js] = ((vals[u] - hi) - lo) * scale + offset
            rs, js = _step(rs, js, dr, dj, inner)
        i += GPU_UNROLL * nthreads


@cuda.jit(device=True, **GPU_JIT)
def _affine_block_nc(x, c, cl, r0, r1, rows_per_block, hi, lo, scale, offset, y):
    nfeat = x.shape[1]
    nty = cuda.blockDim.y
    vals = cuda.local.array(GPU_UNROLL, x.dtype)
    for r in range(r0 + cuda.threadIdx.y, r0 + rows_per_block, GPU_UNROLL * nty):
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            vals[u] = x[ru if ru < r1 else r0, cl, 0]
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            if ru < r1 and c < nfeat:
                y[ru, c, 0] = ((vals[u] - hi) - lo) * scale + offset


@cuda.jit(**GPU_JIT)
def affine_nchw(x, params, items, y):
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(cuda.gridDim.x // nfeat, inner, outer * inner, items)
    _affine_block_nchw(x, c, start, stop, items, params[SHIFT_HI, c], params[SHIFT_LO, c],
                       params[XC_SCALE, c], params[OFFSET, c], y)


@cuda.jit(**GPU_JIT)
def affine_nc(x, params, rows_per_block, y):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1 = _nc_block(nfeat, nrows, rows_per_block)
    _affine_block_nc(x, c, cl, r0, r1, rows_per_block, params[SHIFT_HI, cl],
                     params[SHIFT_LO, cl], params[XC_SCALE, cl], params[OFFSET, cl], y)


@cuda.jit(**GPU_JIT)
def normalize_nchw(x, mean, var, weight, bias, has_weight, has_bias, eps, items, y):
    """Eval mode in one launch: each thread derives its feature's parameters."""
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(cuda.gridDim.x // nfeat, inner, outer * inner, items)
    p = cuda.local.array(4, x.dtype)
    _eval_params(c, mean, var, weight, bias, has_weight, has_bias, eps, p)
    _affine_block_nchw(x, c, start, stop, items, p[0], p[1], p[2], p[3], y)


@cuda.jit(**GPU_JIT)
def normalize_nc(x, mean, var, weight, bias, has_weight, has_bias, eps, rows_per_block, y):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1 = _nc_block(nfeat, nrows, rows_per_block)
    p = cuda.local.array(4, x.dtype)
    _eval_params(cl, mean, var, weight, bias, has_weight, has_bias, eps, p)
    _affine_block_nc(x, c, cl, r0, r1, rows_per_block, p[0], p[1], p[2], p[3], y)


@cuda.jit(**GPU_JIT)
def affine2_nchw(dy, x, params, items, dx):
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(cuda.gridDim.x // nfeat, inner, outer * inner, items)
    nthreads = cuda.blockDim.x
    hi = params[SHIFT_HI, c]
    lo = params[SHIFT_LO, c]
    a = params[DY_SCALE, c]
    b = params[XC_SCALE, c]
    d = params[OFFSET, c]
    r0 = start // inner
    j0 = start - r0 * inner
    i = start + cuda.threadIdx.x
    r = i // inner
    j = i - r * inner
    dr = nthreads // inner
    dj = nthreads - dr * inner
    xs = cuda.local.array(GPU_UNROLL, x.dtype)
    gs = cuda.local.array(GPU_UNROLL, x.dtype)
    for _ in range(0, items, GPU_UNROLL):
        rs, js = r, j
        for u in range(GPU_UNROLL):
            ok = i + u * nthreads < stop
            rl = r if ok else r0
            jl = j if ok else j0
            xs[u] = x[rl, c, jl]
            gs[u] = dy[rl, c, jl]
            r, j = _step(r, j, dr, dj, inner)
        for u in range(GPU_UNROLL):
            if i + u * nthreads < stop:
                dx[rs, c, js] = gs[u] * a + ((xs[u] - hi) - lo) * b + d
            rs, js = _step(rs, js, dr, dj, inner)
        i += GPU_UNROLL * nthreads


@cuda.jit(**GPU_JIT)
def affine2_nc(dy, x, params, rows_per_block, dx):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1 = _nc_block(nfeat, nrows, rows_per_block)
    nty = cuda.blockDim.y
    hi = params[SHIFT_HI, cl]
    lo = params[SHIFT_LO, cl]
    a = params[DY_SCALE, cl]
    b = params[XC_SCALE, cl]
    d = params[OFFSET, cl]
    xs = cuda.local.array(GPU_UNROLL, x.dtype)
    gs = cuda.local.array(GPU_UNROLL, x.dtype)
    for r in range(r0 + cuda.threadIdx.y, r0 + rows_per_block, GPU_UNROLL * nty):
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            rl = ru if ru < r1 else r0
            xs[u] = x[rl, cl, 0]
            gs[u] = dy[rl, cl, 0]
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            if ru < r1 and c < nfeat:
                dx[ru, c, 0] = gs[u] * a + ((xs[u] - hi) - lo) * b + d


# --------------------------------------------------------------------------- #
# Backward reductions: per block, float64 sum(dy), sum(dy * xc), sum(xc) with
# xc = x - mean.  sum(xc) recovers the exact batch mean when the saved mean was
# rounded to float32 (see sum_partials and numbabn._cpu.ops.batch_norm_backward).
# --------------------------------------------------------------------------- #
@cuda.jit(**GPU_JIT)
def backward_partials_nchw(dy, x, mean, items, partials):
    outer, nfeat, inner = x.shape
    c, k, start, stop = _nchw_block(partials.shape[1], inner, outer * inner, items)
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    m = np.float64(mean[c])
    r0 = start // inner
    j0 = start - r0 * inner
    i = start + t
    r = i // inner
    j = i - r * inner
    dr = nthreads // inner
    dj = nthreads - dr * inner
    xs = cuda.local.array(GPU_UNROLL, x.dtype)
    gs = cuda.local.array(GPU_UNROLL, x.dtype)
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for _ in range(0, items, GPU_UNROLL):
        for u in range(GPU_UNROLL):
            ok = i + u * nthreads < stop
            rl = r if ok else r0
            jl = j if ok else j0
            xs[u] = x[rl, c, jl]
            gs[u] = dy[rl, c, jl]
            r, j = _step(r, j, dr, dj, inner)
        for u in range(GPU_UNROLL):
            g = np.float64(gs[u])
            xc = np.float64(xs[u]) - m
            if i + u * nthreads >= stop:
                g = 0.0
                xc = 0.0
            sdy += g
            sdyxc += g * xc
            sxc += xc
        i += GPU_UNROLL * nthreads
    sh1 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh2 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh3 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh1[t] = sdy
    sh2[t] = sdyxc
    sh3[t] = sxc
    _tree_sum3(sh1, sh2, sh3, t, t, nthreads, 1)
    if t == 0:
        partials[0, k, c] = sh1[0]
        partials[1, k, c] = sh2[0]
        partials[2, k, c] = sh3[0]


@cuda.jit(**GPU_JIT)
def backward_partials_nc(dy, x, mean, rows_per_block, partials):
    nrows, nfeat, _ = x.shape
    c, cl, rb, r0, r1 = _nc_block(nfeat, nrows, rows_per_block)
    ty = cuda.threadIdx.y
    nty = cuda.blockDim.y
    m = np.float64(mean[cl])
    xs = cuda.local.array(GPU_UNROLL, x.dtype)
    gs = cuda.local.array(GPU_UNROLL, x.dtype)
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for r in range(r0 + ty, r0 + rows_per_block, GPU_UNROLL * nty):
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            rl = ru if ru < r1 else r0
            xs[u] = x[rl, cl, 0]
            gs[u] = dy[rl, cl, 0]
        for u in range(GPU_UNROLL):
            g = np.float64(gs[u])
            xc = np.float64(xs[u]) - m
            if r + u * nty >= r1:
                g = 0.0
                xc = 0.0
            sdy += g
            sdyxc += g * xc
            sxc += xc
    slot = ty * cuda.blockDim.x + cuda.threadIdx.x
    sh1 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh2 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh3 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh1[slot] = sdy
    sh2[slot] = sdyxc
    sh3[slot] = sxc
    _tree_sum3(sh1, sh2, sh3, slot, ty, nty, cuda.blockDim.x)
    if ty == 0 and c < nfeat:
        partials[0, rb, c] = sh1[slot]
        partials[1, rb, c] = sh2[slot]
        partials[2, rb, c] = sh3[slot]


@cuda.jit(**GPU_JIT)
def sum_partials(partials, count, mean, invstd, weight, has_weight, params):
    """One block per feature: sum the backward partials in a fixed order, then fill
    ``params`` (backward rows) about the true batch mean ``mean + sum(xc)/count``."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for k in range(t, partials.shape[1], nthreads):
        sdy += partials[0, k, c]
        sdyxc += partials[1, k, c]
        sxc += partials[2, k, c]
    sh1 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh2 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh3 = cuda.shared.array(GPU_MAX_THREADS, float64)
    sh1[t] = sdy
    sh2[t] = sdyxc
    sh3[t] = sxc
    _tree_sum3(sh1, sh2, sh3, t, t, nthreads, 1)
    if t == 0:
        n = np.float64(count)
        sdy = sh1[0]
        inv = np.float64(invstd[c])
        delta = sh3[0] / n
        true_mean = np.float64(mean[c]) + delta
        cov = (sh2[0] - delta * sdy) / n  # mean(dy * (x - true_mean))
        a = inv * np.float64(weight[c]) if has_weight else inv
        params[SHIFT_HI, c] = true_mean
        params[SHIFT_LO, c] = true_mean - np.float64(params[SHIFT_HI, c])
        params[DY_SCALE, c] = a
        params[XC_SCALE, c] = -a * inv * inv * cov
        params[OFFSET, c] = -a * (sdy / n)
        params[DWEIGHT, c] = inv * cov * n
        params[DBIAS, c] = sdy


# --------------------------------------------------------------------------- #
# Small per-feature and data-movement kernels.
# --------------------------------------------------------------------------- #
@cuda.jit(**GPU_JIT)
def update_running_stats(running_mean, running_var, mean, var, unbias, momentum):
    """running = (1 - momentum) * running + momentum * batch, in float64, in place."""
    c = cuda.grid(1)
    if c < running_mean.shape[0]:
        keep = 1.0 - momentum
        rm = np.float64(running_mean[c])
        rv = np.float64(running_var[c])
        running_mean[c] = keep * rm + momentum * np.float64(mean[c])
        running_var[c] = keep * rv + momentum * (np.float64(var[c]) * unbias)


@cuda.jit(**GPU_JIT)
def copy_strided(src, src_start, src_strides, dst, dst_start, dst_strides, shape):
    """dst[idx] = src[idx] for every index of ``shape``; both arrays are flat 1-D
    views and ``*_strides`` are element strides (tuples, any sign)."""
    total = 1
    for n in shape:
        total *= n
    i = cuda.grid(1)
    while i < total:
        rest = i
        s = src_start
        d = dst_start
        for ax in range(len(shape) - 1, -1, -1):
            q = rest // shape[ax]
            idx = rest - q * shape[ax]
            rest = q
            s += idx * src_strides[ax]
            d += idx * dst_strides[ax]
        dst[d] = src[s]
        i += cuda.gridsize(1)
