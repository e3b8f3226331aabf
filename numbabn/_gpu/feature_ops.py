"""GPU host drivers: the twins of :mod:`numbabn._cpu.feature_ops`, on numba device arrays.

Same function names, signatures and return dtypes as the CPU's; inputs are
validated and viewed as ``(outer, C, inner)`` device arrays by
:mod:`numbabn.functional`.  Everything stays on the device and on the default
stream: no host copy of ``x`` or ``y``, no synchronisation.  Per-feature results
are numba device arrays, rows of the tables the kernels fill (see
:mod:`numbabn._gpu.feature_kernels`): the float64 statistics and sums tables for float64
results (``batch_moments``, ``batch_norm_backward_reduce``, the variance of
``batch_norm_train``), the coefficient table's result rows for results in the
input's dtype.

Launches per call: ``batch_stats``, ``batch_moments`` 1 (moments);
``batch_norm_train`` 2 (moments, affine pass); ``batch_norm_backward`` 2
(backward sums, dx pass); ``batch_norm_backward_reduce`` 1 (backward sums);
``normalize``, ``batch_norm_elemt``, ``batch_norm_backward_elemt`` and
``update_running_stats`` 1 each.  A reduction merges its block partials in the
same launch, in the block that finishes last (see :mod:`numbabn._gpu.feature_kernels`).

Host work per call is kept small (it, not the GPU, sets the cost of a call on
small and mid-sized inputs): each operation looks up the CUDA context once,
launches compiled overloads directly, takes its float64 partials from a reused
scratch buffer, its tickets from a reused zeroed counter array and its result
tables from a slab (see :mod:`numbabn._gpu.runtime`); launch shapes are computed
once per input shape.  The one device allocation left per call is the output
``y`` or ``dx``.
"""

from collections import namedtuple
from functools import lru_cache

import numpy as np
from numba import cuda

from .. import _config as cfg
from .. import _core
from .._core import cdiv
from . import feature_kernels as k
from .runtime import Kernel, check_threads, counters, dim3, scratch, small_result
from .layout import row

Geometry = namedtuple("Geometry", "items chunk total lanes reverse")
"""The reduction partition every kernel of a call shares, one argument (ints).

``items``: values each thread visits per block (NCHW-like kernels);
``chunk``: values of one feature per block (``blockDim * items`` NCHW-like, the
block's rows channel-contiguous); ``total``: values per feature.  Chunk ``k``
of a feature holds ``min(chunk, total - k * chunk)`` values.  ``lanes``: the
lanes of the fixed merge of a feature's chunk partials (lane ``t`` takes chunks
``t, t + lanes, ...`` in order, then a fixed tree).  ``reverse``: 1 to map
block ``b`` to place ``nblocks - 1 - b`` of the partition (a test hook,
``GPU_REVERSE_BLOCKS``; results are the same), else 0.
"""



class _Plan:
    """Launch shape and the fixed reduction partition for one (outer, C, inner) shape.

    NCHW-like (``inner > 1``): 1-D blocks of ``GPU_THREADS``, each taking
    ``chunk = GPU_THREADS * items`` values of one feature; ``C * nchunks`` blocks.
    Channel-contiguous: ``(tile, rows)`` blocks, ``tile`` adjacent features
    (at most ``GPU_FEATURE_TILE``, split evenly) by ``rows`` rows; a block takes
    ``chunk = rows * items`` rows; ``ntiles * nchunks`` blocks.

    The last block of each feature (NCHW-like) or feature tile
    (channel-contiguous) merges its partials with ``lanes`` lanes per feature:
    the smallest power of two reaching the number of chunks, at most
    ``GPU_THREADS`` (what a separate merge launch with one block per feature
    would use).  ``ncounters`` tickets: one per feature or per tile.
    """

    def __init__(self, shape3, threads, items, tile_max, reverse):
        outer, nfeat, inner = shape3
        check_threads(threads, items, k.GPU_MAX_THREADS, k.GPU_UNROLL)
        self.nfeat = nfeat
        self.channels_last = inner == 1
        total = outer * inner
        if self.channels_last:
            tile = cdiv(nfeat, cdiv(nfeat, tile_max))
            rows = threads // tile
            block = (tile, rows)
            chunk = rows * items
            self.nchunks = cdiv(outer, chunk)
            self.ncounters = cdiv(nfeat, tile)
        else:
            block = threads
            chunk = threads * items
            self.nchunks = cdiv(total, chunk)
            self.ncounters = nfeat
        lanes = 1
        while lanes < min(self.nchunks, threads):
            lanes *= 2
        self.geom = Geometry(items, chunk, total, min(lanes, threads), int(bool(reverse)))
        self.grid, self.block = dim3(self.ncounters * self.nchunks), dim3(block)

    def launch(self, kernels, *args):
        """Launch the family member for this layout over the data partition;
        the geometry is the argument before the output."""
        kernels[self.channels_last].launch(self.grid, self.block, *args[:-1], self.geom,
                                           args[-1])



