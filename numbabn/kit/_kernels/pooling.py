"""Max pooling over channels-last images, forward and backward.  Private:
inputs arrive checked; each output value is written by one thread only."""

import numpy as np
from numba import njit, prange

from ... import _cache
from ..._config import CPU_JIT_PARALLEL


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
                        f = np.int32(h * width + w)
                        for c in range(chans):
                            # The test as bitwise operations on booleans, both stores
                            # unconditional: with `or` and a conditional store, AVX2 code
                            # took 5.5 ms for the cnn's pool on one core, 3.2 this way
                            # (AVX-512 code 1.9-2.0 either way).
                            v = x[n, h, w, c]
                            best = y[n, oh, ow, c]
                            first = argmax[n, oh, ow, c]
                            take = (v > best) | ((v != v) & (best == best)) | (first < 0)
                            y[n, oh, ow, c] = v if take else best
                            argmax[n, oh, ow, c] = f if take else first


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


@njit(**CPU_JIT_PARALLEL)
def max_pool_backward_tiled(dy, argmax, k_h, k_w, dx):
    """:func:`max_pool_backward` for windows that tile the input (stride equal to
    the kernel size, no padding): each ``dx`` value is written once, ``dy`` at its
    window's maximum and 0 elsewhere (and 0 in the rows and columns past the
    last window), instead of zeroing ``dx`` and adding into it."""
    n_img, height, width, chans = dx.shape
    _, out_h, out_w, _ = dy.shape
    zero = dx.dtype.type(0.0)
    for n in prange(n_img):
        for h in range(height):
            oh = h // k_h
            for w in range(width):
                ow = w // k_w
                if oh >= out_h or ow >= out_w:
                    for c in range(chans):
                        dx[n, h, w, c] = zero
                    continue
                f = np.int32(h * width + w)  # argmax's type: a 32-bit compare vectorises plainly
                for c in range(chans):  # + 0: -0.0 gives 0.0, as zero + dy does
                    dx[n, h, w, c] = dy[n, oh, ow, c] + zero if argmax[n, oh, ow, c] == f else zero


_cache.check(globals())  # before any kernel above loads from the disk cache
