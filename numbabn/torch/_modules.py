"""The drop-in layers, and the swaps between them and PyTorch's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._functional import batch_norm


class _NumbabnForward:
    """The forward shared by the layers; put before the stock class in the
    bases so everything else (``__init__``, ``_check_input_dim``, ``state_dict``,
    ``extra_repr``) is PyTorch's."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._stock_forward(input)
        return self._numbabn_forward(input)

    @torch.jit.unused
    def _numbabn_forward(self, input: Tensor) -> Tensor:
        """``_BatchNorm.forward``'s choices, then :func:`batch_norm` (which
        counts the batch).  Under FX symbolic tracing the input is a Proxy:
        the input check is left out, as for a stock (leaf) module."""
        if isinstance(input, torch.fx.Proxy):
            weight, bias, running_mean, running_var, tracked = (
                self.weight, self.bias, self.running_mean, self.running_var,
                self.num_batches_tracked)
        else:
            self._check_input_dim(input)
            if type(self) in _OURS:  # not parametrized: read the dicts, not __getattr__
                params, buffers = self._parameters, self._buffers
                weight, bias = params.get("weight"), params.get("bias")
                running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
                tracked = buffers.get("num_batches_tracked")
            else:
                weight, bias, running_mean, running_var, tracked = (
                    self.weight, self.bias, self.running_mean, self.running_var,
                    self.num_batches_tracked)
        training = self.training
        if not (training and self.track_running_stats):
            tracked = None
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        return batch_norm(input, running_mean, running_var, weight, bias, bn_training,
                          self.momentum, self.eps, num_batches_tracked=tracked)

    def _stock_forward(self, input: Tensor) -> Tensor:
        """``torch.nn.modules.batchnorm._BatchNorm.forward`` as TorchScript
        compiles it (``super()`` is not scriptable): a scripted model runs
        PyTorch's batch norm, and saves and loads without numbabn."""
        self._check_input_dim(input)
        exponential_average_factor = 0.0
        if self.momentum is not None:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        return F.batch_norm(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)


class BatchNorm1d(_NumbabnForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on numbabn's kernels; inputs ``(N, C)`` or ``(N, C, L)``.

    Same constructor (``num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, device=None, dtype=None, *, bias=True``),
    parameters, buffers and behaviour; see the package docstring for which calls
    run numbabn and which run stock PyTorch.
    """


class BatchNorm2d(_NumbabnForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on numbabn's kernels; inputs ``(N, C, H, W)``, NCHW
    or channels-last (the output keeps the input's memory format).

    >>> import torch, numbabn.torch as nbt
    >>> bn = nbt.BatchNorm2d(64)
    >>> y = bn(torch.randn(32, 64, 56, 56))
    """


class BatchNorm3d(_NumbabnForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on numbabn's kernels; inputs ``(N, C, D, H, W)``."""


SWAP = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _swap_classes(model, mapping, name):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} expects a torch.nn.Module; got {type(model).__name__}.")
    for module in model.modules():
        new_cls = mapping.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
    return model


def replace_batchnorm(model):
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` (``model`` itself
    included) the numbabn layer of the same dimensionality, in place; return ``model``.

    Each layer keeps its identity: its class changes, nothing else, so it keeps
    the same Parameter and buffer objects (an optimizer created before the swap
    keeps working), its training/eval mode, hooks and ``state_dict`` keys, and
    every reference to it (shared submodules included) sees the new forward.
    Only these exact classes are swapped: ``SyncBatchNorm``, ``LazyBatchNorm*``
    before their first call, user subclasses (which may override ``forward``)
    and the numbabn layers themselves are left as they are.
    :func:`restore_batchnorm` undoes it.

    >>> model = replace_batchnorm(torchvision.models.resnet18())
    """
    return _swap_classes(model, SWAP, "replace_batchnorm")


def restore_batchnorm(model):
    """The inverse of :func:`replace_batchnorm` (and of
    :func:`convert_sync_batchnorm`'s class): make every numbabn layer in
    ``model`` (``model`` itself included) PyTorch's class again, in place, keeping
    its Parameter and buffer objects; return ``model``.

    ``numbabn.torch.BatchNorm1d/2d/3d`` become ``torch.nn.BatchNorm1d/2d/3d`` and
    ``numbabn.torch.SyncBatchNorm`` becomes ``torch.nn.SyncBatchNorm`` (which
    PyTorch runs on GPUs only).

    >>> model = restore_batchnorm(replace_batchnorm(model))   # stock again
    """
    return _swap_classes(model, RESTORE, "restore_batchnorm")


RESTORE = {new: old for old, new in SWAP.items()}
_OURS = frozenset(SWAP.values())
