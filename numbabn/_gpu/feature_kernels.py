"""numba.cuda kernels.  Private: inputs are validated and shaped by ``ops.py``.

The per-feature maths is :mod:`numbabn._core`'s, compiled here as device
functions (the CPU twins in :mod:`numbabn._cpu.feature_kernels` compile the same
functions), and the tables the kernels fill use its row names.  Each operation
runs these phases, named as the CPU's:

* ``moments_*``: ``(mean, M2)`` of each block's chunk of a feature (float64
  sums about the chunk's first value, then ``shifted_moments``), stored as a
  float64 partial; then, in the same launch, the block that finishes a
  feature's chunks last ("last block done", below) Chan-merges them
  (``chan_merge``) in a fixed order and writes the float64 statistics table
  and the coefficients ``HI``, ``SCALE``, ``OFFSET`` (``invstd_of``,
  ``affine_coefs``);
* ``affine_*``: ``y = (x - HI) * SCALE + OFFSET`` from the coefficient table
  (optionally through a ReLU: the fused ``batch_norm_relu_train``);
* ``normalize_*``: the same pass with each thread deriving its feature's
  coefficients from a given mean and var (eval) or invstd (``batch_norm_elemt``);
* ``backward_sums_*``: float64 ``sum(dy)``, ``sum(dy * (x - hi))``,
  ``sum(x - hi)`` per block, ``hi`` the given mean rounded to the input's
  dtype; then the last block of a feature adds the block sums in a fixed order,
  writes the float64 sums table and either ``sum_dy_xmu_about`` the given mean
  (``batch_norm_backward_reduce``) or the coefficients of dx about the exact
  batch mean ``hi + sum(x - hi) / n`` and the parameter gradients
  (``backward_coefs``, ``parameter_grads``), as the CPU's fused backward;
* ``dx_*``: ``dx = (dy + (x - HI) * XC_COEF + DY_SHIFT) * DX_SCALE`` from the
  coefficient table (the fused ReLU's backward masks ``dy`` by ``y > 0`` here and
  in ``backward_sums_*``);
* ``backward_elemt_*``: the same pass with each thread deriving its feature's
  coefficients from given sums (``batch_norm_backward_elemt``).

So a training forward is two launches (``moments_*``, ``affine_*``), a
backward two (``backward_sums_*``, ``dx_*``), statistics alone or backward sums
alone one, and eval one (``normalize_*``).

Last block done.  A reduction block stores its float64 partial (chunk ``k`` of
feature ``c`` at ``partials[:, k, c]``), fences, and one thread takes a ticket
with an atomic add on an int32 counter: one counter per feature (NCHW) or per
feature tile (NC), from a workspace that the host keeps zeroed between calls
(``launch.counters``).  The block that draws the last ticket resets the counter
to 0 and merges ALL partials of its feature(s) in chunk order, exactly as
``geom.lanes`` threads would (lane ``t`` takes chunks ``t, t + lanes, ...``, then
a fixed tree over the lanes), whichever block that is and whatever order the
blocks finished in: results do not depend on scheduling and are bitwise those
of a separate merge launch of ``lanes`` threads per feature.  ``geom.reverse``
maps block ``b`` to place ``nblocks - 1 - b`` of the partition, so that under
the simulator (which runs blocks in index order) the block holding chunk 0
finishes last; the results must not change.

Two families, chosen by the layout of ``x`` seen as ``(outer, C, inner)``:

* ``*_nchw`` (``inner > 1``): a block handles ``blockDim * geom.items``
  consecutive values of one feature (its ``outer`` runs of ``inner`` contiguous
  values seen as one sequence); consecutive threads read consecutive addresses;
* ``*_nc`` (``inner == 1``, channel-contiguous): a 2-D block of
  ``(features, rows)`` threads takes ``geom.chunk`` rows; a warp reads a
  contiguous run of features of a row, and each thread keeps one feature.

Both families use the same partition for reductions and elementwise passes, so
one launch geometry (``ops.Geometry``: ``items``, ``chunk``, ``total``,
``lanes``, ``reverse``) serves the whole call.  Chunk ``k`` of a feature holds
``min(chunk, total - k * chunk)`` values.

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
from numba import cuda, float64, int32

from .. import _cache, _core
from .._config import GPU_JIT, GPU_MAX_THREADS, GPU_UNROLL
from .._core import (DX_SCALE, DY_SHIFT, HI, INVSTD, MEAN, NCOEFS, NSUMS, OFFSET, SCALE, SUM_DY,
                     SUM_DY_XHI, SUM_XHI, VAR, XC_COEF)

# The statistics core, compiled as device functions.
shifted_moments = cuda.jit(device=True, **GPU_JIT)(_core.shifted_moments)
chan_merge = cuda.jit(device=True, **GPU_JIT)(_core.chan_merge)
invstd_of = cuda.jit(device=True, **GPU_JIT)(_core.invstd_of)
affine_coefs = cuda.jit(device=True, **GPU_JIT)(_core.affine_coefs)
sum_dy_xmu_about = cuda.jit(device=True, **GPU_JIT)(_core.sum_dy_xmu_about)
backward_coefs = cuda.jit(device=True, **GPU_JIT)(_core.backward_coefs)
parameter_grads = cuda.jit(device=True, **GPU_JIT)(_core.parameter_grads)
_imin = cuda.jit(device=True, **GPU_JIT)(_core.imin)
store_statistics = cuda.jit(device=True, **GPU_JIT)(_core.store_statistics)

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
def _lanes_chan(sh, nslots, nlanes, tid, nthreads):
    """Chan-merge (count, mean, M2) in rows 0, 1, 2 of ``sh`` over groups of
    ``nlanes`` consecutive slots (``nslots`` in all, any number of threads):
    each group's first slot gets its total.  The same fixed tree as one block of
    ``nlanes`` threads reducing ``lane < half`` with ``lane + half``."""
    half = 1
    while half < nlanes:
        half *= 2
    half //= 2
    while half > 0:
        cuda.syncthreads()
        for s in range(tid, nslots, nthreads):
            lane = s - (s // nlanes) * nlanes
            if lane < half and lane + half < nlanes:
                o = s + half
                sh[0, s], sh[1, s], sh[2, s] = chan_merge(sh[0, s], sh[1, s], sh[2, s],
                                                          sh[0, o], sh[1, o], sh[2, o])
        half //= 2
    cuda.syncthreads()


@cuda.jit(device=True, **GPU_JIT)
def _lanes_sum(sh, nsums, nslots, nlanes, tid, nthreads):
    """As :func:`_lanes_chan` for plain sums of rows ``0 .. nsums-1``."""
    half = 1
    while half < nlanes:
        half *= 2
    half //= 2
    while half > 0:
        cuda.syncthreads()
        for s in range(tid, nslots, nthreads):
            lane = s - (s // nlanes) * nlanes
            if lane < half and lane + half < nlanes:
                for q in range(nsums):
                    sh[q, s] += sh[q, s + half]
        half //= 2
    cuda.syncthreads()


# --------------------------------------------------------------------------- #
# "Last block done": each block of a reduction stores its float64 partial, then
# takes a ticket; the block drawing a group's last ticket merges that group's
# partials (in chunk order, whatever the order the blocks finished in).
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _last_block(counters, slot, nblocks):
    """Whether this block is the last of the ``nblocks`` blocks counting on
    ``counters[slot]`` to finish (the same answer in every thread of the block).

    Call after this block stored its partials.  The pattern of a grid barrier:
    a block barrier, then one thread makes the block's partials visible
    device-wide (fence), draws a ticket (atomic add), and in the last block
    resets the counter to 0 for the next launch and fences again, so that the
    partials of the other blocks are read after their tickets; a block barrier
    shares the answer, and every thread of the last block fences before it
    reads (no load of a partial may be served from before the tickets).
    """
    flag = cuda.shared.array(1, int32)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
        cuda.threadfence()
        ticket = cuda.atomic.add(counters, slot, 1)
        last = ticket == nblocks - 1
        if last:
            counters[slot] = 0
            cuda.threadfence()
        flag[0] = 1 if last else 0
    cuda.syncthreads()
    if flag[0] != 0:
        cuda.threadfence()
        return True
    return False


@cuda.jit(device=True, **GPU_JIT)
def _flat_thread():
    """``(thread number, threads)`` of a 1-D or 2-D block."""
    return (cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x,
            cuda.blockDim.x * cuda.blockDim.y)


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
def _block_id(geom):
    """This block's place in the partition: ``blockIdx.x``, or counted from the
    end with ``geom.reverse`` (a test hook: the blocks then finish in the other
    order under the simulator, which runs them in index order)."""
    if geom.reverse:
        return cuda.gridDim.x - 1 - cuda.blockIdx.x
    return cuda.blockIdx.x


@cuda.jit(device=True, **GPU_JIT)
def _nchw_block(geom, nchunks, inner, total):
    """This block's feature, chunk, first and last+1 value numbers."""
    b = _block_id(geom)
    c = b // nchunks
    k = b - c * nchunks
    start = k * cuda.blockDim.x * geom.items
    stop = _imin(start + cuda.blockDim.x * geom.items, total)
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
def _nc_block(geom, nfeat, nrows):
    """This thread's feature (``nfeat`` or more past the last one), the clamped
    feature it loads and derives coefficients for, the row block, its rows and
    the feature tile."""
    ntiles = (nfeat + cuda.blockDim.x - 1) // cuda.blockDim.x
    b = _block_id(geom)
    rb = b // ntiles
    tile = b - rb * ntiles
    c = tile * cuda.blockDim.x + cuda.threadIdx.x
    r0 = rb * geom.chunk
    r1 = _imin(r0 + geom.chunk, nrows)
    return c, _imin(c, nfeat - 1), rb, r0, r1, tile


