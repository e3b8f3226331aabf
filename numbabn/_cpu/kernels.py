"""Numba CPU kernels.  Private: inputs are validated, shaped and allocated by ``ops.py``.

Batch norm is memory-bound.  The least a training forward can move is 2 passes
of the tensor (read ``x``, write ``y``), the backward 3 (read ``x`` and ``dy``,
write ``dx``); a plain copy (2 passes) is the ceiling to compare with.  So each
operation is one kernel call, and each input is read from memory once where the
data allows:

* **fused** (NCHW-like data, enough features, a feature small enough to stay in
  cache): one task per feature sums it (pass 1, from memory), turns the sums into
  coefficients, and writes its output (pass 2, from L2/L3 where pass 1 left it).
* **two-phase** (channel-contiguous data, few features, or huge features): a
  parallel loop writes one partial sum per chunk, a second merges them per
  feature, a third writes the output.  Both cores work whatever the number of
  features (3 channels, or a dense ``(N, C)``).  Each thread takes the same
  contiguous range of chunks in both passes and walks it backwards the second
  time, so the output pass starts on the data its own statistics pass read last
  (still in its L2 / the L3).  The ranges depend on the thread count, the chunks
  and their merge order do not.

Two layouts, chosen by ``x`` seen as ``(outer, C, inner)``:

* ``*_nchw`` kernels take the 3-D view with ``inner > 1``: each feature is
  ``outer`` runs of ``inner`` contiguous values;
* ``*_nc`` kernels take the 2-D view ``(rows, C)`` of channel-contiguous data
  (NHWC, dense ``(N, C)``), vectorising across features.

Numerics.  Forward sums are float64 whatever the input dtype.  The backward's
three sums (``dy``, ``dy * xc``, ``xc`` with ``xc = (x - mean) * scale``,
``scale`` a power of two near ``invstd``) are taken in the input's dtype over
short blocks fixed by the shape (``BWD_BLOCK`` values of a row,
``BWD_NC_ROWS`` rows of a column) and the block sums added in float64, in
order: ``x - mean`` is exact near the mean (Sterbenz), the scale keeps the
products in range for any magnitude, and a block's float32 rounding is about
``block / lanes * 2**-24`` relative.  Statistics are shifted
sums: with ``shift`` = the feature's first value, ``s1 = sum(x - shift)`` and
``s2 = sum((x - shift)**2)`` give ``mean = shift + s1/n`` and
``var = s2/n - (s1/n)**2``.  The cancellation in ``var`` loses a factor
``(mean - shift)**2 / var``, which is at most ``n`` because ``shift`` is one of
the values (a few units for typical data): a relative error of at most about
``n * 2**-53`` in float64, 1e-10 for a million values, however large the mean
is next to the spread.  The output is ``(x - hi) * scale + offset`` in the
input's dtype, where ``hi`` is the float64 mean rounded to the input's dtype:
``x - hi`` is exact near the mean (Sterbenz), so a large mean costs nothing,
and the rounding error ``lo = mean - hi`` is folded into the offset in float64
(``offset = bias - lo * scale``), a term of the size of the output, never the
catastrophic ``x * scale + (bias - mean * scale)``.

Cost.  Per float32 value, pass 1 widens, subtracts and adds in float64: 4
AVX-512 double ops per 8 values, ~35 GB/s per core (the pass is compute-bound
in L2/L3, memory-bound beyond); pass 2 is 2 float32 ops per 16 values.

Reproducibility.  Chunks depend on the shape only; chunk sums are merged in chunk
order by code compiled without ``reassoc`` (``CPU_JIT_STRICT``); the fused and
two-phase paths run the same chunk code and the same merge, so results do not
depend on the thread count or on the path.  Elementwise code is strict too, which
keeps ``(x - hi) * scale + offset`` as written.
"""

import math

import numpy as np
from numba import njit, prange

from .._config import (
    BWD_BLOCK,
    BWD_NC_ROWS,
    CPU_JIT,
    CPU_JIT_PARALLEL,
    CPU_JIT_STRICT,
    NC_MERGE_COLS,
)


