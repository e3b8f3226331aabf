"""The functional batch-norm API.

Each public function validates its arguments (all of them, before touching
anything), views the input as ``(outer, C, inner)`` around the feature axis (see
:mod:`numbabn._layout`), and hands the work to the backend's kernels: the CPU's
for NumPy arrays, the GPU's for device arrays (numba.cuda arrays or objects with
``__cuda_array_interface__``), chosen by :mod:`numbabn._backend`.

Conventions (stated once, in the README's "Conventions" section): ``axis`` is the
feature axis; statistics reduce over every other axis; ``var`` is the biased
batch variance; ``invstd = 1 / sqrt(var + eps)``; running variance is stored
unbiased; ``momentum`` is the weight of the new batch.
"""

from __future__ import annotations

import numpy as np

from . import _backend, _layout
from . import _validate as v

__all__ = [
    "batch_stats",
    "normalize",
    "batch_norm_train",
    "batch_norm_backward",
    "update_running_stats",
    "batch_norm",
]


def _prepare(x, axis, **arrays):
    """Pick the backend from where ``x`` lives (the other arrays must live there
    too), validate ``x`` and ``axis``; return ``(backend, layout, x, *arrays)``
    with device arrays as numba device arrays."""
    be, (x, *rest) = _backend.select(dict(x=x, **arrays))
    v.check_input(x)
    axis = v.check_axis(axis, x.ndim)
    return (be, _layout.plan_layout(x, axis), x, *rest)


def _view(be, x, layout):
    return be.layout.as_3d(x, layout)


def _output(be, x, layout, out=None, inputs=None):
    """Return ``(y3, y, finish)``: where kernels write, what to return, and a
    callback that copies into ``out`` when ``out`` could not be written directly
    (not viewable as 3-D, or overlapping one of ``inputs``, default ``(x,)``, in
    some other way than being that very array).  Checks ``out`` first: callers
    run it before any kernel, so a bad ``out`` changes nothing."""
    inputs = (x,) if inputs is None else inputs
    if out is not None:
        v.check_out(out, x)
    if be is not _backend.CPU:
        return be.layout.output_3d(x, layout, out, inputs)
    if out is None:
        y3, y = _layout.empty_like_3d(layout, x.dtype)
        return y3, y, None
    out3 = _layout.as_3d(out, layout, copy_ok=False)
    if out3 is not None and not any(_partial_overlap(out, a) for a in inputs):
        return out3, out, None
    y3, y = _layout.empty_like_3d(layout, x.dtype)
    return y3, out, lambda: np.copyto(out, y)


def _partial_overlap(a, b):
    """True when ``a`` and ``b`` share memory without being the same view."""
    same = (a.__array_interface__["data"] == b.__array_interface__["data"]
            and a.strides == b.strides)
    return np.may_share_memory(a, b) and not same


def batch_stats(x, axis=1):
    """Per-feature mean and biased variance of ``x``.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        Input; any layout or strides.
    axis : int, default 1
        The feature axis (``-1`` for channels-last data).

    Returns
    -------
    mean, var : ndarray of shape ``(C,)`` and ``x.dtype``
        Mean and *biased* variance over every axis except ``axis`` (what
        ``tf.nn.moments`` gives).  Accumulated in float64.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    >>> mean, var = numbabn.batch_stats(x)          # NCHW: statistics per channel
    >>> mean.shape, var.dtype
    ((3,), dtype('float32'))
    """
    be, layout, x = _prepare(x, axis)
    with be.guard(x):
        return be.ops.batch_stats(_view(be, x, layout))


