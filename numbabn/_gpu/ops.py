"""GPU host drivers: the twins of :mod:`numbabn._cpu.ops`, on numba device arrays.

Same function names and signatures; inputs are validated and viewed as
``(outer, C, inner)`` device arrays by :mod:`numbabn.functional`.  Everything
stays on the device and on the default stream: no host copy of ``x`` or ``y``,
no synchronisation.  Per-feature results are numba device arrays in the input's
dtype (rows of the kernels' parameter table, see :mod:`numbabn._gpu.kernels`).

Launches per call: fwd-train 3 (partials, merge, normalise), eval 2, backward 3,
running-stat update 1.
"""

import numpy as np
from numba import cuda

from .. import _config as cfg
from . import kernels as k


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
    """

    def __init__(self, shape3):
        outer, nfeat, inner = shape3
        threads = cfg.GPU_THREADS
        self.items = cfg.GPU_ITEMS_PER_THREAD
        assert threads <= cfg.GPU_MAX_THREADS and self.items % cfg.GPU_UNROLL == 0
        self.nfeat = nfeat
        self.count = outer * inner
        self.channels_last = inner == 1
        if self.channels_last:
            tile = _cdiv(nfeat, _cdiv(nfeat, cfg.GPU_FEATURE_TILE))
            rows = threads // tile
            self.block = (tile, rows)
            self.chunk = rows * self.items
            self.total = outer
            self.nchunks = _cdiv(outer, self.chunk)
            self.grid = _cdiv(nfeat, tile) * self.nchunks
        else:
            self.block = threads
            self.chunk = threads * self.items
            self.total = outer * inner
            self.nchunks = _cdiv(self.total, self.chunk)
            self.grid = nfeat * self.nchunks

    @property
    def per_block(self):
        """The kernels' ``items`` (NCHW) or ``rows_per_block`` (NC) argument."""
        return self.chunk if self.channels_last else self.items

    def launch(self, nchw_kernel, nc_kernel):
        kernel = nc_kernel if self.channels_last else nchw_kernel
        return kernel[self.grid, self.block]


def _merge_launch(kernel, plan):
    """One block per feature, with no more threads than there are partials to merge."""
    threads = 1
    while threads < min(plan.nchunks, cfg.GPU_THREADS):
        threads *= 2
    return kernel[plan.nfeat, min(threads, cfg.GPU_THREADS)]


def _per_feature_launch(kernel, nfeat):
    threads = cfg.GPU_THREADS
    return kernel[_cdiv(nfeat, threads), threads]


def _new_params(nfeat, dtype):
    return cuda.device_array((k.NPARAMS, nfeat), dtype=dtype)


def _optional(v, fallback):
    """Kernels take a same-dtype placeholder and a flag for an absent weight/bias."""
    return (fallback, False) if v is None else (v, True)


def _stats_params(x3, weight, bias, eps):
    """Batch statistics reduced on the device into a new parameter table."""
    plan = _Plan(x3.shape)
    device_partials = cuda.device_array((2, plan.nchunks, plan.nfeat), dtype=np.float64)
    plan.launch(k.stats_partials_nchw, k.stats_partials_nc)(x3, plan.per_block, device_partials)
    device_params = _new_params(plan.nfeat, x3.dtype)
    placeholder = device_params[0] if weight is None or bias is None else None
    device_weight, has_weight = _optional(weight, placeholder)
    device_bias, has_bias = _optional(bias, placeholder)
    _merge_launch(k.merge_partials, plan)(
        device_partials, plan.chunk, plan.total, device_weight, device_bias,
        has_weight, has_bias, np.float64(eps), device_params)
    return plan, device_params


def _affine(plan, x3, device_params, y3):
    plan.launch(k.affine_nchw, k.affine_nc)(x3, device_params, plan.per_block, y3)


# --------------------------------------------------------------------------- #
# The operations behind the public API (same names and signatures as the CPU's).
# --------------------------------------------------------------------------- #
def batch_stats(x3):
    _, device_params = _stats_params(x3, None, None, 1.0)
    return device_params[k.MEAN], device_params[k.VAR]


def normalize(x3, mean, var, weight, bias, eps, y3):
    nfeat = x3.shape[1]
    device_params = _new_params(nfeat, x3.dtype)
    device_weight, has_weight = _optional(weight, mean)
    device_bias, has_bias = _optional(bias, mean)
    _per_feature_launch(k.affine_params, nfeat)(
        mean, var, device_weight, device_bias, has_weight, has_bias, np.float64(eps),
        device_params)
    _affine(_Plan(x3.shape), x3, device_params, y3)


def batch_norm_train(x3, weight, bias, eps, y3):
    """Normalise with batch statistics; return ``(mean, invstd, var)`` in x's dtype."""
    plan, device_params = _stats_params(x3, weight, bias, eps)
    _affine(plan, x3, device_params, y3)
    return device_params[k.MEAN], device_params[k.INVSTD], device_params[k.VAR]


def batch_norm_backward(dy3, x3, mean, invstd, weight, dx3):
    """Write dx into ``dx3``; return ``(dweight, dbias)`` (None without weight).

    As on the CPU, ``sum(x - mean)`` corrects a saved mean rounded to float32 and
    the gradient is taken about the true batch mean.
    """
    plan = _Plan(x3.shape)
    device_partials = cuda.device_array((3, plan.nchunks, plan.nfeat), dtype=np.float64)
    plan.launch(k.backward_partials_nchw, k.backward_partials_nc)(
        dy3, x3, mean, plan.per_block, device_partials)
    device_params = _new_params(plan.nfeat, x3.dtype)
    device_weight, has_weight = _optional(weight, mean)
    _merge_launch(k.sum_partials, plan)(
        device_partials, plan.count, mean, invstd, device_weight, has_weight, device_params)
    plan.launch(k.affine2_nchw, k.affine2_nc)(dy3, x3, device_params, plan.per_block, dx3)
    if weight is None:
        return None, None
    return device_params[k.DWEIGHT], device_params[k.DBIAS]


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    _per_feature_launch(k.update_running_stats, running_mean.shape[0])(
        running_mean, running_var, mean, var,
        np.float64(count / (count - 1)), np.float64(momentum))
