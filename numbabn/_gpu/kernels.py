"""numba.cuda kernels.  Private: inputs are validated and shaped by ``ops.py``.

The per-feature maths is :mod:`numbabn._core`'s, compiled here as device
functions (the CPU twins in :mod:`numbabn._cpu.kernels` compile the same
functions), and the tables the kernels fill use its row names.  Each operation
runs these phases, named as the CPU's:

* ``moments_partials_*``: ``(mean, M2)`` of each block's chunk of a feature
  (float64 sums about the chunk's first value, then ``shifted_moments``);
* ``merge_moments``: one block per feature Chan-merges the chunk moments
  (``chan_merge``) in a fixed tree and writes the float64 statistics table and
  the coefficients ``HI``, ``SCALE``, ``OFFSET`` (``invstd_of``, ``affine_coefs``);
* ``affine_*``: ``y = (x - HI) * SCALE + OFFSET`` from the coefficient table
  (optionally through a ReLU: the fused ``batch_norm_relu_train``);
* ``normalize_*``: the same pass with each thread deriving its feature's
  coefficients from a given mean and var (eval) or invstd (``batch_norm_elemt``);
* ``backward_partials_*``: float64 ``sum(dy)``, ``sum(dy * (x - hi))``,
  ``sum(x - hi)`` per block, ``hi`` the given mean rounded to the input's dtype;
* ``merge_backward_sums``: one block per feature adds the block sums in a fixed
  tree, writes the float64 sums table and either ``sum_dy_xmu_about`` the given
  mean (``batch_norm_backward_reduce``) or the coefficients of dx about the exact
  batch mean ``hi + sum(x - hi) / n`` and the parameter gradients
  (``backward_coefs``, ``parameter_grads``), as the CPU's fused backward;
* ``dx_*``: ``dx = (dy + (x - HI) * XC_COEF + DY_SHIFT) * DX_SCALE`` from the
  coefficient table (the fused ReLU's backward masks ``dy`` by ``y > 0`` here and
  in ``backward_partials_*``);
* ``backward_elemt_*``: the same pass with each thread deriving its feature's
  coefficients from given sums (``batch_norm_backward_elemt``).

Two families, chosen by the layout of ``x`` seen as ``(outer, C, inner)``:

* ``*_nchw`` (``inner > 1``): a block handles ``blockDim * geom.items``
  consecutive values of one feature (its ``outer`` runs of ``inner`` contiguous
  values seen as one sequence); consecutive threads read consecutive addresses;
* ``*_nc`` (``inner == 1``, channel-contiguous): a 2-D block of
  ``(features, rows)`` threads takes ``geom.chunk`` rows; a warp reads a
  contiguous run of features of a row, and each thread keeps one feature.

Both families use the same partition for reductions and elementwise passes, so
one launch geometry (``ops.Geometry``: ``items``, ``chunk``, ``total``) serves
the whole call.  Chunk ``k`` of a feature holds ``min(chunk, total - k * chunk)``
values.

Tables (rows named in :mod:`numbabn._core`, one column per feature):

* ``stats``, float64: ``MEAN``, ``INVSTD``, ``VAR``, ``M2``;
* ``sums``, float64: ``SUM_DY``, ``SUM_DY_XHI``, ``SUM_XHI`` and
  ``SUM_DY_XMU`` (this module's, the second sum about the given mean);
* ``coef``, the input's dtype: ``HI``, ``SCALE``, ``OFFSET`` (forward) or
  ``HI``, ``DX_SCALE``, ``XC_COEF``, ``DY_SHIFT`` (backward), then the results
  returned in the input's dtype: ``X_MEAN``, ``X_INVSTD``, ``X_VAR`` (forward)
  or ``X_DWEIGHT``, ``X_DBIAS`` (backward).

Numerics
--------
* Reductions accumulate in float64 whatever the input dtype.  The forward sums
  ``x - pivot`` and its square about the chunk's first value, so the
  cancellation in ``M2`` is bounded by the chunk; the merge orders depend on the
  shape only, so results are bitwise reproducible.
* Elementwise passes compute in the input dtype.  ``HI`` is the float64 mean
  rounded to the input dtype, so ``x - HI`` is exact near the mean, and the
  rounding ``mean - HI`` is folded into ``OFFSET`` / ``DY_SHIFT`` in float64 by
  the core: this keeps ``1e4 + 1e-2*randn`` accurate in float32.
* No warp shuffles: reductions use shared memory and ``syncthreads`` only, so the
  CUDA simulator runs exactly these kernels.
* Kernels never check anything.  A NaN stays in its feature: NaN-safe selects
  (never ``max``/``min`` on data) and no fast-math flags.

Compile-time constants: ``GPU_MAX_THREADS`` (the shared-memory buffers) and
``GPU_UNROLL`` (the per-thread load buffers) are read from
:mod:`numbabn._config` once, when this module is imported, and frozen into the
compiled (and disk-cached) kernels; every other tunable is a kernel argument.
"""

