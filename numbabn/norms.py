"""Layer, group, instance and RMS normalization, with PyTorch 2.13's semantics.

Each of these normalises *rows*: the values that share the index of the kept
(leading) axes.  Layer and RMS norm keep every axis before ``normalized_shape``;
group norm keeps the batch axis and the group (``C`` split into
``(num_groups, C // num_groups)``); instance norm keeps batch and channel.  The
statistics of a row are its mean and *biased* variance (as PyTorch),
accumulated in float64 (see :mod:`numbabn._core`); ``rstd = 1 / sqrt(var + eps)``
(RMS norm: ``1 / sqrt(mean(x**2) + eps)``).

Each public function validates all of its arguments before touching anything,
views the input as ``(N, M, G, K)`` (:func:`numbabn._layout.plan_rows`: a view
for C-contiguous and channels-last data, a copy only when the strides allow
none), and calls the backend's per-row kernels (:mod:`numbabn._cpu.row_ops`, or
:mod:`numbabn._gpu.row_ops` for device arrays).  Outputs follow the input's memory
order.  Results are bitwise identical for any number of threads.

The split between forward and backward (as ``torch.native_layer_norm`` and
its backward):

* ``layer_norm(x, ...) -> y``, ``layer_norm_train(x, ...) -> (y, mean, rstd)``,
  ``layer_norm_backward(dy, x, mean, rstd, ...) -> (dx, dweight, dbias)``;
* the same for ``group_norm`` (statistics ``(N, num_groups)``) and
  ``instance_norm`` (statistics ``(N, C)``);
* ``rms_norm(x, ...) -> y``, ``rms_norm_train(x, ...) -> (y, rstd)``,
  ``rms_norm_backward(dy, x, rstd, ...) -> (dx, dweight)``.

The saved statistics may be in x's dtype (as returned) or float64; the
backward recovers the exact row mean from the data.

Empty inputs are PyTorch's: any axis may be empty; the output is empty, the
saved statistics are a mean of 0 and an ``rstd`` of NaN per row (rows exist
when only the reduced axes are empty), parameter gradients are zeros (sums
over no values; PyTorch's group norm gives a NaN ``dweight`` when only the
reduced axes are empty), and running statistics are untouched (PyTorch's
instance norm writes NaN into them for an empty batch).  No kernel runs.
"""

from __future__ import annotations

import numbers
from collections import namedtuple
from functools import lru_cache
from math import prod

import numpy as np

from . import _backend, _layout
from . import _validate as v
from ._core import Affine
from ._half import half_aware

__all__ = [
    "layer_norm",
    "layer_norm_train",
    "layer_norm_backward",
    "group_norm",
    "group_norm_train",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_train",
    "instance_norm_backward",
    "rms_norm",
    "rms_norm_train",
    "rms_norm_backward",
]

_RowPlan = namedtuple("_RowPlan", "layout affine wperm")
"""A per-row view and how it indexes the affine parameters; ``wperm`` orders
a layer-norm weight's axes like the row's values (None: per-channel weights)."""


# --------------------------------------------------------------------------- #
# Remembered calls (as numbabn.functional's for batch norm).  After a first
# valid call on a plain NumPy array, what depends only on the function, x's
# shape, strides and dtype and the size argument (normalized_shape, num_groups)
# is kept as a _Host.  A later call with that key, plain arrays of the right
# dtype and shape and a Python float eps goes straight to the views and the
# driver; anything else, including every invalid argument, takes the general
# path, which validates everything and raises as it always did.
# --------------------------------------------------------------------------- #
_Host = namedtuple("_Host", "split plan trailing pshape cdt saved kept")
"""``split``: the shape x is viewed as before planning (group and instance
norm: C split into (G, C/G)) or None; ``plan``: its _RowPlan; ``trailing``:
size-1 axes appended to the returned statistics; ``pshape``: the parameters'
shape; ``cdt``: their dtype; ``saved``: the accepted shapes of saved
statistics; ``kept``: the returned statistics' shape when rows are numbered in
axis order (a reshape makes them), else None."""
_ndarray = np.ndarray
_F64 = np.dtype(np.float64)
_hosts = {}
_MAX_HOSTS = 1024


def _host_key(op, x, arg):
    """The key of a call on ``x`` with size argument ``arg`` (an int or a tuple
    of ints, never a bool), or None when it is not remembered."""
    if type(x) is not _ndarray:
        return None
    if type(arg) is tuple:
        if any(type(n) is not int for n in arg):
            return None
    elif type(arg) is not int:
        return None
    return (op, x.shape, x.strides, x.dtype, arg)


