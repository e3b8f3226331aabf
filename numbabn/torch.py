"""numbabn as a drop-in for PyTorch's BatchNorm layers.

``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d`` here are subclasses of
``torch.nn.BatchNorm1d/2d/3d`` (same constructor, parameters, buffers,
``state_dict`` keys, input checks and ``isinstance`` answers) whose ``forward``
runs numbabn's kernels through a ``torch.autograd.Function``:

- CPU float32/float64 tensors go to the CPU kernels without a copy
  (``tensor.detach().numpy()`` views, any strides, channels-last included);
- CUDA float32/float64 tensors on device 0 and PyTorch's default stream go to
  numbabn's GPU kernels through ``__cuda_array_interface__`` (numba must see a
  real GPU, not the simulator; not tested on a GPU yet);
- everything else (float16/bfloat16, an empty batch, one value per channel in
  training, eps <= 0, momentum outside [0, 1], mismatched dtypes or devices,
  tensor subclasses, TorchScript tracing, ``torch.compile``, functorch transforms,
  forward-mode AD) runs stock PyTorch (``super().forward``), so behaviour and
  error messages are PyTorch's.

Outputs and input gradients have the memory format PyTorch gives them
(channels-last in, channels-last out).  Running statistics follow PyTorch:
``num_batches_tracked`` counts training batches, ``momentum=None`` is the
cumulative average, the running variance is unbiased.  The backward is
first-order only (``once_differentiable``): double backward through these layers
raises; use the stock layers for it.

:func:`replace_batchnorm` turns the stock layers of an existing model into these,
in place, keeping the very same Parameter and buffer objects.

PyTorch is optional for numbabn: ``import numbabn`` never imports it; this
module does, and says how to install it when it is missing.
"""

from __future__ import annotations

import math

try:
    import torch
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "numbabn.torch needs PyTorch, which is not installed. "
        "Install it with: pip install torch==2.13.0"
    ) from _exc

import numpy as np
from torch.autograd.function import once_differentiable

import numbabn as _nb
from numbabn import functional as _F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "replace_batchnorm"]

_FLOAT_DTYPES = (torch.float32, torch.float64)
_GPU_OK = []  # cached answer of _gpu_available()


# --------------------------------------------------------------------------- helpers

def _gpu_available() -> bool:
    """numbabn can run on CUDA tensors: numba.cuda imports, sees a GPU, and is not
    the simulator (which cannot read PyTorch's device memory)."""
    if not _GPU_OK:
        try:
            import numba
            from numba import cuda

            ok = (not numba.config.ENABLE_CUDASIM) and cuda.is_available()
        except Exception:  # noqa: BLE001 - any failure means: use stock PyTorch
            ok = False
        _GPU_OK.append(ok)
    return _GPU_OK[0]


def _channels_last_like(sizes, strides, order) -> bool:
    """Port of c10's ``is_channels_last_strides_{2d,3d}_s{4,5}`` (what
    ``Tensor.suggest_memory_format()`` asks)."""
    if strides[1] == 0:
        return False
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d]
        if sizes[d] > 1:
            smallest *= sizes[d]
    return True


def _suggest_memory_format(t):
    """``Tensor.suggest_memory_format()``: channels-last for NHWC/NDHWC-like
    strides, contiguous otherwise."""
    if t.dim() == 4 and _channels_last_like(t.shape, t.stride(), (1, 3, 2, 0)):
        return torch.channels_last
    if t.dim() == 5 and _channels_last_like(t.shape, t.stride(), (1, 4, 3, 2, 0)):
        return torch.channels_last_3d
    return torch.contiguous_format


def _dense_format(t):
    """The format ``t`` is contiguous in (contiguous first, as ATen's
    ``suggest_memory_format_contig``), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _output_like(x):
    """An empty output with the strides ATen's CPU batch norm gives its output: the
    format x is contiguous in, else x's suggested format (a permuted or sliced
    input gives a contiguous or channels-last output, as in PyTorch)."""
    if x.dim() < 4:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    fmt = _dense_format(x)
    return torch.empty_like(x, memory_format=fmt if fmt is not None else _suggest_memory_format(x))


def _grad_input_like(x, dy):
    """An empty input gradient with ATen's strides (``batch_norm_backward_cpu``):
    x's dense format when x and dy are both dense with the same suggested
    format, else x's suggested format."""
    if x.dim() < 4:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    fmt = _dense_format(x)
    if fmt is None or _dense_format(dy) is None or \
            _suggest_memory_format(x) != _suggest_memory_format(dy):
        fmt = _suggest_memory_format(x)
    return torch.empty_like(x, memory_format=fmt)


def _arr(t):
    """What numbabn reads: a NumPy view of a CPU tensor, the CUDA tensor itself
    (``__cuda_array_interface__``) otherwise; None stays None."""
    if t is None:
        return None
    t = t.detach()
    return t.numpy() if t.device.type == "cpu" else t