import numpy as np
from numba import cuda, float64

from .. import _cache, _core
from .._config import GPU_JIT, GPU_MAX_THREADS, GPU_UNROLL
from .._core import (DX_SCALE, DY_SHIFT, HI, INVSTD, M2, MEAN, NCOEFS, NSUMS, OFFSET, SCALE,
                     SUM_DY, SUM_DY_XHI, SUM_XHI, VAR, XC_COEF)

# The statistics core, compiled as device functions.
shifted_moments = cuda.jit(device=True, **GPU_JIT)(_core.shifted_moments)
chan_merge = cuda.jit(device=True, **GPU_JIT)(_core.chan_merge)
invstd_of = cuda.jit(device=True, **GPU_JIT)(_core.invstd_of)
affine_coefs = cuda.jit(device=True, **GPU_JIT)(_core.affine_coefs)
sum_dy_xmu_about = cuda.jit(device=True, **GPU_JIT)(_core.sum_dy_xmu_about)
backward_coefs = cuda.jit(device=True, **GPU_JIT)(_core.backward_coefs)
parameter_grads = cuda.jit(device=True, **GPU_JIT)(_core.parameter_grads)

# The float64 sums table: the core's rows, then sum(dy * (x - mean)) about the given mean.
SUM_DY_XMU = NSUMS
NSUM_ROWS = NSUMS + 1
# The coefficient table: the core's rows, then the results in the input's dtype.
X_MEAN, X_INVSTD, X_VAR = NCOEFS + MEAN, NCOEFS + INVSTD, NCOEFS + VAR  # forward
X_DWEIGHT, X_DBIAS = NCOEFS, NCOEFS + 1  # backward
NCOEF_ROWS = NCOEFS + 3


# --------------------------------------------------------------------------- #
# Block-level reductions over shared memory.  ``lane`` counts the threads being
# reduced together (0 .. nlanes-1); they sit ``stride`` slots apart in the
# buffers, so an NC block reduces over its rows separately for each feature.
# The tree is fixed by ``nlanes``: deterministic.
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _tree_sum(sh, nsums, slot, lane, nlanes, stride):
    """Sum rows ``0 .. nsums-1`` of ``sh`` over the lanes; lane 0's slot gets the totals."""
    half = 1
    while half < nlanes:
        half *= 2
    half //= 2
    while half > 0:
        cuda.syncthreads()
        if lane < half and lane + half < nlanes:
            other = slot + half * stride
            for q in range(nsums):
                sh[q, slot] += sh[q, other]
        half //= 2
    cuda.syncthreads()


@cuda.jit(device=True, **GPU_JIT)
def _tree_chan(sh, t, nthreads):
    """Chan-merge (count, mean, M2) in rows 0, 1, 2 of ``sh`` over a 1-D block;
    thread 0's slot gets the total."""
    half = 1
    while half < nthreads:
        half *= 2
    half //= 2
    while half > 0:
        cuda.syncthreads()
        if t < half and t + half < nthreads:
            o = t + half
            sh[0, t], sh[1, t], sh[2, t] = chan_merge(sh[0, t], sh[1, t], sh[2, t],
                                                      sh[0, o], sh[1, o], sh[2, o])
        half //= 2
    cuda.syncthreads()


