"""``numbabn.torch.batch_norm``: ``torch.nn.functional.batch_norm`` on numbabn.

Three ways a call can go:

- **graph** (``torch.compile``, ``torch.export``, FX symbolic tracing, fake
  tensors): the custom ops ``torch.ops.numbabn.*`` are recorded, one node per
  call (:mod:`numbabn.torch._ops`);
- **eager**: on CPU tensors whose outputs share the input's strides (dense
  ones: contiguous, channels-last), the ops' implementations are called
  directly, through a small ``torch.autograd.Function`` when a gradient is
  needed, with what depends only on the input's shape, strides and dtype
  decided once per :class:`numbabn.torch._tensors.Case` (checks, 3-D view,
  route).  Same kernels, same results; it skips the dispatcher's round trip
  into Python (about 11 us per call) and ``custom_op``'s autograd wrapper
  (about 30 us for a forward and a backward), which would cost more than the
  whole layer on small tensors.  Other eager calls numbabn takes (CUDA
  tensors, sliced inputs) run the custom ops;
- **ATen**, by shape: where the shape census found ATen's kernel faster, the
  call (or only its backward) runs ATen's, by the table of
  :mod:`numbabn.torch._dispatch`, in eager mode and inside the ops alike;
- **stock** (``F.batch_norm``): whatever numbabn does not compute exactly as
  PyTorch (see :func:`numbabn.torch._tensors.numbabn_runs`: an
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


def _c_apply(fn_class):
    """``fn_class.apply`` without ``Function.apply``'s Python preamble (binding
    default arguments, unwrapping functorch's dead wrappers: about 3 us), which
    this package's Functions need not: they have no defaults and run only where
    no functorch transform is active (:func:`_mode`)."""
    return super(torch.autograd.function._SingleLevelFunction, fn_class).apply


class _TrainFn(torch.autograd.Function):
    """The eager CPU training forward (running statistics updated when ``stats``
    is given) and its backward: the bodies of ``numbabn::batch_norm_train``,
    ``update_running_stats`` and ``batch_norm_backward`` on a :class:`_t.Case`."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu, case, vectors, stats):
        y, mean, invstd = _train(case, x, vectors, eps, relu, stats)
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.state = (case, mean, invstd, vectors[0])
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: refuse a second derivative
            return _train_backward_once(ctx, dy)
        return _train_backward(ctx, dy)


def _train_backward(ctx, dy):
    x, weight, y = ctx.saved_tensors
    case, mean, invstd, wa = ctx.state
    dx, dweight, dbias = _t.backward_train_cpu(case, dy, x, mean, invstd, weight, wa, y,
                                               ctx.needs_input_grad[:3])
    return dx, dweight, dbias, None, None, None, None, None


_train_backward_once = once_differentiable(_train_backward)
_train_apply = _c_apply(_TrainFn)


def _train(case, x, vectors, eps, relu, stats):
    y, mean, invstd, var = _t.train_cpu(case, x, vectors[0], vectors[1], eps, relu)
    if stats is not None:
        running_mean, running_var, factor = stats
        _t.update_running_stats(running_mean, running_var, mean, var, case.count, factor)
    return y, mean, invstd