def _remember(key, x, split, plan, trailing, pshape, saved):
    """Keep a validated, non-empty call's host plan under ``key`` (a
    :func:`_host_key`, or None: nothing to keep)."""
    if key is None or key in _hosts:
        return
    if len(_hosts) >= _MAX_HOSTS:
        _hosts.clear()
    layout = plan.layout
    kept = layout.kept_view[0] + (1,) * trailing if layout.kept_in_order else None
    _hosts[key] = _Host(split, plan, trailing, pshape, v.compute_dtype(x.dtype), saved, kept)


def _is_param(p, h):
    """``p`` is None or a plain array ``_check_param`` passes."""
    return p is None or v.is_plain(p, h.cdt, h.pshape)


_is_eps = v.is_plain_eps


def _is_saved(s, h):
    """A plain array ``_check_saved`` passes."""
    return type(s) is _ndarray and (s.dtype is h.cdt or s.dtype is _F64) and s.shape in h.saved


def _is_dy(dy, x):
    """A plain array ``check_same_as(dy, "dy", x)`` passes."""
    return v.is_plain(dy, x.dtype, x.shape)


def _host_train(h, x, weight, bias, eps, rms):
    """:func:`_forward` of a remembered call, statistics in their returned shape."""
    xs = x if h.split is None else x.reshape(h.split)
    y, mean, rstd, var = _forward(_backend.CPU, xs, h.plan, weight, bias, eps, rms)
    if h.split is not None:
        y = y.reshape(x.shape)
    if h.kept is not None:
        return y, mean.reshape(h.kept), rstd.reshape(h.kept), var
    return y, _kept(_backend.CPU, mean, h.plan, h.trailing), \
        _kept(_backend.CPU, rstd, h.plan, h.trailing), var


def _host_backward(h, dy, x, mean, rstd, weight, rms, param_grads):
    """:func:`_backward` of a remembered call: ``(dx, dweight, dbias)``."""
    lead = h.saved[-1]
    shape = x.shape
    if h.split is not None:
        x, dy = x.reshape(h.split), dy.reshape(h.split)
    dx, dweight, dbias = _backward(_backend.CPU, dy, x, h.plan,
                                   None if mean is None else mean.reshape(lead),
                                   rstd.reshape(lead), weight, rms, param_grads,
                                   h.pshape if h.split is None else None)
    return (dx if h.split is None else dx.reshape(shape)), dweight, dbias


# --------------------------------------------------------------------------- #
# Checks (all before any work)
# --------------------------------------------------------------------------- #
def _check_x(x, name, min_ndim, expected, half=False):
    """A float32/float64 array of at least ``min_ndim`` dimensions; any axis may
    be empty (as PyTorch: see :func:`_empty_train`)."""
    if not v.is_array(x):
        raise TypeError(
            f"{name} must be a numpy.ndarray of float32 or float64; got {v.describe(x)}. "
            f"Wrap it with np.asarray({name}, dtype=np.float32).")
    if not (half and v.half_kind(x.dtype) is not None):  # half: the forwards' own kernels
        v.check_float_dtype(x, name)
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have shape {expected}; got shape {tuple(x.shape)}.")


def _check_normalized_shape(normalized_shape, x):
    """``normalized_shape`` as a tuple that matches the trailing axes of ``x``."""
    shape = normalized_shape
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not shape or any(
            isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in shape):
        raise TypeError(
            f"normalized_shape must be an int or a non-empty tuple of ints (the trailing "
            f"axes to normalise over); got {v.describe(normalized_shape)}.")
    shape = tuple(int(n) for n in shape)  # sizes may be 0 (an empty input), as PyTorch
    k = len(shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(
            f"normalized_shape {shape} must equal the trailing axes of x; got x of shape "
            f"{tuple(x.shape)}, expected (*, {', '.join(map(str, shape))}).")
    return shape


def _check_param(p, name, shape, dtype):
    if p is None:
        return
    if not v.is_array(p):
        raise TypeError(f"{name} must be a numpy.ndarray of shape {shape} and dtype {dtype}; "
                        f"got {v.describe(p)}.")
    if p.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} to match x; got {p.dtype}. "
                        f"Convert it with {name}.astype(np.{dtype}).")
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got shape {tuple(p.shape)}.")


def _check_saved(s, name, shapes, dtype):
    """A saved per-row statistic: one of ``shapes``, x's dtype or float64."""
    if not v.is_array(s):
        raise TypeError(f"{name} must be a numpy.ndarray of shape {shapes[0]} (as the forward "
                        f"returned it); got {v.describe(s)}.")
    if s.dtype not in (np.dtype(dtype), np.dtype(np.float64)):
        raise TypeError(f"{name} must have dtype {dtype} (x's) or float64; got {s.dtype}.")
    if tuple(s.shape) not in shapes:
        raise ValueError(f"{name} must have shape {shapes[0]}, one value per row (as the "
                         f"forward returned it); got shape {tuple(s.shape)}.")


