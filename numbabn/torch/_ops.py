"""numbabn's batch norm as PyTorch custom ops, ``torch.ops.numbabn.*``.

Registered with ``torch.library.custom_op``, each with a fake (meta)
implementation, so that ``torch.compile`` (no graph break), ``torch.export``
and FX record them as single nodes, and with an autograd formula:

- ``batch_norm_train(x, weight, bias, eps, relu) -> (y, mean, invstd, var)``:
  normalise with the batch statistics (then a ReLU with ``relu``); ``mean`` and
  ``invstd`` in x's dtype (float32 for float16/bfloat16 x), the biased ``var`` in float64 (for the running
  statistics).  Differentiable in ``x``, ``weight``, ``bias``.
- ``update_running_stats(running_mean!, running_var!, num_batches_tracked!, mean,
  var, count, momentum)``: PyTorch's update of the running statistics, in place:
  ``num_batches_tracked`` (when given) counts one more batch, and
  ``momentum=None`` is the cumulative average ``1 / num_batches_tracked``.
  Separate from the forward because an op that mutates its inputs cannot have
  an autograd formula.
- ``batch_norm_eval(x, weight, bias, running_mean, running_var, eps, relu) -> y``:
  normalise with the running statistics.  Differentiable in ``x``, ``weight``,
  ``bias``.
- ``batch_norm_backward`` and ``batch_norm_eval_backward``: their gradients.
  Once differentiable: differentiating them again raises.

Inputs numbabn does not take (see :func:`numbabn.torch._tensors.numbabn_runs`:
an empty batch, ...) run ATen's batch norm inside the ops, so a
graph recorded without knowing dtypes (FX's symbolic tracing) runs anything;
so do the shapes that :mod:`numbabn.torch._dispatch` routes to ATen (the same
table as eager calls).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _tensors as _t
from ._dispatch import NUMBABN as _NUMBABN

_NS = "numbabn"


def _strided_like(t, like):
    """``t`` with ``like``'s strides (what the fake implementation promised)."""
    return t if t.stride() == like.stride() else like.copy_(t)


# --------------------------------------------------------------------------- training


@torch.library.custom_op(f"{_NS}::batch_norm_train", mutates_args=())
def batch_norm_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    runs = _t.numbabn_runs(x, weight, bias, None, None, True, None, eps, exact_types=False)
    if runs and _t.route_of(x, "train") == _NUMBABN:
        y, mean, invstd, var = _t.forward_train(x, weight, bias, eps, relu)
        return y, _t.tensor(mean, x), _t.tensor(invstd, x), _t.tensor(var, x)
    # ATen's kernels (by the dispatch table; an empty batch, ...)
    nfeat = x.shape[1]
    if x.numel() == 0:
        y = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        sdt = _t.stat_dtype(x.dtype)
        mean, invstd = x.new_zeros(nfeat, dtype=sdt), x.new_zeros(nfeat, dtype=sdt)
        var = x.new_zeros(nfeat, dtype=torch.float64)
    else:
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        mean, invstd = mean.to(_t.stat_dtype(x.dtype)), invstd.to(_t.stat_dtype(x.dtype))
        dims = [d for d in range(x.dim()) if d != 1]
        # the biased variance for update_running_stats (ATen's variance of x;
        # of x in float64 for half precision)
        var = torch.var(x if runs else x.double(), dim=dims, correction=0).double()
    if relu:
        y = torch.relu(y)
    return _strided_like(y, _t.output_like(x)), mean, invstd, var


@batch_norm_train.register_fake
def _(x, weight, bias, eps, relu):
    nfeat = x.shape[1]
    sdt = _t.stat_dtype(x.dtype)
    return (_t.output_like(x), x.new_empty(nfeat, dtype=sdt), x.new_empty(nfeat, dtype=sdt),
            x.new_empty(nfeat, dtype=torch.float64))


@torch.library.custom_op(f"{_NS}::batch_norm_backward", mutates_args=())
def batch_norm_backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                        y: Optional[Tensor], output_mask: Sequence[bool]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    nfeat = x.shape[1]
    need_x = bool(output_mask[0])
    if _t.numbabn_runs(x, weight, None, None, None, True, None, 1.0, exact_types=False) \
            and dy.dtype == x.dtype and mean.dtype == invstd.dtype == _t.stat_dtype(x.dtype) \
            and _t.route_of(x, "backward") == _NUMBABN:
        dx, dweight, dbias = _t.backward_train(dy, x, _t.arr(mean), _t.arr(invstd), weight, y, need_x)
        dweight, dbias = _t.tensor(dweight, x), _t.tensor(dbias, x)
    elif x.numel() == 0:
        dx = torch.zeros_like(x) if need_x else None
        dweight = dbias = None
    else:
        if y is not None:
            dy = torch.ops.aten.threshold_backward(dy, y, 0)
        if weight is None or weight.dtype == x.dtype:  # ATen's saved statistics: x's dtype
            mean, invstd = mean.to(x.dtype), invstd.to(x.dtype)
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, 0.0, [need_x, True, True])
        if need_x:
            dx = _strided_like(dx, _t.grad_input_like(x, dy))
    pdt = x.dtype if weight is None else weight.dtype
    return (x.new_empty(0) if dx is None else dx,
            x.new_zeros(nfeat, dtype=pdt) if dweight is None else dweight,
            x.new_zeros(nfeat, dtype=pdt) if dbias is None else dbias)


