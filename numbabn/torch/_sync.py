"""``SyncBatchNorm`` for CPU tensors under ``torch.distributed`` (gloo, or any
backend with ``all_gather``), on numbabn's split primitives.

A training forward makes one collective, an ``all_gather`` of one float64 row
per rank: a header (this rank's verdict on its own input, with the error
message when it is bad) and its moments ``(count, mean, M2)`` from
:func:`numbabn.batch_moments`.  Every rank then merges the rows in rank order
(:func:`numbabn.merge_moments`), so every rank gets bitwise the same
statistics and running statistics, whatever the backend's reduction order; and
a bad input on one rank raises the same error on every rank instead of leaving
the others waiting.  The backward gathers the per-rank sums of
:func:`numbabn.batch_norm_backward_reduce` the same way and adds them in rank
order.  ``dweight``/``dbias`` are this rank's share, as in PyTorch's
SyncBatchNorm (DistributedDataParallel averages them over the ranks).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

import numbabn as _nb
from . import _tensors as _t
from ._modules import RESTORE, _NumbabnForward

_MSG_BYTES = 240  # an error message, truncated, travels in the row
_HEAD = 2 + _MSG_BYTES // 8  # status, count, message
_OK, _VALUE, _TYPE, _RUNTIME = 0, 1, 2, 3
_ERRORS = {_VALUE: ValueError, _TYPE: TypeError, _RUNTIME: RuntimeError}


def _header(status, count, message):
    head = np.zeros(_HEAD)
    head[0], head[1] = status, count
    raw = message.encode("utf-8", "replace")[:_MSG_BYTES].ljust(_MSG_BYTES, b"\0")
    head[2:] = np.frombuffer(raw, dtype=np.float64)
    return head


def _message(row):
    return row[2:_HEAD].tobytes().rstrip(b"\0").decode("utf-8", "replace")


def _gather_rows(row, group):
    """Every rank's float64 row, in rank order (one ``all_gather``)."""
    mine = torch.from_numpy(row)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return torch.stack(rows).numpy()


def _raise_if_any_failed(rows, what):
    """The same error on every rank when some rank's status is not OK."""
    bad = [r for r in range(len(rows)) if rows[r, 0] != _OK]
    if bad:
        r = bad[0]
        others = f" (also ranks {bad[1:]})" if len(bad) > 1 else ""
        raise _ERRORS.get(int(rows[r, 0]), RuntimeError)(
            f"numbabn.torch.SyncBatchNorm {what}: rank {r}{others}: {_message(rows[r])}")


def _local_error(module, x):
    """``(status, message)`` of this rank's own checks of its input."""
    if not isinstance(x, torch.Tensor):
        return _TYPE, f"expected a Tensor; got {type(x).__name__}"
    if x.dim() < 2:
        return _VALUE, f"expected at least 2D input (got {x.dim()}D input)"
    if x.shape[1] != module.num_features:
        return _VALUE, (f"expected {module.num_features} channels (dimension 1); got input of "
                        f"shape {tuple(x.shape)}")
    if x.device.type != "cpu" or x.dtype not in _t.FLOAT_DTYPES or x.layout != torch.strided:
        return _TYPE, (f"takes float32 or float64 CPU tensors; got {x.dtype} on {x.device} "
                       f"(use torch.nn.SyncBatchNorm on GPUs)")
    if not module.eps > 0:
        return _VALUE, f"eps must be positive; got {module.eps}"
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(module, name)
        if t is not None and t.dtype != x.dtype:
            return _TYPE, f"input dtype {x.dtype} differs from the layer's {name} ({t.dtype})"
    return _OK, ""


def _gather_moments(x, head, nfeat, group):
    """The moments of every rank's rows together, merged in rank order:
    ``(count, mean, M2)``, float64 and bitwise the same on every rank.  Raises
    the same error on every rank when any rank's ``head`` says its input is bad
    or all ranks together have fewer than 2 values per channel."""
    count, mean, m2 = 0, np.zeros(nfeat), np.zeros(nfeat)  # what a bad rank sends
    if head[0] == _OK:
        try:
            count, mean, m2 = _nb.batch_moments(_t.arr(x))
        except Exception as e:  # noqa: BLE001 - every rank must reach the gather
            head[:] = _header(_RUNTIME, 0, f"{type(e).__name__}: {e}")
    head[1] = count
    rows = _gather_rows(np.concatenate([head, mean, m2]), group)
    _raise_if_any_failed(rows, "forward")
    counts = [int(c) for c in rows[:, 1]]
    if sum(counts) < 2:
        raise ValueError(
            f"numbabn.torch.SyncBatchNorm forward: expected more than 1 value per channel over "
            f"all ranks when training; got {sum(counts)} (per rank: {counts}).")
    return _nb.merge_moments(counts, rows[:, _HEAD:_HEAD + nfeat], rows[:, _HEAD + nfeat:])