def _check_num_groups(num_groups, nchannels):
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups must be a positive int; got {v.describe(num_groups)}.")
    if num_groups < 1:
        raise ValueError(f"num_groups must be a positive int; got {num_groups}.")
    if nchannels % num_groups:
        raise ValueError(
            f"num_groups must divide the number of channels: x has {nchannels} channels "
            f"(axis 1), which {num_groups} groups do not divide; pick a divisor of "
            f"{nchannels}.")
    return int(num_groups)


def _rms_eps(eps, dtype):
    """PyTorch's default: the dtype's machine epsilon."""
    return float(np.finfo(dtype).eps) if eps is None else v.check_eps(eps)


def _check_spatial(x):
    """As PyTorch: one spatial element is refused, none (an empty input) is not."""
    if prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when using input statistics, got input of "
            f"shape {tuple(x.shape)}; instance norm normalises each (sample, channel) over the "
            f"axes after the channel axis.")


# --------------------------------------------------------------------------- #
# Plans
# --------------------------------------------------------------------------- #
def _layer_plan(x, k):
    """Layer and RMS norm: rows are the leading axes, one weight per value."""
    return _layer_plan_of(x.shape, x.strides, k)


@lru_cache(maxsize=1024)
def _layer_plan_of(shape, strides, k):
    layout = _layout.plan_rows(shape, strides, len(shape) - k)
    wperm = tuple(a - layout.nkept for a in layout.reduced_perm)
    return _RowPlan(layout, Affine(1, layout.reduced, 1), wperm)


def _group_plan(xs):
    """Group and instance norm on ``xs`` of shape ``(N, G, C/G, *spatial)``: one
    weight per channel; copy into logical order when the view cannot index them."""
    return _group_plan_of(xs.shape, xs.strides)


@lru_cache(maxsize=1024)
def _group_plan_of(shape, strides):
    layout = _layout.plan_rows(shape, strides, 2)
    aff = _group_affine(layout)
    if aff is None:
        layout = _layout.plan_rows_logical(shape, 2)
        aff = _group_affine(layout)
    return _RowPlan(layout, aff, None)


def _group_affine(layout):
    """The :data:`Affine` of a group norm layout (axes 1 and 2 are the group and
    the channel within it), or None when rows do not end in the group axis or
    the output cannot merge group and channel back into one axis."""
    groups, per_group = layout.shape[1], layout.shape[2]
    if groups > 1 and layout.kept_perm[-1] != 1:
        return None
    if per_group == 1:
        return Affine(groups, 1, layout.reduced)
    if groups > 1 and layout.perm.index(2) != layout.perm.index(1) + 1:
        return None
    # A row's flat index counts its values in reduced_perm order: the channel
    # is its digit of radix per_group, below the axes after it.
    red = layout.reduced_perm
    after = red[red.index(2) + 1:]
    return Affine(groups, per_group, prod(layout.shape[a] for a in after))


def _kept_shapes(shape, k):
    """Accepted shapes of a saved layer-norm statistic: PyTorch's, and squeezed."""
    lead = tuple(shape[:len(shape) - k])
    return (lead + (1,) * k, lead)


# --------------------------------------------------------------------------- #
# Empty inputs (no kernel runs): PyTorch's results
# --------------------------------------------------------------------------- #
def _full(be, shape, dtype, value):
    """An array of ``shape`` filled with ``value`` on ``be``'s device."""
    host = np.full(shape, value, dtype)
    if be is _backend.CPU:
        return host
    from numba import cuda  # already imported: a device array chose this backend

    return cuda.to_device(host)


def _empty_like(be, x):
    """An uninitialised array like an empty ``x`` (same memory order on the CPU)."""
    return np.empty_like(x) if be is _backend.CPU else _full(be, x.shape, x.dtype, 0)


def _empty_train(be, x, stat_shape):
    """The forward of an empty ``x``, as PyTorch's: an empty ``y``; per row a
    mean of 0 and an ``rstd`` of NaN (the variance of no values), rows that
    only exist when the reduced axes are empty."""
    sdt = v.compute_dtype(x.dtype)  # float32 for half inputs
    return (_empty_like(be, x), _full(be, stat_shape, sdt, 0), _full(be, stat_shape, sdt, np.nan))


def _empty_backward(be, x, param_shape, param_grads):
    """The backward of an empty ``x``: an empty ``dx``; parameter gradients of
    zeros (sums over no values), as PyTorch's."""
    dx = _empty_like(be, x)
    if not param_grads:
        return dx, None, None
    pdt = v.compute_dtype(x.dtype)  # float32 for half inputs
    return dx, _full(be, param_shape, pdt, 0), _full(be, param_shape, pdt, 0)


