"""Numba CPU kernels.  Private: inputs are validated, shaped and allocated by ``ops.py``.

Batch norm is memory-bound.  The least a training forward can move is 2 passes
of the tensor (read ``x``, write ``y``), the backward 3 (read ``x`` and ``dy``,
write ``dx``); a plain copy (2 passes) is the ceiling to compare with.  So each
kernel is one call that does everything for its operation, and reads each input
from memory once where it can:

* **fused path** -- a task owns whole features (one feature of NCHW data, or a
  block of ``NC_COLS`` columns of channel-contiguous data), sums them (pass 1,
  from memory), turns the sums into per-feature coefficients, and writes the
  output (pass 2, from L2/L3 where pass 1 left the data).  Used when a task's
  bytes fit in ``FUSE_BYTES`` and there are ``FUSE_MIN_TASKS`` tasks or more.
* **two-phase path** -- otherwise (few features, or features too large to stay
  cached): a parallel loop writes one partial sum per chunk, a second merges them
  per feature, a third writes the output over chunks.  This path parallelises
  over chunks of the batch, so 3 channels still use every core; its output pass
  walks the chunks in reverse, so it starts on the data the sums read last.

Two layouts, chosen by ``x`` seen as ``(outer, C, inner)``:

* ``*_nchw`` kernels take the 3-D view with ``inner > 1``: each feature is
  ``outer`` runs of ``inner`` contiguous values;
* ``*_nc`` kernels take the 2-D view ``(rows, C)`` of channel-contiguous data
  (NHWC, dense ``(N, C)``), vectorising across features.

Numerics.  Sums are float64 whatever the input dtype.  Statistics are shifted
sums: with ``shift`` = the feature's first value, ``s1 = sum(x - shift)`` and
``s2 = sum((x - shift)**2)`` give ``mean = shift + s1/n`` and
``var = s2/n - (s1/n)**2``.  The cancellation in ``var`` loses a factor
``(mean - shift)**2 / var``, which is at most ``n`` because ``shift`` is one of
the values (a few units for typical data): a relative error of at most about
``n * 2**-53`` in float64, 1e-10 for a million values, however large the mean
is next to the spread.  The output is ``((x - hi) - lo) * scale + offset`` in the
input's dtype, ``hi + lo`` being the float64 mean split in two: ``x - hi`` is
exact near the mean (Sterbenz), so the subtraction loses nothing to a large mean.

Reproducibility.  Chunks depend on the shape only; chunk sums are merged in chunk
order by code compiled without ``reassoc`` (``CPU_JIT_STRICT``); both paths run
the same chunk code and the same merge, so the result does not depend on the
thread count or on the path.  Elementwise code is strict too, which keeps
``(x - hi) - lo`` as written.
"""

import numpy as np
from numba import njit, prange

from .._config import CPU_JIT, CPU_JIT_PARALLEL, CPU_JIT_STRICT


@njit(**CPU_JIT_STRICT)
def _cdiv(a, b):
    return (a + b - 1) // b


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
    """Mean, var, invstd of feature ``c`` from its shifted sums, and the output's
    coefficients ``coef[:, c] = (hi, lo, scale, offset)`` in the input's dtype."""
    m = s1 / n
    mean = shift + m
    var = s2 / n - m * m
    if var < 0.0:  # rounding only; keeps NaN
        var = 0.0
    invstd = 1.0 / np.sqrt(var + eps)
    stats[0, c] = mean
    stats[1, c] = invstd
    stats[2, c] = var
    coef[0, c] = mean
    coef[1, c] = mean - coef[0, c]
    coef[2, c] = invstd * weight[c]
    coef[3, c] = bias[c]


@njit(**CPU_JIT_STRICT)
def _eval_coefs(c, mean, var, eps, weight, bias, coef):
    invstd = 1.0 / np.sqrt(np.float64(var[c]) + eps)
    coef[0, c] = mean[c]
    coef[1, c] = 0.0
    coef[2, c] = invstd * weight[c]
    coef[3, c] = bias[c]


@njit(**CPU_JIT_STRICT)
def _backward_coefs(c, sdy, sdyxc, sxc, n, mean, invstd, weight, coef, dwb):
    """``dx = (dy + ((x - hi) - lo) * b + d) * a`` for feature ``c``.

    ``a = invstd * weight``, ``b = -invstd**2 * mean(dy * (x - mean))`` and
    ``d = -mean(dy)``: every factor stays in float32's range for data near 1e30
    (``a * b`` would underflow).  The saved ``mean`` may be the batch mean
    rounded to float32; ``sxc / n`` is its rounding error, so the gradient is
    taken about the exact batch mean.
    """
    m = np.float64(mean[c])
    istd = np.float64(invstd[c])
    delta = sxc / n
    true_mean = m + delta
    cov = (sdyxc - delta * sdy) / n  # mean(dy * (x - true_mean))
    a = istd * weight[c]
    coef[0, c] = a
    coef[1, c] = true_mean
    coef[2, c] = true_mean - coef[1, c]
    coef[3, c] = -istd * istd * cov
    coef[4, c] = -(sdy / n)
    dwb[0, c] = istd * cov * n
    dwb[1, c] = sdy


