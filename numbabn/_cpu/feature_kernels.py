"""Numba CPU kernels.  Private: inputs are validated, shaped and allocated by ``ops.py``.

The per-value and per-feature maths is :mod:`numbabn._core`'s, compiled here
(the GPU twins in :mod:`numbabn._gpu.feature_kernels` compile the same functions).  Each
kernel runs the phases of one operation, named as on the GPU:

* ``forward_*``: moments partials per chunk (:func:`_chunk_sums_nchw` /
  :func:`_chunk_sums_nc`, turned into ``(count, mean, M2)`` by
  ``shifted_moments``), their Chan merge in chunk order, the coefficients, and
  optionally the affine pass ``y = (x - HI) * SCALE + OFFSET``;
* ``normalize_*``: the affine pass with given statistics (eval mode, and
  ``batch_norm_elemt``);
* ``backward_*``: the three backward sums per chunk, their merge in chunk order,
  and optionally the coefficients and the dx pass
  ``dx = (dy + (x - HI) * XC_COEF + DY_SHIFT) * DX_SCALE``;
* ``backward_elemt_*``: the dx pass with given sums (``batch_norm_backward_elemt``).

Batch norm is memory-bound.  The least a training forward can move is 2 passes
of the tensor (read ``x``, write ``y``), the backward 3 (read ``x`` and ``dy``,
write ``dx``); a plain copy (2 passes) is the ceiling to compare with.  So each
operation is one kernel call, and each input is read from memory once where the
data allows:

* **fused** (NCHW-like data, enough features, a feature small enough to stay in
  cache): one task per feature reduces it (pass 1, from memory), turns the result
  into coefficients, and writes its output (pass 2, from L2/L3 where pass 1 left
  it).
* **two-phase** (channel-contiguous data, few features, or huge features): a
  parallel loop writes one partial per chunk, a second merges them per feature,
  a third writes the output.  Both cores work whatever the number of features.
  Each thread takes the same contiguous range of chunks in both passes and walks
  it backwards the second time, so the output pass starts on the data its own
  reduction read last (still in its L2 / the L3).  The ranges depend on the
  thread count, the chunks and their merge order do not.

Two layouts, chosen by ``x`` seen as ``(outer, C, inner)``:

* ``*_nchw`` kernels take the 3-D view with ``inner > 1``: each feature is
  ``outer`` runs of ``inner`` contiguous values;
* ``*_nc`` kernels take the 2-D view ``(rows, C)`` of channel-contiguous data
  (NHWC, dense ``(N, C)``), vectorising across features.

Launch geometry comes in one ``ops.Geometry`` tuple (rows and columns of a chunk,
threads, path flags, block lengths): every tunable is a kernel argument, never a
constant frozen into the compiled (and disk-cached) code.

Numerics.  Forward moments: each chunk sums ``x - shift`` and its square in
float64 about the chunk's first value (``shift``), which bounds the cancellation
in ``M2`` by the chunk, then chunks are merged with Chan's formula in chunk
order.  Backward sums ``dy``, ``dy * xc`` and ``xc`` with ``xc = (x - hi) *
scale`` (``hi`` the mean in the input's dtype, ``scale`` a power of two near
``invstd``) are taken in the input's dtype over short blocks fixed by the shape
(``bwd_block`` values of a row, or rows of a column) and the block sums added in
float64 in order: ``x - hi`` is exact near the mean (Sterbenz), the scale keeps
products in range for any magnitude, and a block's float32 rounding is about
``block / lanes * 2**-24`` relative (the README's numerics table holds).  The
output is ``(x - hi) * scale + offset`` in the input's dtype with the rounding
``mean - hi`` folded into the offset in float64 (see ``_core.affine_coefs``).

Reproducibility.  Chunks depend on the shape only; partials are merged in chunk
order by code compiled without ``reassoc`` (``CPU_JIT_STRICT``); the fused and
two-phase paths run the same chunk code and the same merge, so results do not
depend on the thread count or on the path.  Elementwise code is strict too, which
keeps ``(x - hi) * scale + offset`` as written.
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import _cache, _core
from .._config import (CPU_HELPER, CPU_HELPER_STRICT, CPU_JIT_PARALLEL, CPU_JIT_STRICT,
                       CPU_JIT_STRICT_PARALLEL)
from .._core import (DX_SCALE, DY_SHIFT, HI, OFFSET, SCALE, SUM_DY, SUM_DY_XHI, SUM_XHI, XC_COEF)
from .half import stored, value_of
from .runtime import compile_core, inline_in_serial_code, serial_kernels

# The statistics core, compiled for the CPU (inlined into strict serial callers).
shifted_moments = compile_core(_core.shifted_moments)
chan_merge = compile_core(_core.chan_merge)
invstd_of = compile_core(_core.invstd_of)
affine_coefs = compile_core(_core.affine_coefs)
sum_dy_xmu_about = compile_core(_core.sum_dy_xmu_about)
backward_coefs = compile_core(_core.backward_coefs)
parameter_grads = compile_core(_core.parameter_grads)
_cdiv = compile_core(_core.cdiv)
store_statistics = compile_core(_core.store_statistics)

# The least bytes of each coefficient row per segment of a channel-contiguous
# elementwise pass (see :func:`_nc_table`).  Each segment is one vectorised loop
# with its own setup, so short segments (a segment of C values is one vector
# for C = 16) cost more in setup than in work; four rows of 4 KiB stay in L1.
NC_SEGMENT_BYTES = 4096


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _thread_span(t, nth, total):
    """The contiguous range of ``total`` tasks that thread ``t`` of ``nth`` takes."""
    return total * t // nth, total * (t + 1) // nth


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _accumulate(total, part, width):
    for i in range(width):
        total[i] += part[i]


# =========================================================================== #
# Alignment of the channel-contiguous elementwise passes.  A 64-byte vector load
# or store that straddles two cache lines costs two, and NumPy's large arrays
# start 16 bytes past a page (malloc's header), so every AVX-512 access of a
# plain loop over them straddles; a (rows, C) pass also reads its coefficient
# rows (L1-resident, but straddling too).  When x and the outputs are
# C-contiguous, a block of rows is one run: its first values up to x's first
# 64-byte boundary take the coefficients one by one, then segments of a multiple
# of C values run with aligned loads of x and of a coefficient table laid out to
# match (:func:`_nc_table`), with no per-row loop overhead.  One thread,
# (100352, 64) float32, normalize: 1.1 ms against 1.7-2.2 ms per row (the copy
# 0.8 ms).  Each value's arithmetic is unchanged, so results do not depend on
# addresses (tests/cpu/test_alignment.py).  Reductions are never split this way
# where their vector lanes run along a feature (NCHW sums): the lanes, hence the
# rounding, would depend on where the data lives.  NCHW elementwise runs are not
# split either: measured no faster (64x64x56x56 streams from memory at the same
# speed; 14x14 runs are too short to pay for a head and a tail).
# =========================================================================== #
def _contiguous(a):
    """Whether ``a`` is typed C-contiguous (a constant of the compiled code)."""


def _rows_view(a, r0, r1):
    """Rows [r0, r1) of the C-contiguous 2-D ``a`` as one 1-D array (for any
    other layout an empty array, never used: see :func:`_contiguous`)."""


def _row(a, r):
    """``a[r]``, or None for a None ``a`` (an optional array: see :func:`backward_nc`)."""


def _seg(a, n, p0, p1):
    """``a[n, p0:p1]``, or None for a None ``a``."""


def _seg1(a, b0, b1):
    """``a[b0:b1]``, or None for a None ``a``."""


@overload(_contiguous, jit_options=CPU_JIT_STRICT)
def _contiguous_impl(a):
    if isinstance(a, types.NoneType) or a.layout == "C":
        return lambda a: True
    return lambda a: False


@overload(_rows_view, jit_options=CPU_JIT_STRICT)
def _rows_view_impl(a, r0, r1):
    if isinstance(a, types.NoneType):
        return lambda a, r0, r1: None
    if a.layout == "C":
        return lambda a, r0, r1: a[r0:r1].reshape((r1 - r0) * a.shape[1])
    return lambda a, r0, r1: a[r0, :0]


@overload(_row, jit_options=CPU_JIT_STRICT)
def _row_impl(a, r):
    if isinstance(a, types.NoneType):
        return lambda a, r: None
    return lambda a, r: a[r]


@overload(_seg, jit_options=CPU_JIT_STRICT)
def _seg_impl(a, n, p0, p1):
    if isinstance(a, types.NoneType):
        return lambda a, n, p0, p1: None
    return lambda a, n, p0, p1: a[n, p0:p1]


@overload(_seg1, jit_options=CPU_JIT_STRICT)
def _seg1_impl(a, b0, b1):
    if isinstance(a, types.NoneType):
        return lambda a, b0, b1: None
    return lambda a, b0, b1: a[b0:b1]


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _aligned_empty(shape, dtype_like):
    """An uninitialised (rows, n) array like ``dtype_like`` starting on a 64-byte boundary."""
    per_line = 64 // dtype_like.itemsize
    raw = np.empty(shape[0] * shape[1] + per_line, dtype_like.dtype)
    off = ((-raw.ctypes.data) % 64) // dtype_like.itemsize
    return raw[off:off + shape[0] * shape[1]].reshape(shape)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _nc_table(coef, x, flat):
    """The coefficients of a channel-contiguous elementwise pass, laid out for
    aligned loads, and the lead ``k``:

    * ``flat`` (x and the outputs C-contiguous): a block of rows is one run of
      values; its first ``k`` values (up to x's first 64-byte boundary) take
      ``coef`` directly, then segments of ``L`` values (``L`` a multiple of C
      and of 64 bytes, and at least ``NC_SEGMENT_BYTES`` of ``tab``'s dtype)
      take ``tab[q, t] = coef[q, (t + k) % C]``, 64-byte aligned like the
      segments.  Every block of the pass starts on the same
      offset from a 64-byte boundary as ``x`` (blocks are multiples of 64 bytes,
      see :func:`_elementwise_rows`), so one table serves them all.
    * otherwise (strided rows): ``coef`` itself, each row taken from its start.
    """
    nq, nfeat = coef.shape
    isz = x.itemsize  # (coef's for float inputs; 2 for half ones, whose coef is float32)
    if flat:
        k = ((-x.ctypes.data) % 64) // isz
        width = nfeat * (64 // math.gcd(nfeat * isz, 64))
        width *= _cdiv(NC_SEGMENT_BYTES // coef.itemsize, width)
        tab = _aligned_empty((nq, width), coef)
        for q in range(nq):  # copies of coef[q] rotated by k (no division per value)
            row = tab[q]
            src = coef[q]
            t = 0
            c = k % nfeat
            while t < width:
                m = min(nfeat - c, width - t)
                for i in range(m):  # (a slice assignment compiles its error message)
                    row[t + i] = src[c + i]
                t += m
                c = 0
        return tab, k
    return coef, 0


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _elementwise_rows(rows, nfeat, isz):
    """``rows`` rounded up so that a block of rows is a multiple of 64 bytes."""
    per = 64 // math.gcd(nfeat * isz, 64)
    return _cdiv(rows, per) * per


# =========================================================================== #
# Per-feature coefficients from statistics or sums (strict: fixed order).
# Each writes column c of the float64 ``stats``/``sums`` tables and of the
# coefficient table ``coef`` in the input's dtype.
# =========================================================================== #
@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _store_forward(c, n, mean, m2, eps, weight, bias, coef, stats):
    var = m2 / n
    invstd = invstd_of(var, eps)
    store_statistics(stats, c, mean, invstd, var, m2)
    coef[HI, c] = mean
    coef[SCALE, c], coef[OFFSET, c] = affine_coefs(mean, np.float64(coef[HI, c]), invstd,
                                                   np.float64(weight[c]), np.float64(bias[c]))


@njit(inline=inline_in_serial_code, **CPU_JIT_STRICT)  # called from Python too
def normalize_coefs(mean, spread, spread_is_var, eps, weight, bias, coef):
    """Coefficients from a given mean and either var (``spread_is_var``) or invstd."""
    for c in range(mean.shape[0]):
        m = np.float64(mean[c])
        invstd = invstd_of(np.float64(spread[c]), eps) if spread_is_var else np.float64(spread[c])
        coef[HI, c] = m
        coef[SCALE, c], coef[OFFSET, c] = affine_coefs(m, np.float64(coef[HI, c]), invstd,
                                                       np.float64(weight[c]), np.float64(bias[c]))


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _store_backward(c, n, sdy, sdyxhi, sxhi, hi, invstd, weight, coef, dwb):
    """Coefficients of dx about the exact batch mean ``hi + sxhi / n`` (``hi``,
    the saved mean, may have been rounded to float32), and the parameter grads."""
    n = np.float64(n)  # the count as every caller of backward_coefs passes it
    mean = hi + sxhi / n
    sum_dy_xmu = sum_dy_xmu_about(sdy, sdyxhi, hi, mean)
    coef[HI, c] = mean
    coef[DX_SCALE, c], coef[XC_COEF, c], coef[DY_SHIFT, c] = backward_coefs(
        n, sdy, sum_dy_xmu, mean, np.float64(coef[HI, c]), invstd, np.float64(weight[c]))
    dwb[0, c], dwb[1, c] = parameter_grads(invstd, sdy, sum_dy_xmu)


@njit(inline=inline_in_serial_code, **CPU_JIT_STRICT)  # called from Python too
def elemt_backward_coefs(n, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """dx coefficients from given sums over ``n`` values."""
    for c in range(mean.shape[0]):
        m = np.float64(mean[c])
        coef[HI, c] = m
        coef[DX_SCALE, c], coef[XC_COEF, c], coef[DY_SHIFT, c] = backward_coefs(
            n, sum_dy[c], sum_dy_xmu[c], m, np.float64(coef[HI, c]), np.float64(invstd[c]),
            np.float64(weight[c]))


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _pow2_near(v):
    """A power of two near ``v`` (1 when ``v`` is not finite and positive),
    within float32's normal range."""
    if not (v > 0.0 and v < np.inf):
        return 1.0
    _, e = math.frexp(v)
    return math.ldexp(1.0, max(-120, min(120, e)))


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _backward_scales(invstd):
    """Per feature, a power of two near ``invstd`` in the input's dtype: the
    backward sums take ``xc = (x - hi) * scale`` (exact: a power of two), so
    ``xc`` is of order 1 and ``dy * xc`` of the order of ``dy`` whatever the
    data's magnitude (1e30 or 1e-30 stays in float32's range)."""
    s = np.empty_like(invstd)
    for c in range(invstd.shape[0]):
        s[c] = _pow2_near(np.float64(invstd[c]))
    return s


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _unscaled_sums(c, sdy, sdyxc, sxc, scale, sums):
    sc = np.float64(scale[c])
    sums[SUM_DY, c] = sdy
    sums[SUM_DY_XHI, c] = sdyxc / sc
    sums[SUM_XHI, c] = sxc / sc


# =========================================================================== #
# NCHW-like family: x is (outer, C, inner), inner > 1.
# A chunk of feature c is rows [r0, r1) x columns [j0, j1) of x[:, c, :];
# chunk k of a feature is row block k // ncb, column block k % ncb.
# Inner loops index 0-based slices: a loop from a non-zero start would keep
# Numba's negative-index wraparound and vectorise into gathers (5x slower).
# =========================================================================== #
@njit(**CPU_HELPER)
def _chunk_sums_nchw(x, c, r0, r1, j0, j1, shift, short_run):
    """Float64 sums of ``x - shift`` and its square over one chunk.  Rows of at
    most ``short_run`` values are taken four at a time, ``(d0 + d1) + (d2 +
    d3)`` per position: a quarter of the per-row reductions across the vector
    lanes, which cost more than the sums on short rows (14x14 planes: 0.055
    against 0.090 ns per value, one core, in L1)."""
    s1 = 0.0
    s2 = 0.0
    r = r0
    if j1 - j0 <= short_run:
        while r + 4 <= r1:
            x0 = x[r, c, j0:j1]
            x1 = x[r + 1, c, j0:j1]
            x2 = x[r + 2, c, j0:j1]
            x3 = x[r + 3, c, j0:j1]
            for j in range(j1 - j0):
                d0 = np.float64(value_of(x0[j])) - shift
                d1 = np.float64(value_of(x1[j])) - shift
                d2 = np.float64(value_of(x2[j])) - shift
                d3 = np.float64(value_of(x3[j])) - shift
                s1 += (d0 + d1) + (d2 + d3)
                s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            r += 4
    for r in range(r, r1):
        xr = x[r, c, j0:j1]
        for j in range(j1 - j0):
            d = np.float64(value_of(xr[j])) - shift
            s1 += d
            s2 += d * d
    return s1, s2


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _chunk_moments_nchw(x, c, r0, r1, j0, j1, short_run):
    """``(count, mean, M2)`` of one chunk, about its first value."""
    n = (r1 - r0) * (j1 - j0)
    shift = np.float64(value_of(x[r0, c, j0]))
    s1, s2 = _chunk_sums_nchw(x, c, r0, r1, j0, j1, shift, short_run)
    mean, m2 = shifted_moments(n, shift, s1, s2)
    return n, mean, m2


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _chunk_bounds(k, ncb, rows, cols, outer, inner):
    """Bounds of chunk ``k`` of a feature: row block ``k // ncb``, column block ``k % ncb``."""
    r0 = (k // ncb) * rows
    j0 = (k % ncb) * cols
    return r0, min(r0 + rows, outer), j0, min(j0 + cols, inner)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _feature_moments_nchw(x, c, rows, cols, short_run):
    """Moments of feature ``c``: chunk by chunk, merged in chunk order."""
    outer, _, inner = x.shape
    ncb = _cdiv(inner, cols)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for k in range(_cdiv(outer, rows) * ncb):
        r0, r1, j0, j1 = _chunk_bounds(k, ncb, rows, cols, outer, inner)
        nk, mk, qk = _chunk_moments_nchw(x, c, r0, r1, j0, j1, short_run)
        n, mean, m2 = chan_merge(n, mean, m2, np.float64(nk), mk, qk)
    return n, mean, m2


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _merge_chunk_moments_nchw(p, c, ncb, rows, cols, outer, inner):
    """Chan-merge feature ``c``'s chunk moments ``p[0, c]`` (means), ``p[1, c]``
    (M2s) in chunk order (strict code: the kernels allow reassociation)."""
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for k in range(p.shape[2]):
        r0, r1, j0, j1 = _chunk_bounds(k, ncb, rows, cols, outer, inner)
        n, mean, m2 = chan_merge(n, mean, m2, np.float64((r1 - r0) * (j1 - j0)), p[0, c, k],
                                 p[1, c, k])
    return n, mean, m2


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _sum_in_order(p):
    s = 0.0
    for k in range(p.shape[0]):
        s += p[k]
    return s


@njit(inline="always", **CPU_HELPER_STRICT)
def _affine_nchw(x, c, r0, r1, j0, j1, coef, zero, y):
    """``y = (x - HI) * SCALE + OFFSET`` over rows [r0, r1) and positions
    [j0, j1) of feature ``c``, then a ReLU unless ``zero`` (a zero of the
    coefficients' dtype) is None.  None is a type: without the ReLU its loop is
    not compiled (Numba prunes ``is None`` branches on argument types)."""
    hi = coef[HI, c]
    s = coef[SCALE, c]
    o = coef[OFFSET, c]
    for r in range(r0, r1):
        xr = x[r, c, j0:j1]
        yr = y[r, c, j0:j1]
        if zero is not None:
            for j in range(j1 - j0):
                v = (value_of(xr[j]) - hi) * s + o
                yr[j] = stored(zero if v < zero else v, yr)  # NaN, -0.0 stay, as torch.relu
        else:
            for j in range(j1 - j0):
                yr[j] = stored((value_of(xr[j]) - hi) * s + o, yr)


def _block_backward_sums_kernel(masked):
    """The three sums of one block, in the input's dtype (vector lanes of it);
    with ``masked``, ``dy`` taken as 0 where ``y <= 0`` (the ReLU of the fused
    ``batch_norm_relu``; a NaN ``y`` counts as ``<= 0``, as PyTorch's
    ``threshold_backward``).  ``masked`` is a constant of the compiled code."""

    @njit(**CPU_HELPER)
    def block_sums(dyr, yr, xr, m, s):
        a = np.float32(0.0)
        b = np.float32(0.0)
        e = np.float32(0.0)
        zero = m - m
        for j in range(dyr.shape[0]):
            if masked:
                g = value_of(dyr[j]) if value_of(yr[j]) > zero else zero
            else:
                g = value_of(dyr[j])
            xc = (value_of(xr[j]) - m) * s
            a += g
            b += g * xc
            e += xc
        return a, b, e

    return block_sums


_block_backward_sums = _block_backward_sums_kernel(masked=False)
_block_backward_sums_masked = _block_backward_sums_kernel(masked=True)


@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _chunk_backward_sums_nchw(dy, x, c, r0, r1, j0, j1, m, s, block, y):
    """Float64 sums of blocks of at most ``block`` values of each row, in order;
    ``dy`` masked by ``y > 0`` unless ``y`` is None (see :func:`backward_nchw`)."""
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for r in range(r0, r1):
        for b0 in range(j0, j1, block):
            b1 = min(b0 + block, j1)
            if y is not None:
                a, b, e = _block_backward_sums_masked(dy[r, c, b0:b1], y[r, c, b0:b1],
                                                      x[r, c, b0:b1], m, s)
            else:
                a, b, e = _block_backward_sums(dy[r, c, b0:b1], dy[r, c, b0:b1], x[r, c, b0:b1],
                                               m, s)
            sdy += np.float64(a)
            sdyxc += np.float64(b)
            sxc += np.float64(e)
    return sdy, sdyxc, sxc


@njit(inline="always", **CPU_HELPER_STRICT)
def _feature_backward_sums_nchw(dy, x, c, rows, cols, m, s, block, y):
    """Feature ``c``'s sums: chunk by chunk, added in chunk order.  (Inlined into
    the per-feature task, with no chunk loop for a feature of one chunk (small
    planes): a call and its divisions cost about as much as a 7x7 feature's
    values.)"""
    outer, _, inner = x.shape
    if outer <= rows and inner <= cols:
        a, b, e = _chunk_backward_sums_nchw(dy, x, c, np.int64(0), outer, np.int64(0), inner, m,
                                             s, block, y)
        return 0.0 + a, 0.0 + b, 0.0 + e  # as the chunk loop adds them to 0.0
    ncb = _cdiv(inner, cols)
    sdy = 0.0
    sdyxc = 0.0
    sxc = 0.0
    for k in range(_cdiv(outer, rows) * ncb):
        r0, r1, j0, j1 = _chunk_bounds(k, ncb, rows, cols, outer, inner)
        a, b, e = _chunk_backward_sums_nchw(dy, x, c, r0, r1, j0, j1, m, s, block, y)
        sdy += a
        sdyxc += b
        sxc += e
    return sdy, sdyxc, sxc


@njit(inline="always", **CPU_HELPER_STRICT)
def _dx_nchw(dy, x, c, r0, r1, j0, j1, coef, y, dx):
    """dx over rows [r0, r1) and positions [j0, j1) of feature ``c`` (inlined
    into its callers' loops: a call costs about as much as a 7x7 plane's values)."""
    a = coef[DX_SCALE, c]
    hi = coef[HI, c]
    b = coef[XC_COEF, c]
    d = coef[DY_SHIFT, c]
    zero = hi - hi  # typed like the data; only read with a mask
    for r in range(r0, r1):
        dyr = dy[r, c, j0:j1]
        xr = x[r, c, j0:j1]
        dxr = dx[r, c, j0:j1]
        if y is not None:
            yr = y[r, c, j0:j1]
            for j in range(j1 - j0):
                g = value_of(dyr[j]) if value_of(yr[j]) > zero else zero
                dxr[j] = stored((g + (value_of(xr[j]) - hi) * b + d) * a, dxr)
        else:
            for j in range(j1 - j0):
                dxr[j] = stored((value_of(dyr[j]) + (value_of(xr[j]) - hi) * b + d) * a, dxr)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _task_chunk(u, nchunks, ncb, rows, cols, outer, inner):
    """Feature, chunk and bounds of flat task ``u`` = feature * nchunks + chunk."""
    c = u // nchunks
    k = u - c * nchunks
    r0, r1, j0, j1 = _chunk_bounds(k, ncb, rows, cols, outer, inner)
    return c, k, r0, r1, j0, j1


@njit(**CPU_JIT_STRICT_PARALLEL)
def forward_nchw(x, weight, bias, eps, geom, zero, coef, stats, y):
    """Batch statistics of ``x`` into ``stats`` (rows MEAN, INVSTD, VAR, M2), and
    unless ``y`` is None the normalised output into ``y`` (through a ReLU unless
    ``zero`` is None: the fused ``batch_norm_relu_train``); fused, one task per
    feature.  (Each path is a kernel of its own, chosen by the host drivers, and
    the optional passes are None-typed arguments, so that a call compiles only
    the loops it runs.)"""
    outer, nfeat, inner = x.shape
    for c_ in prange(nfeat):
        c = np.int64(c_)
        n, mean, m2 = _feature_moments_nchw(x, c, geom.rows, geom.cols, geom.short_run)
        _store_forward(c, n, mean, m2, eps, weight, bias, coef, stats)
        if y is not None:
            _affine_nchw(x, c, np.int64(0), outer, np.int64(0), inner, coef, zero, y)


@njit(**CPU_JIT_STRICT_PARALLEL)
def forward_nchw_chunks(x, weight, bias, eps, geom, zero, p, coef, stats, y):
    """As :func:`forward_nchw`, two-phase: ``p`` is (2, C, chunks) scratch for
    the chunk means and M2s."""
    outer, nfeat, inner = x.shape
    rows, cols, nth = geom.rows, geom.cols, geom.threads
    ncb = _cdiv(inner, cols)
    nchunks = _cdiv(outer, rows) * ncb
    ntasks = nfeat * nchunks
    nth = min(nth, ntasks)
    for t_ in prange(nth):
        t = np.int64(t_)
        u0, u1 = _thread_span(t, nth, ntasks)
        for u in range(u0, u1):
            c, k, r0, r1, j0, j1 = _task_chunk(u, nchunks, ncb, rows, cols, outer, inner)
            _, p[0, c, k], p[1, c, k] = _chunk_moments_nchw(x, c, r0, r1, j0, j1,
                                                             geom.short_run)
    for c in range(nfeat):  # a few values per chunk of CHUNK_ELEMS: a plain loop
        n, mean, m2 = _merge_chunk_moments_nchw(p, c, ncb, rows, cols, outer, inner)
        _store_forward(c, n, mean, m2, eps, weight, bias, coef, stats)
    if y is not None:
        for t_ in prange(nth):
            t = np.int64(t_)
            u0, u1 = _thread_span(t, nth, ntasks)
            for u in range(u1 - 1, u0 - 1, -1):
                c, k, r0, r1, j0, j1 = _task_chunk(u, nchunks, ncb, rows, cols, outer, inner)
                _affine_nchw(x, c, r0, r1, j0, j1, coef, zero, y)


@njit(**CPU_JIT_STRICT_PARALLEL)
def normalize_nchw(x, mean, spread, spread_is_var, eps, weight, bias, runs, coef, y):
    """``y = (x - mean) * invstd * weight + bias`` with ``invstd`` given, or
    from ``var`` (``spread_is_var``).  Elementwise, so any order gives the same
    bits: walk ``x`` in memory order, in blocks of ``runs`` runs of ``inner``
    values (run ``q`` is ``x[q // C, q % C]``)."""
    outer, nfeat, inner = x.shape
    normalize_coefs(mean, spread, spread_is_var, eps, weight, bias, coef)
    nruns = outer * nfeat
    for b_ in prange(_cdiv(nruns, runs)):
        b = np.int64(b_)
        for q in range(b * runs, min((b + 1) * runs, nruns)):
            r = q // nfeat
            c = q - r * nfeat
            _affine_nchw(x, c, r, r + 1, np.int64(0), inner, coef, None, y)


# =========================================================================== #
# NCHW-like passes over small planes.  A run of ``inner`` values (a 4x4 ..
# 16x16 plane) is shorter than one step of the vectorised loop (16 float32
# lanes, interleaved four times), so a per-run pass runs scalar code: (32, 512,
# 4, 4) float32 eval took 270 us on one core against 70 us here.  These take
# ``x`` as the 2-D view ``(outer, C * inner)`` and a block of ``fblock``
# features at a time: the block's coefficients repeated over each run (a table
# of ``fblock * inner`` values, in L1), then every sample's segment of the
# block, vectorised along it.  Tasks are (feature block, sample block) pairs.
# Each value's arithmetic is the per-run pass's, so the bits are the same.
# =========================================================================== #
@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _affine_segment(xb, yb, hi, s, o, zero):
    """``yb = (xb - hi) * s + o`` value by value (then a ReLU unless ``zero`` is
    None); ``hi``, ``s``, ``o`` hold at least ``len(xb)`` per-value coefficients."""
    if zero is not None:
        for j in range(xb.shape[0]):
            v = (value_of(xb[j]) - hi[j]) * s[j] + o[j]
            yb[j] = stored(zero if v < zero else v, yb)  # NaN, -0.0 stay, as torch.relu
    else:
        for j in range(xb.shape[0]):
            yb[j] = stored((value_of(xb[j]) - hi[j]) * s[j] + o[j], yb)


@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _dx_segment(gb, xb, yb, hi, a, b, d, zero, ob):
    """``ob = (g + (xb - hi) * b + d) * a`` value by value, ``g = gb`` (0 where
    ``yb <= 0`` unless ``yb`` is None); per-value coefficients as in
    :func:`_affine_segment`."""
    if yb is not None:
        for j in range(xb.shape[0]):
            g = value_of(gb[j]) if value_of(yb[j]) > zero else zero
            ob[j] = stored((g + (value_of(xb[j]) - hi[j]) * b[j] + d[j]) * a[j], ob)
    else:
        for j in range(xb.shape[0]):
            ob[j] = stored((value_of(gb[j]) + (value_of(xb[j]) - hi[j]) * b[j] + d[j]) * a[j], ob)


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _block_table(coef, q0, q1, c0, c1, inner):
    """Rows ``[q0, q1)`` of ``coef`` for features ``[c0, c1)``, each repeated
    over its run: ``tab[q - q0, (c - c0) * inner + j] = coef[q, c]``."""
    tab = np.empty((q1 - q0, (c1 - c0) * inner), coef.dtype)
    for q in range(q0, q1):
        row = tab[q - q0]
        for c in range(c0, c1):
            v = coef[q, c]
            b = (c - c0) * inner
            for j in range(inner):
                row[b + j] = v
    return tab


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _plane_task(u, nsb, outer, nfeat, fblock):
    """Features ``[c0, c1)`` and samples ``[n0, n1)`` of task ``u``."""
    fb, sb = u // nsb, u % nsb
    c0 = fb * fblock
    n0 = (sb * outer) // nsb
    return c0, min(c0 + fblock, nfeat), n0, ((sb + 1) * outer) // nsb


@njit(**CPU_JIT_PARALLEL)
def affine_planes(x2, coef, inner, fblock, nsb, zero, y2):
    """``y = (x - HI) * SCALE + OFFSET`` (then a ReLU unless ``zero`` is None)
    over the ``(outer, C * inner)`` views, with ``coef`` per feature."""
    outer = x2.shape[0]
    nfeat = coef.shape[1]
    for u_ in prange(_cdiv(nfeat, fblock) * nsb):
        u = np.int64(u_)
        c0, c1, n0, n1 = _plane_task(u, nsb, outer, nfeat, fblock)
        tab = _block_table(coef, np.int64(HI), np.int64(OFFSET + 1), c0, c1, inner)
        hi = tab[HI]
        s = tab[SCALE]
        o = tab[OFFSET]
        p0 = c0 * inner
        w = (c1 - c0) * inner
        for n in range(n0, n1):
            _affine_segment(x2[n, p0:p0 + w], y2[n, p0:p0 + w], hi, s, o, zero)


@njit(**CPU_JIT_PARALLEL)
def dx_planes(dy2, x2, y2, coef, inner, fblock, nsb, dx2):
    """The dx pass ``dx = (g + (x - HI) * XC_COEF + DY_SHIFT) * DX_SCALE`` over
    the ``(outer, C * inner)`` views (``g = dy``, or 0 where ``y <= 0`` unless
    ``y2`` is None), with ``coef`` per feature."""
    outer = x2.shape[0]
    nfeat = coef.shape[1]
    zero = np.zeros(1, coef.dtype)[0]
    for u_ in prange(_cdiv(nfeat, fblock) * nsb):
        u = np.int64(u_)
        c0, c1, n0, n1 = _plane_task(u, nsb, outer, nfeat, fblock)
        tab = _block_table(coef, np.int64(0), coef.shape[0], c0, c1, inner)
        hi = tab[HI]
        a = tab[DX_SCALE]
        b = tab[XC_COEF]
        d = tab[DY_SHIFT]
        p0 = c0 * inner
        w = (c1 - c0) * inner
        for n in range(n0, n1):
            _dx_segment(dy2[n, p0:p0 + w], x2[n, p0:p0 + w], _seg(y2, n, p0, p0 + w), hi, a, b,
                        d, zero, dx2[n, p0:p0 + w])


@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _plane_sums(dy2, x2, y2, hi, scale, inner, c0, c1, nblk, sums):
    """The backward sums of features [c0, c1) of the ``(outer, C * inner)``
    views: per position (vector lanes along the sample), ``dy``, ``dy * xc``
    and ``xc`` with ``xc = (x - hi) * scale`` summed over samples in the input's
    dtype in blocks of ``nblk`` samples, each block added to float64 in order;
    then each feature's positions added in order.  Same quantities as
    :func:`_chunk_backward_sums_nchw`, summed in another fixed order."""
    p0 = c0 * inner
    w = (c1 - c0) * inner
    dt = hi.dtype  # the input's, or float32 for half inputs
    zero = np.zeros(1, dt)[0]
    hp = np.empty(w, dt)
    sp = np.empty(w, dt)
    for c in range(c0, c1):
        for j in range(inner):
            hp[(c - c0) * inner + j] = hi[c]
            sp[(c - c0) * inner + j] = scale[c]
    part = np.zeros((3, w), dt)
    acc = np.zeros((3, w))
    pa = part[0]
    pb = part[1]
    pe = part[2]
    outer = x2.shape[0]
    for n in range(outer):
        dyr = dy2[n, p0:p0 + w]
        xr = x2[n, p0:p0 + w]
        # one accumulator per loop: a loop storing to one array vectorises
        # (LLVM checks its overlap with each array read); three would not
        if y2 is not None:
            yr = y2[n, p0:p0 + w]
            for t in range(w):
                pa[t] += value_of(dyr[t]) if value_of(yr[t]) > zero else zero
            for t in range(w):
                g = value_of(dyr[t]) if value_of(yr[t]) > zero else zero
                pb[t] += g * ((value_of(xr[t]) - hp[t]) * sp[t])
        else:
            for t in range(w):
                pa[t] += value_of(dyr[t])
            for t in range(w):
                pb[t] += value_of(dyr[t]) * ((value_of(xr[t]) - hp[t]) * sp[t])
        for t in range(w):
            pe[t] += (value_of(xr[t]) - hp[t]) * sp[t]
        if (n + 1) % nblk == 0 or n == outer - 1:
            for q in range(3):
                for t in range(w):
                    acc[q, t] += np.float64(part[q, t])
                    part[q, t] = zero
    for c in range(c0, c1):
        a = 0.0
        b = 0.0
        e = 0.0
        for j in range((c - c0) * inner, (c - c0 + 1) * inner):
            a += acc[0, j]
            b += acc[1, j]
            e += acc[2, j]
        _unscaled_sums(c, a, b, e, scale, sums)


@njit(**CPU_JIT_PARALLEL)
def backward_planes(dy2, x2, y2, hi, invstd, weight, inner, fblock, nblk, write_dx, sums, coef,
                    dwb):
    """The backward sums of NCHW-like data with small planes, by blocks of
    ``fblock`` features, into ``sums``; with ``write_dx`` the dx coefficients
    and (dweight, dbias) too (the dx pass is :func:`dx_planes`).  Each
    feature's result does not depend on the blocks, hence not on threads."""
    nfeat = hi.shape[0]
    n = x2.shape[0] * inner
    scale = _backward_scales(invstd)
    for fb_ in prange(_cdiv(nfeat, fblock)):
        fb = np.int64(fb_)
        c0 = fb * fblock
        c1 = min(c0 + fblock, nfeat)
        _plane_sums(dy2, x2, y2, hi, scale, inner, c0, c1, nblk, sums)
        if write_dx:
            for c in range(c0, c1):
                _store_backward(c, n, sums[SUM_DY, c], sums[SUM_DY_XHI, c], sums[SUM_XHI, c],
                                np.float64(hi[c]), np.float64(invstd[c]), weight, coef, dwb)


@njit(**CPU_JIT_STRICT_PARALLEL)
def dx_nchw(dy, x, y, coef, runs, dx):
    """The per-run dx pass with the coefficients given (``runs`` runs a task)."""
    outer, nfeat, inner = x.shape
    nruns = outer * nfeat
    for b_ in prange(_cdiv(nruns, runs)):
        b = np.int64(b_)
        for q in range(b * runs, min((b + 1) * runs, nruns)):
            r = q // nfeat
            c = q - r * nfeat
            _dx_nchw(dy, x, c, r, r + 1, np.int64(0), inner, coef, y, dx)


@njit(**CPU_JIT_STRICT_PARALLEL)
def backward_nchw(dy, x, hi, invstd, weight, geom, y, sums, coef, dwb, dx):
    """The backward sums about ``hi`` into ``sums`` (rows SUM_DY, SUM_DY_XHI,
    SUM_XHI); unless ``dx`` is None also dx into ``dx`` and (dweight, dbias)
    into ``dwb``.  Unless ``y`` is None, ``dy`` counts only where ``y > 0`` (the
    fused ReLU's backward).  ``y`` None is a type, so the masked code is not
    compiled for it (Numba prunes ``if y is not None`` branches by type).
    Fused: one task per feature."""
    outer, nfeat, inner = x.shape
    n = outer * inner
    scale = _backward_scales(invstd)
    for c_ in prange(nfeat):
        c = np.int64(c_)
        a, b, e = _feature_backward_sums_nchw(dy, x, c, geom.rows, geom.cols, hi[c], scale[c],
                                              geom.bwd_block, y)
        _unscaled_sums(c, a, b, e, scale, sums)
        if dx is not None:
            _store_backward(c, n, sums[SUM_DY, c], sums[SUM_DY_XHI, c], sums[SUM_XHI, c],
                            np.float64(hi[c]), np.float64(invstd[c]), weight, coef, dwb)
            _dx_nchw(dy, x, c, np.int64(0), outer, np.int64(0), inner, coef, y, dx)


@njit(**CPU_JIT_STRICT_PARALLEL)
def backward_nchw_chunks(dy, x, hi, invstd, weight, geom, y, p, sums, coef, dwb, dx):
    """As :func:`backward_nchw`, two-phase: ``p`` is (3, C, chunks) scratch."""
    outer, nfeat, inner = x.shape
    rows, cols, nth, block = geom.rows, geom.cols, geom.threads, geom.bwd_block
    n = outer * inner
    ncb = _cdiv(inner, cols)
    nchunks = _cdiv(outer, rows) * ncb
    scale = _backward_scales(invstd)
    ntasks = nfeat * nchunks
    nth = min(nth, ntasks)
    for t_ in prange(nth):
        t = np.int64(t_)
        u0, u1 = _thread_span(t, nth, ntasks)
        for u in range(u0, u1):
            c, k, r0, r1, j0, j1 = _task_chunk(u, nchunks, ncb, rows, cols, outer, inner)
            p[0, c, k], p[1, c, k], p[2, c, k] = _chunk_backward_sums_nchw(
                dy, x, c, r0, r1, j0, j1, hi[c], scale[c], block, y)
    for c in range(nfeat):  # a few values per chunk of CHUNK_ELEMS: a plain loop
        _unscaled_sums(c, _sum_in_order(p[0, c]), _sum_in_order(p[1, c]), _sum_in_order(p[2, c]),
                       scale, sums)
        if dx is not None:
            _store_backward(c, n, sums[SUM_DY, c], sums[SUM_DY_XHI, c], sums[SUM_XHI, c],
                            np.float64(hi[c]), np.float64(invstd[c]), weight, coef, dwb)
    if dx is not None:
        for t_ in prange(nth):
            t = np.int64(t_)
            u0, u1 = _thread_span(t, nth, ntasks)
            for u in range(u1 - 1, u0 - 1, -1):
                c, k, r0, r1, j0, j1 = _task_chunk(u, nchunks, ncb, rows, cols, outer, inner)
                _dx_nchw(dy, x, c, r0, r1, j0, j1, coef, y, dx)


# =========================================================================== #
# Channel-contiguous family: x is (rows, C), always two-phase.  A chunk is
# ``rows`` rows of a block of at most ``cols`` columns; partials are per
# (row block, column).  Each column's sum runs over rows in order (the vector
# lanes are columns), so the column blocking never changes a result.
# =========================================================================== #
@njit(**CPU_HELPER)
def _chunk_sums_nc(x, r0, r1, c0, c1, s1, s2):
    """Sums of columns [c0, c1) over rows [r0, r1), about row r0 (each column's
    first value in the chunk), into s1[:c1-c0], s2[:c1-c0].

    The accumulators live in memory (one per column), so rows are taken four at
    a time: one load/store of ``s1``/``s2`` per four rows instead of per row
    (2.5x faster on (4096, 512) float32).
    """
    w = c1 - c0
    sh = x[r0, c0:c1]
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
            h = np.float64(value_of(sh[i]))
            d0 = np.float64(value_of(x0[i])) - h
            d1 = np.float64(value_of(x1[i])) - h
            d2 = np.float64(value_of(x2[i])) - h
            d3 = np.float64(value_of(x3[i])) - h
            s1[i] += (d0 + d1) + (d2 + d3)
            s2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    for r in range(r, r1):
        xr = x[r, c0:c1]
        for i in range(w):
            d = np.float64(value_of(xr[i])) - np.float64(value_of(sh[i]))
            s1[i] += d
            s2[i] += d * d


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _chunk_moments_nc(x, r0, r1, c0, c1, means, m2s):
    """Means and M2s of columns [c0, c1) over rows [r0, r1) into ``means``/``m2s``."""
    _chunk_sums_nc(x, r0, r1, c0, c1, means, m2s)
    n = r1 - r0
    for i in range(c1 - c0):
        means[i], m2s[i] = shifted_moments(n, np.float64(value_of(x[r0, c0 + i])), means[i],
                                           m2s[i])


@njit(inline=inline_in_serial_code, **CPU_HELPER_STRICT)
def _merge_moments_nc(p, nrows, rows, c0, c1, eps, weight, bias, coef, stats):
    """Chan-merge the row blocks' moments of columns [c0, c1) in row-block order."""
    w = c1 - c0
    mean = np.zeros(w)
    m2 = np.zeros(w)
    n = 0.0
    for rb in range(_cdiv(nrows, rows)):
        nb = np.float64(min(rows, nrows - rb * rows))
        pm = p[0, rb, c0:c1]
        pq = p[1, rb, c0:c1]
        for i in range(w):
            _, mean[i], m2[i] = chan_merge(n, mean[i], m2[i], nb, pm[i], pq[i])
        n += nb
    for i in range(w):
        _store_forward(c0 + i, n, mean[i], m2[i], eps, weight, bias, coef, stats)


@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _affine_flat(xf, yf, coef, tab, k, zero):
    """The affine pass over one block of rows seen as the run ``xf`` (see
    :func:`_nc_table`: ``k`` values from ``coef``, then aligned segments)."""
    nfeat = coef.shape[1]
    n = xf.shape[0]
    k = min(k, n)
    for j in range(k):
        c = j % nfeat
        v = (value_of(xf[j]) - coef[HI, c]) * coef[SCALE, c] + coef[OFFSET, c]
        if zero is not None:
            if v < zero:
                v = zero
        yf[j] = stored(v, yf)
    hi = tab[HI]
    s = tab[SCALE]
    o = tab[OFFSET]
    for b0 in range(k, n, hi.shape[0]):
        m = min(hi.shape[0], n - b0)
        _affine_segment(xf[b0:b0 + m], yf[b0:b0 + m], hi, s, o, zero)


@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _affine_nc(x, r0, r1, coef, tab, k, zero, y):
    """The affine pass over rows [r0, r1) with the table of :func:`_nc_table`
    (then a ReLU unless ``zero`` is None)."""
    if _contiguous(x) and _contiguous(y):
        _affine_flat(_rows_view(x, r0, r1), _rows_view(y, r0, r1), coef, tab, k, zero)
        return
    hi = tab[HI]
    s = tab[SCALE]
    o = tab[OFFSET]
    for r in range(r0, r1):
        _affine_segment(x[r], y[r], hi, s, o, zero)


@njit(**CPU_HELPER)
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
            a = value_of(gr[i])
            e = (value_of(xr[i]) - m[i]) * sc[i]
            s0[i] += a
            s1[i] += a * e
            s2[i] += e


@njit(**CPU_HELPER)
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
            a0 = value_of(g0[i])
            a1 = value_of(g1[i])
            a2 = value_of(g2[i])
            a3 = value_of(g3[i])
            e0 = (value_of(x0[i]) - mi) * si
            e1 = (value_of(x1[i]) - mi) * si
            e2 = (value_of(x2[i]) - mi) * si
            e3 = (value_of(x3[i]) - mi) * si
            s0[i] += (a0 + a1) + (a2 + a3)
            s1[i] += (a0 * e0 + a1 * e1) + (a2 * e2 + a3 * e3)
            s2[i] += (e0 + e1) + (e2 + e3)
        r += 4
    _add_backward_sums_nc(dy, x, r, r1, c0, c1, m, sc, acc)


@njit(**CPU_HELPER)
def _add_backward_sums_nc_masked(dy, y, x, r0, r1, c0, c1, m, sc, acc):
    """As :func:`_add_backward_sums_nc` with ``dy`` taken as 0 where ``y <= 0``."""
    w = c1 - c0
    s0 = acc[0]
    s1 = acc[1]
    s2 = acc[2]
    zero = s0[0] - s0[0]
    for r in range(r0, r1):
        gr = dy[r, c0:c1]
        yr = y[r, c0:c1]
        xr = x[r, c0:c1]
        for i in range(w):
            a = value_of(gr[i]) if value_of(yr[i]) > zero else zero
            e = (value_of(xr[i]) - m[i]) * sc[i]
            s0[i] += a
            s1[i] += a * e
            s2[i] += e


@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _chunk_backward_sums_nc(dy, x, r0, r1, c0, c1, hi, scale, geom, y, sdy, sdyxc, sxc, acc):
    """``sum(dy)``, ``sum(dy * xc)``, ``sum(xc)`` of columns [c0, c1) over rows
    [r0, r1) into ``sdy``, ``sdyxc``, ``sxc`` (float64), ``xc = (x - hi) *
    scale``: blocks of ``geom.bwd_block`` rows summed in the input's dtype, added
    in block order, one row at a time with ``geom.by_row``, else four."""
    w = c1 - c0
    m = hi[c0:c1]
    sc = scale[c0:c1]
    for i in range(w):
        sdy[i] = 0.0
        sdyxc[i] = 0.0
        sxc[i] = 0.0
    for b0 in range(r0, r1, geom.bwd_block):
        b1 = min(b0 + geom.bwd_block, r1)
        acc[...] = 0.0
        if y is not None:
            _add_backward_sums_nc_masked(dy, y, x, b0, b1, c0, c1, m, sc, acc)
        elif geom.by_row:
            _add_backward_sums_nc(dy, x, b0, b1, c0, c1, m, sc, acc)
        else:
            _add_backward_sums_nc4(dy, x, b0, b1, c0, c1, m, sc, acc)
        for i in range(w):
            sdy[i] += np.float64(acc[0, i])
            sdyxc[i] += np.float64(acc[1, i])
            sxc[i] += np.float64(acc[2, i])


@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _dx_flat(dyf, xf, yf, coef, tab, k, zero, dxf):
    """The dx pass over one block of rows seen as runs (as :func:`_affine_flat`)."""
    nfeat = coef.shape[1]
    n = xf.shape[0]
    k = min(k, n)
    for j in range(k):
        c = j % nfeat
        g = value_of(dyf[j])
        if yf is not None:
            if not value_of(yf[j]) > zero:
                g = zero
        dxf[j] = stored((g + (value_of(xf[j]) - coef[HI, c]) * coef[XC_COEF, c]
                         + coef[DY_SHIFT, c]) * coef[DX_SCALE, c], dxf)
    a = tab[DX_SCALE]
    hi = tab[HI]
    b = tab[XC_COEF]
    d = tab[DY_SHIFT]
    for b0 in range(k, n, hi.shape[0]):
        m = min(hi.shape[0], n - b0)
        _dx_segment(dyf[b0:b0 + m], xf[b0:b0 + m], _seg1(yf, b0, b0 + m), hi, a, b, d, zero,
                    dxf[b0:b0 + m])


@njit(**CPU_HELPER_STRICT)  # prunes by a None argument: never inlined
def _dx_nc(dy, x, r0, r1, coef, tab, k, y, dx):
    """The dx pass over rows [r0, r1) with the table of :func:`_nc_table`
    (``dy`` masked by ``y > 0`` unless ``y`` is None)."""
    # a zero of the data's dtype, allocated only for the mask (as in _affine_nc)
    zero = coef[HI, 0] if y is None else np.zeros(1, coef.dtype)[0]
    if _contiguous(dy) and _contiguous(x) and _contiguous(y) and _contiguous(dx):
        _dx_flat(_rows_view(dy, r0, r1), _rows_view(x, r0, r1), _rows_view(y, r0, r1), coef,
                 tab, k, zero, _rows_view(dx, r0, r1))
        return
    a = tab[DX_SCALE]
    hi = tab[HI]
    b = tab[XC_COEF]
    d = tab[DY_SHIFT]
    for r in range(r0, r1):
        _dx_segment(dy[r], x[r], _row(y, r), hi, a, b, d, zero, dx[r])


@njit(**CPU_JIT_PARALLEL)
def forward_nc(x, weight, bias, eps, geom, zero, p, coef, stats, y):
    """As :func:`forward_nchw` for (rows, C) data; ``p`` is (2, row blocks, C)."""
    nrows, nfeat = x.shape
    rows, width = geom.rows, geom.cols
    nrb = _cdiv(nrows, rows)
    nth = min(geom.threads, nrb)
    for t_ in prange(nth):
        t = np.int64(t_)
        b0, b1 = _thread_span(t, nth, nrb)
        for rb in range(b0, b1):
            r0 = rb * rows
            r1 = min(r0 + rows, nrows)
            for c0 in range(0, nfeat, width):
                c1 = min(c0 + width, nfeat)
                _chunk_moments_nc(x, r0, r1, c0, c1, p[0, rb, c0:c1], p[1, rb, c0:c1])
    # a plain loop: a few values per chunk of CHUNK_ELEMS (one loop fewer to compile)
    for c0 in range(0, nfeat, geom.merge_cols):
        c1 = min(c0 + geom.merge_cols, nfeat)
        _merge_moments_nc(p, nrows, rows, c0, c1, eps, weight, bias, coef, stats)
    if y is not None:
        tab, k = _nc_table(coef, x, _contiguous(x) and _contiguous(y))
        rows = _elementwise_rows(rows, nfeat, x.itemsize)
        nrb = _cdiv(nrows, rows)
        nth = min(geom.threads, nrb)
        for t_ in prange(nth):
            t = np.int64(t_)
            b0, b1 = _thread_span(t, nth, nrb)
            for rb in range(b1 - 1, b0 - 1, -1):
                r0 = rb * rows
                _affine_nc(x, r0, min(r0 + rows, nrows), coef, tab, k, zero, y)


@njit(**CPU_JIT_PARALLEL)
def normalize_nc(x, mean, spread, spread_is_var, eps, weight, bias, rows, coef, y):
    """As :func:`normalize_nchw` for (rows, C) data."""
    nrows, nfeat = x.shape
    normalize_coefs(mean, spread, spread_is_var, eps, weight, bias, coef)
    tab, k = _nc_table(coef, x, _contiguous(x) and _contiguous(y))
    rows = _elementwise_rows(rows, nfeat, x.itemsize)
    for rb_ in prange(_cdiv(nrows, rows)):
        rb = np.int64(rb_)
        r0 = rb * rows
        _affine_nc(x, r0, min(r0 + rows, nrows), coef, tab, k, None, y)


@njit(**CPU_JIT_PARALLEL)
def backward_nc(dy, x, hi, invstd, weight, geom, y, p, sums, coef, dwb, dx):
    """As :func:`backward_nchw` for (rows, C) data (``y`` None: no mask); ``p``
    is (3, row blocks, C)."""
    nrows, nfeat = x.shape
    rows, width = geom.rows, geom.cols
    nrb = _cdiv(nrows, rows)
    nth = min(geom.threads, nrb)
    scale = _backward_scales(invstd)
    for t_ in prange(nth):
        t = np.int64(t_)
        acc = np.empty((3, width), hi.dtype)  # x's dtype, or float32 for half inputs
        b0, b1 = _thread_span(t, nth, nrb)
        for rb in range(b0, b1):
            r0 = rb * rows
            r1 = min(r0 + rows, nrows)
            for c0 in range(0, nfeat, width):
                c1 = min(c0 + width, nfeat)
                _chunk_backward_sums_nc(dy, x, r0, r1, c0, c1, hi, scale, geom, y,
                                        p[0, rb, c0:c1], p[1, rb, c0:c1], p[2, rb, c0:c1], acc)
    # a plain loop: a few values per chunk of CHUNK_ELEMS (one loop fewer to compile)
    for c0 in range(0, nfeat, geom.merge_cols):
        c1 = min(c0 + geom.merge_cols, nfeat)
        acc = np.zeros((3, c1 - c0))
        for rb in range(nrb):
            for q in range(3):
                _accumulate(acc[q], p[q, rb, c0:c1], c1 - c0)
        for c in range(c0, c1):
            i = c - c0
            _unscaled_sums(c, acc[0, i], acc[1, i], acc[2, i], scale, sums)
            if dx is not None:
                _store_backward(c, nrows, sums[SUM_DY, c], sums[SUM_DY_XHI, c],
                                sums[SUM_XHI, c], np.float64(hi[c]), np.float64(invstd[c]),
                                weight, coef, dwb)
    if dx is not None:
        tab, k = _nc_table(coef, x, _contiguous(dy) and _contiguous(x) and _contiguous(y)
                           and _contiguous(dx))
        rows = _elementwise_rows(rows, nfeat, x.itemsize)
        nrb = _cdiv(nrows, rows)
        nth = min(geom.threads, nrb)
        for t_ in prange(nth):
            t = np.int64(t_)
            b0, b1 = _thread_span(t, nth, nrb)
            for rb in range(b1 - 1, b0 - 1, -1):
                r0 = rb * rows
                _dx_nc(dy, x, r0, min(r0 + rows, nrows), coef, tab, k, y, dx)


@njit(**CPU_JIT_PARALLEL)
def backward_elemt_nc(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, rows, coef, dx):
    """The dx pass with the sums given (taken about ``mean``, over ``count``
    values: the whole batch, which may span several processes), for (rows, C)
    data.  (NCHW-like data: :func:`elemt_backward_coefs`, then
    :func:`dx_nchw` or :func:`dx_planes`.)"""
    nrows, nfeat = x.shape
    elemt_backward_coefs(count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef)
    tab, k = _nc_table(coef, x, _contiguous(dy) and _contiguous(x) and _contiguous(dx))
    rows = _elementwise_rows(rows, nfeat, x.itemsize)
    for rb_ in prange(_cdiv(nrows, rows)):
        rb = np.int64(rb_)
        r0 = rb * rows
        _dx_nc(dy, x, r0, min(r0 + rows, nrows), coef, tab, k, None, dx)


# The kernels for inputs of at most SERIAL_MAX_ELEMS values (runtime.is_small).
serial = serial_kernels(globals())

_cache.check({**globals(), **vars(serial)})  # before any kernel loads from the disk cache