class _SyncFn(torch.autograd.Function):
    """Normalise with the merged statistics; the backward is collective too."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, moments):
        total, mean, m2 = moments
        var = m2 / total
        invstd = 1.0 / np.sqrt(var + eps)  # float64, as the kernels' invstd_of
        y = _t.output_like(x)
        _nb.batch_norm_elemt(_t.arr(x), mean, invstd, _t.arr(weight), _t.arr(bias), out=_t.arr(y))
        if running_mean is not None:
            _t.update_running_stats(running_mean, running_var, mean, var, total, momentum)
        ctx.save_for_backward(x, weight)
        ctx.stats = (mean, invstd, total, group)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        mean, invstd, total, group = ctx.stats
        nfeat = x.shape[1]
        xa = _t.arr(x)
        try:
            dya = _t.arr(dy)
            sum_dy, sum_dy_xmu = _nb.batch_norm_backward_reduce(dya, xa, mean, invstd)
            head = _header(_OK, 0, "")
        except Exception as e:  # noqa: BLE001 - every rank must reach the gather
            sum_dy = sum_dy_xmu = np.zeros(nfeat)
            head = _header(_RUNTIME, 0, f"{type(e).__name__}: {e}")
        rows = _gather_rows(np.concatenate([head, sum_dy, sum_dy_xmu]), group)
        _raise_if_any_failed(rows, "backward")
        sums = rows[0, _HEAD:].copy()
        for r in range(1, len(rows)):  # rank order: the same bits on every rank
            sums += rows[r, _HEAD:]
        dx = _t.grad_input_like(x, dy)
        _nb.batch_norm_backward_elemt(dya, xa, mean, invstd, _t.arr(weight), sums[:nfeat],
                                      sums[nfeat:], total, out=_t.arr(dx))
        dweight = dbias = None
        if weight is not None:
            dweight = torch.from_numpy((invstd * sum_dy_xmu).astype(xa.dtype))
            dbias = torch.from_numpy(sum_dy.astype(xa.dtype))
        return dx, dweight, dbias if ctx.needs_input_grad[2] else None, None, None, None, None, \
            None, None


class SyncBatchNorm(_NumbabnForward, torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU tensors: batch norm over the rows of
    every rank of ``process_group`` together, on numbabn's kernels.

    Same constructor (``num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None, *,
    bias=True``), parameters, buffers and ``state_dict`` as PyTorch's; inputs
    ``(N, C, ...)`` with any ``N`` per rank (0 included), float32 or float64.
    In training mode with ``torch.distributed`` initialised and more than one
    rank, the forward and backward are collective (every rank calls them):
    every rank gets bitwise the same statistics and running statistics (the
    unbiased variance of the whole batch); a bad input on any rank raises the
    same ValueError/TypeError on every rank.  Otherwise it is
    :class:`BatchNorm2d` (of any dimensionality), with no communication.

    Not a subclass of ``torch.nn.SyncBatchNorm`` (DistributedDataParallel
    refuses those on CPU modules); :func:`restore_batchnorm` makes it one.

    >>> model = DistributedDataParallel(convert_sync_batchnorm(model))   # gloo, CPU
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @torch.jit.unused
    def forward(self, input: Tensor) -> Tensor:
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        group = None
        if bn_training and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) < 2:
                group = None
        if group is None:
            return self._numbabn_forward(input)
        status, message = _local_error(self, input)
        moments = _gather_moments(input, _header(status, 0, message), self.num_features, group)
        momentum = 0.0 if self.momentum is None else self.momentum
        stats = self.track_running_stats
        if stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return _SyncFn.apply(input, self.weight, self.bias,
                             self.running_mean if stats else None,
                             self.running_var if stats else None, float(self.eps), momentum,
                             group, moments)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """:func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module, process_group=None):
    """Replace every BatchNorm layer of ``module`` (PyTorch's ``BatchNorm1d/2d/3d``
    and ``SyncBatchNorm``, numbabn's layers) by a :class:`SyncBatchNorm`, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: each new layer holds
    the old one's Parameter and buffer objects (an optimizer built before keeps
    working) and its training mode.  Returns ``module`` (a new layer when
    ``module`` is itself a BatchNorm layer).

    >>> model = convert_sync_batchnorm(torchvision.models.resnet18())
    """
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and \
            not isinstance(module, torch.nn.modules.batchnorm._LazyNormBase):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            bias=module.bias is not None)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


RESTORE[SyncBatchNorm] = torch.nn.SyncBatchNorm