# =========================================================================== #
# NCHW-like family: x is (outer, C, inner), inner > 1.
# A chunk of feature c is rows [r0, r1) x columns [j0, j1) of x[:, c, :];
# chunk k of a feature is row block k // ncb, column block k % ncb.
# =========================================================================== #
@njit(**CPU_JIT)
def _chunk_sums_nchw(x, c, r0, r1, j0, j1, shift):
    # Per value: load, widen, subtract, add, fma -- 16 float32 (one line) in 4
    # AVX-512 double ops; far below the ~20 B/cycle L3 read rate per core.
    s1 = 0.0
    s2 = 0.0
    for r in range(r0, r1):
        xr = x[r, c]
        for j in range(j0, j1):
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
    lo = coef[1, c]
    s = coef[2, c]
    o = coef[3, c]
    for r in range(r0, r1):
        xr = x[r, c]
        yr = y[r, c]
        for j in range(j0, j1):
            yr[j] = ((xr[j] - hi) - lo) * s + o


@njit(**CPU_JIT)
def _chunk_backward_sums_nchw(dy, x, c, r0, r1, j0, j1, m):
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for r in range(r0, r1):
        dyr = dy[r, c]
        xr = x[r, c]
        for j in range(j0, j1):
            g = np.float64(dyr[j])
            xc = np.float64(xr[j]) - m
            sdy += g
            sdyxc += g * xc
            sxc += xc
    return sdy, sdyxc, sxc


@njit(**CPU_JIT_STRICT)
def _feature_backward_sums_nchw(dy, x, c, rows, cols, m):
    outer, _, inner = x.shape
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for r0 in range(0, outer, rows):
        for j0 in range(0, inner, cols):
            a, b, e = _chunk_backward_sums_nchw(
                dy, x, c, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner), m
            )
            sdy += a
            sdyxc += b
            sxc += e
    return sdy, sdyxc, sxc


@njit(**CPU_JIT_STRICT)
def _dx_nchw(dy, x, c, r0, r1, j0, j1, coef, dx):
    a = coef[0, c]
    hi = coef[1, c]
    lo = coef[2, c]
    b = coef[3, c]
    d = coef[4, c]
    for r in range(r0, r1):
        dyr = dy[r, c]
        xr = x[r, c]
        dxr = dx[r, c]
        for j in range(j0, j1):
            dxr[j] = (dyr[j] + ((xr[j] - hi) - lo) * b + d) * a


@njit(**CPU_JIT_PARALLEL)
def forward_nchw(x, weight, bias, eps, rows, cols, fused, write_y, p1, p2, coef, stats, y):
    """Batch statistics of ``x`` into ``stats`` (mean, invstd, var), and with
    ``write_y`` the normalised output into ``y``.  ``p1``/``p2`` are (C, chunks)
    scratch for the two-phase path."""
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
    else:
        for t in prange(nfeat * nchunks):
            c = t // nchunks
            k = t - c * nchunks
            r0 = (k // ncb) * rows
            j0 = (k % ncb) * cols
            p1[c, k], p2[c, k] = _chunk_sums_nchw(
                x, c, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner), np.float64(x[0, c, 0])
            )
        for c in prange(nfeat):
            shift = np.float64(x[0, c, 0])
            s1 = _sum_in_order(p1[c])
            s2 = _sum_in_order(p2[c])
            _forward_coefs(c, s1, s2, n, shift, eps, weight, bias, coef, stats)
        if write_y:
            last = nfeat * nchunks - 1
            for t in prange(nfeat * nchunks):
                u = last - t
                c = u // nchunks
                k = u - c * nchunks
                r0 = (k // ncb) * rows
                j0 = (k % ncb) * cols
                _affine_nchw(x, c, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner), coef, y)


@njit(**CPU_JIT_PARALLEL)
def normalize_nchw(x, mean, var, weight, bias, eps, rows, cols, coef, y):
    outer, nfeat, inner = x.shape
    for c in range(nfeat):
        _eval_coefs(c, mean, var, eps, weight, bias, coef)
    ncb = _cdiv(inner, cols)
    nchunks = _cdiv(outer, rows) * ncb
    for t in prange(nfeat * nchunks):
        c = t // nchunks
        k = t - c * nchunks
        r0 = (k // ncb) * rows
        j0 = (k % ncb) * cols
        _affine_nchw(x, c, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner), coef, y)