@cuda.jit(device=True, **GPU_JIT)
def _imin(a, b):
    """Integer minimum (the ``min`` builtin is not used in kernels)."""
    return a if a < b else b


@cuda.jit(device=True, **GPU_JIT)
def _chunk_count(k, chunk, total):
    """Values in chunk ``k`` of a feature, as float64."""
    return np.float64(_imin(chunk, total - k * chunk))


@cuda.jit(device=True, **GPU_JIT)
def _zero_like(a):
    """0 in the dtype of array ``a`` (for the ReLU's comparisons and stores)."""
    z = cuda.local.array(1, a.dtype)
    z[0] = 0
    return z[0]


@cuda.jit(device=True, **GPU_JIT)
def _param(v, c, present, fill):
    """``v[c]`` in float64, or ``fill`` for an absent weight or bias."""
    return np.float64(v[c]) if present else fill


# --------------------------------------------------------------------------- #
# Walking one feature's values in an NCHW block.  Value number i of feature c is
# x[i // inner, c, i % inner]; a thread visits i = start + t, + nthreads, ...
# and steps (r, j) with a carry instead of dividing for every value.
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _nchw_block(nchunks, inner, total, items):
    """This block's feature, chunk, first and last+1 value numbers."""
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
    """This thread's feature (``nfeat`` or more past the last one), the clamped
    feature it loads and derives coefficients for, the row block and its rows."""
    ntiles = (nfeat + cuda.blockDim.x - 1) // cuda.blockDim.x
    rb = cuda.blockIdx.x // ntiles
    tile = cuda.blockIdx.x - rb * ntiles
    c = tile * cuda.blockDim.x + cuda.threadIdx.x
    r0 = rb * rows_per_block
    r1 = _imin(r0 + rows_per_block, nrows)
    return c, _imin(c, nfeat - 1), rb, r0, r1


# --------------------------------------------------------------------------- #
# Forward statistics: moments per chunk, then a fixed-order merge per feature
# that fills the statistics and coefficient tables.
# --------------------------------------------------------------------------- #
@cuda.jit(**GPU_JIT)
def moments_partials_nchw(x, geom, partials):
    """``partials[0, k, c], partials[1, k, c]`` = mean, M2 of chunk k of feature c."""
    outer, nfeat, inner = x.shape
    c, k, start, stop = _nchw_block(partials.shape[1], inner, outer * inner, geom.items)
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
    for _ in range(0, geom.items, GPU_UNROLL):
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
    sh = cuda.shared.array((2, GPU_MAX_THREADS), float64)
    sh[0, t] = s1
    sh[1, t] = s2
    _tree_sum(sh, 2, t, t, nthreads, 1)
    if t == 0:
        partials[0, k, c], partials[1, k, c] = shifted_moments(
            np.float64(stop - start), pivot, sh[0, 0], sh[1, 0])


@cuda.jit(**GPU_JIT)
def moments_partials_nc(x, geom, partials):
    """As :func:`moments_partials_nchw` with k the row block, for channel-contiguous x."""
    nrows, nfeat, _ = x.shape
    rows = geom.chunk
    c, cl, rb, r0, r1 = _nc_block(nfeat, nrows, rows)
    ty = cuda.threadIdx.y
    nty = cuda.blockDim.y
    pivot = np.float64(x[r0, cl, 0])
    vals = cuda.local.array(GPU_UNROLL, x.dtype)
    s1 = 0.0
    s2 = 0.0
    for r in range(r0 + ty, r0 + rows, GPU_UNROLL * nty):
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
    sh = cuda.shared.array((2, GPU_MAX_THREADS), float64)
    sh[0, slot] = s1
    sh[1, slot] = s2
    _tree_sum(sh, 2, slot, ty, nty, cuda.blockDim.x)
    if ty == 0 and c < nfeat:
        partials[0, rb, c], partials[1, rb, c] = shifted_moments(
            np.float64(r1 - r0), pivot, sh[0, slot], sh[1, slot])


