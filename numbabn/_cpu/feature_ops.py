"""CPU host drivers: choose the kernel family and path, allocate, call one kernel.

Every function takes arrays already validated and viewed as ``(outer, C, inner)``
by :mod:`numbabn.functional`; outputs of the input's shape are written into the
``y3``/``dx3`` arrays given.  The GPU backend (``numbabn._gpu.feature_ops``) has the
same functions, signatures and return dtypes:

* the fused operations return per-feature results in the input's dtype, except
  the batch variance of :func:`batch_norm_train` (float64: it feeds the
  running-statistics update, where momentum may bring a variance beyond
  float32's range back into it);
* the split primitives (:func:`batch_moments`, :func:`batch_norm_backward_reduce`)
  return float64 partials, ready to merge across processes.

Each operation is a single kernel call (see :mod:`numbabn._cpu.feature_kernels` for the
fused and two-phase paths); this module plans the chunk grid, which depends on
the shape alone, and allocates.  Every tunable is read from :mod:`numbabn._config`
per plan and passed to the kernels as an argument.
"""

from collections import namedtuple

import numpy as np

from .. import _config as cfg
from .. import _core
from .._core import compute_dtype
from .runtime import astype, astype_quiet, constant, is_small, num_threads
from . import feature_kernels
from . import half

Geometry = namedtuple("Geometry",
                      "rows cols threads fused by_row bwd_block merge_cols short_run")
"""A kernel's launch geometry, one argument (all ints).

NCHW-like (``inner > 1``): a chunk is ``rows`` x ``cols`` of one feature's
``(outer, inner)`` plane, and ``fused`` says whether one task per feature may
read its inputs and keep them in cache for the output pass.  Channel-contiguous
(``inner == 1``): a chunk is ``rows`` rows of a block of ``cols`` columns; never
fused; ``by_row`` says whether the backward sums take one row at a time.
``threads`` splits the two-phase passes (results never depend on it);
``bwd_block`` is the backward's block of values summed in the input's dtype;
``merge_cols`` the columns per task of the channel-contiguous merge;
``short_run`` the longest NCHW-like row whose statistics take four rows at a time.
"""