@lru_cache(maxsize=256)
def _cached_plan(shape3, threads, items, tile_max, reverse):
    return _Plan(shape3, threads, items, tile_max, reverse)


def _plan(shape3):
    return _cached_plan(tuple(shape3), cfg.GPU_THREADS, cfg.GPU_ITEMS_PER_THREAD,
                        cfg.GPU_FEATURE_TILE, bool(cfg.GPU_REVERSE_BLOCKS))


@lru_cache(maxsize=256)
def _per_feature_launch(nfeat, threads):
    """Grid and block of a kernel with one thread per feature."""
    return dim3(cdiv(nfeat, threads)), dim3(threads)


def _family(nchw, nc):
    """``(NCHW kernel, channel-contiguous kernel)``, indexed by ``plan.channels_last``."""
    return Kernel(nchw), Kernel(nc)


_MOMENTS = _family(k.moments_nchw, k.moments_nc)
_AFFINE = _family(k.affine_nchw, k.affine_nc)
_NORMALIZE = _family(k.normalize_nchw, k.normalize_nc)
_BACKWARD_SUMS = _family(k.backward_sums_nchw, k.backward_sums_nc)
_DX = _family(k.dx_nchw, k.dx_nc)
_BACKWARD_ELEMT = _family(k.backward_elemt_nchw, k.backward_elemt_nc)
_UPDATE_RUNNING_STATS = Kernel(k.update_running_stats)


def _optional(v, placeholder):
    """Kernels take an array and a presence flag for a weight or bias that may be
    absent (``None``): then ``placeholder``, any 1-D device array, never read."""
    return (placeholder, False) if v is None else (v, True)


def _forward(x3, weight, bias, eps, y3, relu=False):
    """Moments, merged in the same launch (and with ``y3`` the affine pass into
    it, through a ReLU with ``relu``).  Returns the fresh float64 ``stats``
    table and the input-dtype ``coef`` table."""
    plan = _plan(x3.shape)
    partials = scratch((2, plan.nchunks, plan.nfeat))
    stats = small_result((_core.NSTATS, plan.nfeat), np.float64)
    coef = small_result((k.NCOEF_ROWS, plan.nfeat), x3.dtype)
    placeholder = row(coef, 0) if weight is None or bias is None else None
    device_weight, has_weight = _optional(weight, placeholder)
    device_bias, has_bias = _optional(bias, placeholder)
    plan.launch(_MOMENTS, x3, device_weight, device_bias, has_weight, has_bias, np.float64(eps),
                partials, counters(plan.ncounters), stats, coef)
    if y3 is not None:
        plan.launch(_AFFINE, x3, coef, bool(relu), y3)
    return stats, coef


def _backward_sums(dy3, x3, mean, invstd, weight, dx3, y3=None):
    """Backward sums about ``mean`` rounded to x's dtype, merged in the same
    launch (and with ``dx3`` the dx pass into it); with ``y3`` (a fused ReLU's
    output) ``dy`` counts only where ``y > 0``.  Returns the fresh float64
    ``sums`` table and the input-dtype ``coef`` table."""
    plan = _plan(x3.shape)
    masked = y3 is not None
    y3 = y3 if masked else dy3  # unread without the mask
    partials = scratch((_core.NSUMS, plan.nchunks, plan.nfeat))
    sums = small_result((k.NSUM_ROWS, plan.nfeat), np.float64)
    coef = small_result((k.NCOEF_ROWS, plan.nfeat), x3.dtype)
    device_weight, has_weight = _optional(weight, mean)
    write_dx = dx3 is not None
    plan.launch(_BACKWARD_SUMS, dy3, x3, mean, y3, masked, invstd, device_weight, has_weight,
                write_dx, partials, counters(plan.ncounters), sums, coef)
    if write_dx:
        plan.launch(_DX, dy3, x3, coef, y3, masked, dx3)
    return sums, coef