@cuda.jit(device=True, **GPU_JIT)
def _store_forward(c, n, mean, m2, eps, weight, bias, has_weight, has_bias, stats, coef):
    """Feature ``c``'s statistics (float64) and coefficients (input dtype), as
    the CPU's ``_store_forward``, plus the results in the input's dtype."""
    var = m2 / n
    invstd = invstd_of(var, eps)
    stats[MEAN, c] = mean
    stats[INVSTD, c] = invstd
    stats[VAR, c] = var
    stats[M2, c] = m2
    coef[HI, c] = mean
    coef[SCALE, c], coef[OFFSET, c] = affine_coefs(
        mean, np.float64(coef[HI, c]), invstd, _param(weight, c, has_weight, 1.0),
        _param(bias, c, has_bias, 0.0))
    coef[X_MEAN, c] = mean
    coef[X_INVSTD, c] = invstd
    coef[X_VAR, c] = var


@cuda.jit(**GPU_JIT)
def merge_moments(partials, geom, weight, bias, has_weight, has_bias, eps, stats, coef):
    """One block per feature: Chan-merge the chunk moments (each thread its
    chunks in order, then a fixed tree), then fill ``stats`` and ``coef``."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for k in range(t, partials.shape[1], nthreads):
        n, mean, m2 = chan_merge(n, mean, m2, _chunk_count(k, geom.chunk, geom.total),
                                 partials[0, k, c], partials[1, k, c])
    sh = cuda.shared.array((3, GPU_MAX_THREADS), float64)
    sh[0, t] = n
    sh[1, t] = mean
    sh[2, t] = m2
    _tree_chan(sh, t, nthreads)
    if t == 0:
        _store_forward(c, sh[0, 0], sh[1, 0], sh[2, 0], eps, weight, bias, has_weight,
                       has_bias, stats, coef)


# --------------------------------------------------------------------------- #
# Forward elementwise pass, in the input dtype: y = (x - HI) * SCALE + OFFSET.
# The ``_*_block`` device functions do one block's share; the kernels differ in
# where the coefficients come from (the table, or derived per thread).
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _affine_block_nchw(x, c, start, stop, items, hi, scale, offset, relu, y):
    inner = x.shape[2]
    zero = _zero_like(x)
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
                v = (vals[u] - hi) * scale + offset
                if relu and v < zero:  # NaN and -0.0 stay, as torch.relu
                    v = zero
                y[rs, c, js] = v
            rs, js = _step(rs, js, dr, dj, inner)
        i += GPU_UNROLL * nthreads


@cuda.jit(device=True, **GPU_JIT)
def _affine_block_nc(x, c, cl, r0, r1, rows, hi, scale, offset, relu, y):
    nfeat = x.shape[1]
    zero = _zero_like(x)
    nty = cuda.blockDim.y
    vals = cuda.local.array(GPU_UNROLL, x.dtype)
    for r in range(r0 + cuda.threadIdx.y, r0 + rows, GPU_UNROLL * nty):
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            vals[u] = x[ru if ru < r1 else r0, cl, 0]
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            if ru < r1 and c < nfeat:
                v = (vals[u] - hi) * scale + offset
                if relu and v < zero:
                    v = zero
                y[ru, c, 0] = v


@cuda.jit(device=True, **GPU_JIT)
def _given_affine_coefs(c, mean, spread, spread_is_var, eps, weight, bias, has_weight,
                        has_bias, p):
    """Feature ``c``'s forward coefficients into ``p`` (a local array of the input
    dtype, rows HI, SCALE, OFFSET) from a given mean and var (``spread_is_var``)
    or invstd: the CPU's ``_normalize_coefs``, one feature."""
    m = np.float64(mean[c])
    invstd = invstd_of(np.float64(spread[c]), eps) if spread_is_var else np.float64(spread[c])
    p[HI] = m
    p[SCALE], p[OFFSET] = affine_coefs(m, np.float64(p[HI]), invstd,
                                       _param(weight, c, has_weight, 1.0),
                                       _param(bias, c, has_bias, 0.0))