@njit(**CPU_JIT_STRICT)
def _cdiv(a, b):
    return (a + b - 1) // b


@njit(**CPU_JIT_STRICT)
def _thread_span(t, nth, total):
    """The contiguous range of ``total`` tasks that thread ``t`` of ``nth`` takes."""
    return total * t // nth, total * (t + 1) // nth


# =========================================================================== #
# Per-feature arithmetic (strict: fixed order, no reassociation)
# =========================================================================== #
@njit(**CPU_JIT_STRICT)
def _sum_in_order(p):
    s = 0.0
    for k in range(p.shape[0]):
        s += p[k]
    return s


@njit(**CPU_JIT_STRICT)
def _accumulate(total, part, width):
    for i in range(width):
        total[i] += part[i]


@njit(**CPU_JIT_STRICT)
def _forward_coefs(c, s1, s2, n, shift, eps, weight, bias, coef, stats):
    """Mean, invstd, var of feature ``c`` from its shifted sums into ``stats``,
    and ``coef[:, c] = (hi, scale, offset)`` in the input's dtype."""
    m = s1 / n
    mean = shift + m
    var = s2 / n - m * m
    if var < 0.0:  # rounding only; keeps NaN
        var = 0.0
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd * weight[c]
    stats[0, c] = mean
    stats[1, c] = invstd
    stats[2, c] = var
    coef[0, c] = mean
    coef[1, c] = scale
    coef[2, c] = bias[c] - (mean - coef[0, c]) * scale


@njit(**CPU_JIT_STRICT)
def _eval_coefs(c, mean, var, eps, weight, bias, coef):
    invstd = 1.0 / np.sqrt(np.float64(var[c]) + eps)
    coef[0, c] = mean[c]
    coef[1, c] = invstd * weight[c]
    coef[2, c] = bias[c]


@njit(**CPU_JIT_STRICT)
def _pow2_near(v):
    """A power of two near ``v`` (1 when ``v`` is not finite and positive),
    within float32's normal range."""
    if not (v > 0.0 and v < np.inf):
        return 1.0
    _, e = math.frexp(v)
    return math.ldexp(1.0, max(-120, min(120, e)))


@njit(**CPU_JIT_STRICT)
def _backward_scales(invstd):
    """Per feature, a power of two near ``invstd`` in the input's dtype: the
    backward sums take ``xc = (x - mean) * scale`` (exact: a power of two), so
    ``xc`` is of order 1 and ``dy * xc`` of the order of ``dy`` whatever the
    data's magnitude (1e30 or 1e-30 stays in float32's range)."""
    s = np.empty_like(invstd)
    for c in range(invstd.shape[0]):
        s[c] = _pow2_near(np.float64(invstd[c]))
    return s


@njit(**CPU_JIT_STRICT)
def _backward_coefs(c, sdy, sdyxc, sxc, n, mean, invstd, weight, coef, dwb, scale):
    """``dx = (dy + (x - hi) * b + d) * a`` for feature ``c``: ``coef[:, c] = (a, hi, b, d)``.

    ``a = invstd * weight``, ``b = -invstd**2 * mean(dy * (x - mean))``,
    ``d = -mean(dy)`` (plus the folded ``lo`` term): every factor stays in
    float32's range for data near 1e30, where ``a * b`` would underflow.  The
    saved ``mean`` may be the batch mean rounded to float32; ``sxc / n`` is its
    rounding error, so the gradient is taken about the exact batch mean.
    ``sdyxc`` and ``sxc`` come scaled by ``scale[c]`` (a power of two).
    """
    sc = np.float64(scale[c])
    sdyxc = sdyxc / sc
    sxc = sxc / sc
    m = np.float64(mean[c])
    istd = np.float64(invstd[c])
    delta = sxc / n
    true_mean = m + delta
    cov = (sdyxc - delta * sdy) / n  # mean(dy * (x - true_mean))
    b = -istd * istd * cov
    coef[0, c] = istd * weight[c]
    coef[1, c] = true_mean
    coef[2, c] = b
    coef[3, c] = -(sdy / n) - (true_mean - coef[1, c]) * b
    dwb[0, c] = istd * cov * n
    dwb[1, c] = sdy


