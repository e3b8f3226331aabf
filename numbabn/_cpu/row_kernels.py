"""CPU per-row kernels and their host drivers: layer, group, instance and RMS norm.

The second reduction pattern of the statistics core (:mod:`numbabn._core`);
batch norm's per-feature pattern is :mod:`numbabn._cpu.feature_kernels`.  The GPU twins
are :mod:`numbabn._gpu.row_ops`, with the same host functions and signatures.

Layout.  ``x4`` is the ``(N, M, G, K)`` view of the input (see
:func:`numbabn._layout.plan_rows`): row ``r = n * G + g`` holds the values
``x4[n, :, g, :]``, ``M`` runs of ``K``; a C-contiguous input is
``(1, 1, rows, reduced)``.

Affine.  Value ``(m, k)`` of row ``r`` uses the weight and bias at
``a = (r % gmod) * arow + ((m * K + k) // adiv) % arow`` (an :data:`Affine`):

* LayerNorm, RMSNorm: ``gmod = 1``, ``arow`` = values per row, ``adiv = 1``:
  one weight per value (the weight is laid out in the row's memory order);
* GroupNorm: ``gmod = G``, ``arow = C / G``, ``adiv`` = values per channel run;
* InstanceNorm: ``gmod = C``, ``arow = 1``.

With ``adiv == 1`` consecutive values use consecutive weights and the pass is
``y = xhat * w + b``, ``xhat = (x - hi) * scale + offset`` with the row's
coefficients; otherwise runs of values share one weight and the pass is
``y = (x - hi) * scale + offset`` with the run's coefficients.  Either way the
coefficients come from ``_core.affine_coefs`` in float64 (``hi``: the row's
mean in the input's dtype, whose rounding goes into ``offset``).  RMSNorm is the
same pass about 0: its "variance" is the mean square ``var + mean**2``.

Phases:

* forward: each row is cut into chunks of ``mrows x kcols`` values of its
  ``(M, K)`` plane; a chunk's moments are float64 sums about its first value
  (``shifted_moments``), merged with ``chan_merge`` in chunk order; the row's
  coefficients; the elementwise pass in the input's dtype.
* backward: per row, float64 sums of ``g = dy * w``, ``g * (x - hi)`` and
  ``x - hi`` (``hi`` the saved mean; the last sum recovers the exact mean when
  it was rounded), by chunk, added in chunk order; ``_core.backward_coefs``;
  then ``dx = (g + (x - hi) * XC_COEF + DY_SHIFT) * DX_SCALE`` row by row, and
  the parameter gradients ``sum(dy * xhat)``, ``sum(dy)`` per affine index.
  Those are float64 partials per *parameter block* (``grad_rows`` rows with the
  same ``r % gmod``, fixed by the shape), merged in block order.

Paths.  *Fused*: one task per row (forward) or per parameter block (backward)
reads a row, then writes it while it is in cache.  *Two-phase* (long rows, few
rows): the chunks are reduced in parallel, merged per row, then the
elementwise pass runs.  Both run the same chunk code and merge in the same
order, so results do not depend on the path or on the thread count; merges are
in strict code (no ``reassoc``), only the sums inside one chunk are
reassociated (vectorised).

Rows that are one run of consecutive weights (``M == 1``, ``adiv == 1``,
``arow == K``: layer and RMS norm of rows contiguous in memory) take 1-D slices
of whole rows instead of the run bookkeeping (:func:`_one_run`; short rows pay
per call), and the backward adds their parameter-gradient terms four rows at a
time (:func:`_dx_grads_4`: a quarter of the float64 accumulators' loads and
stores).
"""

from collections import namedtuple

import numpy as np
from numba import njit, prange

from .. import _cache, _core
from .._config import (CPU_HELPER, CPU_HELPER_STRICT, CPU_JIT_PARALLEL, CPU_JIT_STRICT,
                       CPU_JIT_STRICT_PARALLEL)
from .._core import (CENTER, DX_SCALE, DY_SHIFT, HI, INVSTD, OFFSET, SCALE, XC_COEF, XHAT_OFFSET,
                     XHAT_SCALE)

# The statistics core, compiled once for the CPU in numbabn._cpu.feature_kernels.
from .feature_kernels import (_add_backward_sums_nc4, _block_backward_sums, _cdiv, _pow2_near,
                              affine_coefs, backward_coefs, chan_merge, invstd_of,
                              shifted_moments, store_statistics, sum_dy_xmu_about)
from .half import stored, value_of
from .runtime import inline_in_serial_code, serial_kernels