# --------------------------------------------------------------------------- #
# Runs
# --------------------------------------------------------------------------- #
def _forward(be, x, plan, weight, bias, eps, rms):
    """Run the forward; return ``y`` and per-row ``(mean, rstd, var)`` (row order)."""
    rows, layout = be.row_ops, be.layout
    x4 = layout.as_4d(x, plan.layout)
    y4, y = layout.empty_like_4d(plan.layout, x.dtype)
    if plan.wperm is not None:
        weight = None if weight is None else layout.permute_flat(weight, plan.wperm)
        bias = None if bias is None else layout.permute_flat(bias, plan.wperm)
    with be.guard(x):
        mean, rstd, var = rows.row_norm_train(x4, weight, bias, plan.affine, eps, rms, y4)
    return y, mean, rstd, var


def _backward(be, dy, x, plan, mean, rstd, weight, rms, param_grads, param_shape):
    rows, layout = be.row_ops, be.layout
    x4 = layout.as_4d(x, plan.layout)
    dy4 = layout.as_4d(dy, plan.layout)
    dx4, dx = layout.empty_like_4d(plan.layout, x.dtype)
    if plan.wperm is not None and weight is not None:
        weight = layout.permute_flat(weight, plan.wperm)
    mean = None if mean is None else layout.kept_to_rows(mean, plan.layout)
    rstd = layout.kept_to_rows(rstd, plan.layout)
    with be.guard(x):
        dweight, dbias = rows.row_norm_backward(dy4, x4, mean, rstd, weight, plan.affine, rms,
                                                param_grads, dx4)
    if param_grads and plan.wperm is not None:
        dweight = layout.unpermute_flat(dweight, param_shape, plan.wperm)
        dbias = layout.unpermute_flat(dbias, param_shape, plan.wperm)
    return dx, dweight, dbias


def _kept(be, stat, plan, trailing_ones):
    kept = be.layout.rows_to_kept(stat, plan.layout)
    return be.layout.reshape_ones(kept, tuple(kept.shape) + (1,) * trailing_ones)