# =========================================================================== #
# NCHW-like family: x is (outer, C, inner), inner > 1.
# A chunk of feature c is rows [r0, r1) x columns [j0, j1) of x[:, c, :];
# chunk k of a feature is row block k // ncb, column block k % ncb.
# Inner loops index 0-based slices: a loop from a non-zero start would keep
# Numba's negative-index wraparound and vectorise into gathers (5x slower).
# =========================================================================== #
@njit(**CPU_JIT)
def _chunk_sums_nchw(x, c, r0, r1, j0, j1, shift):
    s1 = 0.0
    s2 = 0.0
    for r in range(r0, r1):
        xr = x[r, c, j0:j1]
        for j in range(j1 - j0):
            d = np.float64(xr[j]) - shift
            s1 += d
            s2 += d * d
    return s1, s2


@njit(**CPU_JIT_STRICT)
def _feature_sums_nchw(x, c, rows, cols, shift):
    """Shifted sums of feature ``c``, chunk by chunk in chunk order."""
    outer, _, inner = x.shape
    s1 = 0.0
    s2 = 0.0
    for r0 in range(0, outer, rows):
        for j0 in range(0, inner, cols):
            a, b = _chunk_sums_nchw(x, c, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner), shift)
            s1 += a
            s2 += b
    return s1, s2


@njit(**CPU_JIT_STRICT)
def _affine_nchw(x, c, r0, r1, j0, j1, coef, y):
    hi = coef[0, c]
    s = coef[1, c]
    o = coef[2, c]
    for r in range(r0, r1):
        xr = x[r, c, j0:j1]
        yr = y[r, c, j0:j1]
        for j in range(j1 - j0):
            yr[j] = (xr[j] - hi) * s + o


@njit(**CPU_JIT)
def _block_backward_sums(dyr, xr, m, s):
    """The three sums of one block, in the input's dtype (vector lanes of it)."""
    a = np.float32(0.0)
    b = np.float32(0.0)
    e = np.float32(0.0)
    for j in range(dyr.shape[0]):
        g = dyr[j]
        xc = (xr[j] - m) * s
        a += g
        b += g * xc
        e += xc
    return a, b, e


@njit(**CPU_JIT_STRICT)
def _chunk_backward_sums_nchw(dy, x, c, r0, r1, j0, j1, m, s):
    """Float64 sums of blocks of at most ``BWD_BLOCK`` values of each row, in order."""
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    w = j1 - j0
    for r in range(r0, r1):
        dyr = dy[r, c, j0:j1]
        xr = x[r, c, j0:j1]
        for b0 in range(0, w, BWD_BLOCK):
            b1 = min(b0 + BWD_BLOCK, w)
            a, b, e = _block_backward_sums(dyr[b0:b1], xr[b0:b1], m, s)
            sdy += np.float64(a)
            sdyxc += np.float64(b)
            sxc += np.float64(e)
    return sdy, sdyxc, sxc


@njit(**CPU_JIT_STRICT)
def _feature_backward_sums_nchw(dy, x, c, rows, cols, m, s):
    outer, _, inner = x.shape
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for r0 in range(0, outer, rows):
        for j0 in range(0, inner, cols):
            a, b, e = _chunk_backward_sums_nchw(
                dy, x, c, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner), m, s
            )
            sdy += a
            sdyxc += b
            sxc += e
    return sdy, sdyxc, sxc


@njit(**CPU_JIT_STRICT)
def _dx_nchw(dy, x, c, r0, r1, j0, j1, coef, dx):
    a = coef[0, c]
    hi = coef[1, c]
    b = coef[2, c]
    d = coef[3, c]
    for r in range(r0, r1):
        dyr = dy[r, c, j0:j1]
        xr = x[r, c, j0:j1]
        dxr = dx[r, c, j0:j1]
        for j in range(j1 - j0):
            dxr[j] = (dyr[j] + (xr[j] - hi) * b + d) * a


