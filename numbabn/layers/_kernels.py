"""Numba kernels behind Conv2d and MaxPool2d.  Private: inputs arrive checked.

All image arrays are channels-last, ``(N, H, W, C)``, so the innermost loop runs
over contiguous channels.  Every kernel is parallel over images, and an image's
outputs are written by one thread only, so results do not depend on the number
of threads.
"""

import numpy as np
from numba import njit, prange

from .. import _cache
from .._config import CPU_JIT_PARALLEL, CPU_JIT_STRICT
from .._cpu.kernels import _accumulate


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


@njit(**CPU_JIT_PARALLEL)
def max_pool(x, k_h, k_w, stride_h, stride_w, pad_h, pad_w, y, argmax):
    """Window maxima into ``y`` and their flat positions ``h * W + w`` into ``argmax``.

    The first maximum wins ties; a NaN in a window is propagated (as PyTorch).
    """
    n_img, height, width, chans = x.shape
    _, out_h, out_w, _ = y.shape
    for n in prange(n_img):
        for oh in range(out_h):
            for ow in range(out_w):
                for c in range(chans):
                    y[n, oh, ow, c] = -np.inf
                    argmax[n, oh, ow, c] = -1
                for i in range(k_h):
                    h = oh * stride_h - pad_h + i
                    if h < 0 or h >= height:
                        continue
                    for j in range(k_w):
                        w = ow * stride_w - pad_w + j
                        if w < 0 or w >= width:
                            continue
                        for c in range(chans):
                            v = x[n, h, w, c]
                            best = y[n, oh, ow, c]
                            if v > best or (v != v and best == best) or argmax[n, oh, ow, c] < 0:
                                y[n, oh, ow, c] = v
                                argmax[n, oh, ow, c] = h * width + w


@njit(**CPU_JIT_PARALLEL)
def max_pool_backward(dy, argmax, dx):
    """Route each ``dy`` entry to its window's maximum; ``dx`` is overwritten."""
    n_img, height, width, chans = dx.shape
    _, out_h, out_w, _ = dy.shape
    for n in prange(n_img):
        dx[n] = 0.0
        for oh in range(out_h):
            for ow in range(out_w):
                for c in range(chans):
                    f = argmax[n, oh, ow, c]
                    dx[n, f // width, f % width, c] += dy[n, oh, ow, c]


@njit(**CPU_JIT_STRICT)
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


@njit(**CPU_JIT_PARALLEL)
def relu_backward(dy, y, dx):
    """``dx = dy where y > 0, else 0`` over flat arrays (PyTorch's
    ``threshold_backward``: a NaN or inf in ``dy`` where ``y <= 0`` gives 0)."""
    zero = dy.dtype.type(0.0)
    for i in prange(dy.shape[0]):
        dx[i] = dy[i] if y[i] > 0 else zero


_cache.check(globals())  # before any kernel above loads from the disk cache