# --------------------------------------------------------------------------- #
# The operations behind the public API (same names and signatures as the CPU's).
# Each holds the CUDA context for its whole body (``require_context``), so the
# allocations and launches inside do not look it up again.
# --------------------------------------------------------------------------- #
@cuda.require_context
def batch_stats(x3):
    """``(mean, var)`` in x's dtype."""
    _, coef = _forward(x3, None, None, 1.0, None)
    return row(coef, k.X_MEAN), row(coef, k.X_VAR)


@cuda.require_context
def batch_moments(x3):
    """Float64 ``(mean, M2)`` per feature (the count is ``outer * inner``)."""
    stats, _ = _forward(x3, None, None, 1.0, None)
    return row(stats, _core.MEAN), row(stats, _core.M2)


def _normalize(x3, mean, spread, spread_is_var, weight, bias, eps, y3):
    device_weight, has_weight = _optional(weight, mean)
    device_bias, has_bias = _optional(bias, mean)
    _plan(x3.shape).launch(_NORMALIZE, x3, mean, spread, spread_is_var, np.float64(eps),
                           device_weight, device_bias, has_weight, has_bias, y3)


@cuda.require_context
def normalize(x3, mean, var, weight, bias, eps, y3):
    _normalize(x3, mean, var, True, weight, bias, eps, y3)


@cuda.require_context
def batch_norm_elemt(x3, mean, invstd, weight, bias, y3):
    """``mean``/``invstd`` in x's dtype or float64 (a float64 mean is used exactly)."""
    _normalize(x3, mean, invstd, False, weight, bias, 1.0, y3)


@cuda.require_context
def batch_norm_train(x3, weight, bias, eps, y3, relu=False):
    """Normalise with batch statistics (then a ReLU with ``relu``); return
    ``(mean, invstd)`` in x's dtype and the biased ``var`` in float64."""
    stats, coef = _forward(x3, weight, bias, eps, y3, relu)
    return row(coef, k.X_MEAN), row(coef, k.X_INVSTD), row(stats, _core.VAR)


@cuda.require_context
def batch_norm_backward(dy3, x3, mean, invstd, weight, dx3, y3=None):
    """Write dx into ``dx3``; return ``(dweight, dbias)`` (None without weight).
    ``y3``: the output of the fused ReLU, whose mask applies to ``dy``.

    As on the CPU, ``sum(x - mean)`` corrects a saved mean rounded to float32 and
    the gradient is taken about the exact batch mean.
    """
    _, coef = _backward_sums(dy3, x3, mean, invstd, weight, dx3, y3)
    if weight is None:
        return None, None
    return row(coef, k.X_DWEIGHT), row(coef, k.X_DBIAS)


@cuda.require_context
def batch_norm_backward_reduce(dy3, x3, mean, invstd):
    """Float64 ``(sum(dy), sum(dy * (x - mean)))`` per feature, about the given
    ``mean`` (x's dtype or float64; a float64 mean is used exactly)."""
    sums, _ = _backward_sums(dy3, x3, mean, invstd, None, None)
    return row(sums, _core.SUM_DY), row(sums, k.SUM_DY_XMU)


@cuda.require_context
def batch_norm_backward_elemt(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx3):
    device_weight, has_weight = _optional(weight, mean)
    _plan(x3.shape).launch(_BACKWARD_ELEMT, dy3, x3, mean, invstd, device_weight, has_weight,
                           sum_dy, sum_dy_xmu, np.float64(count), dx3)


@cuda.require_context
def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """In place, in float64; ``mean``/``var`` in the running dtype or float64."""
    grid, block = _per_feature_launch(running_mean.shape[0], cfg.GPU_THREADS)
    _UPDATE_RUNNING_STATS.launch(grid, block, running_mean, running_var, mean, var,
                                 np.float64(count / (count - 1)), np.float64(momentum))
