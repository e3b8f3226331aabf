"""The statistics core: the scalar maths every normalization shares, written once.

Plain Python functions of float64 scalars.  Each backend compiles the same
functions for itself: :mod:`numbabn._cpu.feature_kernels` with ``njit`` and
:mod:`numbabn._gpu.feature_kernels` as ``numba.cuda`` device functions, so the CPU and GPU twins cannot drift apart in
their arithmetic.  The functions call nothing but ``math``: a compiled function
cannot call another plain Python function.

The pipeline of every normalization, per group of values (a feature for batch
norm, a row for layer/group/instance norm):

1. **accumulate** a block of ``n`` values about a pivot (``shift``, one of the
   values) into ``s1 = sum(x - shift)`` and ``s2 = sum((x - shift)**2)`` in
   float64, and turn them into the block's moments with :func:`shifted_moments`;
2. **merge** blocks' ``(count, mean, M2)`` with :func:`chan_merge`, always in a
   fixed order (block order on one process, rank order across processes), so
   results are bitwise reproducible;
3. **coefficients**: :func:`invstd_of` and :func:`affine_coefs` give the forward
   ``y = (x - hi) * scale + offset``; :func:`sum_dy_xmu_about` and
   :func:`backward_coefs` give the backward ``dx = (dy + (x - hi) * b + d) * a``.

Accuracy.  ``hi`` is the float64 mean rounded to the input's dtype, so
``x - hi`` is exact for values near the mean (Sterbenz) and a large mean next to
a tiny spread costs nothing; the rounding ``mean - hi`` is folded into the
offsets in float64.  The cancellation in ``M2 = s2 - s1**2 / n`` is bounded by
``(mean - shift)**2 / var``, at most ``n`` since the pivot is one of the values.
NaN propagates through every function (comparisons that clamp keep NaN).
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

# Rows of the per-feature tables both backends build and return rows of.
# Float64 statistics of a forward reduction:
MEAN, INVSTD, VAR, M2 = 0, 1, 2, 3
NSTATS = 4
# Float64 sums of a backward reduction, about ``hi`` (the mean in the input dtype):
SUM_DY, SUM_DY_XHI, SUM_XHI = 0, 1, 2
NSUMS = 3
# Coefficients of the elementwise passes, in the input dtype:
#   forward:  y  = (x - HI) * SCALE + OFFSET
#   backward: dx = (dy + (x - HI) * XC_COEF + DY_SHIFT) * DX_SCALE
# The per-row forward also keeps RSTD, the row's ``1 / sqrt(var + eps)`` rounded to
# the table's dtype (what the family's forwards return; HI is the mean rounded).
HI, SCALE, OFFSET = 0, 1, 2
RSTD = 3
DX_SCALE, XC_COEF, DY_SHIFT = 1, 2, 3
NCOEFS = 4

_FLOAT32 = np.dtype(np.float32)

# Half types, one numbering for every layer (validation, both backends' kernels).
BFLOAT16_KIND, FLOAT16_KIND = 0, 1


def half_kind(dtype):
    """``BFLOAT16_KIND``, ``FLOAT16_KIND``, or ``None`` for any other dtype (a
    NumPy dtype).  ``ml_dtypes`` is not imported: its bfloat16 is recognised by
    name and module."""
    if dtype.itemsize != 2:
        return None
    if dtype.name == "float16" and dtype.isnative:
        return FLOAT16_KIND
    if dtype.name == "bfloat16" and dtype.type.__module__.startswith("ml_dtypes"):
        return BFLOAT16_KIND
    return None


def compute_dtype(dtype):
    """The dtype of per-feature arguments, coefficients and results for input
    ``dtype`` (a NumPy dtype): itself, or float32 for a half type."""
    return _FLOAT32 if dtype.itemsize == 2 else dtype


def cdiv(a, b):
    """Integer ``ceil(a / b)`` for ``b > 0``."""
    return -(-a // b)


def imin(a, b):
    """Integer minimum (kernels do not use the ``min`` builtin)."""
    return a if a < b else b


def store_statistics(stats, c, mean, invstd, var, m2):
    """Write one group's float64 statistics into column ``c`` of a table whose
    rows are ``MEAN, INVSTD, VAR, M2`` (the table writer of every backend)."""
    stats[MEAN, c] = mean
    stats[INVSTD, c] = invstd
    stats[VAR, c] = var
    stats[M2, c] = m2


def shifted_moments(n, shift, s1, s2):
    """``(mean, M2)`` of ``n > 0`` values from their shifted sums
    ``s1 = sum(x - shift)`` and ``s2 = sum((x - shift)**2)``."""
    m = s1 / n
    m2 = s2 - s1 * m
    if m2 < 0.0:  # rounding only; NaN fails the test and stays
        m2 = 0.0
    return shift + m, m2


def chan_merge(n, mean, m2, nb, mean_b, m2_b):
    """Chan et al.'s merge of ``(n, mean, M2)`` with ``(nb, mean_b, M2_b)``.

    An empty side (count 0) leaves the other as it is, whatever its mean holds.
    """
    if nb == 0.0:
        return n, mean, m2
    if n == 0.0:
        return nb, mean_b, m2_b
    total = n + nb
    d = mean_b - mean
    return total, mean + d * (nb / total), m2 + m2_b + d * d * (n * (nb / total))


def invstd_of(var, eps):
    """``1 / sqrt(var + eps)``."""
    return 1.0 / math.sqrt(var + eps)


def affine_coefs(mean, hi, invstd, weight, bias):
    """``(scale, offset)`` of ``y = (x - hi) * scale + offset``, which equals
    ``(x - mean) * invstd * weight + bias`` with ``hi`` the mean in the input's
    dtype (``mean - hi`` is its rounding)."""
    scale = invstd * weight
    return scale, bias - (mean - hi) * scale


def sum_dy_xmu_about(sum_dy, sum_dy_xhi, hi, mean):
    """``sum(dy * (x - mean))`` from ``sum(dy * (x - hi))``: moves the centre of
    the backward's second sum from ``hi`` (what the kernels subtract, in the
    input's dtype) to ``mean`` (float64), exactly up to one rounding."""
    return sum_dy_xhi - (mean - hi) * sum_dy