@njit(**CPU_JIT_STRICT)
def _chunk_bounds(u, nchunks, ncb, rows, cols, outer, inner):
    """Feature and bounds of flat task ``u`` = feature * nchunks + chunk."""
    c = u // nchunks
    k = u - c * nchunks
    r0 = (k // ncb) * rows
    j0 = (k % ncb) * cols
    return c, k, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner)


@njit(**CPU_JIT_PARALLEL)
def forward_nchw(x, weight, bias, eps, rows, cols, fused, write_y, nth, p1, p2, coef, stats, y):
    """Batch statistics of ``x`` into ``stats`` (mean, invstd, var), and with
    ``write_y`` the normalised output into ``y``.  ``p1``/``p2`` are (C, chunks)
    scratch for the two-phase path, whose passes are split among ``nth`` threads
    (Numba's thread count, passed in: calling ``get_num_threads`` here would
    stop the kernel from being cached)."""
    outer, nfeat, inner = x.shape
    n = outer * inner
    ncb = _cdiv(inner, cols)
    nchunks = _cdiv(outer, rows) * ncb
    if fused:
        for c in prange(nfeat):
            shift = np.float64(x[0, c, 0])
            s1, s2 = _feature_sums_nchw(x, c, rows, cols, shift)
            _forward_coefs(c, s1, s2, n, shift, eps, weight, bias, coef, stats)
            if write_y:
                _affine_nchw(x, c, 0, outer, 0, inner, coef, y)
        return
    ntasks = nfeat * nchunks
    nth = min(nth, ntasks)
    for t in prange(nth):
        u0, u1 = _thread_span(t, nth, ntasks)
        for u in range(u0, u1):
            c, k, r0, r1, j0, j1 = _chunk_bounds(u, nchunks, ncb, rows, cols, outer, inner)
            p1[c, k], p2[c, k] = _chunk_sums_nchw(x, c, r0, r1, j0, j1, np.float64(x[0, c, 0]))
    for c in prange(nfeat):
        s1 = _sum_in_order(p1[c])
        s2 = _sum_in_order(p2[c])
        _forward_coefs(c, s1, s2, n, np.float64(x[0, c, 0]), eps, weight, bias, coef, stats)
    if write_y:
        for t in prange(nth):
            u0, u1 = _thread_span(t, nth, ntasks)
            for u in range(u1 - 1, u0 - 1, -1):
                c, k, r0, r1, j0, j1 = _chunk_bounds(u, nchunks, ncb, rows, cols, outer, inner)
                _affine_nchw(x, c, r0, r1, j0, j1, coef, y)


@njit(**CPU_JIT_PARALLEL)
def normalize_nchw(x, mean, var, weight, bias, eps, rows, coef, y):
    """Elementwise, so any order gives the same bits: walk ``x`` in memory order,
    in blocks of ``rows`` runs of ``inner`` values (run ``q`` is ``x[q // C, q % C]``)."""
    outer, nfeat, inner = x.shape
    for c in range(nfeat):
        _eval_coefs(c, mean, var, eps, weight, bias, coef)
    nruns = outer * nfeat
    for b in prange(_cdiv(nruns, rows)):
        for q in range(b * rows, min((b + 1) * rows, nruns)):
            r = q // nfeat
            c = q - r * nfeat
            _affine_nchw(x, c, r, r + 1, 0, inner, coef, y)