# --------------------------------------------------------------------------- #
# Layer norm
# --------------------------------------------------------------------------- #
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm``: normalise over the trailing axes.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape ``(*, *normalized_shape)``
        Any strides.
    normalized_shape : int or tuple of ints
        The trailing axes of ``x`` to normalise over.
    weight, bias : ndarray of shape ``normalized_shape`` and ``x.dtype``, optional
        Elementwise scale and shift (``None``: 1 and 0).
    eps : float, default 1e-5
        Added to the biased variance.

    Returns
    -------
    y : ndarray like ``x`` (same memory order)

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((4, 10, 768)).astype(np.float32)
    >>> y = numbabn.layer_norm(x, 768, weight, bias)
    """
    return layer_norm_train(x, normalized_shape, weight, bias, eps)[0]


@half_aware(params=("weight", "bias"), results=("x", "f32", "f32"), native=True)
def layer_norm_train(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """:func:`layer_norm` that also returns what the backward needs.

    Returns
    -------
    y : ndarray like ``x``
    mean, rstd : ndarray of shape ``(*, 1, ..., 1)`` and ``x.dtype``
        Per row (leading index): the mean and ``1 / sqrt(var + eps)`` with the
        biased variance, as ``torch.native_layer_norm`` returns them.

    Examples
    --------
    >>> y, mean, rstd = numbabn.layer_norm_train(x, 768, weight, bias)
    >>> dx, dweight, dbias = numbabn.layer_norm_backward(dy, x, mean, rstd, 768, weight)
    """
    key = _host_key("layer", x, normalized_shape)
    h = _hosts.get(key)
    if h is not None and _is_param(weight, h) and _is_param(bias, h) and _is_eps(eps):
        return _host_train(h, x, weight, bias, eps, False)[:3]
    be, (x, weight, bias) = _backend.select(dict(x=x, weight=weight, bias=bias))
    _check_x(x, "x", 1, "(*, *normalized_shape)", half=True)
    shape = _check_normalized_shape(normalized_shape, x)
    _check_param(weight, "weight", shape, v.compute_dtype(x.dtype))
    _check_param(bias, "bias", shape, v.compute_dtype(x.dtype))
    eps = v.check_eps(eps)
    k = len(shape)
    if x.size == 0:
        return _empty_train(be, x, _kept_shapes(x.shape, k)[0])
    plan = _layer_plan(x, k)
    y, mean, rstd, _ = _forward(be, x, plan, weight, bias, eps, False)
    _remember(key, x, None, plan, k, shape, _kept_shapes(x.shape, k))
    return y, _kept(be, mean, plan, k), _kept(be, rstd, plan, k)


@half_aware(tensors=("dy",), params=("weight",), stats=("mean", "rstd"),
            results=("x", "weight", "weight"), native=True)
def layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight=None, param_grads=True):
    """Gradients of :func:`layer_norm_train`.

    Parameters
    ----------
    dy : ndarray like ``x``
        Gradient of the loss with respect to ``y``.
    x : ndarray, the forward input
    mean, rstd : ndarray, as :func:`layer_norm_train` returned them (or float64;
        the squeezed shape ``x.shape[:-k]`` is accepted too)
    normalized_shape : int or tuple of ints
    weight : ndarray of shape ``normalized_shape``, optional
    param_grads : bool, default True
        Compute ``dweight`` and ``dbias`` (else they are None).

    Returns
    -------
    dx : ndarray like ``x``
    dweight, dbias : ndarray of shape ``normalized_shape`` and ``x.dtype``, or None
        ``sum(dy * xhat)`` and ``sum(dy)`` over the rows, accumulated in float64.
    """
    key = _host_key("layer", x, normalized_shape)
    h = _hosts.get(key)
    if h is not None and _is_dy(dy, x) and _is_saved(mean, h) and _is_saved(rstd, h) and \
            _is_param(weight, h) and type(param_grads) is bool:
        return _host_backward(h, dy, x, mean, rstd, weight, False, param_grads)
    be, (x, dy, mean, rstd, weight) = _backend.select(
        dict(x=x, dy=dy, mean=mean, rstd=rstd, weight=weight))
    _check_x(x, "x", 1, "(*, *normalized_shape)", half=True)
    cdt = v.compute_dtype(x.dtype)  # float32 for half inputs
    v.check_same_as(dy, "dy", x)
    shape = _check_normalized_shape(normalized_shape, x)
    shapes = _kept_shapes(x.shape, len(shape))
    _check_saved(mean, "mean", shapes, cdt)
    _check_saved(rstd, "rstd", shapes, cdt)
    _check_param(weight, "weight", shape, cdt)
    param_grads = v.check_bool(param_grads, "param_grads")
    if x.size == 0:
        return _empty_backward(be, x, shape, param_grads)
    plan = _layer_plan(x, len(shape))
    _remember(key, x, None, plan, len(shape), shape, shapes)
    lead = shapes[1]
    return _backward(be, dy, x, plan, be.layout.reshape_ones(mean, lead),
                     be.layout.reshape_ones(rstd, lead), weight, False, param_grads, shape)


# --------------------------------------------------------------------------- #
# RMS norm
# --------------------------------------------------------------------------- #
def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: ``x / sqrt(mean(x**2) + eps) * weight``
    over the trailing axes.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape ``(*, *normalized_shape)``
    normalized_shape : int or tuple of ints
    weight : ndarray of shape ``normalized_shape`` and ``x.dtype``, optional
    eps : float or None, default None
        ``None`` is ``np.finfo(x.dtype).eps``, as PyTorch.

    Returns
    -------
    y : ndarray like ``x``

    Examples
    --------
    >>> y = numbabn.rms_norm(x, 768, weight)
    """
    return rms_norm_train(x, normalized_shape, weight, eps)[0]


@half_aware(params=("weight",), results=("x", "f32"), native=True)
def rms_norm_train(x, normalized_shape, weight=None, eps=None):
    """:func:`rms_norm` that also returns ``rstd`` (shape ``(*, 1, ..., 1)``,
    ``x.dtype``), ``1 / sqrt(mean(x**2) + eps)`` per row.

    Examples
    --------
    >>> y, rstd = numbabn.rms_norm_train(x, 768, weight)
    >>> dx, dweight = numbabn.rms_norm_backward(dy, x, rstd, 768, weight)
    """
    key = _host_key("rms", x, normalized_shape)
    h = _hosts.get(key)
    if h is not None and _is_param(weight, h) and (eps is None or _is_eps(eps)):
        y, _, rstd, _ = _host_train(h, x, weight, None, _rms_eps(eps, h.cdt), True)
        return y, rstd
    be, (x, weight) = _backend.select(dict(x=x, weight=weight))
    _check_x(x, "x", 1, "(*, *normalized_shape)", half=True)
    shape = _check_normalized_shape(normalized_shape, x)
    _check_param(weight, "weight", shape, v.compute_dtype(x.dtype))
    eps = _rms_eps(eps, v.compute_dtype(x.dtype))  # float32's for half inputs, as PyTorch
    if x.size == 0:
        return _empty_train(be, x, _kept_shapes(x.shape, len(shape))[0])[::2]
    plan = _layer_plan(x, len(shape))
    y, _, rstd, _ = _forward(be, x, plan, weight, None, eps, True)
    _remember(key, x, None, plan, len(shape), shape, _kept_shapes(x.shape, len(shape)))
    return y, _kept(be, rstd, plan, len(shape))