RowGeometry = namedtuple("RowGeometry", "mrows kcols fused grad_rows bwd_block")
"""A row's chunks are ``mrows`` runs by ``kcols`` values of its ``(M, K)``
plane; ``fused``: one task per row; ``grad_rows``: rows per parameter block;
``bwd_block``: values per block of the backward sums in the input's dtype."""


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _chunk_bounds(c, ncb, geom, M, K):
    """Runs ``[m0, m1)`` and values ``[k0, k1)`` of chunk ``c`` of a row."""
    m0 = (c // ncb) * geom.mrows
    k0 = (c % ncb) * geom.kcols
    return m0, min(m0 + geom.mrows, M), k0, min(k0 + geom.kcols, K)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _nchunks(geom, M, K):
    return _cdiv(M, geom.mrows) * _cdiv(K, geom.kcols), _cdiv(K, geom.kcols)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _one_run(x, aff):
    """Whether each row is one run of values with consecutive weights (layer and
    RMS norm of rows contiguous in memory): the loops need no run bookkeeping."""
    return x.shape[1] == 1 and aff.adiv == 1 and aff.arow == x.shape[3]


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _weight_run(m, k, k1, K, aff):
    """The run of values from ``k`` on that either uses consecutive weights
    (``adiv == 1``) or one weight: its end and its first index within the row's
    affine group."""
    f = m * K + k
    if aff.adiv == 1:
        j = f % aff.arow
        return min(k1, k + aff.arow - j), j
    q = f // aff.adiv
    return min(k1, (q + 1) * aff.adiv - m * K), q % aff.arow


# =========================================================================== #
# Forward
# =========================================================================== #
@njit(**CPU_HELPER)
def _chunk_sums(x, n, g, m0, m1, k0, k1, shift):
    s1 = 0.0
    s2 = 0.0
    for m in range(m0, m1):
        xr = x[n, m, g, k0:k1]
        for j in range(k1 - k0):
            d = np.float64(value_of(xr[j])) - shift
            s1 += d
            s2 += d * d
    return s1, s2


@njit(**CPU_HELPER)
def _run_sums(xr, shift):
    """:func:`_chunk_sums` of one run (rows of one run: ``M == 1``)."""
    s1 = 0.0
    s2 = 0.0
    for j in range(xr.shape[0]):
        d = np.float64(value_of(xr[j])) - shift
        s1 += d
        s2 += d * d
    return s1, s2


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _chunk_moments(x, n, g, m0, m1, k0, k1):
    """``(mean, M2)`` of one chunk, about its first value."""
    shift = np.float64(value_of(x[n, m0, g, k0]))
    if x.shape[1] == 1:  # one run per row: no loop over runs (cheaper for short rows)
        s1, s2 = _run_sums(x[n, 0, g, k0:k1], shift)
    else:
        s1, s2 = _chunk_sums(x, n, g, m0, m1, k0, k1, shift)
    return shifted_moments((m1 - m0) * (k1 - k0), shift, s1, s2)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _row_moments(x, n, g, geom):
    """``(count, mean, M2)`` of one row: its chunks merged in chunk order."""
    M, K = x.shape[1], x.shape[3]
    nch, ncb = _nchunks(geom, M, K)
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for c in range(nch):
        m0, m1, k0, k1 = _chunk_bounds(c, ncb, geom, M, K)
        mk, qk = _chunk_moments(x, n, g, m0, m1, k0, k1)
        cnt, mean, m2 = chan_merge(cnt, mean, m2, np.float64((m1 - m0) * (k1 - k0)), mk, qk)
    return cnt, mean, m2


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _merge_chunk_moments(p, r, geom, M, K):
    """As :func:`_row_moments` from the chunk moments ``p[0, r]``, ``p[1, r]``."""
    nch, ncb = _nchunks(geom, M, K)
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for c in range(nch):
        m0, m1, k0, k1 = _chunk_bounds(c, ncb, geom, M, K)
        cnt, mean, m2 = chan_merge(cnt, mean, m2, np.float64((m1 - m0) * (k1 - k0)),
                                   p[0, r, c], p[1, r, c])
    return cnt, mean, m2


_store_forward = _core.row_forward_writer(njit(**CPU_HELPER_STRICT), invstd_of, affine_coefs,
                                          store_statistics, np.float64)
"""Row ``r``'s statistics and the coefficients of ``xhat = (x - HI) * SCALE + OFFSET``."""


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _affine_each(xr, hi, s, o, w, b, yr):
    for j in range(xr.shape[0]):
        yr[j] = stored(((value_of(xr[j]) - hi) * s + o) * w[j] + b[j], yr)


@njit(inline="always", **CPU_HELPER_STRICT)  # a call per short run costs as much as its values
def _affine_run(xr, hi, s, o, yr):
    for j in range(xr.shape[0]):
        yr[j] = stored((value_of(xr[j]) - hi) * s + o, yr)


@njit(inline="always", **CPU_HELPER_STRICT)
def _weight_run_pass(xr, r, a, hi, coef, stats, weight, bias, yr):
    """``yr`` from ``xr``, a run of row ``r``'s values that share weight and
    bias ``a``: that run's coefficients (float64, then x's dtype), then the pass."""
    s, o = affine_coefs(stats[CENTER, r], np.float64(hi), stats[INVSTD, r],
                        np.float64(weight[a]), np.float64(bias[a]))
    _affine_run(xr, hi, coef.dtype.type(s), coef.dtype.type(o), yr)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _normalize_region(x, n, g, r, m0, m1, k0, k1, aff, coef, stats, weight, bias, y):
    """``y`` over runs ``[m0, m1)``, values ``[k0, k1)`` of row ``r``."""
    K = x.shape[3]
    hi = coef[HI, r]
    base = (r % aff.gmod) * aff.arow
    if _one_run(x, aff):  # the row is one run of consecutive weights
        s = coef[SCALE, r]
        o = coef[OFFSET, r]
        xr = x[n, 0, g, k0:k1]
        yr = y[n, 0, g, k0:k1]
        w = weight[base + k0:base + k1]
        b = bias[base + k0:base + k1]
        for j in range(k1 - k0):
            yr[j] = stored(((value_of(xr[j]) - hi) * s + o) * w[j] + b[j], yr)
        return
    for m in range(m0, m1):
        xr = x[n, m, g]
        yr = y[n, m, g]
        k = k0
        while k < k1:
            e, j = _weight_run(m, k, k1, K, aff)
            a = base + j
            if aff.adiv == 1:
                _affine_each(xr[k:e], hi, coef[SCALE, r], coef[OFFSET, r], weight[a:a + e - k],
                             bias[a:a + e - k], yr[k:e])
            else:
                _weight_run_pass(xr[k:e], r, a, hi, coef, stats, weight, bias, yr[k:e])
            k = e


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _one_run_forward(x, n, g, r, aff, eps, rms, geom, write_y, weight, bias, coef, stats, y):
    """The fused forward of a row that is one run (:func:`_one_run`): the same
    chunks, sums and merge as :func:`_row_moments`, and the pass of
    :func:`_normalize_region`, with the row as one 1-D slice."""
    xr = x[n, 0, g]
    K = xr.shape[0]
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for k0 in range(0, K, geom.kcols):
        k1 = min(k0 + geom.kcols, K)
        shift = np.float64(value_of(xr[k0]))
        s1, s2 = _run_sums(xr[k0:k1], shift)
        mk, qk = shifted_moments(k1 - k0, shift, s1, s2)
        cnt, mean, m2 = chan_merge(cnt, mean, m2, np.float64(k1 - k0), mk, qk)
    _store_forward(r, cnt, mean, m2, eps, rms, coef, stats)
    if not write_y:
        return
    hi = coef[HI, r]
    s = coef[SCALE, r]
    o = coef[OFFSET, r]
    base = (r % aff.gmod) * aff.arow
    w = weight[base:base + K]
    b = bias[base:base + K]
    yr = y[n, 0, g]
    for j in range(K):
        yr[j] = stored(((value_of(xr[j]) - hi) * s + o) * w[j] + b[j], yr)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _row_statistics(x, r, geom, eps, rms, coef, stats):
    """Row ``r``'s moments (:func:`_row_moments`) stored with its coefficients;
    returns the row's ``(n, g)``."""
    n, g = r // x.shape[2], r % x.shape[2]
    cnt, mean, m2 = _row_moments(x, n, g, geom)
    _store_forward(r, cnt, mean, m2, eps, rms, coef, stats)
    return n, g


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _runs_pass(x, n, g, r, aff, coef, stats, weight, bias, y):
    """:func:`_normalize_region` of a whole row of ``aff.arow`` runs of
    ``aff.adiv`` values (:func:`_whole_runs` in the host driver): the same
    coefficients and arithmetic per run, without the run bookkeeping."""
    hi = coef[HI, r]
    base = (r % aff.gmod) * aff.arow
    adiv = aff.adiv
    xr = x[n, 0, g]
    yr = y[n, 0, g]
    for j in range(aff.arow):
        _weight_run_pass(xr[j * adiv:(j + 1) * adiv], r, base + j, hi, coef, stats, weight, bias,
                         yr[j * adiv:(j + 1) * adiv])


# Each path is a kernel of its own (the host drivers choose), so that a call
# compiles only the loops it runs.
@njit(**CPU_JIT_PARALLEL)
def forward_one_run(x, weight, bias, aff, eps, rms, geom, write_y, coef, stats, y):
    """The fused forward of rows that are each one run of values with
    consecutive weights (:func:`_one_run`: layer and RMS norm of contiguous
    rows): row statistics of ``x`` into ``stats`` (rows MEAN, INVSTD, VAR, M2,
    CENTER) and the pass coefficients into ``coef``; with ``write_y`` the
    normalised output into ``y``."""
    N, M, G, K = x.shape
    for r_ in prange(N * G):
        r = np.int64(r_)
        _one_run_forward(x, r // G, r % G, r, aff, eps, rms, geom, write_y, weight, bias, coef,
                         stats, y)


@njit(**CPU_JIT_PARALLEL)
def forward_rows(x, weight, bias, aff, eps, rms, geom, write_y, coef, stats, y):
    """As :func:`forward_one_run` for rows of any runs: one task per row."""
    N, M, G, K = x.shape
    for r_ in prange(N * G):
        r = np.int64(r_)
        n, g = _row_statistics(x, r, geom, eps, rms, coef, stats)
        if write_y:
            _normalize_region(x, n, g, r, np.int64(0), M, np.int64(0), K, aff, coef, stats,
                              weight, bias, y)


@njit(**CPU_JIT_PARALLEL)
def forward_runs(x, weight, bias, aff, eps, rms, geom, write_y, coef, stats, y):
    """:func:`forward_rows` for rows that are ``aff.arow`` whole runs of
    ``aff.adiv`` values each (group and instance norm of NCHW data): the same
    statistics and bits, the elementwise pass run by run (:func:`_runs_pass`)."""
    N, M, G, K = x.shape
    for r_ in prange(N * G):
        r = np.int64(r_)
        n, g = _row_statistics(x, r, geom, eps, rms, coef, stats)
        if write_y:
            _runs_pass(x, n, g, r, aff, coef, stats, weight, bias, y)


@njit(**CPU_JIT_PARALLEL)
def forward_chunks(x, weight, bias, aff, eps, rms, geom, write_y, p, coef, stats, y):
    """As :func:`forward_rows`, two-phase (long rows, few rows): the chunks'
    moments into ``p`` (2, rows, chunks) in parallel, merged per row, then the
    elementwise pass by chunks."""
    N, M, G, K = x.shape
    rows = N * G
    nch, ncb = _nchunks(geom, M, K)
    for u_ in prange(rows * nch):
        u = np.int64(u_)
        r, c = u // nch, u % nch
        m0, m1, k0, k1 = _chunk_bounds(c, ncb, geom, M, K)
        p[0, r, c], p[1, r, c] = _chunk_moments(x, r // G, r % G, m0, m1, k0, k1)
    for r in range(rows):  # a few values per chunk of CHUNK_ELEMS: a plain loop
        cnt, mean, m2 = _merge_chunk_moments(p, r, geom, M, K)
        _store_forward(r, cnt, mean, m2, eps, rms, coef, stats)
    if write_y:
        for u_ in prange(rows * nch):
            u = np.int64(u_)
            r, c = u // nch, u % nch
            m0, m1, k0, k1 = _chunk_bounds(c, ncb, geom, M, K)
            _normalize_region(x, r // G, r % G, r, m0, m1, k0, k1, aff, coef, stats, weight,
                              bias, y)


# =========================================================================== #
# Backward
# =========================================================================== #
@njit(**CPU_HELPER)
def _sums_each(dyr, xr, w, hi):
    """float64 ``sum(g)``, ``sum(g * (x - hi))``, ``sum(x - hi)`` with ``g = dy * w``."""
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for j in range(xr.shape[0]):
        gj = np.float64(value_of(dyr[j])) * np.float64(w[j])
        d = np.float64(value_of(xr[j])) - hi
        s1 += gj
        s2 += gj * d
        s3 += d
    return s1, s2, s3


@njit(**CPU_HELPER)
def _sums_run(dyr, xr, hi):
    """As :func:`_sums_each` with ``w = 1`` (the caller scales by the run's weight)."""
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for j in range(xr.shape[0]):
        gj = np.float64(value_of(dyr[j]))
        d = np.float64(value_of(xr[j])) - hi
        s1 += gj
        s2 += gj * d
        s3 += d
    return s1, s2, s3


@njit(**CPU_HELPER)
def _block_sums_each(dyr, xr, w, hi, sc):
    """``sum(g)``, ``sum(g * xc)``, ``sum(xc)`` with ``g = dy * w`` and ``xc =
    (x - hi) * sc`` in the input's dtype (vector lanes of it) over one block."""
    a = hi - hi
    b = hi - hi
    e = hi - hi
    for j in range(xr.shape[0]):
        gj = value_of(dyr[j]) * w[j]
        xc = (value_of(xr[j]) - hi) * sc
        a += gj
        b += gj * xc
        e += xc
    return a, b, e


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _sums_each_blocked(dyr, xr, w, hi, rstd, block):
    """The three float64 sums of :func:`_sums_each` as batch norm's backward
    takes them: blocks of ``block`` values in the input's dtype with ``x - hi``
    scaled by a power of two near ``rstd`` (exact), each block added in
    float64 in order.  ``hi`` is the saved mean in the input's dtype; the
    blocks' dtype is the weight's (x's, or float32 for half inputs)."""
    dt = w.dtype.type
    hx = dt(hi)
    sc = dt(_pow2_near(rstd))
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for b0 in range(0, xr.shape[0], block):
        b1 = min(b0 + block, xr.shape[0])
        a, b, e = _block_sums_each(dyr[b0:b1], xr[b0:b1], w[b0:b1], hx, sc)
        s1 += np.float64(a)
        s2 += np.float64(b)
        s3 += np.float64(e)
    inv = 1.0 / np.float64(sc)  # a power of two: exact
    return s1, s2 * inv, s3 * inv


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _chunk_backward_sums(dy, x, n, g, r, m0, m1, k0, k1, aff, hi, weight, rstd, block):
    K = x.shape[3]
    base = (r % aff.gmod) * aff.arow
    if _one_run(x, aff):
        return _sums_each_blocked(dy[n, 0, g, k0:k1], x[n, 0, g, k0:k1],
                                  weight[base + k0:base + k1], hi, rstd, block)
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for m in range(m0, m1):
        xr = x[n, m, g]
        dyr = dy[n, m, g]
        k = k0
        while k < k1:
            e, j = _weight_run(m, k, k1, K, aff)
            a = base + j
            if aff.adiv == 1:
                t1, t2, t3 = _sums_each(dyr[k:e], xr[k:e], weight[a:a + e - k], hi)
            else:
                t1, t2, t3 = _sums_run(dyr[k:e], xr[k:e], hi)
                w = np.float64(weight[a])
                t1 *= w
                t2 *= w
            s1 += t1
            s2 += t2
            s3 += t3
            k = e
    return s1, s2, s3


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _row_backward_sums(dy, x, n, g, r, geom, aff, hi, weight, rstd, block):
    M, K = x.shape[1], x.shape[3]
    nch, ncb = _nchunks(geom, M, K)
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for c in range(nch):
        m0, m1, k0, k1 = _chunk_bounds(c, ncb, geom, M, K)
        t1, t2, t3 = _chunk_backward_sums(dy, x, n, g, r, m0, m1, k0, k1, aff, hi, weight,
                                          rstd, block)
        s1 += t1
        s2 += t2
        s3 += t3
    return s1, s2, s3


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _one_run_sums(dy, x, n, g, r, geom, aff, hi, weight, rstd, block):
    """:func:`_row_backward_sums` of a row that is one run (:func:`_one_run`):
    the same chunks, sums and order, without the runs' bookkeeping."""
    K = x.shape[3]
    base = (r % aff.gmod) * aff.arow
    xr = x[n, 0, g]
    dyr = dy[n, 0, g]
    w = weight[base:base + K]
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for k0 in range(0, K, geom.kcols):
        k1 = min(k0 + geom.kcols, K)
        t1, t2, t3 = _sums_each_blocked(dyr[k0:k1], xr[k0:k1], w[k0:k1], hi, rstd, block)
        s1 += t1
        s2 += t2
        s3 += t3
    return s1, s2, s3


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _sum_chunks(p, r):
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for c in range(p.shape[2]):
        s1 += p[0, r, c]
        s2 += p[1, r, c]
        s3 += p[2, r, c]
    return s1, s2, s3


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _store_backward(r, cnt, sg, sgx, sx, hi, rstd, rms, coef, bstat):
    """Coefficients of ``dx = (g + (x - HI) * XC_COEF + DY_SHIFT) * DX_SCALE``
    about the exact row mean ``hi + sx / cnt`` (``hi``, the saved mean, may have
    been rounded), and of the float64 ``xhat`` of the parameter gradients."""
    if rms:
        mean = 0.0
        sum_g = 0.0
        sum_gxmu = sgx
    else:
        mean = hi + sx / cnt
        sum_g = sg
        sum_gxmu = sum_dy_xmu_about(sg, sgx, hi, mean)
    coef[HI, r] = mean
    hi2 = np.float64(coef[HI, r])
    coef[DX_SCALE, r], coef[XC_COEF, r], coef[DY_SHIFT, r] = backward_coefs(
        cnt, sum_g, sum_gxmu, mean, hi2, rstd, 1.0)
    bstat[XHAT_SCALE, r], bstat[XHAT_OFFSET, r] = affine_coefs(mean, hi2, rstd, 1.0, 0.0)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _dx_each(dyr, xr, w, hi, a, b, d, dxr):
    for j in range(xr.shape[0]):
        dxr[j] = stored((value_of(dyr[j]) * w[j] + (value_of(xr[j]) - hi) * b + d) * a, dxr)


@njit(inline="always", **CPU_HELPER_STRICT)  # a call per short run costs as much as its values
def _dx_run(dyr, xr, w, hi, a, b, d, dxr):
    for j in range(xr.shape[0]):
        dxr[j] = stored((value_of(dyr[j]) * w + (value_of(xr[j]) - hi) * b + d) * a, dxr)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _grads_each(dyr, xr, hi, xs, xo, qw, qb):
    """``qw += dy * xhat``, ``qb += dy`` value by value (float64)."""
    for j in range(xr.shape[0]):
        gj = np.float64(value_of(dyr[j]))
        qw[j] += gj * ((np.float64(value_of(xr[j])) - hi) * xs + xo)
        qb[j] += gj


@njit(**CPU_HELPER)
def _grads_run(dyr, xr, hi, xs, xo):
    """``(sum(dy * xhat), sum(dy))`` of a run (float64)."""
    tw = 0.0
    tb = 0.0
    for j in range(xr.shape[0]):
        gj = np.float64(value_of(dyr[j]))
        tw += gj * ((np.float64(value_of(xr[j])) - hi) * xs + xo)
        tb += gj
    return tw, tb


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _dx_one_run(dy, x, n, g, r, aff, coef, bstat, weight, want_grads, qw, qb, dx):
    """:func:`_dx_row` of a row that is one run of consecutive weights (:func:`_one_run`)."""
    K = x.shape[3]
    hi = coef[HI, r]
    a = coef[DX_SCALE, r]
    b = coef[XC_COEF, r]
    d = coef[DY_SHIFT, r]
    base = (r % aff.gmod) * aff.arow
    xr = x[n, 0, g]
    dyr = dy[n, 0, g]
    dxr = dx[n, 0, g]
    w = weight[base:base + K]
    for j in range(K):
        dxr[j] = stored((value_of(dyr[j]) * w[j] + (value_of(xr[j]) - hi) * b + d) * a, dxr)
    if want_grads:
        _grads_each(dyr, xr, np.float64(hi), bstat[XHAT_SCALE, r], bstat[XHAT_OFFSET, r], qw, qb)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _dx_row(dy, x, n, g, r, aff, coef, bstat, weight, want_grads, qw, qb, dx):
    """dx of a whole row, and its parameter-gradient terms added to ``qw``/``qb``
    (indexed within the row's affine group)."""
    M, K = x.shape[1], x.shape[3]
    hi = coef[HI, r]
    a = coef[DX_SCALE, r]
    b = coef[XC_COEF, r]
    d = coef[DY_SHIFT, r]
    hi64 = np.float64(hi)
    xs = bstat[XHAT_SCALE, r]
    xo = bstat[XHAT_OFFSET, r]
    base = (r % aff.gmod) * aff.arow
    if _one_run(x, aff):
        _dx_one_run(dy, x, n, g, r, aff, coef, bstat, weight, want_grads, qw, qb, dx)
        return
    for m in range(M):
        xr = x[n, m, g]
        dyr = dy[n, m, g]
        dxr = dx[n, m, g]
        k = np.int64(0)  # (a literal 0 would compile _weight_run once more)
        while k < K:
            e, j = _weight_run(m, k, K, K, aff)
            if aff.adiv == 1:
                _dx_each(dyr[k:e], xr[k:e], weight[base + j:base + j + e - k], hi, a, b, d,
                         dxr[k:e])
                if want_grads:
                    _grads_each(dyr[k:e], xr[k:e], hi64, xs, xo, qw[j:j + e - k],
                                qb[j:j + e - k])
            else:
                _dx_run(dyr[k:e], xr[k:e], weight[base + j], hi, a, b, d, dxr[k:e])
                if want_grads:
                    tw, tb = _grads_run(dyr[k:e], xr[k:e], hi64, xs, xo)
                    qw[j] += tw
                    qb[j] += tb
            k = e


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _dense_row(x, r, G):
    """Row ``r`` of an ``(N, 1, G, K)`` view as one contiguous run."""
    return x[r // G, 0, r % G]


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _dx_grads_4(dy, x, rows, aff, coef, bstat, weight, qw, qb, dx):
    """dx of four rows ``rows`` whose values each use consecutive weights (one
    run per row: ``M == 1``, ``arow == K``), and their parameter-gradient
    terms added to ``qw``/``qb`` four rows at a time: a quarter of the
    accumulators' loads and stores."""
    G = x.shape[2]
    r0, r1, r2, r3 = rows
    x0, x1, x2, x3 = (_dense_row(x, r0, G), _dense_row(x, r1, G), _dense_row(x, r2, G),
                      _dense_row(x, r3, G))
    g0, g1, g2, g3 = (_dense_row(dy, r0, G), _dense_row(dy, r1, G), _dense_row(dy, r2, G),
                      _dense_row(dy, r3, G))
    d0, d1, d2, d3 = (_dense_row(dx, r0, G), _dense_row(dx, r1, G), _dense_row(dx, r2, G),
                      _dense_row(dx, r3, G))
    h0, h1, h2, h3 = coef[HI, r0], coef[HI, r1], coef[HI, r2], coef[HI, r3]
    a0, a1, a2, a3 = (coef[DX_SCALE, r0], coef[DX_SCALE, r1], coef[DX_SCALE, r2],
                      coef[DX_SCALE, r3])
    b0, b1, b2, b3 = coef[XC_COEF, r0], coef[XC_COEF, r1], coef[XC_COEF, r2], coef[XC_COEF, r3]
    e0, e1, e2, e3 = (coef[DY_SHIFT, r0], coef[DY_SHIFT, r1], coef[DY_SHIFT, r2],
                      coef[DY_SHIFT, r3])
    s0, s1, s2, s3 = (bstat[XHAT_SCALE, r0], bstat[XHAT_SCALE, r1], bstat[XHAT_SCALE, r2],
                      bstat[XHAT_SCALE, r3])
    o0, o1, o2, o3 = (bstat[XHAT_OFFSET, r0], bstat[XHAT_OFFSET, r1], bstat[XHAT_OFFSET, r2],
                      bstat[XHAT_OFFSET, r3])
    # xhat = (x - HI) * XHAT_SCALE + XHAT_OFFSET in the input's dtype (float32 for half inputs)
    dt = coef.dtype.type
    t0, t1, t2, t3 = dt(s0), dt(s1), dt(s2), dt(s3)
    p0, p1, p2, p3 = dt(o0), dt(o1), dt(o2), dt(o3)
    base = (r0 % aff.gmod) * aff.arow
    w = weight[base:base + aff.arow]
    for j in range(x0.shape[0]):
        wj = w[j]
        c0 = value_of(x0[j]) - h0
        c1 = value_of(x1[j]) - h1
        c2 = value_of(x2[j]) - h2
        c3 = value_of(x3[j]) - h3
        y0, y1, y2, y3 = value_of(g0[j]), value_of(g1[j]), value_of(g2[j]), value_of(g3[j])
        d0[j] = stored((y0 * wj + c0 * b0 + e0) * a0, d0)
        d1[j] = stored((y1 * wj + c1 * b1 + e1) * a1, d1)
        d2[j] = stored((y2 * wj + c2 * b2 + e2) * a2, d2)
        d3[j] = stored((y3 * wj + c3 * b3 + e3) * a3, d3)
        # the four rows' dy * xhat and dy in the input's dtype, added to float64
        qw[j] += np.float64((y0 * (c0 * t0 + p0) + y1 * (c1 * t1 + p1))
                            + (y2 * (c2 * t2 + p2) + y3 * (c3 * t3 + p3)))
        qb[j] += np.float64((y0 + y1) + (y2 + y3))


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _block_rows(blk, nblk_per_group, aff, grad_rows, rows):
    """Group, first and last+1 rank of parameter block ``blk``: rows
    ``t * gmod + group`` for ranks ``t`` in ``[t0, t1)``."""
    group = blk // nblk_per_group
    t0 = (blk % nblk_per_group) * grad_rows
    return group, t0, min(t0 + grad_rows, rows // aff.gmod)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _merge_grads(q, group, nblk_per_group, arow, out):
    """Parameter gradients of one affine group: its blocks' partials in block order."""
    for j in range(arow):
        out[0, group * arow + j] = 0.0
        out[1, group * arow + j] = 0.0
    for i in range(nblk_per_group):
        blk = group * nblk_per_group + i
        for j in range(arow):
            out[0, group * arow + j] += q[0, blk, j]
            out[1, group * arow + j] += q[1, blk, j]


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _grad_partials(q, i, want_grads):
    """The zeroed float64 rows ``q[0, i]``, ``q[1, i]`` for a task's
    parameter-gradient partials; ``q`` is a (2, 1, 1) dummy without
    ``want_grads`` (row 0 then, never read).  (np.int64: a prange index unified
    with an int literal would become a float.)"""
    qi = np.int64(i) if want_grads else np.int64(0)
    qw = q[0, qi]
    qb = q[1, qi]
    if want_grads:
        qw[:] = 0.0
        qb[:] = 0.0
    return qw, qb


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _backward_block(dy, x, hi, rstd, weight, aff, rms, geom, want_grads, blk, nblk_per_group,
                    coef, bstat, q, dx):
    """dx of the rows of parameter block ``blk`` (with their coefficients on the
    fused path), and the block's parameter-gradient partials into ``q[:, blk]``."""
    N, M, G, K = x.shape
    rows = N * G
    cnt = np.float64(M * K)
    group, t0, t1 = _block_rows(blk, nblk_per_group, aff, geom.grad_rows, rows)
    qw, qb = _grad_partials(q, blk, want_grads)
    # Rows that are one run of consecutive weights (layer and RMS norm of
    # contiguous rows) go four at a time; any others, and the last few, one by one.
    by4 = want_grads and M == 1 and aff.adiv == 1 and aff.arow == K
    t = t0
    while t < t1:
        nrows = 4 if by4 and t + 4 <= t1 else 1
        for i in range(nrows):
            r = (t + i) * aff.gmod + group
            if geom.fused:
                s1, s2, s3 = _row_backward_sums(dy, x, r // G, r % G, r, geom, aff,
                                                np.float64(hi[r]), weight, rstd[r],
                                                geom.bwd_block)
                _store_backward(r, cnt, s1, s2, s3, np.float64(hi[r]), rstd[r], rms, coef,
                                bstat)
        r = t * aff.gmod + group
        if nrows == 4:
            _dx_grads_4(dy, x, (r, r + aff.gmod, r + 2 * aff.gmod, r + 3 * aff.gmod), aff,
                        coef, bstat, weight, qw, qb, dx)
        else:
            _dx_row(dy, x, r // G, r % G, r, aff, coef, bstat, weight, want_grads, qw, qb, dx)
        t += nrows


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _one_run_block(dy, x, hi, rstd, weight, aff, rms, geom, want_grads, blk, nblk_per_group,
                   coef, bstat, q, dx):
    """:func:`_backward_block` on the fused path for rows that are one run each
    (:func:`_one_run`): the same sums, coefficients and dx, four rows at a
    time with ``want_grads``."""
    N, M, G, K = x.shape
    cnt = np.float64(K)
    group, t0, t1 = _block_rows(blk, nblk_per_group, aff, geom.grad_rows, N * G)
    qw, qb = _grad_partials(q, blk, want_grads)
    t = t0
    while t < t1:
        nrows = 4 if want_grads and t + 4 <= t1 else 1
        for i in range(nrows):
            r = (t + i) * aff.gmod + group
            s1, s2, s3 = _one_run_sums(dy, x, r // G, r % G, r, geom, aff, np.float64(hi[r]),
                                       weight, rstd[r], geom.bwd_block)
            _store_backward(r, cnt, s1, s2, s3, np.float64(hi[r]), rstd[r], rms, coef, bstat)
        r = t * aff.gmod + group
        if nrows == 4:
            _dx_grads_4(dy, x, (r, r + aff.gmod, r + 2 * aff.gmod, r + 3 * aff.gmod), aff,
                        coef, bstat, weight, qw, qb, dx)
        else:
            _dx_one_run(dy, x, r // G, r % G, r, aff, coef, bstat, weight, want_grads, qw, qb,
                        dx)
        t += nrows


@njit(**CPU_JIT_PARALLEL)
def backward_one_run(dy, x, hi, rstd, weight, aff, rms, geom, want_grads, coef, bstat, q, grads,
                     dx):
    """:func:`backward` on the fused path for rows that are one run each (layer
    and RMS norm of contiguous rows)."""
    N, M, G, K = x.shape
    nblk_per_group = _cdiv(N * G // aff.gmod, geom.grad_rows)
    for blk_ in prange(aff.gmod * nblk_per_group):
        blk = np.int64(blk_)
        _one_run_block(dy, x, hi, rstd, weight, aff, rms, geom, want_grads, blk, nblk_per_group,
                       coef, bstat, q, dx)
    if want_grads:
        for group in range(aff.gmod):
            _merge_grads(q, group, nblk_per_group, aff.arow, grads)


@njit(**CPU_JIT_PARALLEL)
def backward_sums(dy, x, hi, rstd, weight, aff, rms, geom, p, coef, bstat):
    """The first phase of the two-phase backward (long rows, or few rows): the
    chunks' sums into ``p`` (3, rows, chunks) in parallel, added per row in
    chunk order, and each row's dx coefficients into ``coef`` and ``bstat``;
    :func:`backward` then writes dx.  (The per-row step is a plain loop: its
    work is a few values per chunk of ``CHUNK_ELEMS``.)"""
    N, M, G, K = x.shape
    rows = N * G
    cnt = np.float64(M * K)
    nch, ncb = _nchunks(geom, M, K)
    for u_ in prange(rows * nch):
        u = np.int64(u_)
        r, c = u // nch, u % nch
        m0, m1, k0, k1 = _chunk_bounds(c, ncb, geom, M, K)
        p[0, r, c], p[1, r, c], p[2, r, c] = _chunk_backward_sums(
            dy, x, r // G, r % G, r, m0, m1, k0, k1, aff, np.float64(hi[r]), weight,
            rstd[r], geom.bwd_block)
    for r in range(rows):
        s1, s2, s3 = _sum_chunks(p, r)
        _store_backward(r, cnt, s1, s2, s3, np.float64(hi[r]), rstd[r], rms, coef, bstat)


@njit(**CPU_JIT_PARALLEL)
def backward(dy, x, hi, rstd, weight, aff, rms, geom, want_grads, coef, bstat, q, grads, dx):
    """dx into ``dx``; with ``want_grads`` the float64 ``(dweight, dbias)`` per
    affine index into ``grads`` (2, gmod * arow).  ``hi``: the saved row means in
    x's dtype (zeros for RMSNorm); ``rstd``: float64.  On the fused path each
    task also takes its rows' sums; otherwise :func:`backward_sums` has left
    the coefficients in ``coef`` and ``bstat``.  ``q`` (2, blocks, arow) holds
    the blocks' partials, merged in block order by a plain loop (a few values
    per block of ``grad_rows`` rows)."""
    N, M, G, K = x.shape
    rows = N * G
    nblk_per_group = _cdiv(rows // aff.gmod, geom.grad_rows)
    nblk = aff.gmod * nblk_per_group
    for blk_ in prange(nblk):
        blk = np.int64(blk_)
        _backward_block(dy, x, hi, rstd, weight, aff, rms, geom, want_grads, blk,
                        nblk_per_group, coef, bstat, q, dx)
    if want_grads:
        for group in range(aff.gmod):
            _merge_grads(q, group, nblk_per_group, aff.arow, grads)


# =========================================================================== #
# Channels-last group and instance norm.  When each sample is one contiguous
# (M, C) block with a group's K channels adjacent (NHWC memory: ``x4`` is
# (N, HW, G, K) with unit stride along K), a row is M runs of K values: 8 for
# GroupNorm(32) of 256 channels, 1 for InstanceNorm, too short for the run
# loops above.  These kernels take the (N, M, C) view and vectorise along the
# channels instead: per sample, float64 sums per channel over the M positions
# (about each channel's first value), merged into the group's moments channel
# by channel (Chan, in channel order), then the elementwise pass with per-channel
# coefficients.  Per-value arithmetic is the run loops'; the sums' order is
# fixed by the shape, so results do not depend on the thread count.
# Channel ``c = g * K + k`` takes weight[c] (GroupNorm: ``aff`` is (G, K, 1);
# InstanceNorm: K = 1).
# =========================================================================== #
@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _channel_sums_cl(x, n, s0, s1, s2):
    """Per channel: ``s0`` the first value (the shift), float64 sums of
    ``x - shift`` and its square over the M positions of sample ``n``."""
    M, C = x.shape[1], x.shape[2]
    x0 = x[n, 0]
    for c in range(C):
        s0[c] = np.float64(value_of(x0[c]))
        s1[c] = 0.0
        s2[c] = 0.0
    for m in range(M):
        xr = x[n, m]
        for c in range(C):
            d = np.float64(value_of(xr[c])) - s0[c]
            s1[c] += d
            s2[c] += d * d


@njit(**CPU_JIT_PARALLEL)
def forward_cl(x, weight, bias, G, eps, rms, write_y, coef, stats, y):
    """:func:`forward` of channels-last data, ``x`` and ``y`` the (N, M, C)
    views; rows ``r = n * G + g``."""
    N, M, C = x.shape
    K = C // G
    for n_ in prange(N):
        n = np.int64(n_)
        s0 = np.empty(C)
        s1 = np.empty(C)
        s2 = np.empty(C)
        _channel_sums_cl(x, n, s0, s1, s2)
        for g in range(G):
            cnt = 0.0
            mean = 0.0
            m2 = 0.0
            for c in range(g * K, (g + 1) * K):
                mk, qk = shifted_moments(np.float64(M), s0[c], s1[c], s2[c])
                cnt, mean, m2 = chan_merge(cnt, mean, m2, np.float64(M), mk, qk)
            _store_forward(n * G + g, cnt, mean, m2, eps, rms, coef, stats)
        if not write_y:
            continue
        hic = np.empty(C, coef.dtype)  # x's dtype, or float32 for half inputs
        sc = np.empty(C, coef.dtype)
        oc = np.empty(C, coef.dtype)
        for c in range(C):
            r = n * G + c // K
            hic[c] = coef[HI, r]
            sc[c] = coef[SCALE, r]
            oc[c] = coef[OFFSET, r]
        for m in range(M):
            xr = x[n, m]
            yr = y[n, m]
            for c in range(C):
                yr[c] = stored(((value_of(xr[c]) - hic[c]) * sc[c] + oc[c]) * weight[c]
                               + bias[c], yr)


@njit(**CPU_JIT_PARALLEL)
def backward_cl(dy, x, hi, rstd, weight, G, rms, want_grads, block, coef, bstat, q, grads,
                dx):
    """:func:`backward` of channels-last data (the (N, M, C) views), one task
    per sample.  Each channel's ``sum(dy)``, ``sum(dy * xc)`` and ``sum(xc)``
    (``xc = (x - hi) * sc``, ``sc`` a power of two near rstd) are taken as
    batch norm's channel-contiguous backward takes them (blocks of ``block``
    positions in the input's dtype, each block added in float64 in order), then
    weighted and summed per group in float64 as :func:`backward_runs` does; the
    parameter-gradient partials come from the same sums.  ``q`` is (2, N, C)
    float64 scratch for those partials, added in sample order into ``grads``."""
    N, M, C = x.shape
    K = C // G
    cnt = np.float64(M * K)
    dt = coef.dtype.type  # x's dtype, or float32 for half inputs
    for n_ in prange(N):
        n = np.int64(n_)
        hc = np.empty(C, coef.dtype)
        sc = np.empty(C, coef.dtype)
        for c in range(C):
            r = n * G + c // K
            hc[c] = hi[r]
            sc[c] = dt(_pow2_near(rstd[r]))
        pa = np.zeros(C)
        pb = np.zeros(C)
        pe = np.zeros(C)
        acc = np.empty((3, C), coef.dtype)
        dyn = dy[n]
        xn = x[n]
        for m0 in range(0, M, block):
            m1 = min(m0 + block, M)
            acc[...] = 0.0
            _add_backward_sums_nc4(dyn, xn, m0, m1, 0, C, hc, sc, acc)
            for c in range(C):
                pa[c] += np.float64(acc[0, c])
                pb[c] += np.float64(acc[1, c])
                pe[c] += np.float64(acc[2, c])
        for c in range(C):
            inv = 1.0 / np.float64(sc[c])  # a power of two: exact
            pb[c] *= inv
            pe[c] *= inv
        for g in range(G):
            r = n * G + g
            sg = 0.0
            sgx = 0.0
            sx = 0.0
            for c in range(g * K, (g + 1) * K):
                w = np.float64(weight[c])
                sg += w * pa[c]
                sgx += w * pb[c]
                sx += pe[c]
            _store_backward(r, cnt, sg, sgx, sx, np.float64(hi[r]), rstd[r], rms, coef, bstat)
        ac = np.empty(C, coef.dtype)
        bc = np.empty(C, coef.dtype)
        dc = np.empty(C, coef.dtype)
        for c in range(C):
            r = n * G + c // K
            hc[c] = coef[HI, r]  # from here on the exact mean rounded, no longer the saved one
            ac[c] = coef[DX_SCALE, r]
            bc[c] = coef[XC_COEF, r]
            dc[c] = coef[DY_SHIFT, r]
        for m in range(M):
            gr = dyn[m]
            xr = xn[m]
            dxr = dx[n, m]
            for c in range(C):
                dxr[c] = stored((value_of(gr[c]) * weight[c] + (value_of(xr[c]) - hc[c]) * bc[c]
                                 + dc[c]) * ac[c], dxr)
        if want_grads:
            # sum(dy * xhat), xhat = (x - HI) * XHAT_SCALE + XHAT_OFFSET, from the
            # sums about the saved mean (as in backward_runs)
            for c in range(C):
                r = n * G + c // K
                shift = np.float64(hi[r]) - np.float64(hc[c])
                q[0, n, c] = bstat[XHAT_SCALE, r] * (pb[c] + shift * pa[c]) + (
                    bstat[XHAT_OFFSET, r] * pa[c])
                q[1, n, c] = pa[c]
    if want_grads:
        # a plain loop: N * C values against the data's M * N * C
        for c in range(C):
            grads[0, c] = 0.0
            grads[1, c] = 0.0
        for n in range(N):
            for c in range(C):
                grads[0, c] += q[0, n, c]
                grads[1, c] += q[1, n, c]


# =========================================================================== #
# Rows of whole weight runs (group and instance norm of NCHW data: a row is
# ``arow`` channels of ``adiv`` contiguous values).  The backward needs per run
# only ``sum(dy)``, ``sum(dy * (x - hi))`` and ``sum(x - hi)``: taken as batch
# norm's backward takes them (blocks of ``block`` values in the input's dtype,
# ``x - hi`` scaled by a power of two near rstd, each block added in float64),
# the row's sums, the parameter-gradient partials and the dx pass all follow,
# one task per row, the row still in cache for its dx pass.
# =========================================================================== #
@njit(**CPU_JIT_STRICT_PARALLEL)  # strict: it inlines the dx pass of each run
def backward_runs(dy, x, hi, rstd, weight, aff, rms, want_grads, block, coef, bstat, q, grads,
                  dx):
    """:func:`backward` for (N, G, K) views whose rows are ``aff.arow`` runs of
    ``aff.adiv`` values (``K = arow * adiv``); ``q`` is (2, rows, arow) float64
    scratch for the parameter-gradient partials, added in row order."""
    N, G, K = x.shape
    rows = N * G
    arow, adiv, gmod = aff.arow, aff.adiv, aff.gmod
    cnt = np.float64(K)
    for r_ in prange(rows):
        r = np.int64(r_)
        n, g = r // G, r % G
        hr = hi[r]
        sc = coef.dtype.type(_pow2_near(rstd[r]))  # x's dtype, or float32 for half inputs
        sc64 = np.float64(sc)
        base = (r % gmod) * arow
        pa = np.empty(arow)
        pb = np.empty(arow)
        sg = 0.0
        sgx = 0.0
        sx = 0.0
        for j in range(arow):
            dyr = dy[n, g, j * adiv:(j + 1) * adiv]
            xr = x[n, g, j * adiv:(j + 1) * adiv]
            ta = 0.0
            tb = 0.0
            te = 0.0
            for b0 in range(0, adiv, block):
                b1 = min(b0 + block, adiv)
                a, b, e = _block_backward_sums(dyr[b0:b1], dyr[b0:b1], xr[b0:b1], hr, sc)
                ta += np.float64(a)
                tb += np.float64(b)
                te += np.float64(e)
            tb /= sc64
            te /= sc64
            w = np.float64(weight[base + j])
            sg += w * ta
            sgx += w * tb
            sx += te
            pa[j] = ta
            pb[j] = tb
        _store_backward(r, cnt, sg, sgx, sx, np.float64(hr), rstd[r], rms, coef, bstat)
        h = coef[HI, r]
        a_, b_, d_ = coef[DX_SCALE, r], coef[XC_COEF, r], coef[DY_SHIFT, r]
        for j in range(arow):
            _dx_run(dy[n, g, j * adiv:(j + 1) * adiv], x[n, g, j * adiv:(j + 1) * adiv],
                    weight[base + j], h, a_, b_, d_, dx[n, g, j * adiv:(j + 1) * adiv])
        if want_grads:
            # sum(dy * xhat) with xhat = (x - HI) * XHAT_SCALE + XHAT_OFFSET about
            # HI (the exact mean rounded), from the sums about the saved mean hr
            shift = np.float64(hr) - np.float64(h)
            xs, xo = bstat[XHAT_SCALE, r], bstat[XHAT_OFFSET, r]
            for j in range(arow):
                q[0, r, j] = xs * (pb[j] + shift * pa[j]) + xo * pa[j]
                q[1, r, j] = pa[j]
    if want_grads:
        for p in range(gmod * arow):  # a plain loop: arow values a row against its K
            g, j = p // arow, p % arow
            tw = 0.0
            tb = 0.0
            for r in range(g, rows, gmod):
                tw += q[0, r, j]
                tb += q[1, r, j]
            grads[0, p] = tw
            grads[1, p] = tb


@njit(inline=inline_in_serial_code, **CPU_JIT_STRICT)
def narrow(a, out):
    """``out[...] = a`` for float64 rows ``a``: each value rounded to ``out``'s
    dtype as a NumPy cast rounds it (beyond its range: inf), without the
    floating-point warning and the ``np.errstate`` a cast needs to silence it."""
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i, j] = a[i, j]


# The kernels for inputs of at most SERIAL_MAX_ELEMS values (runtime.is_small).
serial = serial_kernels(globals())

_cache.check({**globals(), **vars(serial)})  # before any kernel loads from the disk cache