@njit(**CPU_JIT_PARALLEL)
def backward_nchw(dy, x, mean, invstd, weight, rows, cols, fused, p, coef, dwb, dx):
    """dx into ``dx``; (dweight, dbias) into ``dwb``.  ``p`` is (3, C, chunks)
    scratch for the two-phase path."""
    outer, nfeat, inner = x.shape
    n = outer * inner
    ncb = _cdiv(inner, cols)
    nchunks = _cdiv(outer, rows) * ncb
    if fused:
        for c in prange(nfeat):
            sdy, sdyxc, sxc = _feature_backward_sums_nchw(dy, x, c, rows, cols, np.float64(mean[c]))
            _backward_coefs(c, sdy, sdyxc, sxc, n, mean, invstd, weight, coef, dwb)
            _dx_nchw(dy, x, c, 0, outer, 0, inner, coef, dx)
    else:
        for t in prange(nfeat * nchunks):
            c = t // nchunks
            k = t - c * nchunks
            r0 = (k // ncb) * rows
            j0 = (k % ncb) * cols
            p[0, c, k], p[1, c, k], p[2, c, k] = _chunk_backward_sums_nchw(
                dy, x, c, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner), np.float64(mean[c])
            )
        for c in prange(nfeat):
            sdy = _sum_in_order(p[0, c])
            sdyxc = _sum_in_order(p[1, c])
            sxc = _sum_in_order(p[2, c])
            _backward_coefs(c, sdy, sdyxc, sxc, n, mean, invstd, weight, coef, dwb)
        last = nfeat * nchunks - 1
        for t in prange(nfeat * nchunks):
            u = last - t
            c = u // nchunks
            k = u - c * nchunks
            r0 = (k // ncb) * rows
            j0 = (k % ncb) * cols
            _dx_nchw(dy, x, c, r0, min(r0 + rows, outer), j0, min(j0 + cols, inner), coef, dx)


# =========================================================================== #
# Channel-contiguous family: x is (rows, C).  Column block b is columns
# [b * width, ...) with width = min(C, NC_COLS); a chunk is ``rows`` rows of one
# column block.  Each column's sum runs over rows in order (the vector lanes are
# columns), so neither column blocking nor the path changes any result.
# =========================================================================== #
@njit(**CPU_JIT)
def _chunk_sums_nc(x, r0, r1, c0, c1, shift, s1, s2):
    """Shifted sums of columns [c0, c1) over rows [r0, r1) into s1[:c1-c0], s2[:c1-c0]."""
    w = c1 - c0
    for i in range(w):
        s1[i] = 0.0
        s2[i] = 0.0
    for r in range(r0, r1):
        xr = x[r, c0:c1]
        sh = shift[c0:c1]
        for i in range(w):
            d = np.float64(xr[i]) - sh[i]
            s1[i] += d
            s2[i] += d * d


@njit(**CPU_JIT_STRICT)
def _affine_nc(x, r0, r1, c0, c1, coef, y):
    hi = coef[0, c0:c1]
    lo = coef[1, c0:c1]
    s = coef[2, c0:c1]
    o = coef[3, c0:c1]
    w = c1 - c0
    for r in range(r0, r1):
        xr = x[r, c0:c1]
        yr = y[r, c0:c1]
        for i in range(w):
            yr[i] = ((xr[i] - hi[i]) - lo[i]) * s[i] + o[i]


@njit(**CPU_JIT)
def _chunk_backward_sums_nc(dy, x, r0, r1, c0, c1, mean, s):
    w = c1 - c0
    for i in range(w):
        s[0, i] = 0.0
        s[1, i] = 0.0
        s[2, i] = 0.0
    sdy = s[0]
    sdyxc = s[1]
    sxc = s[2]
    for r in range(r0, r1):
        dyr = dy[r, c0:c1]
        xr = x[r, c0:c1]
        m = mean[c0:c1]
        for i in range(w):
            g = np.float64(dyr[i])
            xc = np.float64(xr[i]) - m[i]
            sdy[i] += g
            sdyxc[i] += g * xc
            sxc[i] += xc


@njit(**CPU_JIT_STRICT)
def _dx_nc(dy, x, r0, r1, c0, c1, coef, dx):
    a = coef[0, c0:c1]
    hi = coef[1, c0:c1]
    lo = coef[2, c0:c1]
    b = coef[3, c0:c1]
    d = coef[4, c0:c1]
    w = c1 - c0
    for r in range(r0, r1):
        dyr = dy[r, c0:c1]
        xr = x[r, c0:c1]
        dxr = dx[r, c0:c1]
        for i in range(w):
            dxr[i] = (dyr[i] + ((xr[i] - hi[i]) - lo[i]) * b[i] + d[i]) * a[i]


@njit(**CPU_JIT_PARALLEL)
def forward_nc(x, weight, bias, eps, rows, width, fused, write_y, p1, p2, coef, stats, y):
    """As :func:`forward_nchw` for (rows, C) data; ``p1``/``p2`` are (row blocks, C)."""
    nrows, nfeat = x.shape
    n = nrows
    nrb = _cdiv(nrows, rows)
    ncb = _cdiv(nfeat, width)
    shift = np.empty(nfeat)
    for c in range(nfeat):
        shift[c] = x[0, c]
    if fused:
        for b in prange(ncb):
            c0 = b * width
            c1 = min(c0 + width, nfeat)
            s1 = np.empty(width)
            s2 = np.empty(width)
            t1 = np.zeros(width)
            t2 = np.zeros(width)
            for r0 in range(0, nrows, rows):
                _chunk_sums_nc(x, r0, min(r0 + rows, nrows), c0, c1, shift, s1, s2)
                _accumulate(t1, s1, c1 - c0)
                _accumulate(t2, s2, c1 - c0)
            for c in range(c0, c1):
                _forward_coefs(c, t1[c - c0], t2[c - c0], n, shift[c], eps, weight, bias, coef, stats)
            if write_y:
                _affine_nc(x, 0, nrows, c0, c1, coef, y)
    else:
        for rb in prange(nrb):
            r0 = rb * rows
            r1 = min(r0 + rows, nrows)
            for c0 in range(0, nfeat, width):
                c1 = min(c0 + width, nfeat)
                _chunk_sums_nc(x, r0, r1, c0, c1, shift, p1[rb, c0:c1], p2[rb, c0:c1])
        for b in prange(ncb):
            c0 = b * width
            c1 = min(c0 + width, nfeat)
            t1 = np.zeros(width)
            t2 = np.zeros(width)
            for rb in range(nrb):
                _accumulate(t1, p1[rb, c0:c1], c1 - c0)
                _accumulate(t2, p2[rb, c0:c1], c1 - c0)
            for c in range(c0, c1):
                _forward_coefs(c, t1[c - c0], t2[c - c0], n, shift[c], eps, weight, bias, coef, stats)
        if write_y:
            for t in prange(nrb):
                r0 = (nrb - 1 - t) * rows
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
def backward_nc(dy, x, mean, invstd, weight, rows, width, fused, p, coef, dwb, dx):
    """As :func:`backward_nchw` for (rows, C) data; ``p`` is (row blocks, 3, C)."""
    nrows, nfeat = x.shape
    n = nrows
    nrb = _cdiv(nrows, rows)
    ncb = _cdiv(nfeat, width)
    if fused:
        for b in prange(ncb):
            c0 = b * width
            c1 = min(c0 + width, nfeat)
            s = np.empty((3, width))
            t = np.zeros((3, width))
            for r0 in range(0, nrows, rows):
                _chunk_backward_sums_nc(dy, x, r0, min(r0 + rows, nrows), c0, c1, mean, s)
                for q in range(3):
                    _accumulate(t[q], s[q], c1 - c0)
            for c in range(c0, c1):
                i = c - c0
                _backward_coefs(c, t[0, i], t[1, i], t[2, i], n, mean, invstd, weight, coef, dwb)
            _dx_nc(dy, x, 0, nrows, c0, c1, coef, dx)
    else:
        for rb in prange(nrb):
            r0 = rb * rows
            r1 = min(r0 + rows, nrows)
            for c0 in range(0, nfeat, width):
                c1 = min(c0 + width, nfeat)
                _chunk_backward_sums_nc(dy, x, r0, r1, c0, c1, mean, p[rb, :, c0:c1])
        for b in prange(ncb):
            c0 = b * width
            c1 = min(c0 + width, nfeat)
            t = np.zeros((3, width))
            for rb in range(nrb):
                for q in range(3):
                    _accumulate(t[q], p[rb, q, c0:c1], c1 - c0)
            for c in range(c0, c1):
                i = c - c0
                _backward_coefs(c, t[0, i], t[1, i], t[2, i], n, mean, invstd, weight, coef, dwb)
        for t in prange(nrb):
            r0 = (nrb - 1 - t) * rows
            _dx_nc(dy, x, r0, min(r0 + rows, nrows), 0, nfeat, coef, dx)