@batch_norm_backward.register_fake
def _(dy, x, mean, invstd, weight, y, output_mask):
    nfeat = x.shape[1]
    dx = _t.grad_input_like(x, dy) if output_mask[0] else x.new_empty(0)
    pdt = x.dtype if weight is None else weight.dtype  # float32 weights of a half x
    return dx, x.new_empty(nfeat, dtype=pdt), x.new_empty(nfeat, dtype=pdt)


def _train_setup(ctx, inputs, output):
    x, weight, _, _, relu = inputs
    y, mean, invstd, var = output
    ctx.save_for_backward(x, weight, mean, invstd, y if relu else None)
    ctx.mark_non_differentiable(mean, invstd, var)


def _train_backward(ctx, dy, _dmean, _dinvstd, _dvar):
    x, weight, mean, invstd, y = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dweight, dbias = torch.ops.numbabn.batch_norm_backward(
        dy, x, mean, invstd, weight, y, [need_x, need_w, need_b])
    return dx if need_x else None, dweight if need_w else None, dbias if need_b else None, None, None


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup)


@torch.library.custom_op(f"{_NS}::update_running_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
                         count: int, momentum: Optional[float]) -> None:
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:  # the cumulative average
        momentum = 0.0 if num_batches_tracked is None else 1.0 / float(num_batches_tracked)
    if count == 0:  # an empty batch changes nothing (as PyTorch)
        return
    _t.update_running_stats(running_mean, running_var, mean, var, count, momentum)


@update_running_stats.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None


# --------------------------------------------------------------------------- eval


@torch.library.custom_op(f"{_NS}::batch_norm_eval", mutates_args=())
def batch_norm_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                    running_var: Tensor, eps: float, relu: bool) -> Tensor:
    if _t.numbabn_runs(x, weight, bias, running_mean, running_var, False, None, eps,
                       exact_types=False) and _t.route_of(x, "eval") == _NUMBABN:
        return _t.forward_eval(x, weight, bias, running_mean, running_var, eps, relu)
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if relu:
        y = torch.relu(y)
    return _strided_like(y, _t.output_like(x))


@batch_norm_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps, relu):
    return _t.output_like(x)


@torch.library.custom_op(f"{_NS}::batch_norm_eval_backward", mutates_args=())
def batch_norm_eval_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], running_mean: Tensor,
                             running_var: Tensor, eps: float, y: Optional[Tensor],
                             output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    nfeat = x.shape[1]
    need = tuple(bool(m) for m in output_mask)
    if _t.numbabn_runs(x, weight, None, running_mean, running_var, False, None, eps,
                       exact_types=False) and dy.dtype == x.dtype \
            and _t.route_of(x, "eval") == _NUMBABN:
        dx, dweight, dbias = _t.backward_eval(dy, x, weight, running_mean, running_var, eps, y, need)
    elif x.numel() == 0:
        dx, dweight, dbias = torch.zeros_like(x), None, None
    else:
        if y is not None:
            dy = torch.ops.aten.threshold_backward(dy, y, 0)
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, running_mean, running_var, None, None, False, eps, list(need))
        if need[0]:
            dx = _strided_like(dx, _t.grad_input_like(x, dy))
    pdt = x.dtype if weight is None else weight.dtype
    return (x.new_empty(0) if dx is None or not need[0] else dx,
            x.new_zeros(nfeat, dtype=pdt) if dweight is None else dweight,
            x.new_zeros(nfeat, dtype=pdt) if dbias is None else dbias)


@batch_norm_eval_backward.register_fake
def _(dy, x, weight, running_mean, running_var, eps, y, output_mask):
    nfeat = x.shape[1]
    dx = _t.grad_input_like(x, dy) if output_mask[0] else x.new_empty(0)
    pdt = x.dtype if weight is None else weight.dtype
    return dx, x.new_empty(nfeat, dtype=pdt), x.new_empty(nfeat, dtype=pdt)


def _eval_setup(ctx, inputs, output):
    x, weight, _, running_mean, running_var, eps, relu = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var, output if relu else None)
    ctx.eps = eps


def _eval_backward(ctx, dy):
    x, weight, running_mean, running_var, y = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dweight, dbias = torch.ops.numbabn.batch_norm_eval_backward(
        dy, x, weight, running_mean, running_var, ctx.eps, y, [need_x, need_w, need_b])
    return (dx if need_x else None, dweight if need_w else None, dbias if need_b else None,
            None, None, None, None)


batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


# --------------------------------------------------------------------------- once differentiable


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "numbabn's batch norm is differentiable once: its backward has no gradient. For double "
        "backward (gradient penalties, Hessian-vector products) use PyTorch's layers: "
        "numbabn.torch.restore_batchnorm(model).")


def _no_setup(ctx, inputs, output):
    pass


batch_norm_backward.register_autograd(_refuse_double_backward, setup_context=_no_setup)
batch_norm_eval_backward.register_autograd(_refuse_double_backward, setup_context=_no_setup)