class _EvalFn(torch.autograd.Function):
    """The eager eval forward and backward: the bodies of
    ``numbabn::batch_norm_eval`` and ``batch_norm_eval_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, relu, case, vectors):
        y = _t.eval_cpu(case, x, *vectors, eps, relu)
        ctx.save_for_backward(x, weight, running_mean, running_var, y if relu else None)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, running_mean, running_var, y = ctx.saved_tensors
        dx, dweight, dbias = _t.backward_eval(dy, x, weight, running_mean, running_var, ctx.eps, y,
                                              ctx.needs_input_grad[:3])
        return dx, dweight, dbias, None, None, None, None, None, None


_eval_apply = _c_apply(_EvalFn)


def _needs_grad(x, weight, bias):
    return torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad))


def _eager_cpu(case, running_mean, running_var, weight, bias, training, momentum, eps):
    """The vectors' NumPy views when numbabn takes this eager CPU call (what
    :func:`_t.numbabn_runs` checks, with the input's part decided once per
    case), else None."""
    if not case.ok or (training and not case.trainable):
        return None
    if (running_mean is None) != (running_var is None) or \
            (running_mean is None and not training):
        return None
    if not isinstance(eps, (float, int)) or not (0.0 < eps < _INF):
        return None
    if training and running_mean is not None and momentum is not None and not (
            isinstance(momentum, (float, int)) and 0.0 <= momentum <= 1.0):
        return None
    return _t.cpu_vectors(case, weight, bias, running_mean, running_var)


_INF = float("inf")


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
    if mode == _EAGER:
        case = _t.cpu_case(input)
        if case is not None and case.plan is not None:
            vectors = _eager_cpu(case, running_mean, running_var, weight, bias, training,
                                 momentum, eps)
            if vectors is not None:
                return _eager(case, vectors, input, running_mean, running_var, weight, bias,
                              training, momentum, float(eps), relu, num_batches_tracked)
        elif _t.numbabn_runs(input, weight, bias, running_mean, running_var, training, momentum,
                             eps):
            return _eager_general(input, running_mean, running_var, weight, bias, training,
                                  momentum, float(eps), relu, num_batches_tracked)
    elif mode == _GRAPH:
        graph_ok = isinstance(input, torch.fx.Proxy) or _t.numbabn_runs(
            input, weight, bias, running_mean, running_var, training, momentum, eps,
            exact_types=False)
        if graph_ok:
            return _graph(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          relu, num_batches_tracked)
    return _stock(input, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                  num_batches_tracked)


def _stock(input, running_mean, running_var, weight, bias, training, momentum, eps, relu,
           num_batches_tracked):
    """PyTorch's batch norm, as ``_BatchNorm.forward`` calls it."""
    momentum = _count_batch(num_batches_tracked, momentum)
    y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
                                       momentum, eps)
    return torch.relu(y) if relu else y


def _eager(case, vectors, x, running_mean, running_var, weight, bias, training, momentum, eps,
           relu, num_batches_tracked):
    """An eager CPU call numbabn takes, by the case's route."""
    if training:
        if case.aten_train:
            return _stock(x, running_mean, running_var, weight, bias, True, momentum, eps, relu,
                          num_batches_tracked)
        momentum = _count_batch(num_batches_tracked, momentum)
        stats = None if running_mean is None or momentum <= 0 else (
            running_mean, running_var, momentum)
        if _needs_grad(x, weight, bias):
            return _train_apply(x, weight, bias, eps, relu, case, vectors, stats)
        return _train(case, x, vectors, eps, relu, stats)[0]
    if case.aten_eval:
        return _stock(x, running_mean, running_var, weight, bias, False, momentum, eps, relu,
                      num_batches_tracked)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if _needs_grad(x, weight, bias):
        return _eval_apply(x, weight, bias, running_mean, running_var, eps, relu, case, vectors)
    return _t.eval_cpu(case, x, *vectors, eps, relu)


def _eager_general(x, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                   num_batches_tracked):
    """Any other eager call numbabn takes (a CUDA tensor; a CPU one whose
    outputs do not share its strides): the custom ops, with their autograd
    formulas."""
    momentum = _count_batch(num_batches_tracked, momentum)
    if training:
        y, mean, _, var = torch.ops.numbabn.batch_norm_train(x, weight, bias, eps, relu)
        if running_mean is not None and momentum > 0:
            _t.update_running_stats(running_mean, running_var, mean, var,
                                    x.numel() // x.shape[1], momentum)
        return y
    return torch.ops.numbabn.batch_norm_eval(x, weight, bias, running_mean, running_var, eps, relu)


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