def _tensor(a, like):
    """A numbabn result (NumPy array or numba device array) as a tensor, no copy."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)


# --------------------------------------------------------------------------- autograd

class _TrainFn(torch.autograd.Function):
    """Batch statistics: ``numbabn.batch_norm_train`` / ``batch_norm_backward``;
    updates the running statistics in place when ``stats`` is given."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, stats):
        y = _output_like(x)
        # the private variant also returns the biased batch variance (float64),
        # straight from the kernel, for the running statistics
        _, mean, invstd, var = _F._batch_norm_train(_arr(x), _arr(weight), _arr(bias), eps, 1,
                                                    _arr(y))
        if stats is not None:
            running_mean, running_var, factor = stats
            count = x.numel() // x.shape[1]
            _nb.update_running_stats(_arr(running_mean), _arr(running_var), mean, var, count,
                                     factor)
            # written through NumPy/CAI views: tell autograd, as add_/mul_ would
            torch.autograd.graph.increment_version(running_mean)
            torch.autograd.graph.increment_version(running_var)
        ctx.save_for_backward(x, weight)
        ctx.stats = (mean, invstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        mean, invstd = ctx.stats
        dx = _grad_input_like(x, dy)
        _, dweight, dbias = _nb.batch_norm_backward(_arr(dy), _arr(x), mean, invstd,
                                                    _arr(weight), out=_arr(dx))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None,
                _tensor(dweight, x) if need_w else None,
                _tensor(dbias, x) if need_b and ctx.has_bias else None,
                None, None)


class _EvalFn(torch.autograd.Function):
    """Running statistics (constants): ``numbabn.normalize``; the gradient is that
    of the affine map ``(x - running_mean) * invstd * weight + bias``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):
        y = _output_like(x)
        _nb.normalize(_arr(x), _arr(running_mean), _arr(running_var), _arr(weight),
                      _arr(bias), eps, out=_arr(y))
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, running_mean, running_var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dweight = dbias = None
        if need_w or need_b:
            # float64 sum(dy) and sum(dy * (x - running_mean)) in one read; not
            # batch_norm_backward's sums, which are about the *batch* mean (it
            # recovers it from x whatever mean it is given).
            invstd = torch.rsqrt(running_var.detach().double() + ctx.eps)
            sum_dy, sum_dy_xmu = _nb.batch_norm_backward_reduce(
                _arr(dy), _arr(x), _arr(running_mean), _arr(invstd))
            if need_w:
                dweight = (_tensor(sum_dy_xmu, x) * invstd).to(x.dtype)
            if need_b:
                dbias = _tensor(sum_dy, x).to(x.dtype)
        if need_x:
            dx = _grad_input_like(x, dy)
            zeros = torch.zeros_like(running_mean)
            _nb.normalize(_arr(dy), _arr(zeros), _arr(running_var), _arr(weight), None,
                          ctx.eps, out=_arr(dx))
        return dx, dweight, dbias if ctx.has_bias else None, None, None, None


# --------------------------------------------------------------------------- layers

def _unsupported_context(x) -> bool:
    """States where a custom autograd.Function of NumPy calls must not run."""
    return (type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter) or \
        torch.jit.is_scripting() or torch.jit.is_tracing() or \
        torch.compiler.is_compiling() or \
        torch._C._are_functorch_transforms_active() or \
        getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


class _NumbabnForward:
    """The forward shared by the three layers; put before the stock class in the
    bases so everything else (``__init__``, ``_check_input_dim``, ``state_dict``,
    ``extra_repr``) is PyTorch's."""

    def forward(self, input):
        self._check_input_dim(input)
        plan = self._numbabn_plan(input)
        if plan is None:
            return super().forward(input)
        bn_training, running_mean, running_var, momentum = plan

        # The same steps as torch.nn.modules.batchnorm._BatchNorm.forward.
        factor = 0.0 if momentum is None else momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
        eps = float(self.eps)
        if bn_training:
            stats = None
            if running_mean is not None:
                stats = (running_mean, running_var, factor)
            return _TrainFn.apply(input, self.weight, self.bias, eps, stats)
        return _EvalFn.apply(input, self.weight, self.bias, running_mean, running_var, eps)

    def _numbabn_plan(self, x):
        """``(bn_training, running_mean, running_var, momentum)`` when numbabn can
        run this call exactly as PyTorch would, else None (stock PyTorch runs)."""
        if x.dtype not in _FLOAT_DTYPES or x.layout != torch.strided or _unsupported_context(x):
            return None
        device = x.device.type
        if device == "cuda":
            # numba launches on its default stream in its current context
            # (device 0 unless changed): other devices or streams run stock.
            if not _gpu_available() or x.device.index not in (0, None) or \
                    torch.cuda.current_stream(x.device).cuda_stream != 0:
                return None
        elif device != "cpu":
            return None
        n = x.numel()
        if n == 0:
            return None
        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None
        pass_stats = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_stats else None
        running_var = self.running_var if pass_stats else None
        if (running_mean is None) != (running_var is None):
            return None
        nfeat = x.shape[1]
        for t in (self.weight, self.bias, running_mean, running_var):
            if t is not None and (t.dtype != x.dtype or t.device != x.device
                                  or t.shape != (nfeat,) or type(t) not in (
                                      torch.Tensor, torch.nn.Parameter)):
                return None
        eps = self.eps
        if not (isinstance(eps, (float, int)) and math.isfinite(eps) and eps > 0):
            return None
        momentum = self.momentum
        if bn_training:
            if n // nfeat < 2:  # PyTorch's "Expected more than 1 value per channel"
                return None
            if running_mean is not None and momentum is not None and not (
                    isinstance(momentum, (float, int)) and 0.0 <= momentum <= 1.0):
                return None
        return bn_training, running_mean, running_var, momentum


class BatchNorm1d(_NumbabnForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on numbabn's kernels; inputs ``(N, C)`` or ``(N, C, L)``.

    Same constructor (``num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, device=None, dtype=None, *, bias=True``),
    parameters, buffers and behaviour; see the module docstring for which calls
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


_SWAP = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


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

    >>> model = replace_batchnorm(torchvision.models.resnet18())
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"replace_batchnorm expects a torch.nn.Module; got {type(model).__name__}.")
    for module in model.modules():
        new_cls = _SWAP.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
    return model
