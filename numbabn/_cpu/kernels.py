"""Numba CPU kernels.  Private: inputs are validated and shaped by ``ops.py``.

Two families, chosen by the layout of ``x`` seen as ``(outer, C, inner)``:

* ``*_nchw`` kernels take the 3-D view with ``inner > 1`` (NCHW-like data: each
  feature is ``outer`` runs of ``inner`` contiguous values);
* ``*_nc`` kernels take the 2-D view ``(rows, C)`` of channel-contiguous data
  (NHWC, or dense ``(N, C)``), vectorising across features.

Every reduction runs over a fixed chunk grid that depends on the shape only, and
chunk results are merged in a fixed order: results are bitwise identical for any
number of threads.  All accumulation is in float64 whatever the input dtype, and
statistics are two-pass inside each chunk (the chunk is in L1 for the second
pass) and merged across chunks with Chan's formula, so ill-conditioned float32
data (large mean, tiny spread) keeps full accuracy.
"""

import numpy as np
from numba import njit, prange

from .._config import CPU_JIT, CPU_JIT_PARALLEL


@njit(**CPU_JIT)
def _span(block, size, total):
    """Start and stop of block number ``block`` of ``size`` items out of ``total``."""
    start = block * size
    return start, min(start + size, total)


# --------------------------------------------------------------------------- #
# Per-feature statistics: partial (mean, M2) per chunk, then a fixed-order merge.
# --------------------------------------------------------------------------- #
@njit(**CPU_JIT_PARALLEL)
def stats_partials_nchw(x, rows, cols, pmean, pm2):
    outer, nfeat, inner = x.shape
    ncb = (inner + cols - 1) // cols
    nchunks = pmean.shape[0]
    for t in prange(nfeat * nchunks):
        c = t // nchunks
        k = t - c * nchunks
        r0, r1 = _span(k // ncb, rows, outer)
        j0, j1 = _span(k % ncb, cols, inner)
        s = 0.0
        for r in range(r0, r1):
            for j in range(j0, j1):
                s += x[r, c, j]
        m = s / ((r1 - r0) * (j1 - j0))
        q = 0.0
        for r in range(r0, r1):
            for j in range(j0, j1):
                d = x[r, c, j] - m
                q += d * d
        pmean[k, c] = m
        pm2[k, c] = q


@njit(**CPU_JIT_PARALLEL)
def stats_partials_nc(x, rows, cblock, pmean, pm2):
    nrows, nfeat = x.shape
    ncb = (nfeat + cblock - 1) // cblock
    nrb = pmean.shape[0]
    for t in prange(nrb * ncb):
        rb = t // ncb
        r0, r1 = _span(rb, rows, nrows)
        c0, c1 = _span(t - rb * ncb, cblock, nfeat)
        s = np.zeros(c1 - c0)
        for r in range(r0, r1):
            for c in range(c0, c1):
                s[c - c0] += x[r, c]
        n = r1 - r0
        for i in range(c1 - c0):
            s[i] = s[i] / n
        q = np.zeros(c1 - c0)
        for r in range(r0, r1):
            for c in range(c0, c1):
                d = x[r, c] - s[c - c0]
                q[c - c0] += d * d
        for c in range(c0, c1):
            pmean[rb, c] = s[c - c0]
            pm2[rb, c] = q[c - c0]


@njit(**CPU_JIT_PARALLEL)
def merge_partials(counts, pmean, pm2, mean, var):
    """Chan's parallel-variance merge of chunk results, in chunk order."""
    nchunks, nfeat = pmean.shape
    for c in prange(nfeat):
        n = counts[0]
        m = pmean[0, c]
        q = pm2[0, c]
        for k in range(1, nchunks):
            nb = counts[k]
            total = n + nb
            d = pmean[k, c] - m
            m += d * (nb / total)
            q += pm2[k, c] + d * d * (n * nb / total)
            n = total
        mean[c] = m
        var[c] = q / n


# --------------------------------------------------------------------------- #
# Elementwise affine transform y = (x - shift) * scale + offset, per feature.
# Used by normalisation (shift = mean) and by the backward's dx
# (dx = dy * a + (x - mean) * b + d, see ``affine2_*``).
# --------------------------------------------------------------------------- #
@njit(**CPU_JIT_PARALLEL)
def affine_nchw(x, shift, scale, offset, rows, cols, y):
    outer, nfeat, inner = x.shape
    nrb = (outer + rows - 1) // rows
    ncb = (inner + cols - 1) // cols
    nchunks = nrb * ncb
    for t in prange(nfeat * nchunks):
        c = t // nchunks
        k = t - c * nchunks
        r0, r1 = _span(k // ncb, rows, outer)
        j0, j1 = _span(k % ncb, cols, inner)
        m = shift[c]
        s = scale[c]
        o = offset[c]
        for r in range(r0, r1):
            for j in range(j0, j1):
                y[r, c, j] = (x[r, c, j] - m) * s + o


@njit(**CPU_JIT_PARALLEL)
def affine_nc(x, shift, scale, offset, rows, cblock, y):
    nrows, nfeat = x.shape
    nrb = (nrows + rows - 1) // rows
    ncb = (nfeat + cblock - 1) // cblock
    for t in prange(nrb * ncb):
        rb = t // ncb
        r0, r1 = _span(rb, rows, nrows)
        c0, c1 = _span(t - rb * ncb, cblock, nfeat)
        for r in range(r0, r1):
            for c in range(c0, c1):
                y[r, c] = (x[r, c] - shift[c]) * scale[c] + offset[c]


@njit(**CPU_JIT_PARALLEL)
def affine2_nchw(dy, x, a, shift, b, d, rows, cols, dx):
    outer, nfeat, inner = x.shape
    nrb = (outer + rows - 1) // rows
    ncb = (inner + cols - 1) // cols
    nchunks = nrb * ncb
    for t in prange(nfeat * nchunks):
        c = t // nchunks
        k = t - c * nchunks
        r0, r1 = _span(k // ncb, rows, outer)
        j0, j1 = _span(k % ncb, cols, inner)
        ac = a[c]
        mc = shift[c]
        bc = b[c]
        dc = d[c]
        for r in range(r0, r1):
            for j in range(j0, j1):
                dx[r, c, j] = dy[r, c, j] * ac + (x[r, c, j] - mc) * bc + dc


@njit(**CPU_JIT_PARALLEL)
def affine2_nc(dy, x, a, shift, b, d, rows, cblock, dx):
    nrows, nfeat = x.shape
    nrb = (nrows + rows - 1) // rows
    ncb = (nfeat + cblock - 1) // cblock
    for t in prange(nrb * ncb):
        rb = t // ncb
        r0, r1 = _span(rb, rows, nrows)
        c0, c1 = _span(t - rb * ncb, cblock, nfeat)
        for r in range(r0, r1):
            for c in range(c0, c1):
                dx[r, c] = dy[r, c] * a[c] + (x[r, c] - shift[c]) * b[c] + d[c]


# --------------------------------------------------------------------------- #
# Backward reductions: per chunk, sum(dy), sum(dy * xc), sum(xc) with
# xc = x - mean.  sum(xc) recovers the exact batch mean in float64 even when the
# saved mean was rounded to float32 (see ops.backward).
# --------------------------------------------------------------------------- #
@njit(**CPU_JIT_PARALLEL)
def backward_partials_nchw(dy, x, mean, rows, cols, pdy, pdyxc, pxc):
    outer, nfeat, inner = x.shape
    ncb = (inner + cols - 1) // cols
    nchunks = pdy.shape[0]
    for t in prange(nfeat * nchunks):
        c = t // nchunks
        k = t - c * nchunks
        r0, r1 = _span(k // ncb, rows, outer)
        j0, j1 = _span(k % ncb, cols, inner)
        m = mean[c]
        sdy = 0.0
        sdyxc = 0.0
        sxc = 0.0
        for r in range(r0, r1):
            for j in range(j0, j1):
                g = np.float64(dy[r, c, j])
                xc = x[r, c, j] - m
                sdy += g
                sdyxc += g * xc
                sxc += xc
        pdy[k, c] = sdy
        pdyxc[k, c] = sdyxc
        pxc[k, c] = sxc


@njit(**CPU_JIT_PARALLEL)
def backward_partials_nc(dy, x, mean, rows, cblock, pdy, pdyxc, pxc):
    nrows, nfeat = x.shape
    ncb = (nfeat + cblock - 1) // cblock
    nrb = pdy.shape[0]
    for t in prange(nrb * ncb):
        rb = t // ncb
        r0, r1 = _span(rb, rows, nrows)
        c0, c1 = _span(t - rb * ncb, cblock, nfeat)
        sdy = np.zeros(c1 - c0)
        sdyxc = np.zeros(c1 - c0)
        sxc = np.zeros(c1 - c0)
        for r in range(r0, r1):
            for c in range(c0, c1):
                g = np.float64(dy[r, c])
                xc = x[r, c] - mean[c]
                sdy[c - c0] += g
                sdyxc[c - c0] += g * xc
                sxc[c - c0] += xc
        for c in range(c0, c1):
            pdy[rb, c] = sdy[c - c0]
            pdyxc[rb, c] = sdyxc[c - c0]
            pxc[rb, c] = sxc[c - c0]


@njit(**CPU_JIT_PARALLEL)
def sum_partials(p, out):
    """Sum chunk partials over chunks, in chunk order."""
    nchunks, nfeat = p.shape
    for c in prange(nfeat):
        s = 0.0
        for k in range(nchunks):
            s += p[k, c]
        out[c] = s