def normalize(x, mean, var, weight=None, bias=None, eps=1e-5, axis=1, out=None):
    """``(x - mean) / sqrt(var + eps) * weight + bias``, broadcast along ``axis``.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
    mean, var : ndarray of shape ``(C,)`` and ``x.dtype``
    weight, bias : ndarray of shape ``(C,)`` and ``x.dtype``, optional
        Per-feature scale (gamma) and shift (beta); ``None`` means 1 and 0.
    eps : float, default 1e-5
        Added to the variance; must be positive and finite.
    axis : int, default 1
        The feature axis.
    out : ndarray, optional
        Where to write the result (shape and dtype of ``x``); may be ``x`` itself.

    Returns
    -------
    y : ndarray of the shape and dtype of ``x``

    Examples
    --------
    >>> mean, var = numbabn.batch_stats(x)
    >>> y = numbabn.normalize(x, mean, var)
    """
    be, layout, x, mean, var, weight, bias, out = _prepare(
        x, axis, mean=mean, var=var, weight=weight, bias=bias, out=out)
    nfeat = layout.shape3[1]
    v.check_vector(mean, "mean", nfeat, x.dtype)
    v.check_vector(var, "var", nfeat, x.dtype)
    _check_affine(weight, bias, nfeat, x.dtype)
    eps = v.check_eps(eps)
    y3, y, finish = _output(be, x, layout, out)
    with be.guard(x):
        be.ops.normalize(_view(be, x, layout), mean, var, weight, bias, eps, y3)
    if finish:
        finish()
    return y


def batch_norm_train(x, weight=None, bias=None, eps=1e-5, axis=1, out=None):
    """Training-mode forward: normalise ``x`` with its own batch statistics.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2, at least 2 values per feature
    weight, bias : ndarray of shape ``(C,)`` and ``x.dtype``, optional
    eps : float, default 1e-5
    axis : int, default 1
    out : ndarray, optional
        Where to write ``y`` (shape and dtype of ``x``); may be ``x`` itself.
        Reusing one output array saves the page faults of a fresh one on
        every call (about 3.5 ms for a 51 MB tensor here).

    Returns
    -------
    y : ndarray like ``x`` (``out`` when given)
    mean : ndarray ``(C,)``, the batch mean
    invstd : ndarray ``(C,)``, ``1 / sqrt(var + eps)`` with the biased batch variance

    ``mean`` and ``invstd`` are what :func:`batch_norm_backward` needs.

    Examples
    --------
    >>> y, mean, invstd = numbabn.batch_norm_train(x, weight, bias)
    >>> dx, dweight, dbias = numbabn.batch_norm_backward(dy, x, mean, invstd, weight)
    """
    be, layout, x, weight, bias, out = _prepare(x, axis, weight=weight, bias=bias, out=out)
    nfeat = layout.shape3[1]
    _check_affine(weight, bias, nfeat, x.dtype)
    eps = v.check_eps(eps)
    v.check_training_count(layout.count, x.shape, axis)
    y3, y, finish = _output(be, x, layout, out)
    with be.guard(x):
        mean, invstd, _ = be.ops.batch_norm_train(_view(be, x, layout), weight, bias, eps, y3)
    if finish:
        finish()
    return y, mean, invstd


def batch_norm_backward(dy, x, mean, invstd, weight=None, axis=1, out=None):
    """Gradients of :func:`batch_norm_train` (biased batch statistics).

    Parameters
    ----------
    dy : ndarray like ``x``
        Gradient of the loss with respect to the forward output ``y``.
    x : ndarray, the forward input
    mean, invstd : ndarray ``(C,)`` returned by :func:`batch_norm_train`
    weight : ndarray ``(C,)``, optional
    axis : int, default 1
    out : ndarray, optional
        Where to write ``dx`` (shape and dtype of ``x``); may be ``dy`` or ``x``.

    Returns
    -------
    dx : ndarray like ``x`` (``out`` when given)
    dweight, dbias : ndarray ``(C,)``, or ``None`` when ``weight`` is ``None``

    Examples
    --------
    >>> dx, dweight, dbias = numbabn.batch_norm_backward(dy, x, mean, invstd, weight)
    """
    be, layout, x, dy, mean, invstd, weight, out = _prepare(
        x, axis, dy=dy, mean=mean, invstd=invstd, weight=weight, out=out)
    v.check_same_as(dy, "dy", x)
    nfeat = layout.shape3[1]
    v.check_vector(mean, "mean", nfeat, x.dtype)
    v.check_vector(invstd, "invstd", nfeat, x.dtype)
    if weight is not None:
        v.check_vector(weight, "weight", nfeat, x.dtype)
    dx3, dx, finish = _output(be, x, layout, out, inputs=(x, dy))
    with be.guard(x):
        dweight, dbias = be.ops.batch_norm_backward(
            _view(be, dy, layout), _view(be, x, layout), mean, invstd, weight, dx3
        )
    if finish:
        finish()
    return dx, dweight, dbias