@cuda.jit(**GPU_JIT)
def affine_nchw(x, coef, relu, geom, y):
    """The affine pass from the coefficient table; with ``relu`` through a ReLU
    (``max(v, 0)`` keeping NaN and -0.0: the fused ``batch_norm_relu_train``)."""
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(cuda.gridDim.x // nfeat, inner, outer * inner, geom.items)
    _affine_block_nchw(x, c, start, stop, geom.items, coef[HI, c], coef[SCALE, c],
                       coef[OFFSET, c], relu, y)


@cuda.jit(**GPU_JIT)
def affine_nc(x, coef, relu, geom, y):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1 = _nc_block(nfeat, nrows, geom.chunk)
    _affine_block_nc(x, c, cl, r0, r1, geom.chunk, coef[HI, cl], coef[SCALE, cl],
                     coef[OFFSET, cl], relu, y)


@cuda.jit(**GPU_JIT)
def normalize_nchw(x, mean, spread, spread_is_var, eps, weight, bias, has_weight, has_bias,
                   geom, y):
    """The affine pass in one launch, each thread deriving its feature's
    coefficients from ``mean`` and ``spread`` (var or invstd)."""
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(cuda.gridDim.x // nfeat, inner, outer * inner, geom.items)
    p = cuda.local.array(NCOEFS, x.dtype)
    _given_affine_coefs(c, mean, spread, spread_is_var, eps, weight, bias, has_weight, has_bias,
                        p)
    _affine_block_nchw(x, c, start, stop, geom.items, p[HI], p[SCALE], p[OFFSET], False, y)


@cuda.jit(**GPU_JIT)
def normalize_nc(x, mean, spread, spread_is_var, eps, weight, bias, has_weight, has_bias, geom,
                 y):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1 = _nc_block(nfeat, nrows, geom.chunk)
    p = cuda.local.array(NCOEFS, x.dtype)
    _given_affine_coefs(cl, mean, spread, spread_is_var, eps, weight, bias, has_weight,
                        has_bias, p)
    _affine_block_nc(x, c, cl, r0, r1, geom.chunk, p[HI], p[SCALE], p[OFFSET], False, y)


# --------------------------------------------------------------------------- #
# Backward sums: per block, float64 sum(dy), sum(dy * (x - hi)), sum(x - hi),
# with ``hi`` the given mean rounded to the input's dtype (exact differences
# near the mean); then a fixed-order sum per feature.
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _hi_of(mean, c, dtype_like):
    """``mean[c]`` rounded to the dtype of the array ``dtype_like``, as float64."""
    h = cuda.local.array(1, dtype_like.dtype)
    h[0] = mean[c]
    return np.float64(h[0])


@cuda.jit(**GPU_JIT)
def backward_partials_nchw(dy, x, mean, y, masked, geom, partials):
    """``partials[:, k, c]`` = the three sums of chunk k of feature c; with
    ``masked``, ``dy`` counts only where ``y > 0`` (the fused ReLU's backward:
    0 where ``y <= 0`` or NaN, whatever ``dy`` holds; ``y`` is unread otherwise)."""
    outer, nfeat, inner = x.shape
    c, k, start, stop = _nchw_block(partials.shape[1], inner, outer * inner, geom.items)
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    hi = _hi_of(mean, c, x)
    zero = _zero_like(x)
    r0 = start // inner
    j0 = start - r0 * inner
    i = start + t
    r = i // inner
    j = i - r * inner
    dr = nthreads // inner
    dj = nthreads - dr * inner
    xs = cuda.local.array(GPU_UNROLL, x.dtype)
    gs = cuda.local.array(GPU_UNROLL, x.dtype)
    ys = cuda.local.array(GPU_UNROLL, x.dtype)
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for _ in range(0, geom.items, GPU_UNROLL):
        for u in range(GPU_UNROLL):
            ok = i + u * nthreads < stop
            rl = r if ok else r0
            jl = j if ok else j0
            xs[u] = x[rl, c, jl]
            gs[u] = dy[rl, c, jl]
            if masked:
                ys[u] = y[rl, c, jl]
            r, j = _step(r, j, dr, dj, inner)
        for u in range(GPU_UNROLL):
            g = np.float64(gs[u])
            if masked and not ys[u] > zero:
                g = 0.0
            xc = np.float64(xs[u]) - hi
            if i + u * nthreads >= stop:
                g = 0.0
                xc = 0.0
            sdy += g
            sdyxc += g * xc
            sxc += xc
        i += GPU_UNROLL * nthreads
    sh = cuda.shared.array((NSUMS, GPU_MAX_THREADS), float64)
    sh[SUM_DY, t] = sdy
    sh[SUM_DY_XHI, t] = sdyxc
    sh[SUM_XHI, t] = sxc
    _tree_sum(sh, NSUMS, t, t, nthreads, 1)
    if t == 0:
        for q in range(NSUMS):
            partials[q, k, c] = sh[q, 0]


@cuda.jit(**GPU_JIT)
def backward_partials_nc(dy, x, mean, y, masked, geom, partials):
    """As :func:`backward_partials_nchw` with k the row block, for channel-contiguous x."""
    nrows, nfeat, _ = x.shape
    rows = geom.chunk
    c, cl, rb, r0, r1 = _nc_block(nfeat, nrows, rows)
    ty = cuda.threadIdx.y
    nty = cuda.blockDim.y
    hi = _hi_of(mean, cl, x)
    zero = _zero_like(x)
    xs = cuda.local.array(GPU_UNROLL, x.dtype)
    gs = cuda.local.array(GPU_UNROLL, x.dtype)
    ys = cuda.local.array(GPU_UNROLL, x.dtype)
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for r in range(r0 + ty, r0 + rows, GPU_UNROLL * nty):
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            rl = ru if ru < r1 else r0
            xs[u] = x[rl, cl, 0]
            gs[u] = dy[rl, cl, 0]
            if masked:
                ys[u] = y[rl, cl, 0]
        for u in range(GPU_UNROLL):
            g = np.float64(gs[u])
            if masked and not ys[u] > zero:
                g = 0.0
            xc = np.float64(xs[u]) - hi
            if r + u * nty >= r1:
                g = 0.0
                xc = 0.0
            sdy += g
            sdyxc += g * xc
            sxc += xc
    slot = ty * cuda.blockDim.x + cuda.threadIdx.x
    sh = cuda.shared.array((NSUMS, GPU_MAX_THREADS), float64)
    sh[SUM_DY, slot] = sdy
    sh[SUM_DY_XHI, slot] = sdyxc
    sh[SUM_XHI, slot] = sxc
    _tree_sum(sh, NSUMS, slot, ty, nty, cuda.blockDim.x)
    if ty == 0 and c < nfeat:
        for q in range(NSUMS):
            partials[q, rb, c] = sh[q, slot]


@cuda.jit(device=True, **GPU_JIT)
def _store_backward(c, n, sdy, sdyxhi, sxhi, hi, invstd, weight, coef):
    """Coefficients of dx about the exact batch mean ``hi + sxhi / n`` (``hi``,
    the saved mean, may have been rounded to float32) and the parameter grads:
    the CPU's ``_store_backward``."""
    mean = hi + sxhi / n
    sum_dy_xmu = sum_dy_xmu_about(sdy, sdyxhi, hi, mean)
    coef[HI, c] = mean
    coef[DX_SCALE, c], coef[XC_COEF, c], coef[DY_SHIFT, c] = backward_coefs(
        n, sdy, sum_dy_xmu, mean, np.float64(coef[HI, c]), invstd, weight)
    coef[X_DWEIGHT, c], coef[X_DBIAS, c] = parameter_grads(invstd, sdy, sum_dy_xmu)


@cuda.jit(**GPU_JIT)
def merge_backward_sums(partials, geom, mean, invstd, weight, has_weight, write_coefs, sums,
                        coef):
    """One block per feature: add the block sums (each thread its chunks in
    order, then a fixed tree) into ``sums``; then with ``write_coefs`` the dx
    coefficients and parameter gradients into ``coef`` (``batch_norm_backward``),
    else ``SUM_DY_XMU`` about the given ``mean`` (``batch_norm_backward_reduce``)."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    sdy = 0.0
    sdyxhi = 0.0
    sxhi = 0.0
    for k in range(t, partials.shape[1], nthreads):
        sdy += partials[SUM_DY, k, c]
        sdyxhi += partials[SUM_DY_XHI, k, c]
        sxhi += partials[SUM_XHI, k, c]
    sh = cuda.shared.array((NSUMS, GPU_MAX_THREADS), float64)
    sh[SUM_DY, t] = sdy
    sh[SUM_DY_XHI, t] = sdyxhi
    sh[SUM_XHI, t] = sxhi
    _tree_sum(sh, NSUMS, t, t, nthreads, 1)
    if t == 0:
        sdy = sh[SUM_DY, 0]
        sdyxhi = sh[SUM_DY_XHI, 0]
        sxhi = sh[SUM_XHI, 0]
        sums[SUM_DY, c] = sdy
        sums[SUM_DY_XHI, c] = sdyxhi
        sums[SUM_XHI, c] = sxhi
        coef[HI, c] = mean[c]
        hi = np.float64(coef[HI, c])  # the partials' centre: mean in the input's dtype
        if write_coefs:
            _store_backward(c, np.float64(geom.total), sdy, sdyxhi, sxhi, hi,
                            np.float64(invstd[c]), _param(weight, c, has_weight, 1.0), coef)
        else:
            sums[SUM_DY_XMU, c] = sum_dy_xmu_about(sdy, sdyxhi, hi, np.float64(mean[c]))


# --------------------------------------------------------------------------- #
# Backward elementwise pass, in the input dtype:
#   dx = (dy + (x - HI) * XC_COEF + DY_SHIFT) * DX_SCALE
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _dx_block_nchw(dy, x, c, start, stop, items, hi, a, b, d, y, masked, dx):
    inner = x.shape[2]
    zero = _zero_like(x)
    nthreads = cuda.blockDim.x
    r0 = start // inner
    j0 = start - r0 * inner
    i = start + cuda.threadIdx.x
    r = i // inner
    j = i - r * inner
    dr = nthreads // inner
    dj = nthreads - dr * inner
    xs = cuda.local.array(GPU_UNROLL, x.dtype)
    gs = cuda.local.array(GPU_UNROLL, x.dtype)
    ys = cuda.local.array(GPU_UNROLL, x.dtype)
    for _ in range(0, items, GPU_UNROLL):
        rs, js = r, j
        for u in range(GPU_UNROLL):
            ok = i + u * nthreads < stop
            rl = r if ok else r0
            jl = j if ok else j0
            xs[u] = x[rl, c, jl]
            gs[u] = dy[rl, c, jl]
            if masked:
                ys[u] = y[rl, c, jl]
            r, j = _step(r, j, dr, dj, inner)
        for u in range(GPU_UNROLL):
            if i + u * nthreads < stop:
                g = gs[u]
                if masked and not ys[u] > zero:
                    g = zero
                dx[rs, c, js] = (g + (xs[u] - hi) * b + d) * a
            rs, js = _step(rs, js, dr, dj, inner)
        i += GPU_UNROLL * nthreads


@cuda.jit(device=True, **GPU_JIT)
def _dx_block_nc(dy, x, c, cl, r0, r1, rows, hi, a, b, d, y, masked, dx):
    nfeat = x.shape[1]
    nty = cuda.blockDim.y
    zero = _zero_like(x)
    xs = cuda.local.array(GPU_UNROLL, x.dtype)
    gs = cuda.local.array(GPU_UNROLL, x.dtype)
    ys = cuda.local.array(GPU_UNROLL, x.dtype)
    for r in range(r0 + cuda.threadIdx.y, r0 + rows, GPU_UNROLL * nty):
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            rl = ru if ru < r1 else r0
            xs[u] = x[rl, cl, 0]
            gs[u] = dy[rl, cl, 0]
            if masked:
                ys[u] = y[rl, cl, 0]
        for u in range(GPU_UNROLL):
            ru = r + u * nty
            if ru < r1 and c < nfeat:
                g = gs[u]
                if masked and not ys[u] > zero:
                    g = zero
                dx[ru, c, 0] = (g + (xs[u] - hi) * b + d) * a


@cuda.jit(device=True, **GPU_JIT)
def _given_backward_coefs(c, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count, p):
    """Feature ``c``'s dx coefficients into ``p`` (a local array of the input
    dtype, rows HI, DX_SCALE, XC_COEF, DY_SHIFT) from given sums over ``count``
    values: the CPU's ``_elemt_backward_coefs``, one feature."""
    m = np.float64(mean[c])
    p[HI] = m
    p[DX_SCALE], p[XC_COEF], p[DY_SHIFT] = backward_coefs(
        count, np.float64(sum_dy[c]), np.float64(sum_dy_xmu[c]), m, np.float64(p[HI]),
        np.float64(invstd[c]), _param(weight, c, has_weight, 1.0))


@cuda.jit(**GPU_JIT)
def dx_nchw(dy, x, coef, y, masked, geom, dx):
    """The dx pass from the coefficient table; ``dy`` masked by ``y > 0`` with
    ``masked``, as in :func:`backward_partials_nchw`."""
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(cuda.gridDim.x // nfeat, inner, outer * inner, geom.items)
    _dx_block_nchw(dy, x, c, start, stop, geom.items, coef[HI, c], coef[DX_SCALE, c],
                   coef[XC_COEF, c], coef[DY_SHIFT, c], y, masked, dx)


@cuda.jit(**GPU_JIT)
def dx_nc(dy, x, coef, y, masked, geom, dx):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1 = _nc_block(nfeat, nrows, geom.chunk)
    _dx_block_nc(dy, x, c, cl, r0, r1, geom.chunk, coef[HI, cl], coef[DX_SCALE, cl],
                 coef[XC_COEF, cl], coef[DY_SHIFT, cl], y, masked, dx)


@cuda.jit(**GPU_JIT)
def backward_elemt_nchw(dy, x, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count,
                        geom, dx):
    """The dx pass in one launch, each thread deriving its feature's
    coefficients from the given sums (over ``count`` values, the whole batch)."""
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(cuda.gridDim.x // nfeat, inner, outer * inner, geom.items)
    p = cuda.local.array(NCOEFS, x.dtype)
    _given_backward_coefs(c, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count, p)
    _dx_block_nchw(dy, x, c, start, stop, geom.items, p[HI], p[DX_SCALE], p[XC_COEF],
                   p[DY_SHIFT], dy, False, dx)


@cuda.jit(**GPU_JIT)
def backward_elemt_nc(dy, x, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count, geom,
                      dx):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1 = _nc_block(nfeat, nrows, geom.chunk)
    p = cuda.local.array(NCOEFS, x.dtype)
    _given_backward_coefs(cl, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count, p)
    _dx_block_nc(dy, x, c, cl, r0, r1, geom.chunk, p[HI], p[DX_SCALE], p[XC_COEF],
                 p[DY_SHIFT], dy, False, dx)


# --------------------------------------------------------------------------- #
# Small per-feature and data-movement kernels.
# --------------------------------------------------------------------------- #
@cuda.jit(**GPU_JIT)
def update_running_stats(running_mean, running_var, mean, var, unbias, momentum):
    """running = (1 - momentum) * running + momentum * batch, in float64, in place
    (``mean``/``var`` in the running dtype or float64)."""
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


# Before any kernel above loads from the disk cache: GPU_MAX_THREADS and
# GPU_UNROLL are compiled in, so the cache is keyed on them (numbabn._cache).
_cache.check(globals())