@half_aware(tensors=("dy",), params=("weight",), stats=("rstd",),
            results=("x", "weight"), native=True)
def rms_norm_backward(dy, x, rstd, normalized_shape, weight=None, param_grads=True):
    """Gradients of :func:`rms_norm_train`: ``(dx, dweight)`` (``dweight`` is
    ``sum(dy * x * rstd)`` over the rows, None without ``param_grads``)."""
    key = _host_key("rms", x, normalized_shape)
    h = _hosts.get(key)
    if h is not None and _is_dy(dy, x) and _is_saved(rstd, h) and _is_param(weight, h) and \
            type(param_grads) is bool:
        return _host_backward(h, dy, x, None, rstd, weight, True, param_grads)[:2]
    be, (x, dy, rstd, weight) = _backend.select(dict(x=x, dy=dy, rstd=rstd, weight=weight))
    _check_x(x, "x", 1, "(*, *normalized_shape)", half=True)
    cdt = v.compute_dtype(x.dtype)  # float32 for half inputs
    v.check_same_as(dy, "dy", x)
    shape = _check_normalized_shape(normalized_shape, x)
    shapes = _kept_shapes(x.shape, len(shape))
    _check_saved(rstd, "rstd", shapes, cdt)
    _check_param(weight, "weight", shape, cdt)
    param_grads = v.check_bool(param_grads, "param_grads")
    if x.size == 0:
        return _empty_backward(be, x, shape, param_grads)[:2]
    plan = _layer_plan(x, len(shape))
    _remember(key, x, None, plan, len(shape), shape, shapes)
    dx, dweight, _ = _backward(be, dy, x, plan, None, be.layout.reshape_ones(rstd, shapes[1]),
                               weight, True, param_grads, shape)
    return dx, dweight