def backward_coefs(n, sum_dy, sum_dy_xmu, mean, hi, invstd, weight):
    """``(a, b, d)`` of ``dx = (dy + (x - hi) * b + d) * a``, the gradient

    ``dx = weight * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)``

    of batch-statistics normalization over ``n`` values, with ``sum_dy_xmu``
    taken about ``mean`` (float64) and ``hi`` the mean in the input's dtype.
    Every factor stays within float32's range for data near 1e30, where the
    product ``a * b`` would underflow.
    """
    a = invstd * weight
    b = -invstd * invstd * (sum_dy_xmu / n)
    d = -(sum_dy / n) - (mean - hi) * b
    return a, b, d


def parameter_grads(invstd, sum_dy, sum_dy_xmu):
    """``(dweight, dbias)`` of one feature: ``invstd * sum(dy * (x - mean))`` and ``sum(dy)``."""
    return invstd * sum_dy_xmu, sum_dy


# --------------------------------------------------------------------------- #
# The per-row pattern (layer, group, instance and RMS norm)
# --------------------------------------------------------------------------- #
# Rows of the float64 per-row table: the statistics above, and the centre the
# pass subtracts (the mean, or 0 for RMSNorm).
CENTER = NSTATS
NROWSTATS = NSTATS + 1
# Rows of the float64 per-row backward table: xhat = (x - HI) * XHAT_SCALE + XHAT_OFFSET.
XHAT_SCALE, XHAT_OFFSET = 0, 1

Affine = namedtuple("Affine", "gmod arow adiv")
"""Weight index of value ``(m, k)`` of row ``r``:
``(r % gmod) * arow + ((m * K + k) // adiv) % arow`` (see :mod:`numbabn._cpu.row_kernels`)."""


# --------------------------------------------------------------------------- #
# Table writers built from a backend's compiled core functions
# --------------------------------------------------------------------------- #
def row_forward_writer(compile, invstd_of, affine_coefs, store_statistics, as_float64):
    """The per-row "statistics and coefficients" step of the family's forward,
    compiled by ``compile`` (``njit(...)`` or ``cuda.jit(device=True, ...)``)
    from that backend's compiled ``invstd_of``, ``affine_coefs`` and
    ``store_statistics``; ``as_float64`` is ``numpy.float64``.

    ``store(r, cnt, mean, m2, eps, rms, coef, stats)`` writes row ``r``'s
    statistics and centre (the mean, or 0 for RMSNorm, whose "variance" is the
    mean square) and the coefficients of ``xhat = (x - HI) * SCALE + OFFSET``,
    ``HI`` the centre rounded to the table's dtype, and ``RSTD`` the row's
    ``invstd`` rounded to it."""

    def store(r, cnt, mean, m2, eps, rms, coef, stats):
        var = m2 / cnt
        if rms:
            center = 0.0
            invstd = invstd_of(var + mean * mean, eps)
        else:
            center = mean
            invstd = invstd_of(var, eps)
        store_statistics(stats, r, mean, invstd, var, m2)
        stats[CENTER, r] = center
        coef[HI, r] = center
        coef[RSTD, r] = invstd
        coef[SCALE, r], coef[OFFSET, r] = affine_coefs(center, as_float64(coef[HI, r]), invstd,
                                                       1.0, 0.0)

    return compile(store)


# --------------------------------------------------------------------------- #
# Host side, both backends: NumPy, not compiled
# --------------------------------------------------------------------------- #
def update_instance_running_stats(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's instance-norm update, in place: the batch statistics are the
    mean over samples of the instances' means and unbiased variances (``mean``
    and the biased ``var`` of shape ``(N, C)``, ``count`` values each)."""
    import numpy as np

    batch_mean = np.mean(mean.astype(np.float64), axis=0)
    batch_var = np.mean(var.astype(np.float64) * (count / (count - 1)), axis=0)
    keep = 1.0 - momentum
    with np.errstate(over="ignore"):  # beyond float32's range, inf is the right value
        running_mean[...] = keep * running_mean.astype(np.float64) + momentum * batch_mean
        running_var[...] = keep * running_var.astype(np.float64) + momentum * batch_var


