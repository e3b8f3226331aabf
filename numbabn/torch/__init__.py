"""numbabn as a drop-in for PyTorch's BatchNorm layers.

``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d`` here are subclasses of
``torch.nn.BatchNorm1d/2d/3d`` (same constructor, parameters, buffers,
``state_dict`` keys, input checks and ``isinstance`` answers) whose forward runs
numbabn's kernels, registered as PyTorch custom ops (``torch.ops.numbabn.*``,
see :mod:`numbabn.torch._ops`):

- eager mode calls the ops' implementations directly (same kernels, without the
  dispatcher's round trip into Python); ``torch.compile`` (no graph break),
  ``torch.export`` and ``torch.fx.symbolic_trace`` record the ops; a
  ``torch.jit.script``-ed model runs PyTorch's batch norm (and saves and loads
  without numbabn); ``torch.jit.trace``, functorch transforms (``vmap``,
  ``grad``), forward-mode AD and tensor subclasses run stock PyTorch;
- CPU float32/float64 tensors go to the CPU kernels without a copy (any
  strides, channels-last included), with Numba's thread count following
  ``torch.get_num_threads()``, except the shapes where the shape census found
  ATen's kernels faster: those run ATen's, by a fixed table of shape, layout
  and dtype (:mod:`numbabn.torch._dispatch`; the same route, and the same bits,
  on every call of a shape); CUDA tensors on device 0 and the default stream
  go to numbabn's GPU kernels through ``__cuda_array_interface__`` (not tested on
  a GPU yet);
- float16 and bfloat16 CPU tensors (and float16 CUDA ones) run numbabn's
  kernels too, with parameters of the input's dtype or float32 (mixed
  precision, as ``torch.autocast`` gives them); their saved statistics are
  float32, their parameter gradients in the parameters' dtype;
- everything else (an empty batch, one value per channel in
  training, eps <= 0, momentum outside [0, 1], mismatched dtypes or devices)
  runs stock PyTorch, so behaviour and error messages are PyTorch's.

Outputs and input gradients have the memory format PyTorch gives them
(channels-last in, channels-last out).  Running statistics follow PyTorch:
``num_batches_tracked`` counts training batches, ``momentum=None`` is the
cumulative average, the running variance is unbiased.  The backward is
first-order only: double backward through these layers raises; use the stock
layers for it.

:func:`replace_batchnorm` turns the stock layers of an existing model into these,
in place, keeping the very same Parameter and buffer objects;
:func:`restore_batchnorm` turns them back.  ``torch.ao.quantization.fuse_modules``
and ``torch.nn.utils.fuse_conv_bn_eval`` take them (see :mod:`numbabn.torch._fuse`).
:func:`batch_norm` is the functional form (with an optional fused ReLU).

:class:`SyncBatchNorm` and :func:`convert_sync_batchnorm` synchronise batch
statistics over ``torch.distributed`` on CPUs (gloo), bitwise the same on every
rank, where PyTorch's SyncBatchNorm takes GPU tensors only.

PyTorch is optional for numbabn: ``import numbabn`` never imports it; this
package does, and says how to install it when it is missing.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "numbabn.torch needs PyTorch, which is not installed. "
        "Install it with: pip install torch==2.13.0"
    ) from _exc

from ._functional import batch_norm
from ._modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, replace_batchnorm, restore_batchnorm
from ._sync import SyncBatchNorm, convert_sync_batchnorm
from ._fuse import register_fusers

register_fusers()

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm",
           "replace_batchnorm", "restore_batchnorm", "convert_sync_batchnorm"]