# --------------------------------------------------------------------------- #
# Group and instance norm
# --------------------------------------------------------------------------- #
def _group_train(be, x, groups, weight, bias, eps, want_var=False, key=None):
    """``(y, mean, rstd, var)``, the statistics of shape ``(N, groups)``
    (``var`` None unless ``want_var``); the call is remembered under ``key``
    (a :func:`_host_key`, None: not)."""
    nchan = x.shape[1]
    if x.size == 0:
        return (*_empty_train(be, x, (x.shape[0], groups)), None)
    xs = be.layout.split_axis(x, 1, (groups, nchan // groups))
    plan = _group_plan(xs)
    _remember(key, x, xs.shape, plan, 0, (nchan,), ((x.shape[0], groups),))
    ys, mean, rstd, var = _forward(be, xs, plan, weight, bias, eps, False)
    return (be.layout.merge_axes(ys, 1, 2), _kept(be, mean, plan, 0), _kept(be, rstd, plan, 0),
            _kept(be, var, plan, 0) if want_var else None)


def _group_backward(be, dy, x, groups, mean, rstd, weight, param_grads, key=None):
    nchan = x.shape[1]
    if x.size == 0:
        return _empty_backward(be, x, (nchan,), param_grads)
    parts = (groups, nchan // groups)
    xs = be.layout.split_axis(x, 1, parts)
    plan = _group_plan(xs)
    _remember(key, x, xs.shape, plan, 0, (nchan,), ((x.shape[0], groups),))
    dxs, dweight, dbias = _backward(be, be.layout.split_axis(dy, 1, parts), xs, plan, mean, rstd,
                                    weight, False, param_grads, None)
    return be.layout.merge_axes(dxs, 1, 2), dweight, dbias


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm``: normalise each sample's channel groups.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape ``(N, C, *)``
        Any strides (channels-last stays channels-last).
    num_groups : int
        Must divide ``C``; group ``g`` holds channels ``g * C/G .. (g+1) * C/G - 1``.
    weight, bias : ndarray of shape ``(C,)`` and ``x.dtype``, optional
        Per-channel scale and shift.
    eps : float, default 1e-5

    Returns
    -------
    y : ndarray like ``x``

    Examples
    --------
    >>> y = numbabn.group_norm(x, 32, weight, bias)     # x: (N, 256, H, W)
    """
    return group_norm_train(x, num_groups, weight, bias, eps)[0]


@half_aware(params=("weight", "bias"), results=("x", "f32", "f32"), native=True)
def group_norm_train(x, num_groups, weight=None, bias=None, eps=1e-5):
    """:func:`group_norm` that also returns ``mean`` and ``rstd`` of shape
    ``(N, num_groups)`` and ``x.dtype`` (as ``torch.native_group_norm``).

    Examples
    --------
    >>> y, mean, rstd = numbabn.group_norm_train(x, 32, weight, bias)
    >>> dx, dweight, dbias = numbabn.group_norm_backward(dy, x, mean, rstd, 32, weight)
    """
    key = _host_key("group", x, num_groups)
    h = _hosts.get(key)
    if h is not None and _is_param(weight, h) and _is_param(bias, h) and _is_eps(eps):
        return _host_train(h, x, weight, bias, eps, False)[:3]
    be, (x, weight, bias) = _backend.select(dict(x=x, weight=weight, bias=bias))
    _check_x(x, "x", 2, "(N, C, *)", half=True)
    groups = _check_num_groups(num_groups, x.shape[1])
    _check_param(weight, "weight", (x.shape[1],), v.compute_dtype(x.dtype))
    _check_param(bias, "bias", (x.shape[1],), v.compute_dtype(x.dtype))
    eps = v.check_eps(eps)
    y, mean, rstd, _ = _group_train(be, x, groups, weight, bias, eps, key=key)
    return y, mean, rstd


@half_aware(tensors=("dy",), params=("weight",), stats=("mean", "rstd"),
            results=("x", "weight", "weight"), native=True)
def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, param_grads=True):
    """Gradients of :func:`group_norm_train`: ``(dx, dweight, dbias)``, the
    parameter gradients of shape ``(C,)`` (None without ``param_grads``)."""
    key = _host_key("group", x, num_groups)
    h = _hosts.get(key)
    if h is not None and _is_dy(dy, x) and _is_saved(mean, h) and _is_saved(rstd, h) and \
            _is_param(weight, h) and type(param_grads) is bool:
        return _host_backward(h, dy, x, mean, rstd, weight, False, param_grads)
    be, (x, dy, mean, rstd, weight) = _backend.select(
        dict(x=x, dy=dy, mean=mean, rstd=rstd, weight=weight))
    _check_x(x, "x", 2, "(N, C, *)", half=True)
    cdt = v.compute_dtype(x.dtype)  # float32 for half inputs
    v.check_same_as(dy, "dy", x)
    groups = _check_num_groups(num_groups, x.shape[1])
    shapes = ((x.shape[0], groups),)
    _check_saved(mean, "mean", shapes, cdt)
    _check_saved(rstd, "rstd", shapes, cdt)
    _check_param(weight, "weight", (x.shape[1],), cdt)
    param_grads = v.check_bool(param_grads, "param_grads")
    return _group_backward(be, dy, x, groups, mean, rstd, weight, param_grads, key=key)


@half_aware(params=("weight", "bias"), results=("x", "f32", "f32"), native=True)
def instance_norm_train(x, weight=None, bias=None, eps=1e-5):
    """Instance norm with the input's statistics: ``(y, mean, rstd)``, the
    statistics of shape ``(N, C)`` and ``x.dtype``.

    Examples
    --------
    >>> y, mean, rstd = numbabn.instance_norm_train(x, weight, bias)
    >>> dx, dweight, dbias = numbabn.instance_norm_backward(dy, x, mean, rstd, weight)
    """
    key = _host_key("instance", x, 0)
    h = _hosts.get(key)
    if h is not None and _is_param(weight, h) and _is_param(bias, h) and _is_eps(eps):
        return _host_train(h, x, weight, bias, eps, False)[:3]
    be, (x, weight, bias) = _backend.select(dict(x=x, weight=weight, bias=bias))
    _check_x(x, "x", 3, "(N, C, *spatial) with at least one spatial axis", half=True)
    _check_spatial(x)
    _check_param(weight, "weight", (x.shape[1],), v.compute_dtype(x.dtype))
    _check_param(bias, "bias", (x.shape[1],), v.compute_dtype(x.dtype))
    eps = v.check_eps(eps)
    y, mean, rstd, _ = _group_train(be, x, x.shape[1], weight, bias, eps, key=key)
    return y, mean, rstd


@half_aware(tensors=("dy",), params=("weight",), stats=("mean", "rstd"),
            results=("x", "weight", "weight"), native=True)
def instance_norm_backward(dy, x, mean, rstd, weight=None, param_grads=True):
    """Gradients of :func:`instance_norm_train`: ``(dx, dweight, dbias)``."""
    key = _host_key("instance", x, 0)
    h = _hosts.get(key)
    if h is not None and _is_dy(dy, x) and _is_saved(mean, h) and _is_saved(rstd, h) and \
            _is_param(weight, h) and type(param_grads) is bool:
        return _host_backward(h, dy, x, mean, rstd, weight, False, param_grads)
    be, (x, dy, mean, rstd, weight) = _backend.select(
        dict(x=x, dy=dy, mean=mean, rstd=rstd, weight=weight))
    _check_x(x, "x", 3, "(N, C, *spatial) with at least one spatial axis", half=True)
    cdt = v.compute_dtype(x.dtype)  # float32 for half inputs
    v.check_same_as(dy, "dy", x)
    shapes = ((x.shape[0], x.shape[1]),)
    _check_saved(mean, "mean", shapes, cdt)
    _check_saved(rstd, "rstd", shapes, cdt)
    _check_param(weight, "weight", (x.shape[1],), cdt)
    param_grads = v.check_bool(param_grads, "param_grads")
    return _group_backward(be, dy, x, x.shape[1], mean, rstd, weight, param_grads, key=key)


@half_aware(params=("weight", "bias"), inplace=("running_mean", "running_var"))
def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm``: normalise each (sample, channel).

    With ``use_input_stats`` each ``x[n, c]`` is normalised with its own mean and
    biased variance, and running statistics, when given, are updated in place
    as PyTorch does: ``running = (1 - momentum) * running + momentum * batch``
    with ``batch`` the mean over the samples of the instances' means and
    *unbiased* variances.  Without it, ``x`` is normalised with the running
    statistics (:func:`numbabn.normalize` along axis 1).

    Parameters
    ----------
    x : ndarray, float32 or float64, shape ``(N, C, *spatial)``
    running_mean, running_var : ndarray ``(C,)`` and ``x.dtype``, optional
        Both or neither; required when ``use_input_stats`` is False.
    weight, bias : ndarray ``(C,)`` and ``x.dtype``, optional
    use_input_stats : bool, default True
    momentum : float in [0, 1], default 0.1
    eps : float, default 1e-5

    Returns
    -------
    y : ndarray like ``x``

    Examples
    --------
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y = numbabn.instance_norm(x, rm, rv)        # updates rm, rv
    """
    from . import functional as F

    be, x, running_mean, running_var, weight, bias, momentum, eps = _check_instance_norm(
        x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not use_input_stats:
        if x.size == 0:  # no features either, perhaps: nothing to normalise
            return _empty_like(be, x)
        return F.normalize(x, running_mean, running_var, weight, bias, eps, axis=1)
    return _instance_update(be, x, running_mean, running_var, weight, bias, momentum, eps)[0]


@half_aware(params=("weight", "bias"), inplace=("running_mean", "running_var"),
            results=("x", "f32", "f32"))
def _instance_norm_train(x, running_mean, running_var, weight, bias, momentum, eps):
    """:func:`instance_norm_train` that also updates the running statistics
    (or None) as :func:`instance_norm` does: for the layers."""
    be, x, running_mean, running_var, weight, bias, momentum, eps = _check_instance_norm(
        x, running_mean, running_var, weight, bias, True, momentum, eps)
    return _instance_update(be, x, running_mean, running_var, weight, bias, momentum, eps)


def _check_instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum,
                         eps):
    be, (x, running_mean, running_var, weight, bias) = _backend.select(dict(
        x=x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias))
    _check_x(x, "x", 3, "(N, C, *spatial) with at least one spatial axis")
    nchan = x.shape[1]
    use_input_stats = v.check_bool(use_input_stats, "use_input_stats")
    v.check_running_pair(running_mean, running_var)
    if running_mean is not None:
        v.check_vector(running_mean, "running_mean", nchan, x.dtype, writeable=use_input_stats)
        v.check_vector(running_var, "running_var", nchan, x.dtype, writeable=use_input_stats)
    elif not use_input_stats:
        raise ValueError("use_input_stats=False normalises with running_mean and running_var, "
                         "but they are None; pass them, or use use_input_stats=True.")
    _check_param(weight, "weight", (nchan,), x.dtype)
    _check_param(bias, "bias", (nchan,), x.dtype)
    momentum = v.check_momentum(momentum)
    eps = v.check_eps(eps)
    if use_input_stats:
        _check_spatial(x)
    return be, x, running_mean, running_var, weight, bias, momentum, eps


def _instance_update(be, x, running_mean, running_var, weight, bias, momentum, eps):
    nchan = x.shape[1]
    y, mean, rstd, var = _group_train(be, x, nchan, weight, bias, eps, want_var=True)
    # An empty input leaves the running statistics untouched, as batch norm's
    # (PyTorch 2.13 writes NaN into them for an empty batch).
    if running_mean is not None and momentum > 0 and x.size:
        count = x.size // (x.shape[0] * nchan)
        be.row_ops.update_instance_running_stats(running_mean, running_var, mean, var, count,
                                              momentum)
    return y, mean, rstd
