"""The im2col + BLAS path of Conv2d and Linear: columns of image patches
(channels-last), their scatter back, and the bias gradients' column sums.
Private: inputs arrive checked.

Every kernel is parallel and each output value is written by one thread only,
summed in an order fixed by the shape, so results do not depend on the number
of threads."""

import numpy as np
from numba import njit, prange

from ... import _cache
from ..._config import CPU_HELPER_STRICT, CPU_JIT_PARALLEL
from ..._cpu.feature_kernels import _accumulate


@njit(**CPU_JIT_PARALLEL)
def im2col(x, stride_h, stride_w, pad_h, pad_w, cols):
    """``cols[n, oh, ow, i, j, c] = x[n, oh*stride_h - pad_h + i, ow*stride_w - pad_w + j, c]``
    (zero outside ``x``)."""
    n_img, height, width, chans = x.shape
    _, out_h, out_w, k_h, k_w, _ = cols.shape
    for n in prange(n_img):
        for oh in range(out_h):
            for ow in range(out_w):
                for i in range(k_h):
                    h = oh * stride_h - pad_h + i
                    for j in range(k_w):
                        w = ow * stride_w - pad_w + j
                        if 0 <= h < height and 0 <= w < width:
                            for c in range(chans):
                                cols[n, oh, ow, i, j, c] = x[n, h, w, c]
                        else:
                            for c in range(chans):
                                cols[n, oh, ow, i, j, c] = 0.0


@njit(**CPU_JIT_PARALLEL)
def col2im(dcols, stride_h, stride_w, pad_h, pad_w, dx):
    """Adjoint of :func:`im2col`: ``dx`` (overwritten) sums every column entry
    that was copied from it."""
    n_img, height, width, chans = dx.shape
    _, out_h, out_w, k_h, k_w, _ = dcols.shape
    for n in prange(n_img):
        dx[n] = 0.0
        for oh in range(out_h):
            for ow in range(out_w):
                for i in range(k_h):
                    h = oh * stride_h - pad_h + i
                    if h < 0 or h >= height:
                        continue
                    for j in range(k_w):
                        w = ow * stride_w - pad_w + j
                        if 0 <= w < width:
                            for c in range(chans):
                                dx[n, h, w, c] += dcols[n, oh, ow, i, j, c]


@njit(**CPU_HELPER_STRICT)
def _add_rows(a, r0, r1, acc):
    for r in range(r0, r1):
        _accumulate(acc, a[r], acc.shape[0])


@njit(**CPU_JIT_PARALLEL)
def column_sums(a, rows, out):
    """Float64 column sums of the C-contiguous ``(n, C)`` array ``a`` into ``out``.

    Blocks of ``rows`` whole rows are summed in parallel, each column in row
    order, and the block sums added in block order: the partition depends on the
    shape only, so the bits do not depend on the thread count.
    """
    n, ncol = a.shape
    nblocks = (n + rows - 1) // rows
    partial = np.zeros((nblocks, ncol))
    for b in prange(nblocks):
        _add_rows(a, b * rows, min((b + 1) * rows, n), partial[b])
    out[:] = 0.0
    for b in range(nblocks):
        _accumulate(out, partial[b], ncol)


_cache.check(globals())  # before any kernel above loads from the disk cache