@njit(**CPU_JIT_PARALLEL)
def backward_nchw(dy, x, mean, invstd, weight, rows, cols, fused, nth, p, coef, dwb, dx):
    """dx into ``dx``; (dweight, dbias) into ``dwb``.  ``p`` is (3, C, chunks)
    scratch for the two-phase path."""
    outer, nfeat, inner = x.shape
    n = outer * inner
    ncb = _cdiv(inner, cols)
    nchunks = _cdiv(outer, rows) * ncb
    scale = _backward_scales(invstd)
    if fused:
        for c in prange(nfeat):
            sdy, sdyxc, sxc = _feature_backward_sums_nchw(dy, x, c, rows, cols, mean[c], scale[c])
            _backward_coefs(c, sdy, sdyxc, sxc, n, mean, invstd, weight, coef, dwb, scale)
            _dx_nchw(dy, x, c, 0, outer, 0, inner, coef, dx)
        return
    ntasks = nfeat * nchunks
    nth = min(nth, ntasks)
    for t in prange(nth):
        u0, u1 = _thread_span(t, nth, ntasks)
        for u in range(u0, u1):
            c, k, r0, r1, j0, j1 = _chunk_bounds(u, nchunks, ncb, rows, cols, outer, inner)
            p[0, c, k], p[1, c, k], p[2, c, k] = _chunk_backward_sums_nchw(
                dy, x, c, r0, r1, j0, j1, mean[c], scale[c]
            )
    for c in prange(nfeat):
        sdy = _sum_in_order(p[0, c])
        sdyxc = _sum_in_order(p[1, c])
        sxc = _sum_in_order(p[2, c])
        _backward_coefs(c, sdy, sdyxc, sxc, n, mean, invstd, weight, coef, dwb, scale)
    for t in prange(nth):
        u0, u1 = _thread_span(t, nth, ntasks)
        for u in range(u1 - 1, u0 - 1, -1):
            c, k, r0, r1, j0, j1 = _chunk_bounds(u, nchunks, ncb, rows, cols, outer, inner)
            _dx_nchw(dy, x, c, r0, r1, j0, j1, coef, dx)


# =========================================================================== #
# Channel-contiguous family: x is (rows, C), always two-phase.  A chunk is
# ``rows`` rows of a block of at most ``width`` columns; partial sums are per
# (row block, column).  Each column's sum runs over rows in order (the vector
# lanes are columns), so the column blocking never changes a result.
# =========================================================================== #
@njit(**CPU_JIT)
def _chunk_sums_nc(x, r0, r1, c0, c1, shift, s1, s2):
    """Shifted sums of columns [c0, c1) over rows [r0, r1) into s1[:c1-c0], s2[:c1-c0].

    The accumulators live in memory (one per column), so rows are taken four at
    a time: one load/store of ``s1``/``s2`` per four rows instead of per row
    (2.5x faster on (4096, 512) float32).
    """
    w = c1 - c0
    sh = shift[c0:c1]
    for i in range(w):
        s1[i] = 0.0
        s2[i] = 0.0
    r = r0
    while r + 4 <= r1:
        x0 = x[r, c0:c1]
        x1 = x[r + 1, c0:c1]
        x2 = x[r + 2, c0:c1]
        x3 = x[r + 3, c0:c1]
        for i in range(w):
            d0 = np.float64(x0[i]) - sh[i]
            d1 = np.float64(x1[i]) - sh[i]
            d2 = np.float64(x2[i]) - sh[i]
            d3 = np.float64(x3[i]) - sh[i]
            s1[i] += (d0 + d1) + (d2 + d3)
            s2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    for r in range(r, r1):
        xr = x[r, c0:c1]
        for i in range(w):
            d = np.float64(xr[i]) - sh[i]
            s1[i] += d
            s2[i] += d * d


@njit(**CPU_JIT_STRICT)
def _affine_nc(x, r0, r1, c0, c1, coef, y):
    hi = coef[0, c0:c1]
    s = coef[1, c0:c1]
    o = coef[2, c0:c1]
    w = c1 - c0
    for r in range(r0, r1):
        xr = x[r, c0:c1]
        yr = y[r, c0:c1]
        for i in range(w):
            yr[i] = (xr[i] - hi[i]) * s[i] + o[i]


@njit(**CPU_JIT)
def _add_backward_sums_nc(dy, x, r0, r1, c0, c1, m, sc, acc):
    """Add the three sums of columns [c0, c1) over rows [r0, r1), in the input's
    dtype, to ``acc`` (3, width), one row at a time: every load walks memory in
    order, which is fastest when whole rows stream from memory."""
    w = c1 - c0
    s0 = acc[0]
    s1 = acc[1]
    s2 = acc[2]
    for r in range(r0, r1):
        gr = dy[r, c0:c1]
        xr = x[r, c0:c1]
        for i in range(w):
            a = gr[i]
            e = (xr[i] - m[i]) * sc[i]
            s0[i] += a
            s1[i] += a * e
            s2[i] += e