# --------------------------------------------------------------------------- #
# Forward statistics, one launch: moments per chunk, and in the last block of
# each feature (NCHW) or feature tile (NC) the merge of its chunk moments, which
# fills the statistics and coefficient tables.
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _store_forward(c, n, mean, m2, eps, weight, bias, has_weight, has_bias, stats, coef):
    """Feature ``c``'s statistics (float64) and coefficients (input dtype), as
    the CPU's ``_store_forward``, plus the results in the input's dtype."""
    var = m2 / n
    invstd = invstd_of(var, eps)
    store_statistics(stats, c, mean, invstd, var, m2)
    coef[HI, c] = mean
    coef[SCALE, c], coef[OFFSET, c] = affine_coefs(
        mean, np.float64(coef[HI, c]), invstd, _param(weight, c, has_weight, 1.0),
        _param(bias, c, has_bias, 0.0))
    coef[X_MEAN, c] = mean
    coef[X_INVSTD, c] = invstd
    coef[X_VAR, c] = var


def _merge_partials_kernel(accumulate, lanes, store):
    """A device function that reduces the per-chunk partials of features
    ``c0 .. c0+nf-1`` and stores each feature's result, the whole block taking
    part.  Per feature, as ``geom.lanes`` threads would: lane ``t`` folds chunks
    ``t, t + lanes, ...`` in order with ``accumulate`` (three float64 values),
    then ``lanes`` (a fixed tree over the lanes, :func:`_lanes_chan` or
    :func:`_lanes_sum`); features go side by side, as many as the block's
    threads hold lanes for.  ``store(c, a, b, e, geom, args)`` writes a
    feature's results; ``args`` is a tuple of whatever it needs."""

    @cuda.jit(device=True, **GPU_JIT)
    def merge(sh, partials, c0, nf, geom, args):
        tid, nthreads = _flat_thread()
        nlanes = geom.lanes
        nchunks = partials.shape[1]
        group = nthreads // nlanes
        if group < 1:
            group = 1
        for f0 in range(0, nf, group):
            nslots = _imin(group, nf - f0) * nlanes
            for s in range(tid, nslots, nthreads):
                f = s // nlanes
                c = c0 + f0 + f
                a = 0.0
                b = 0.0
                e = 0.0
                for k in range(s - f * nlanes, nchunks, nlanes):
                    a, b, e = accumulate(a, b, e, partials, k, c, geom)
                sh[0, s] = a
                sh[1, s] = b
                sh[2, s] = e
            lanes(sh, nslots, nlanes, tid, nthreads)
            for f in range(tid, nslots // nlanes, nthreads):
                s = f * nlanes
                store(c0 + f0 + f, sh[0, s], sh[1, s], sh[2, s], geom, args)
            cuda.syncthreads()

    return merge


@cuda.jit(device=True, **GPU_JIT)
def _chan_chunk(n, mean, m2, partials, k, c, geom):
    """Chan-merge chunk ``k``'s moments of feature ``c`` into ``(n, mean, m2)``."""
    return chan_merge(n, mean, m2, _chunk_count(k, geom.chunk, geom.total),
                      partials[0, k, c], partials[1, k, c])


@cuda.jit(device=True, **GPU_JIT)
def _store_moments(c, n, mean, m2, geom, args):
    weight, bias, has_weight, has_bias, eps, stats, coef = args
    _store_forward(c, n, mean, m2, eps, weight, bias, has_weight, has_bias, stats, coef)


_merge_moments = _merge_partials_kernel(_chan_chunk, _lanes_chan, _store_moments)
"""Merge the chunk moments of features ``c0 .. c0+nf-1`` and fill ``stats`` and
``coef`` (``args``: ``weight, bias, has_weight, has_bias, eps, stats, coef``)."""


@cuda.jit(**GPU_JIT)
def moments_nchw(x, weight, bias, has_weight, has_bias, eps, partials, counters, stats, geom,
                 coef):
    """``partials[0, k, c], partials[1, k, c]`` = mean, M2 of chunk k of feature
    c; the last of a feature's blocks to finish merges them (``counters[c]``)."""
    outer, nfeat, inner = x.shape
    nchunks = partials.shape[1]
    c, k, start, stop = _nchw_block(geom, nchunks, inner, outer * inner)
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
    sh = cuda.shared.array((3, GPU_MAX_THREADS), float64)
    sh[0, t] = s1
    sh[1, t] = s2
    _tree_sum(sh, 2, t, t, nthreads, 1)
    if t == 0:
        partials[0, k, c], partials[1, k, c] = shifted_moments(
            np.float64(stop - start), pivot, sh[0, 0], sh[1, 0])
    if _last_block(counters, c, nchunks):
        _merge_moments(sh, partials, c, 1, geom,
                       (weight, bias, has_weight, has_bias, eps, stats, coef))


@cuda.jit(**GPU_JIT)
def moments_nc(x, weight, bias, has_weight, has_bias, eps, partials, counters, stats, geom,
               coef):
    """As :func:`moments_nchw` with k the row block, for channel-contiguous x;
    the last of a feature tile's blocks merges the tile (``counters[tile]``)."""
    nrows, nfeat, _ = x.shape
    rows = geom.chunk
    c, cl, rb, r0, r1, tile = _nc_block(geom, nfeat, nrows)
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
    sh = cuda.shared.array((3, GPU_MAX_THREADS), float64)
    sh[0, slot] = s1
    sh[1, slot] = s2
    _tree_sum(sh, 2, slot, ty, nty, cuda.blockDim.x)
    if ty == 0 and c < nfeat:
        partials[0, rb, c], partials[1, rb, c] = shifted_moments(
            np.float64(r1 - r0), pivot, sh[0, slot], sh[1, slot])
    if _last_block(counters, tile, partials.shape[1]):
        c0 = tile * cuda.blockDim.x
        _merge_moments(sh, partials, c0, _imin(cuda.blockDim.x, nfeat - c0), geom,
                       (weight, bias, has_weight, has_bias, eps, stats, coef))


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
    or invstd: the CPU's ``normalize_coefs``, one feature."""
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
    c, _, start, stop = _nchw_block(geom, cuda.gridDim.x // nfeat, inner, outer * inner)
    _affine_block_nchw(x, c, start, stop, geom.items, coef[HI, c], coef[SCALE, c],
                       coef[OFFSET, c], relu, y)


@cuda.jit(**GPU_JIT)
def affine_nc(x, coef, relu, geom, y):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1, _ = _nc_block(geom, nfeat, nrows)
    _affine_block_nc(x, c, cl, r0, r1, geom.chunk, coef[HI, cl], coef[SCALE, cl],
                     coef[OFFSET, cl], relu, y)


@cuda.jit(**GPU_JIT)
def normalize_nchw(x, mean, spread, spread_is_var, eps, weight, bias, has_weight, has_bias,
                   geom, y):
    """The affine pass in one launch, each thread deriving its feature's
    coefficients from ``mean`` and ``spread`` (var or invstd)."""
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(geom, cuda.gridDim.x // nfeat, inner, outer * inner)
    p = cuda.local.array(NCOEFS, x.dtype)
    _given_affine_coefs(c, mean, spread, spread_is_var, eps, weight, bias, has_weight, has_bias,
                        p)
    _affine_block_nchw(x, c, start, stop, geom.items, p[HI], p[SCALE], p[OFFSET], False, y)


@cuda.jit(**GPU_JIT)
def normalize_nc(x, mean, spread, spread_is_var, eps, weight, bias, has_weight, has_bias, geom,
                 y):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1, _ = _nc_block(geom, nfeat, nrows)
    p = cuda.local.array(NCOEFS, x.dtype)
    _given_affine_coefs(cl, mean, spread, spread_is_var, eps, weight, bias, has_weight,
                        has_bias, p)
    _affine_block_nc(x, c, cl, r0, r1, geom.chunk, p[HI], p[SCALE], p[OFFSET], False, y)


# --------------------------------------------------------------------------- #
# Backward sums, one launch: per block, float64 sum(dy), sum(dy * (x - hi)),
# sum(x - hi), with ``hi`` the given mean rounded to the input's dtype (exact
# differences near the mean); in the last block of each feature (NCHW) or
# feature tile (NC), the fixed-order sum of its block sums.
# --------------------------------------------------------------------------- #
@cuda.jit(device=True, **GPU_JIT)
def _hi_of(mean, c, dtype_like):
    """``mean[c]`` rounded to the dtype of the array ``dtype_like``, as float64."""
    h = cuda.local.array(1, dtype_like.dtype)
    h[0] = mean[c]
    return np.float64(h[0])


@cuda.jit(**GPU_JIT)
def backward_sums_nchw(dy, x, mean, y, masked, invstd, weight, has_weight, write_coefs,
                       partials, counters, sums, geom, coef):
    """``partials[:, k, c]`` = the three sums of chunk k of feature c; with
    ``masked``, ``dy`` counts only where ``y > 0`` (the fused ReLU's backward:
    0 where ``y <= 0`` or NaN, whatever ``dy`` holds; ``y`` is unread otherwise).
    The last of a feature's blocks to finish adds them up (``counters[c]``, see
    :func:`_merge_backward_sums`)."""
    outer, nfeat, inner = x.shape
    nchunks = partials.shape[1]
    c, k, start, stop = _nchw_block(geom, nchunks, inner, outer * inner)
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
    if _last_block(counters, c, nchunks):
        _merge_backward_sums(sh, partials, c, 1, geom,
                             (mean, invstd, weight, has_weight, write_coefs, sums, coef))


@cuda.jit(**GPU_JIT)
def backward_sums_nc(dy, x, mean, y, masked, invstd, weight, has_weight, write_coefs, partials,
                     counters, sums, geom, coef):
    """As :func:`backward_sums_nchw` with k the row block, for channel-contiguous
    x; the last of a feature tile's blocks adds up the tile (``counters[tile]``)."""
    nrows, nfeat, _ = x.shape
    rows = geom.chunk
    c, cl, rb, r0, r1, tile = _nc_block(geom, nfeat, nrows)
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
    if _last_block(counters, tile, partials.shape[1]):
        c0 = tile * cuda.blockDim.x
        _merge_backward_sums(sh, partials, c0, _imin(cuda.blockDim.x, nfeat - c0), geom,
                             (mean, invstd, weight, has_weight, write_coefs, sums, coef))


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


@cuda.jit(device=True, **GPU_JIT)
def _store_sums(c, sdy, sdyxhi, sxhi, geom, mean, invstd, weight, has_weight, write_coefs, sums,
                coef):
    """Feature ``c``'s float64 sums into ``sums``; then with ``write_coefs`` the
    dx coefficients and parameter gradients into ``coef``
    (``batch_norm_backward``), else ``SUM_DY_XMU`` about the given ``mean``
    (``batch_norm_backward_reduce``)."""
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


@cuda.jit(device=True, **GPU_JIT)
def _add_chunk_sums(sdy, sdyxhi, sxhi, partials, k, c, geom):
    """Add chunk ``k``'s three backward sums of feature ``c``."""
    return (sdy + partials[SUM_DY, k, c], sdyxhi + partials[SUM_DY_XHI, k, c],
            sxhi + partials[SUM_XHI, k, c])


@cuda.jit(device=True, **GPU_JIT)
def _lanes_sums(sh, nslots, nlanes, tid, nthreads):
    _lanes_sum(sh, NSUMS, nslots, nlanes, tid, nthreads)


@cuda.jit(device=True, **GPU_JIT)
def _store_backward_sums(c, sdy, sdyxhi, sxhi, geom, args):
    mean, invstd, weight, has_weight, write_coefs, sums, coef = args
    _store_sums(c, sdy, sdyxhi, sxhi, geom, mean, invstd, weight, has_weight, write_coefs, sums,
                coef)


_merge_backward_sums = _merge_partials_kernel(_add_chunk_sums, _lanes_sums, _store_backward_sums)
"""Add up the block sums of features ``c0 .. c0+nf-1`` and store them
(:func:`_store_sums`; ``args``: ``mean, invstd, weight, has_weight, write_coefs,
sums, coef``)."""


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
    values: the CPU's ``elemt_backward_coefs``, one feature."""
    m = np.float64(mean[c])
    p[HI] = m
    p[DX_SCALE], p[XC_COEF], p[DY_SHIFT] = backward_coefs(
        count, np.float64(sum_dy[c]), np.float64(sum_dy_xmu[c]), m, np.float64(p[HI]),
        np.float64(invstd[c]), _param(weight, c, has_weight, 1.0))


@cuda.jit(**GPU_JIT)
def dx_nchw(dy, x, coef, y, masked, geom, dx):
    """The dx pass from the coefficient table; ``dy`` masked by ``y > 0`` with
    ``masked``, as in :func:`backward_sums_nchw`."""
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(geom, cuda.gridDim.x // nfeat, inner, outer * inner)
    _dx_block_nchw(dy, x, c, start, stop, geom.items, coef[HI, c], coef[DX_SCALE, c],
                   coef[XC_COEF, c], coef[DY_SHIFT, c], y, masked, dx)


@cuda.jit(**GPU_JIT)
def dx_nc(dy, x, coef, y, masked, geom, dx):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1, _ = _nc_block(geom, nfeat, nrows)
    _dx_block_nc(dy, x, c, cl, r0, r1, geom.chunk, coef[HI, cl], coef[DX_SCALE, cl],
                 coef[XC_COEF, cl], coef[DY_SHIFT, cl], y, masked, dx)


@cuda.jit(**GPU_JIT)
def backward_elemt_nchw(dy, x, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count,
                        geom, dx):
    """The dx pass in one launch, each thread deriving its feature's
    coefficients from the given sums (over ``count`` values, the whole batch)."""
    outer, nfeat, inner = x.shape
    c, _, start, stop = _nchw_block(geom, cuda.gridDim.x // nfeat, inner, outer * inner)
    p = cuda.local.array(NCOEFS, x.dtype)
    _given_backward_coefs(c, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count, p)
    _dx_block_nchw(dy, x, c, start, stop, geom.items, p[HI], p[DX_SCALE], p[XC_COEF],
                   p[DY_SHIFT], dy, False, dx)


@cuda.jit(**GPU_JIT)
def backward_elemt_nc(dy, x, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count, geom,
                      dx):
    nrows, nfeat, _ = x.shape
    c, cl, _, r0, r1, _ = _nc_block(geom, nfeat, nrows)
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
