"""CPU host drivers: pick the kernel family, lay out the chunk grid, call kernels.

Every function takes arrays already validated and viewed as ``(outer, C, inner)``
by :mod:`numbabn.functional` and returns float64 per-feature vectors; outputs of
the input's shape are written into the ``y3``/``dx3`` arrays given.
"""

import numpy as np

from .._config import CHANNEL_BLOCK, CHUNK_ELEMS
from . import kernels as k


def _cdiv(a, b):
    return -(-a // b)


class _Grid:
    """The fixed reduction partition for one ``(outer, C, inner)`` shape."""

    def __init__(self, shape3):
        outer, nfeat, inner = shape3
        self.channels_last = inner == 1
        if self.channels_last:
            # Chunks are (row block) x (feature block); partials are per row block.
            self.cols = min(nfeat, CHANNEL_BLOCK)
            self.rows = max(1, CHUNK_ELEMS // self.cols)
            row_counts = _block_sizes(outer, self.rows)
            self.counts = row_counts.astype(np.float64)
        else:
            # Chunks are (row block) x (inner block) of one feature.
            self.cols = min(inner, CHUNK_ELEMS)
            self.rows = max(1, CHUNK_ELEMS // self.cols)
            row_counts = _block_sizes(outer, self.rows)
            col_counts = _block_sizes(inner, self.cols)
            self.counts = np.outer(row_counts, col_counts).ravel().astype(np.float64)
        self.nchunks = self.counts.size
        self.nfeat = nfeat

    def partials(self, n=1):
        return [np.empty((self.nchunks, self.nfeat)) for _ in range(n)]


def _block_sizes(total, size):
    sizes = np.full(_cdiv(total, size), size, dtype=np.int64)
    sizes[-1] = total - size * (sizes.size - 1)
    return sizes


def _as2d(a3):
    return a3.reshape(a3.shape[0], a3.shape[1])


def stats(x3):
    """Per-feature mean and biased variance, float64."""
    g = _Grid(x3.shape)
    pmean, pm2 = g.partials(2)
    if g.channels_last:
        k.stats_partials_nc(_as2d(x3), g.rows, g.cols, pmean, pm2)
    else:
        k.stats_partials_nchw(x3, g.rows, g.cols, pmean, pm2)
    mean = np.empty(g.nfeat)
    var = np.empty(g.nfeat)
    k.merge_partials(g.counts, pmean, pm2, mean, var)
    return mean, var


def affine(x3, shift, scale, offset, y3):
    """``y = (x - shift) * scale + offset`` per feature (float64 vectors)."""
    g = _Grid(x3.shape)
    if g.channels_last:
        k.affine_nc(_as2d(x3), shift, scale, offset, g.rows, g.cols, _as2d(y3))
    else:
        k.affine_nchw(x3, shift, scale, offset, g.rows, g.cols, y3)


def backward_sums(dy3, x3, mean):
    """Per-feature ``sum(dy)``, ``sum(dy * (x - mean))``, ``sum(x - mean)``."""
    g = _Grid(x3.shape)
    pdy, pdyxc, pxc = g.partials(3)
    if g.channels_last:
        k.backward_partials_nc(_as2d(dy3), _as2d(x3), mean, g.rows, g.cols, pdy, pdyxc, pxc)
    else:
        k.backward_partials_nchw(dy3, x3, mean, g.rows, g.cols, pdy, pdyxc, pxc)
    sums = []
    for p in (pdy, pdyxc, pxc):
        out = np.empty(g.nfeat)
        k.sum_partials(p, out)
        sums.append(out)
    return sums


def backward_dx(dy3, x3, a, shift, b, d, dx3):
    """``dx = dy * a + (x - shift) * b + d`` per feature (float64 vectors)."""
    g = _Grid(x3.shape)
    if g.channels_last:
        k.affine2_nc(_as2d(dy3), _as2d(x3), a, shift, b, d, g.rows, g.cols, _as2d(dx3))
    else:
        k.affine2_nchw(dy3, x3, a, shift, b, d, g.rows, g.cols, dx3)


# --------------------------------------------------------------------------- #
# The operations behind the public API, on (outer, C, inner) arrays.  Per-feature
# vectors are float64 here; results are returned in the input's dtype.  The GPU
# backend (numbabn._gpu.ops) has the same functions with the same signatures.
# --------------------------------------------------------------------------- #
def _f64(v):
    return None if v is None else np.asarray(v, dtype=np.float64)


def _scale(invstd, weight):
    return invstd if weight is None else invstd * _f64(weight)


def _offset(bias, nfeat):
    return np.zeros(nfeat) if bias is None else _f64(bias)


def _cast(dtype, *vectors):
    """Cast float64 results to the output dtype; a variance beyond float32's range
    (data near 1e30) becomes inf, which is its correct float32 value."""
    with np.errstate(over="ignore"):
        return tuple(None if a is None else a.astype(dtype) for a in vectors)


def batch_stats(x3):
    return _cast(x3.dtype, *stats(x3))


def normalize(x3, mean, var, weight, bias, eps, y3):
    invstd = 1.0 / np.sqrt(_f64(var) + eps)
    affine(x3, _f64(mean), _scale(invstd, weight), _offset(bias, x3.shape[1]), y3)


def batch_norm_train(x3, weight, bias, eps, y3):
    """Normalise with batch statistics; return ``(mean, invstd)`` in x's dtype and
    the biased ``var`` in float64."""
    mean, var = stats(x3)
    invstd = 1.0 / np.sqrt(var + eps)
    affine(x3, mean, _scale(invstd, weight), _offset(bias, x3.shape[1]), y3)
    # var stays float64: it only feeds the running-stat update, where momentum may
    # bring a variance beyond float32's range (data near 1e20) back into it.
    return (*_cast(x3.dtype, mean, invstd), var)


def batch_norm_backward(dy3, x3, mean, invstd, weight, dx3):
    """Write dx into ``dx3``; return ``(dweight, dbias)`` (None without weight).

    The saved ``mean`` may have been rounded to float32; ``sum(x - mean)`` gives
    the rounding error ``delta`` exactly enough in float64, and the gradient is
    taken about the true batch mean ``mean + delta``.
    """
    n = x3.shape[0] * x3.shape[2]
    mean = _f64(mean)
    invstd = _f64(invstd)
    sum_dy, sum_dy_xc, sum_xc = backward_sums(dy3, x3, mean)
    delta = sum_xc / n
    true_mean = mean + delta
    cov = (sum_dy_xc - delta * sum_dy) / n  # mean(dy * (x - true_mean))
    a = _scale(invstd, weight)
    b = -a * invstd * invstd * cov
    d = -a * (sum_dy / n)
    backward_dx(dy3, x3, a, true_mean, b, d, dx3)
    if weight is None:
        return None, None
    return _cast(x3.dtype, invstd * cov * n, sum_dy)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    unbiased = _f64(var) * (count / (count - 1))
    keep = 1.0 - momentum
    running_mean[...] = keep * _f64(running_mean) + momentum * _f64(mean)
    running_var[...] = keep * _f64(running_var) + momentum * unbiased