def _plan(shape3, itemsize, nread, tunables, threads):
    outer, nfeat, inner = shape3
    (chunk, nc_cols, fuse_bytes, fuse_min_tasks, stream_min, bwd_block, bwd_nc_rows, merge,
     short_run) = tunables
    if inner == 1:
        cols = min(nfeat, nc_cols)
        rows = max(1, chunk // cols)
        by_row = cols == nfeat and nread * outer * nfeat * itemsize > stream_min
        return Geometry(rows, cols, threads, 0, int(by_row), bwd_nc_rows, merge, short_run)
    cols = min(inner, chunk)
    rows = max(1, chunk // cols)
    fused = nfeat >= fuse_min_tasks and nread * outer * inner * itemsize <= fuse_bytes
    return Geometry(rows, cols, threads, int(fused), 0, bwd_block, merge, short_run)


_plans = {}  # (shape3, itemsize, nread, tunables, threads) -> Geometry
_MAX_PLANS = 256


def plan(shape3, itemsize, nread):
    """The geometry for one ``(outer, C, inner)`` shape reading ``nread`` arrays,
    with the tunables of :mod:`numbabn._config` as they are now.

    Memoised on the shape and the tunables' current values (read on every call:
    a benchmark may change them between calls), so a training loop's few shapes
    cost one dictionary look-up each."""
    tunables = (cfg.CHUNK_ELEMS, cfg.NC_COLS, cfg.FUSE_BYTES, cfg.FUSE_MIN_TASKS,
                cfg.NC_STREAM_MIN_BYTES, cfg.BWD_BLOCK, cfg.BWD_NC_ROWS, cfg.NC_MERGE_COLS,
                cfg.SHORT_RUN)
    key = (tuple(shape3), itemsize, nread, tunables, num_threads())
    geom = _plans.get(key)
    if geom is None:
        geom = _plan(*key)
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = geom
    return geom


def _kernels(x3):
    """The kernels for ``x3``: the serial twins for small inputs
    (:func:`runtime.is_small`), else the parallel ones."""
    return feature_kernels.serial if is_small(x3) else feature_kernels


def _nchunks(shape3, geom):
    outer, _, inner = shape3
    if inner == 1:
        return -(-outer // geom.rows)
    return -(-outer // geom.rows) * -(-inner // geom.cols)


def _as2d(a3):
    """The (rows, C) view of a channel-contiguous ``a3``; None stays None (an
    absent optional array: the kernels compile no pass for it)."""
    return None if a3 is None else a3.reshape(a3.shape[0], a3.shape[1])


def _param(v, nfeat, dtype, fill):
    return constant(nfeat, dtype, fill) if v is None else v


def _elementwise_runs(x3):
    """Rows (channel-contiguous) or runs of ``inner`` values per elementwise task."""
    return max(1, cfg.CHUNK_ELEMS // (x3.shape[1] if x3.shape[2] == 1 else x3.shape[2]))


def _planes(x3, *outs):
    """Whether NCHW-like ``x3`` takes the small-plane passes
    (:func:`feature_kernels.affine_planes`, ``dx_planes``):
    runs of fewer than ``PLANE_MAX_BYTES`` bytes and every array (None ones
    left out) C-contiguous.  Depends on the shape, dtype and layout only."""
    return 1 < x3.shape[2] and x3.shape[2] * x3.dtype.itemsize < cfg.PLANE_MAX_BYTES and all(
        a.flags.c_contiguous for a in (x3, *outs) if a is not None)


def _flat(a3):
    """The (outer, C * inner) view of ``a3``; None stays None."""
    return None if a3 is None else a3.reshape(a3.shape[0], a3.shape[1] * a3.shape[2])


def _plane_blocks(x3):
    """Features per block and sample blocks of the small-plane passes: blocks
    of about ``PLANE_BLOCK_VALUES`` values a sample, split by samples too when
    there are fewer feature blocks than two per thread (results never depend on
    the blocks)."""
    outer, nfeat, inner = x3.shape
    fblock = max(1, cfg.PLANE_BLOCK_VALUES // inner)
    nfb = -(-nfeat // fblock)
    want = 2 * num_threads()
    nsb = 1 if nfb >= want else min(outer, -(-want // nfb))
    return fblock, nsb


def _affine_planes(x3, coef, zero, y3):
    """The small-plane affine pass, then a ReLU unless ``zero`` is None."""
    k = _kernels(x3)
    fblock, nsb = _plane_blocks(x3)
    k.affine_planes(_flat(x3), coef, x3.shape[2], fblock, nsb, zero, _flat(y3))


def _dx_planes(dy3, x3, y3, coef, dx3):
    """The small-plane dx pass; ``y3``: the fused ReLU's output masking ``dy``, or None."""
    k = _kernels(x3)
    fblock, nsb = _plane_blocks(x3)
    k.dx_planes(_flat(dy3), _flat(x3), _flat(y3), coef, x3.shape[2], fblock, nsb, _flat(dx3))


def _forward(x3, weight, bias, eps, y3, relu=False):
    """Run the forward kernel; ``y3=None`` computes the statistics only; ``relu``
    passes the output through a ReLU.
    Returns the float64 ``stats`` table (rows ``_core.MEAN``, ``INVSTD``, ``VAR``, ``M2``).
    Half inputs run the same kernels on their bits (``half.bits_view``)."""
    k = _kernels(x3)
    nfeat, dtype = x3.shape[1], compute_dtype(x3.dtype)
    geom = plan(x3.shape, x3.dtype.itemsize, 1)
    x3, y3 = half.bits_view(x3), None if y3 is None else half.bits_view(y3)
    weight, bias = _param(weight, nfeat, dtype, 1), _param(bias, nfeat, dtype, 0)
    coef = np.empty((_core.NCOEFS, nfeat), dtype)
    stats = np.empty((_core.NSTATS, nfeat))
    # The ReLU's zero (of the coefficients' dtype) or None, and y3 or None: None
    # is a type to the kernels, which then compile no ReLU or no output pass.
    zero = dtype.type(0) if relu else None
    if x3.shape[2] == 1:
        p = np.empty((2, _nchunks(x3.shape, geom), nfeat))
        k.forward_nc(_as2d(x3), weight, bias, eps, geom, zero, p, coef, stats, _as2d(y3))
    else:
        planes = y3 is not None and _planes(x3, y3)
        args = (x3, weight, bias, eps, geom, zero)
        y3k = None if planes else y3
        if geom.fused:
            k.forward_nchw(*args, coef, stats, y3k)
        else:
            p = np.empty((2, nfeat, _nchunks(x3.shape, geom)))
            k.forward_nchw_chunks(*args, p, coef, stats, y3k)
        if planes:
            _affine_planes(x3, coef, zero, y3)
    return stats


def _cast(dtype, table, a, b, may_overflow=True):
    """Rows ``a < b`` of a float64 table, cast to the output dtype in one cast
    (float32: two rows of one new ``(2, C)`` array; float64: the table's rows).  A
    variance beyond float32's range (data near 1e30) becomes inf, which is its
    correct float32 value; ``may_overflow=False`` (no value can exceed float32's
    range) skips silencing that warning, which costs more than the cast."""
    if dtype == np.float64:
        return table[a], table[b]
    rows = (astype_quiet if may_overflow else astype)(table[a:b + 1:b - a], dtype)
    return rows[0], rows[1]


# The training forward's float32 mean and invstd cannot overflow when eps is at
# least this: the mean lies within the float32 data (a float64 rounding away),
# and var >= 0 (or NaN) gives invstd = 1 / sqrt(var + eps) <= 1 / sqrt(eps),
# which is below float32's largest value (3.4e38) for eps >= 8.7e-78.
_EPS_NO_OVERFLOW = 1e-76


def batch_stats(x3):
    stats = _forward(x3, None, None, 1.0, None)
    return _cast(x3.dtype, stats, _core.MEAN, _core.VAR)


def batch_moments(x3):
    """Float64 ``(mean, M2)`` per feature (the count is ``outer * inner``)."""
    stats = _forward(x3, None, None, 1.0, None)
    return stats[_core.MEAN], stats[_core.M2]


def _normalize(x3, mean, spread, spread_is_var, weight, bias, eps, y3):
    k = _kernels(x3)
    nfeat, dtype = x3.shape[1], compute_dtype(x3.dtype)
    x3, y3 = half.bits_view(x3), half.bits_view(y3)
    weight, bias = _param(weight, nfeat, dtype, 1), _param(bias, nfeat, dtype, 0)
    coef = np.empty((_core.NCOEFS, nfeat), dtype)
    runs = _elementwise_runs(x3)
    if x3.shape[2] == 1:
        k.normalize_nc(_as2d(x3), mean, spread, spread_is_var, eps, weight, bias, runs, coef,
                       _as2d(y3))
    elif _planes(x3, y3):
        k.normalize_coefs(mean, spread, spread_is_var, eps, weight, bias, coef)
        _affine_planes(x3, coef, None, y3)
    else:
        k.normalize_nchw(x3, mean, spread, spread_is_var, eps, weight, bias, runs, coef, y3)


def normalize(x3, mean, var, weight, bias, eps, y3):
    _normalize(x3, mean, var, True, weight, bias, eps, y3)


def batch_norm_elemt(x3, mean, invstd, weight, bias, y3):
    _normalize(x3, mean, invstd, False, weight, bias, 1.0, y3)


def batch_norm_train(x3, weight, bias, eps, y3, relu=False):
    """Normalise with batch statistics (then a ReLU with ``relu``); return
    ``(mean, invstd)`` in x's dtype and the biased ``var`` in float64."""
    stats = _forward(x3, weight, bias, eps, y3, relu)
    return (*_cast(compute_dtype(x3.dtype), stats, _core.MEAN, _core.INVSTD,
                   eps < _EPS_NO_OVERFLOW),
            stats[_core.VAR])


def _backward(dy3, x3, hi, invstd, weight, dx3, y3=None):
    """Run the backward kernel; ``dx3=None`` computes the sums only; ``y3``, the
    output of a fused ReLU, masks ``dy`` where ``y <= 0``.  Returns the
    float64 ``sums`` table (rows ``_core.SUM_DY``, ``SUM_DY_XHI``, ``SUM_XHI``,
    about ``hi``) and ``(dweight, dbias)`` rows in x's dtype (float32 for half
    inputs, read and written as half values by the kernels themselves)."""
    k = _kernels(x3)
    nfeat, dtype = x3.shape[1], compute_dtype(x3.dtype)
    geom = plan(x3.shape, x3.dtype.itemsize, 2)
    dy3, x3 = half.bits_view(dy3), half.bits_view(x3)
    dx3 = None if dx3 is None else half.bits_view(dx3)
    y3 = None if y3 is None else half.bits_view(y3)
    w = _param(weight, nfeat, dtype, 1)
    coef = np.empty((_core.NCOEFS, nfeat), dtype)
    sums = np.empty((_core.NSUMS, nfeat))
    dwb = np.empty((2, nfeat), dtype)
    write_dx = dx3 is not None
    # y3 None (no ReLU mask) is a type to the kernels: they compile no mask code for it
    if x3.shape[2] == 1:
        p = np.empty((3, _nchunks(x3.shape, geom), nfeat))
        k.backward_nc(_as2d(dy3), _as2d(x3), hi, invstd, w, geom, _as2d(y3), p, sums, coef, dwb,
                      _as2d(dx3))
    elif x3.shape[2] <= cfg.PLANE_BWD_MAX_INNER and _planes(x3, dy3, y3):
        # runs of a few values (4x4 planes): sums per position along whole
        # samples, then the plane-wise dx pass
        inner = x3.shape[2]
        fblock, _ = _plane_blocks(x3)
        fblock = max(1, min(fblock, -(-nfeat // (2 * geom.threads))))
        k.backward_planes(_flat(dy3), _flat(x3), _flat(y3), hi, invstd, w, inner, fblock,
                          cfg.PLANE_SUM_SAMPLES, write_dx, sums, coef, dwb)
        if write_dx:
            if _planes(x3, dx3):
                _dx_planes(dy3, x3, y3, coef, dx3)
            else:
                k.dx_nchw(dy3, x3, y3, coef, _elementwise_runs(x3), dx3)
    else:
        # (from 7x7 up the small-plane passes were no faster here: this one
        # writes dx while the feature's sums leave it in cache)
        args = (dy3, x3, hi, invstd, w, geom, y3)
        if geom.fused:
            k.backward_nchw(*args, sums, coef, dwb, dx3)
        else:
            p = np.empty((3, nfeat, _nchunks(x3.shape, geom)))
            k.backward_nchw_chunks(*args, p, sums, coef, dwb, dx3)
    return sums, dwb


def batch_norm_backward(dy3, x3, mean, invstd, weight, dx3, y3=None):
    """Write dx into ``dx3``; return ``(dweight, dbias)`` (None without weight).
    ``y3``: the output of the fused ReLU, whose mask applies to ``dy``.

    The saved ``mean`` may have been rounded to float32; the kernel also sums
    ``x - mean`` to recover the exact batch mean (see ``kernels._store_backward``).
    """
    _, dwb = _backward(dy3, x3, mean, invstd, weight, dx3, y3)
    if weight is None:
        return None, None
    return dwb[0], dwb[1]


def batch_norm_backward_reduce(dy3, x3, mean, invstd):
    """Float64 ``(sum(dy), sum(dy * (x - mean)))`` per feature, about the given
    ``mean`` (any float dtype; a float64 mean is used exactly)."""
    hi = mean.astype(x3.dtype, copy=False)
    sums, _ = _backward(dy3, x3, hi, invstd.astype(x3.dtype, copy=False), None, None)
    sum_dy = sums[_core.SUM_DY]
    return sum_dy, _core.sum_dy_xmu_about(sum_dy, sums[_core.SUM_DY_XHI],
                                          hi.astype(np.float64), mean.astype(np.float64))


def batch_norm_backward_elemt(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx3):
    k = _kernels(x3)
    nfeat, dtype = x3.shape[1], x3.dtype
    w = _param(weight, nfeat, dtype, 1)
    coef = np.empty((_core.NCOEFS, nfeat), dtype)
    runs = _elementwise_runs(x3)
    if x3.shape[2] == 1:
        k.backward_elemt_nc(_as2d(dy3), _as2d(x3), mean, invstd, w, sum_dy, sum_dy_xmu,
                            float(count), runs, coef, _as2d(dx3))
        return
    # the per-run or small-plane dx pass of the backward, with these coefficients
    k.elemt_backward_coefs(float(count), mean, invstd, w, sum_dy, sum_dy_xmu, coef)
    if _planes(x3, dy3, dx3):
        _dx_planes(dy3, x3, None, coef, dx3)
    else:
        k.dx_nchw(dy3, x3, None, coef, runs, dx3)


def _f64(v):
    return np.asarray(v, dtype=np.float64)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    unbiased = _f64(var) * (count / (count - 1))
    keep = 1.0 - momentum
    with np.errstate(over="ignore"):  # beyond float32's range, inf is the right value
        running_mean[...] = keep * _f64(running_mean) + momentum * _f64(mean)
        running_var[...] = keep * _f64(running_var) + momentum * unbiased
