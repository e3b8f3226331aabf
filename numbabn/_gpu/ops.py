"""GPU host drivers: the twins of :mod:`numbabn._cpu.ops`, on numba device arrays.

Same function names and signatures; inputs are validated and viewed as
``(outer, C, inner)`` device arrays by :mod:`numbabn.functional`.  Everything
stays on the device and on the default stream: no host copy of ``x`` or ``y``,
no synchronisation.  Per-feature results are numba device arrays in the input's
dtype (rows of the kernels' parameter table, see :mod:`numbabn._gpu.kernels`).

Launches per call: fwd-train 3 (partials, merge, normalise), eval 1, backward 3,
running-stat update 1.  Host work per call is kept small (it, not the GPU, sets
the cost of a call on small and mid-sized inputs): each operation looks up the
CUDA context once, launches compiled overloads directly, takes its float64
partials from a reused scratch buffer and its parameter table from a slab (see
:mod:`numbabn._gpu.launch`); launch shapes are computed once per input shape.
The one device allocation left per call is the output ``y`` or ``dx``.
"""

from functools import lru_cache

import numpy as np
from numba import cuda

from .. import _config as cfg
from . import kernels as k
from .launch import Kernel, dim3, scratch, small_result
from .layout import row


def _cdiv(a, b):
    return -(-a // b)


class _Plan:
    """Launch shape and the fixed reduction partition for one (outer, C, inner) shape.

    NCHW-like (``inner > 1``): 1-D blocks of ``GPU_THREADS``, each taking
    ``chunk = GPU_THREADS * items`` values of one feature; ``C * nchunks`` blocks.
    Channel-contiguous: ``(tile, rows)`` blocks, ``tile`` adjacent features
    (at most ``GPU_FEATURE_TILE``, split evenly) by ``rows`` rows; a block takes
    ``chunk = rows * items`` rows; ``ntiles * nchunks`` blocks.  Either way chunk
    k of a feature holds ``min(chunk, total - k * chunk)`` values.

    The merge kernels run one block per feature with no more threads than there
    are partials to merge.
    """

    def __init__(self, shape3, threads, items, tile_max):
        outer, nfeat, inner = shape3
        assert threads <= cfg.GPU_MAX_THREADS and items % cfg.GPU_UNROLL == 0
        self.items = items
        self.nfeat = nfeat
        self.count = outer * inner
        self.channels_last = inner == 1
        if self.channels_last:
            tile = _cdiv(nfeat, _cdiv(nfeat, tile_max))
            rows = threads // tile
            block = (tile, rows)
            self.chunk = rows * items
            self.total = outer
            self.nchunks = _cdiv(outer, self.chunk)
            grid = _cdiv(nfeat, tile) * self.nchunks
        else:
            block = threads
            self.chunk = threads * items
            self.total = outer * inner
            self.nchunks = _cdiv(self.total, self.chunk)
            grid = nfeat * self.nchunks
        self.grid, self.block = dim3(grid), dim3(block)
        merge_threads = 1
        while merge_threads < min(self.nchunks, threads):
            merge_threads *= 2
        self.merge_grid, self.merge_block = dim3(nfeat), dim3(min(merge_threads, threads))

    @property
    def per_block(self):
        """The kernels' ``items`` (NCHW) or ``rows_per_block`` (NC) argument."""
        return self.chunk if self.channels_last else self.items

    def launch(self, kernels, *args):
        """Launch the family member for this layout, over the data partition."""
        kernels[self.channels_last].launch(self.grid, self.block, *args)

    def merge(self, kernel, *args):
        kernel.launch(self.merge_grid, self.merge_block, *args)


@lru_cache(maxsize=256)
def _cached_plan(shape3, threads, items, tile_max):
    return _Plan(shape3, threads, items, tile_max)


def _plan(shape3):
    return _cached_plan(tuple(shape3), cfg.GPU_THREADS, cfg.GPU_ITEMS_PER_THREAD,
                        cfg.GPU_FEATURE_TILE)


@lru_cache(maxsize=256)
def _per_feature_launch(nfeat, threads):
    """Grid and block of a kernel with one thread per feature."""
    return dim3(_cdiv(nfeat, threads)), dim3(threads)


def _family(nchw, nc):
    """``(NCHW kernel, channel-contiguous kernel)``, indexed by ``plan.channels_last``."""
    return Kernel(nchw), Kernel(nc)


_STATS_PARTIALS = _family(k.stats_partials_nchw, k.stats_partials_nc)
_AFFINE = _family(k.affine_nchw, k.affine_nc)
_NORMALIZE = _family(k.normalize_nchw, k.normalize_nc)
_BACKWARD_PARTIALS = _family(k.backward_partials_nchw, k.backward_partials_nc)
_AFFINE2 = _family(k.affine2_nchw, k.affine2_nc)
_MERGE_PARTIALS = Kernel(k.merge_partials)
_SUM_PARTIALS = Kernel(k.sum_partials)
_UPDATE_RUNNING_STATS = Kernel(k.update_running_stats)


def _new_params(nfeat, dtype):
    """A fresh parameter table: its rows are returned to the caller."""
    return small_result((k.NPARAMS, nfeat), dtype)


def _optional(v, fallback):
    """Kernels take a same-dtype placeholder and a flag for an absent weight/bias."""
    return (fallback, False) if v is None else (v, True)


def _stats_params(x3, weight, bias, eps):
    """Batch statistics reduced on the device into a new parameter table."""
    plan = _plan(x3.shape)
    device_partials = scratch((2, plan.nchunks, plan.nfeat))
    plan.launch(_STATS_PARTIALS, x3, plan.per_block, device_partials)
    device_params = _new_params(plan.nfeat, x3.dtype)
    placeholder = row(device_params, 0) if weight is None or bias is None else None
    device_weight, has_weight = _optional(weight, placeholder)
    device_bias, has_bias = _optional(bias, placeholder)
    plan.merge(_MERGE_PARTIALS, device_partials, plan.chunk, plan.total, device_weight,
               device_bias, has_weight, has_bias, np.float64(eps), device_params)
    return plan, device_params


# --------------------------------------------------------------------------- #
# The operations behind the public API (same names and signatures as the CPU's).
# Each holds the CUDA context for its whole body (``require_context``), so the
# allocations and launches inside do not look it up again.
# --------------------------------------------------------------------------- #
@cuda.require_context
def batch_stats(x3):
    _, device_params = _stats_params(x3, None, None, 1.0)
    return row(device_params, k.MEAN), row(device_params, k.VAR)


@cuda.require_context
def normalize(x3, mean, var, weight, bias, eps, y3):
    device_weight, has_weight = _optional(weight, mean)
    device_bias, has_bias = _optional(bias, mean)
    plan = _plan(x3.shape)
    plan.launch(_NORMALIZE, x3, mean, var, device_weight, device_bias, has_weight, has_bias,
                np.float64(eps), plan.per_block, y3)


@cuda.require_context
def batch_norm_train(x3, weight, bias, eps, y3):
    """Normalise with batch statistics; return ``(mean, invstd, var)`` in x's dtype."""
    plan, device_params = _stats_params(x3, weight, bias, eps)
    plan.launch(_AFFINE, x3, device_params, plan.per_block, y3)
    return (row(device_params, k.MEAN), row(device_params, k.INVSTD),
            row(device_params, k.VAR))


@cuda.require_context
def batch_norm_backward(dy3, x3, mean, invstd, weight, dx3):
    """Write dx into ``dx3``; return ``(dweight, dbias)`` (None without weight).

    As on the CPU, ``sum(x - mean)`` corrects a saved mean rounded to float32 and
    the gradient is taken about the true batch mean.
    """
    plan = _plan(x3.shape)
    device_partials = scratch((3, plan.nchunks, plan.nfeat))
    plan.launch(_BACKWARD_PARTIALS, dy3, x3, mean, plan.per_block, device_partials)
    device_params = _new_params(plan.nfeat, x3.dtype)
    device_weight, has_weight = _optional(weight, mean)
    plan.merge(_SUM_PARTIALS, device_partials, plan.count, mean, invstd, device_weight,
               has_weight, device_params)
    plan.launch(_AFFINE2, dy3, x3, device_params, plan.per_block, dx3)
    if weight is None:
        return None, None
    return row(device_params, k.DWEIGHT), row(device_params, k.DBIAS)


@cuda.require_context
def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    grid, block = _per_feature_launch(running_mean.shape[0], cfg.GPU_THREADS)
    _UPDATE_RUNNING_STATS.launch(grid, block, running_mean, running_var, mean, var,
                                 np.float64(count / (count - 1)), np.float64(momentum))
