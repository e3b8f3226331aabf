"""``numbabn.torch.batch_norm``: ``torch.nn.functional.batch_norm`` on numbabn.

Three ways a call can go:

- **graph** (``torch.compile``, ``torch.export``, FX symbolic tracing, fake
  tensors): the custom ops ``torch.ops.numbabn.*`` are recorded, one node per
  call (:mod:`numbabn.torch._ops`);
- **eager**: the ops' implementations are called directly, through a small
  ``torch.autograd.Function`` when a gradient is needed.  Same kernels, same
  results; it skips the dispatcher's round trip into Python (about 11 us per
  call) and ``custom_op``'s autograd wrapper (about 30 us for a forward and a
  backward), which would cost more than the whole layer on small tensors;
- **stock** (``F.batch_norm``): whatever numbabn does not compute exactly as
  PyTorch (see :func:`numbabn.torch._tensors.numbabn_runs`: half precision, an
  empty batch, ...), and TorchScript tracing, functorch transforms (``vmap``,
  ``grad``), forward-mode AD and tensor subclasses, where an opaque Python
  kernel cannot run.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _ops  # noqa: F401 - registers torch.ops.numbabn
from . import _tensors as _t

_STOCK, _EAGER, _GRAPH = 0, 1, 2
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _fake_tensor_types():
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (FakeTensor, FunctionalTensor)


_FAKE = []


def _mode(x):
    """How a call on ``x`` runs: _EAGER, _GRAPH or _STOCK."""
    if torch.compiler.is_compiling():  # first: dynamo must not see the checks below
        return _GRAPH
    if type(x) in _PLAIN:
        if torch.jit.is_tracing() or torch._C._are_functorch_transforms_active() or \
                torch.autograd.forward_ad._current_level >= 0:
            return _STOCK
        return _EAGER
    if isinstance(x, torch.fx.Proxy):
        return _GRAPH
    if not _FAKE:
        _FAKE.append(_fake_tensor_types())
    return _GRAPH if isinstance(x, _FAKE[0]) else _STOCK


class _TrainFn(torch.autograd.Function):
    """The eager training forward (running statistics updated when ``stats``
    is given) and its backward: the bodies of ``numbabn::batch_norm_train``,
    ``update_running_stats`` and ``batch_norm_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu, stats):
        y, mean, invstd = _train(x, weight, bias, eps, relu, stats)
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.stats = (mean, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        mean, invstd = ctx.stats
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dweight, dbias = _t.backward_train(dy, x, mean, invstd, weight, y, need_x)
        return (dx, _t.tensor(dweight, x) if need_w else None,
                _t.tensor(dbias, x) if need_b else None, None, None, None)


def _train(x, weight, bias, eps, relu, stats):
    y, mean, invstd, var = _t.forward_train(x, weight, bias, eps, relu)
    if stats is not None:
        running_mean, running_var, factor = stats
        _t.update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1],
                                factor)
    return y, mean, invstd


class _EvalFn(torch.autograd.Function):
    """The eager eval forward and backward: the bodies of
    ``numbabn::batch_norm_eval`` and ``batch_norm_eval_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, relu):
        y = _t.forward_eval(x, weight, bias, running_mean, running_var, eps, relu)
        ctx.save_for_backward(x, weight, running_mean, running_var, y if relu else None)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, running_mean, running_var, y = ctx.saved_tensors
        dx, dweight, dbias = _t.backward_eval(dy, x, weight, running_mean, running_var, ctx.eps, y,
                                              ctx.needs_input_grad[:3])
        return dx, dweight, dbias, None, None, None, None


def _needs_grad(x, weight, bias):
    return torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, relu=False, num_batches_tracked=None):
    """``torch.nn.functional.batch_norm`` on numbabn's kernels, optionally fused
    with a ReLU.

    Parameters
    ----------
    input : Tensor ``(N, C, ...)``, float32 or float64 (others run stock PyTorch)
    running_mean, running_var : Tensor ``(C,)`` or None
        Updated in place in training mode (the variance unbiased).
    weight, bias : Tensor ``(C,)``, optional
    training : bool
        Normalise with the batch statistics (and update the running ones), or
        with the running statistics.
    momentum : float in [0, 1] or None, default 0.1
        The weight of the new batch; None: the cumulative average
        ``1 / num_batches_tracked`` (as ``BatchNorm2d(momentum=None)``).
    eps : float, default 1e-5
    relu : bool, default False
        ``torch.relu`` of the result in the same pass (its backward masks the
        gradient where the output is not positive).
    num_batches_tracked : Tensor, optional
        The layer's count of training batches: the call adds 1 to it (as
        ``_BatchNorm.forward`` does before ``F.batch_norm``), and reads it when
        ``momentum`` is None.

    Returns
    -------
    Tensor like ``input`` (contiguous or channels-last as PyTorch's output).

    See the README's "Conventions" section for momentum and variance.

    Examples
    --------
    >>> y = numbabn.torch.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
    ...                              training=True, relu=True)
    """
    mode = _mode(input)
    if mode == _GRAPH:
        graph_ok = isinstance(input, torch.fx.Proxy) or _t.numbabn_runs(
            input, weight, bias, running_mean, running_var, training, momentum, eps,
            exact_types=False)
        if graph_ok:
            return _graph(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          relu, num_batches_tracked)
    elif mode == _EAGER and _t.numbabn_runs(input, weight, bias, running_mean, running_var,
                                            training, momentum, eps):
        momentum = _count_batch(num_batches_tracked, momentum)
        if training:
            stats = None if running_mean is None else (running_mean, running_var, momentum)
            if _needs_grad(input, weight, bias):
                return _TrainFn.apply(input, weight, bias, float(eps), relu, stats)
            return _train(input, weight, bias, float(eps), relu, stats)[0]
        if _needs_grad(input, weight, bias):
            return _EvalFn.apply(input, weight, bias, running_mean, running_var, float(eps), relu)
        return _t.forward_eval(input, weight, bias, running_mean, running_var, float(eps), relu)
    momentum = _count_batch(num_batches_tracked, momentum)
    y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
                                       momentum, eps)
    return torch.relu(y) if relu else y


def _count_batch(num_batches_tracked, momentum):
    """Count the batch; return the factor of the running-statistics update
    (``_BatchNorm.forward``'s ``exponential_average_factor``)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    return 0.0 if num_batches_tracked is None else 1.0 / float(num_batches_tracked)


def _graph(x, running_mean, running_var, weight, bias, training, momentum, eps, relu,
           num_batches_tracked):
    """The call as custom ops, for a graph being recorded."""
    eps = float(eps)
    if not training:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return torch.ops.numbabn.batch_norm_eval(x, weight, bias, running_mean, running_var, eps,
                                                 relu)
    y, mean, _, var = torch.ops.numbabn.batch_norm_train(x, weight, bias, eps, relu)
    if running_mean is not None:  # the op counts the batch: FX records it there
        torch.ops.numbabn.update_running_stats(
            running_mean, running_var, num_batches_tracked, mean, var, x.numel() // x.shape[1],
            None if momentum is None else float(momentum))
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y