@njit(**CPU_JIT)
def _add_backward_sums_nc4(dy, x, r0, r1, c0, c1, m, sc, acc):
    """As :func:`_add_backward_sums_nc`, four rows at a time as in
    :func:`_chunk_sums_nc` (faster for column blocks and data in cache)."""
    w = c1 - c0
    s0 = acc[0]
    s1 = acc[1]
    s2 = acc[2]
    r = r0
    while r + 4 <= r1:
        g0 = dy[r, c0:c1]
        g1 = dy[r + 1, c0:c1]
        g2 = dy[r + 2, c0:c1]
        g3 = dy[r + 3, c0:c1]
        x0 = x[r, c0:c1]
        x1 = x[r + 1, c0:c1]
        x2 = x[r + 2, c0:c1]
        x3 = x[r + 3, c0:c1]
        for i in range(w):
            mi = m[i]
            si = sc[i]
            a0 = g0[i]
            a1 = g1[i]
            a2 = g2[i]
            a3 = g3[i]
            e0 = (x0[i] - mi) * si
            e1 = (x1[i] - mi) * si
            e2 = (x2[i] - mi) * si
            e3 = (x3[i] - mi) * si
            s0[i] += (a0 + a1) + (a2 + a3)
            s1[i] += (a0 * e0 + a1 * e1) + (a2 * e2 + a3 * e3)
            s2[i] += (e0 + e1) + (e2 + e3)
        r += 4
    _add_backward_sums_nc(dy, x, r, r1, c0, c1, m, sc, acc)


@njit(**CPU_JIT_STRICT)
def _chunk_backward_sums_nc(dy, x, r0, r1, c0, c1, mean, scale, by_row, sdy, sdyxc, sxc, acc):
    """``sum(dy)``, ``sum(dy * xc)``, ``sum(xc)`` of columns [c0, c1) over rows
    [r0, r1) into ``sdy``, ``sdyxc``, ``sxc`` (float64), ``xc = (x - mean) *
    scale``: blocks of ``BWD_NC_ROWS`` rows summed in the input's dtype, added
    in block order, one row at a time with ``by_row``, else four."""
    w = c1 - c0
    m = mean[c0:c1]
    sc = scale[c0:c1]
    for i in range(w):
        sdy[i] = 0.0
        sdyxc[i] = 0.0
        sxc[i] = 0.0
    for b0 in range(r0, r1, BWD_NC_ROWS):
        acc[...] = 0.0
        if by_row:
            _add_backward_sums_nc(dy, x, b0, min(b0 + BWD_NC_ROWS, r1), c0, c1, m, sc, acc)
        else:
            _add_backward_sums_nc4(dy, x, b0, min(b0 + BWD_NC_ROWS, r1), c0, c1, m, sc, acc)
        for i in range(w):
            sdy[i] += np.float64(acc[0, i])
            sdyxc[i] += np.float64(acc[1, i])
            sxc[i] += np.float64(acc[2, i])


@njit(**CPU_JIT_STRICT)
def _dx_nc(dy, x, r0, r1, c0, c1, coef, dx):
    a = coef[0, c0:c1]
    hi = coef[1, c0:c1]
    b = coef[2, c0:c1]
    d = coef[3, c0:c1]
    w = c1 - c0
    for r in range(r0, r1):
        dyr = dy[r, c0:c1]
        xr = x[r, c0:c1]
        dxr = dx[r, c0:c1]
        for i in range(w):
            dxr[i] = (dyr[i] + (xr[i] - hi[i]) * b[i] + d[i]) * a[i]