def update_running_stats(running_mean, running_var, mean, var, count, momentum=0.1):
    """Update running statistics in place, as PyTorch does.

    ``running_mean = (1 - momentum) * running_mean + momentum * mean`` and
    ``running_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)``:
    ``var`` is the biased batch variance and the running variance is unbiased.

    Parameters
    ----------
    running_mean, running_var : writeable ndarray ``(C,)``, float32 or float64
    mean, var : ndarray ``(C,)`` of the same dtype, the batch statistics
    count : int >= 2, the number of values per feature in the batch
    momentum : float in [0, 1], default 0.1, the weight of the new batch

    Examples
    --------
    >>> mean, var = numbabn.batch_stats(x)
    >>> numbabn.update_running_stats(running_mean, running_var, mean, var, count=x.size // 3)
    """
    be, (running_mean, running_var, mean, var) = _backend.select(dict(
        running_mean=running_mean, running_var=running_var, mean=mean, var=var))
    v.check_stat_vector(running_mean, "running_mean")
    nfeat, dtype = running_mean.shape[0], running_mean.dtype
    v.check_vector(running_mean, "running_mean", nfeat, dtype, writeable=True)
    v.check_vector(running_var, "running_var", nfeat, dtype, writeable=True)
    v.check_vector(mean, "mean", nfeat, dtype)
    v.check_vector(var, "var", nfeat, dtype)
    count = v.check_count(count)
    momentum = v.check_momentum(momentum)
    if momentum > 0:  # momentum 0 keeps the old values (even where a batch var is inf)
        be.ops.update_running_stats(running_mean, running_var, mean, var, count, momentum)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, axis=1):
    """One-call batch norm with ``torch.nn.functional.batch_norm`` semantics.

    Training mode normalises with the batch statistics and, when running
    statistics are given, updates them in place (see
    :func:`update_running_stats`).  Eval mode normalises with the running
    statistics and changes nothing.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
    running_mean, running_var : ndarray ``(C,)`` or None
        Both or neither; required in eval mode; writeable in training mode.
    weight, bias : ndarray ``(C,)``, optional
    training : bool, default False
    momentum : float in [0, 1], default 0.1, the weight of the new batch
    eps : float, default 1e-5
    axis : int, default 1

    Returns
    -------
    y : ndarray like ``x``

    Examples
    --------
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y = numbabn.batch_norm(x, rm, rv, training=True)   # updates rm, rv
    >>> y_eval = numbabn.batch_norm(x, rm, rv)              # uses them
    """
    be, layout, x, running_mean, running_var, weight, bias = _prepare(
        x, axis, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    nfeat = layout.shape3[1]
    training = v.check_bool(training, "training")
    v.check_running_pair(running_mean, running_var)
    has_running = running_mean is not None
    if has_running:
        v.check_vector(running_mean, "running_mean", nfeat, x.dtype, writeable=training)
        v.check_vector(running_var, "running_var", nfeat, x.dtype, writeable=training)
    elif not training:
        raise ValueError(
            "eval mode (training=False) normalises with running_mean and running_var, "
            "but they are None; pass them, or use training=True."
        )
    _check_affine(weight, bias, nfeat, x.dtype)
    momentum = v.check_momentum(momentum)
    eps = v.check_eps(eps)
    if training:
        v.check_training_count(layout.count, x.shape, axis)
    y3, y, _ = _output(be, x, layout)
    x3 = _view(be, x, layout)
    with be.guard(x):
        if not training:
            be.ops.normalize(x3, running_mean, running_var, weight, bias, eps, y3)
            return y
        mean, _, var = be.ops.batch_norm_train(x3, weight, bias, eps, y3)
    if has_running and momentum > 0:
        be.ops.update_running_stats(running_mean, running_var, mean, var, layout.count, momentum)
    return y


def _check_affine(weight, bias, nfeat, dtype):
    if weight is not None:
        v.check_vector(weight, "weight", nfeat, dtype)
    if bias is not None:
        v.check_vector(bias, "bias", nfeat, dtype)