@njit(**CPU_JIT_PARALLEL)
def forward_nc(x, weight, bias, eps, rows, width, write_y, nth, p1, p2, coef, stats, y):
    """As :func:`forward_nchw` for (rows, C) data; ``p1``/``p2`` are (row blocks, C)."""
    nrows, nfeat = x.shape
    nrb = _cdiv(nrows, rows)
    shift = np.empty(nfeat)
    for c in range(nfeat):
        shift[c] = x[0, c]
    nth = min(nth, nrb)
    for t in prange(nth):
        b0, b1 = _thread_span(t, nth, nrb)
        for rb in range(b0, b1):
            r0 = rb * rows
            r1 = min(r0 + rows, nrows)
            for c0 in range(0, nfeat, width):
                c1 = min(c0 + width, nfeat)
                _chunk_sums_nc(x, r0, r1, c0, c1, shift, p1[rb, c0:c1], p2[rb, c0:c1])
    for b in prange(_cdiv(nfeat, NC_MERGE_COLS)):
        c0 = b * NC_MERGE_COLS
        c1 = min(c0 + NC_MERGE_COLS, nfeat)
        t1 = np.zeros(c1 - c0)
        t2 = np.zeros(c1 - c0)
        for rb in range(nrb):
            _accumulate(t1, p1[rb, c0:c1], c1 - c0)
            _accumulate(t2, p2[rb, c0:c1], c1 - c0)
        for c in range(c0, c1):
            _forward_coefs(c, t1[c - c0], t2[c - c0], nrows, shift[c], eps, weight, bias, coef, stats)
    if write_y:
        for t in prange(nth):
            b0, b1 = _thread_span(t, nth, nrb)
            for rb in range(b1 - 1, b0 - 1, -1):
                r0 = rb * rows
                _affine_nc(x, r0, min(r0 + rows, nrows), 0, nfeat, coef, y)


@njit(**CPU_JIT_PARALLEL)
def normalize_nc(x, mean, var, weight, bias, eps, rows, coef, y):
    nrows, nfeat = x.shape
    for c in range(nfeat):
        _eval_coefs(c, mean, var, eps, weight, bias, coef)
    for rb in prange(_cdiv(nrows, rows)):
        r0 = rb * rows
        _affine_nc(x, r0, min(r0 + rows, nrows), 0, nfeat, coef, y)


@njit(**CPU_JIT_PARALLEL)
def backward_nc(dy, x, mean, invstd, weight, rows, width, by_row, nth, p, coef, dwb, dx):
    """As :func:`backward_nchw` for (rows, C) data; ``p`` is (3, row blocks, C);
    ``by_row`` as in :func:`_chunk_backward_sums_nc`."""
    nrows, nfeat = x.shape
    nrb = _cdiv(nrows, rows)
    nth = min(nth, nrb)
    scale = _backward_scales(invstd)
    for t in prange(nth):
        acc = np.empty((3, width), x.dtype)
        b0, b1 = _thread_span(t, nth, nrb)
        for rb in range(b0, b1):
            r0 = rb * rows
            r1 = min(r0 + rows, nrows)
            for c0 in range(0, nfeat, width):
                c1 = min(c0 + width, nfeat)
                _chunk_backward_sums_nc(dy, x, r0, r1, c0, c1, mean, scale, by_row,
                                        p[0, rb, c0:c1], p[1, rb, c0:c1], p[2, rb, c0:c1], acc)
    for b in prange(_cdiv(nfeat, NC_MERGE_COLS)):
        c0 = b * NC_MERGE_COLS
        c1 = min(c0 + NC_MERGE_COLS, nfeat)
        acc = np.zeros((3, c1 - c0))
        for rb in range(nrb):
            for q in range(3):
                _accumulate(acc[q], p[q, rb, c0:c1], c1 - c0)
        for c in range(c0, c1):
            i = c - c0
            _backward_coefs(c, acc[0, i], acc[1, i], acc[2, i], nrows, mean, invstd, weight, coef, dwb,
                            scale)
    for t in prange(nth):
        b0, b1 = _thread_span(t, nth, nrb)
        for rb in range(b1 - 1, b0 - 1, -1):
            r0 = rb * rows
            _dx_nc(dy, x, r0, min(r0 + rows, nrows), 0, nfeat, coef, dx)
