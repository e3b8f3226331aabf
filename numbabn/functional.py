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

from . import _backend, _core, _layout
from ._half import half_aware
from . import _validate as v

__all__ = [
    "batch_stats",
    "normalize",
    "batch_norm_train",
    "batch_norm_backward",
    "update_running_stats",
    "batch_norm",
    "batch_moments",
    "merge_moments",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "batch_norm_relu_train",
    "batch_norm_relu_backward",
]


def _prepare(x, axis, allow_empty_batch=False, half=False, **arrays):
    """Pick the backend from where ``x`` lives (the other arrays must live there
    too), validate ``x`` and ``axis``; return ``(backend, layout, x, *arrays)``
    with device arrays as numba device arrays.  ``half``: ``x`` may be a half
    type (the functions whose CPU kernels read it directly, see numbabn._half)."""
    be, (x, *rest) = _backend.select(dict(x=x, **arrays))
    v.check_input(x, allow_empty_batch=allow_empty_batch, half=half)
    axis_in, axis = axis, v.check_axis(axis, x.ndim)
    if x.shape[axis] == 0:
        raise ValueError(f"x must have at least one feature, but its feature axis {axis} is "
                         f"empty; got shape {tuple(x.shape)}.")
    layout = _layout.plan_layout(x, axis)
    _remember(x, axis_in, layout)
    return (be, layout, x, *rest)


# --------------------------------------------------------------------------- #
# The fast path.  A training loop calls with the same few shapes every step, so
# everything that depends only on ``x``'s shape, strides, dtype and ``axis`` (its
# validation, its layout, how to view it and allocate an output) is kept in a
# ``HostPlan`` per key, made by the general path the first time (which validated
# them).  A call with a remembered key, plain ``np.ndarray`` arguments of the
# right dtype and shape, Python float scalars in range and no ``out`` then only
# checks what varies per call and goes straight to the CPU kernels.  Anything
# else, including every invalid argument, takes the general path, which
# validates all arguments and raises the errors it always raised.
# --------------------------------------------------------------------------- #
_ndarray = np.ndarray
_CPU = _backend.CPU
_plans = {}  # (shape, strides, dtype, axis) -> _layout.HostPlan
_MAX_PLANS = 1024


def _remember(x, axis, layout):
    """Keep the plan of a host ``x`` that passed ``check_input`` (non-empty)
    and ``check_axis`` with this ``axis``."""
    if type(x) is not _ndarray or type(axis) is not int or not layout.count:
        return
    key = (x.shape, x.strides, x.dtype, axis)
    if key not in _plans:
        plan = _layout.host_plan(x, layout)
        if plan is not None:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[key] = plan


def _plan_of(x, axis):
    """The remembered plan of a host ``x`` with this ``axis``, or None."""
    if type(x) is _ndarray and type(axis) is int:
        return _plans.get((x.shape, x.strides, x.dtype, axis))
    return None


_cdt = v.compute_dtype  # per-feature dtype: x's, float32 for half x


_is_vector = v.is_plain  # a host per-feature vector: check_vector would pass
_is_eps = v.is_plain_eps


def _is_like(a, x):
    """A host array ``check_same_as`` would pass, with ``x``'s strides (so ``x``'s
    plan views it)."""
    return v.is_plain(a, x.dtype, x.shape) and a.strides == x.strides


def _view(be, x, layout):
    return be.layout.as_3d(x, layout)


def _output(be, x, layout, out=None, inputs=None):
    """Return ``(y3, y, finish)``: where kernels write, what to return, and a
    callback that copies into ``out`` when ``out`` could not be written directly
    (see :func:`numbabn._layout.output_3d`, one rule for both backends).  Checks
    ``out`` first: callers run it before any kernel, so a bad ``out`` changes
    nothing."""
    if out is not None:
        v.check_out(out, x)
    return _layout.output_3d(be.layout, x, layout, out, inputs)


@half_aware(results=("f32", "f32"))
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
    plan = _plan_of(x, axis)
    if plan is not None:
        with _CPU.guard(x):
            return _CPU.feature_ops.batch_stats(plan.view(x))
    be, layout, x = _prepare(x, axis)
    with be.guard(x):
        return be.feature_ops.batch_stats(_view(be, x, layout))


@half_aware(params=("mean", "var", "weight", "bias"), native=True)
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
    plan = _plan_of(x, axis)
    if plan is not None and out is None and _is_eps(eps):
        dtype, vshape = _cdt(x.dtype), plan.vector_shape
        if _is_vector(mean, dtype, vshape) and _is_vector(var, dtype, vshape) and (
                weight is None or _is_vector(weight, dtype, vshape)) and (
                bias is None or _is_vector(bias, dtype, vshape)):
            y3, y = plan.empty(x.dtype)
            with _CPU.guard(x):
                _CPU.feature_ops.normalize(plan.view(x), mean, var, weight, bias, eps, y3)
            return y
    be, layout, x, mean, var, weight, bias, out = _prepare(
        x, axis, allow_empty_batch=True, half=True, mean=mean, var=var, weight=weight, bias=bias,
        out=out)
    nfeat, cdt = layout.shape3[1], v.compute_dtype(x.dtype)
    v.check_vector(mean, "mean", nfeat, cdt)
    v.check_vector(var, "var", nfeat, cdt)
    _check_affine(weight, bias, nfeat, cdt)
    eps = v.check_eps(eps)
    y3, y, finish = _output(be, x, layout, out)
    if layout.count:
        with be.guard(x):
            be.feature_ops.normalize(_view(be, x, layout), mean, var, weight, bias, eps, y3)
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
    y, mean, invstd, _ = _batch_norm_train(x, weight, bias, eps, axis, out)
    return y, mean, invstd


@half_aware(params=("weight", "bias"), results=("x", "f32", "f32", "f32"), native=True)
def _batch_norm_train(x, weight, bias, eps, axis, out, relu=False):
    """:func:`batch_norm_train` that also returns the biased batch variance in
    float64 (for the layers' running statistics; no round trip through invstd);
    ``relu`` applies a ReLU to the output in the same pass."""
    plan = _plan_of(x, axis)
    if plan is not None and out is None and plan.count >= 2 and _is_eps(eps) and (
            weight is None or _is_vector(weight, _cdt(x.dtype), plan.vector_shape)) and (
            bias is None or _is_vector(bias, _cdt(x.dtype), plan.vector_shape)):
        y3, y = plan.empty(x.dtype)
        with _CPU.guard(x):
            mean, invstd, var = _CPU.feature_ops.batch_norm_train(plan.view(x), weight, bias, eps, y3,
                                                          relu)
        return y, mean, invstd, var
    be, layout, x, weight, bias, out = _prepare(x, axis, half=True, weight=weight, bias=bias,
                                                out=out)
    nfeat = layout.shape3[1]
    _check_affine(weight, bias, nfeat, v.compute_dtype(x.dtype))
    eps = v.check_eps(eps)
    v.check_training_count(layout.count, x.shape, axis)
    y3, y, finish = _output(be, x, layout, out)
    with be.guard(x):
        mean, invstd, var = be.feature_ops.batch_norm_train(_view(be, x, layout), weight, bias, eps, y3,
                                                    relu)
    if finish:
        finish()
    return y, mean, invstd, var


def batch_norm_relu_train(x, weight=None, bias=None, eps=1e-5, axis=1, out=None):
    """``relu(batch_norm_train(x, ...))`` in one pass over the output.

    Parameters and returns as :func:`batch_norm_train`; ``y`` is the ReLU's
    output (``torch.relu`` semantics: NaN and -0.0 pass through), and ``mean``,
    ``invstd`` are the batch statistics, for :func:`batch_norm_relu_backward`.

    Examples
    --------
    >>> y, mean, invstd = numbabn.batch_norm_relu_train(x, weight, bias)
    >>> dx, dweight, dbias = numbabn.batch_norm_relu_backward(dy, y, x, mean, invstd, weight)
    """
    y, mean, invstd, _ = _batch_norm_train(x, weight, bias, eps, axis, out, relu=True)
    return y, mean, invstd


def batch_norm_relu_backward(dy, y, x, mean, invstd, weight=None, axis=1, out=None):
    """Gradients of :func:`batch_norm_relu_train`.

    The ReLU's mask comes from its output ``y``: ``dy`` counts where ``y > 0``
    and is 0 elsewhere (PyTorch's ``threshold_backward``, even for a NaN or inf
    in ``dy``), inside the batch-norm backward's passes.

    Parameters
    ----------
    dy : ndarray like ``x``, the gradient with respect to ``y``
    y : ndarray like ``x``, the output of :func:`batch_norm_relu_train`
    x, mean, invstd, weight, axis : as in :func:`batch_norm_backward`
    out : ndarray, optional
        Where to write ``dx``; may be ``dy``, ``y`` or ``x``.

    Returns
    -------
    dx : ndarray like ``x`` (``out`` when given)
    dweight, dbias : ndarray ``(C,)``, or ``None`` when ``weight`` is ``None``
    """
    return _batch_norm_backward(dy, x, mean, invstd, weight, axis, out, y)


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
    return _batch_norm_backward(dy, x, mean, invstd, weight, axis, out, None)


@half_aware(tensors=("dy", "y"), params=("mean", "invstd", "weight"),
            results=("x", "weight", "weight"), native=True)
def _batch_norm_backward(dy, x, mean, invstd, weight, axis, out, y):
    """:func:`batch_norm_backward`; with ``y`` (a fused ReLU's output) ``dy``
    counts only where ``y > 0``."""
    plan = _plan_of(x, axis)
    if plan is not None and out is None and _is_like(dy, x) and (y is None or _is_like(y, x)):
        dtype, vshape = _cdt(x.dtype), plan.vector_shape
        if _is_vector(mean, dtype, vshape) and _is_vector(invstd, dtype, vshape) and (
                weight is None or _is_vector(weight, dtype, vshape)):
            dx3, dx = plan.empty(x.dtype)
            with _CPU.guard(x):
                dweight, dbias = _CPU.feature_ops.batch_norm_backward(
                    plan.view(dy), plan.view(x), mean, invstd, weight, dx3,
                    None if y is None else plan.view(y))
            return dx, dweight, dbias
    be, layout, x, dy, mean, invstd, weight, y, out = _prepare(
        x, axis, half=True, dy=dy, mean=mean, invstd=invstd, weight=weight, y=y, out=out)
    v.check_same_as(dy, "dy", x)
    if y is not None:
        v.check_same_as(y, "y", x)
    nfeat, cdt = layout.shape3[1], v.compute_dtype(x.dtype)
    v.check_vector(mean, "mean", nfeat, cdt)
    v.check_vector(invstd, "invstd", nfeat, cdt)
    if weight is not None:
        v.check_vector(weight, "weight", nfeat, cdt)
    dx3, dx, finish = _output(be, x, layout, out, inputs=(x, dy) if y is None else (x, dy, y))
    with be.guard(x):
        dweight, dbias = be.feature_ops.batch_norm_backward(
            _view(be, dy, layout), _view(be, x, layout), mean, invstd, weight, dx3,
            None if y is None else _view(be, y, layout))
    if finish:
        finish()
    return dx, dweight, dbias


@half_aware(x="running_mean", stats=("mean", "var"),
            inplace=("running_mean", "running_var"), results=())
def update_running_stats(running_mean, running_var, mean, var, count, momentum=0.1):
    """Update running statistics in place, as PyTorch does.

    ``running_mean = (1 - momentum) * running_mean + momentum * mean`` and
    ``running_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)``:
    ``var`` is the biased batch variance and the running variance is unbiased.

    Parameters
    ----------
    running_mean, running_var : writeable ndarray ``(C,)``, float32 or float64
    mean, var : ndarray ``(C,)`` of the same dtype or float64, the batch statistics
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
    v.check_stat(mean, "mean", nfeat, dtype)
    v.check_stat(var, "var", nfeat, dtype)
    count = v.check_count(count)
    momentum = v.check_momentum(momentum)
    if momentum > 0:  # momentum 0 keeps the old values (even where a batch var is inf)
        be.feature_ops.update_running_stats(running_mean, running_var, mean, var, count, momentum)


@half_aware(params=("weight", "bias"), inplace=("running_mean", "running_var"), native=True)
def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, axis=1):
    """One-call batch norm with ``torch.nn.functional.batch_norm`` semantics.

    Training mode normalises with the batch statistics and, when running
    statistics are given, updates them in place (see
    :func:`update_running_stats`).  Eval mode normalises with the running
    statistics and changes nothing.  An empty batch gives an empty output and
    changes nothing.

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
    plan = _plan_of(x, axis)
    if plan is not None and type(training) is bool and type(momentum) is float \
            and 0.0 <= momentum <= 1.0 and _is_eps(eps) and (not training or plan.count >= 2):
        dtype, vshape = _cdt(x.dtype), plan.vector_shape
        if _is_vector(running_mean, dtype, vshape) and _is_vector(running_var, dtype, vshape) \
                and (not training or (running_mean.flags.writeable
                                      and running_var.flags.writeable)) and (
                weight is None or _is_vector(weight, dtype, vshape)) and (
                bias is None or _is_vector(bias, dtype, vshape)):
            y3, y = plan.empty(x.dtype)
            with _CPU.guard(x):
                if not training:
                    _CPU.feature_ops.normalize(plan.view(x), running_mean, running_var, weight, bias,
                                       eps, y3)
                    return y
                mean, _, var = _CPU.feature_ops.batch_norm_train(plan.view(x), weight, bias, eps, y3)
            if momentum > 0:
                _CPU.feature_ops.update_running_stats(running_mean, running_var, mean, var, plan.count,
                                              momentum)
            return y
    be, layout, x, running_mean, running_var, weight, bias = _prepare(
        x, axis, allow_empty_batch=True, half=True, running_mean=running_mean,
        running_var=running_var, weight=weight, bias=bias)
    nfeat, cdt = layout.shape3[1], v.compute_dtype(x.dtype)
    training = v.check_bool(training, "training")
    v.check_running_pair(running_mean, running_var)
    has_running = running_mean is not None
    if has_running:
        v.check_vector(running_mean, "running_mean", nfeat, cdt, writeable=training)
        v.check_vector(running_var, "running_var", nfeat, cdt, writeable=training)
    elif not training:
        raise ValueError(
            "eval mode (training=False) normalises with running_mean and running_var, "
            "but they are None; pass them, or use training=True."
        )
    _check_affine(weight, bias, nfeat, cdt)
    momentum = v.check_momentum(momentum)
    eps = v.check_eps(eps)
    if training and layout.count:
        v.check_training_count(layout.count, x.shape, axis)
    y3, y, _ = _output(be, x, layout)
    if not layout.count:  # an empty batch: an empty output, nothing updated (as PyTorch)
        return y
    x3 = _view(be, x, layout)
    with be.guard(x):
        if not training:
            be.feature_ops.normalize(x3, running_mean, running_var, weight, bias, eps, y3)
            return y
        mean, _, var = be.feature_ops.batch_norm_train(x3, weight, bias, eps, y3)
    if has_running and momentum > 0:
        be.feature_ops.update_running_stats(running_mean, running_var, mean, var, layout.count, momentum)
    return y



# --------------------------------------------------------------------------- #
# Split primitives: the pieces of batch norm with a reduction between them, for
# statistics merged across processes (numbabn.distributed) or any other way.
# Partials are float64; see the README's "Split primitives" section.
# --------------------------------------------------------------------------- #
@half_aware(results=("f32", "f32", "f32"))
def batch_moments(x, axis=1):
    """Per-feature moments of ``x``, mergeable with :func:`merge_moments`.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        Any layout; the batch may be empty (0 values per feature).
    axis : int, default 1
        The feature axis.

    Returns
    -------
    count : int
        Values per feature (the product of every axis but ``axis``).
    mean, m2 : ndarray ``(C,)`` float64
        The mean and ``M2 = sum((x - mean)**2)`` of each feature (0 and 0 for
        an empty batch), accumulated as in :func:`batch_norm_train`: its
        ``mean`` and ``var = m2 / count`` are these, rounded.

    Examples
    --------
    >>> count, mean, m2 = numbabn.batch_moments(x)
    >>> var = m2 / count                       # the biased batch variance
    """
    be, layout, x = _prepare(x, axis, allow_empty_batch=True)
    if layout.count == 0:
        nfeat = layout.shape3[1]
        return 0, np.zeros(nfeat), np.zeros(nfeat)
    with be.guard(x):
        mean, m2 = be.feature_ops.batch_moments(_view(be, x, layout))
    return layout.count, mean, m2


def merge_moments(counts, means, m2s):
    """Merge several batches' moments (Chan et al.), in the order given.

    The merge order is fixed (first row first), so every process that merges
    the same partials gets bitwise the same result.

    Parameters
    ----------
    counts : sequence of P ints >= 0
        Values per feature of each part (as returned by :func:`batch_moments`).
    means, m2s : array_like ``(P, C)``, float64
        Each part's per-feature mean and M2.

    Returns
    -------
    count : int
    mean, m2 : ndarray ``(C,)`` float64
        The moments of the concatenated batches.

    Examples
    --------
    >>> parts = [numbabn.batch_moments(x) for x in (x0, x1)]
    >>> count, mean, m2 = numbabn.merge_moments(*zip(*parts))
    """
    counts = list(counts)
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise TypeError(f"counts must be non-negative ints; got {v.describe(c)}.")
    for name, a in (("means", means), ("m2s", m2s)):
        dtype = a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype
        # NumPy's own ints and floats convert exactly; not complex, bool, ml_dtypes' float8...
        if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers, float64 as batch_moments returns "
                            f"them; got dtype {dtype}. Pass the float64 partials.")
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    if means.ndim != 2 or m2s.shape != means.shape or means.shape[0] != len(counts) \
            or means.shape[0] == 0:
        raise ValueError(
            f"means and m2s must both have shape (P, C) with P = len(counts) = {len(counts)} >= 1; "
            f"got {means.shape} and {m2s.shape}.")
    n, mean, m2 = 0.0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    for nb, mb, qb in zip(counts, means, m2s):
        n, mean, m2 = _core.chan_merge(n, mean, m2, float(nb), mb, qb)
    return int(sum(counts)), np.array(mean, dtype=np.float64), np.array(m2, dtype=np.float64)


@half_aware(params=("weight", "bias"), stats=("mean", "invstd"), native=True)
def batch_norm_elemt(x, mean, invstd, weight=None, bias=None, axis=1, out=None):
    """``(x - mean) * invstd * weight + bias``, broadcast along ``axis``.

    The elementwise half of a training forward whose statistics came from
    elsewhere (:func:`merge_moments` across processes, say).

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
    mean, invstd : ndarray ``(C,)``, ``x.dtype`` or float64
        A float64 mean is used exactly (its rounding to ``x.dtype`` is folded
        into the offset), so large means stay accurate in float32.
    weight, bias : ndarray ``(C,)`` and ``x.dtype``, optional
    axis : int, default 1
    out : ndarray, optional
        Where to write the result; may be ``x`` itself.

    Returns
    -------
    y : ndarray like ``x`` (``out`` when given)

    Examples
    --------
    >>> count, m, m2 = numbabn.batch_moments(x)
    >>> y = numbabn.batch_norm_elemt(x, m, 1 / np.sqrt(m2 / count + 1e-5))
    """
    be, layout, x, mean, invstd, weight, bias, out = _prepare(
        x, axis, allow_empty_batch=True, half=True, mean=mean, invstd=invstd, weight=weight,
        bias=bias, out=out)
    nfeat, cdt = layout.shape3[1], v.compute_dtype(x.dtype)
    v.check_stat(mean, "mean", nfeat, cdt)
    v.check_stat(invstd, "invstd", nfeat, cdt)
    _check_affine(weight, bias, nfeat, cdt)
    y3, y, finish = _output(be, x, layout, out)
    if layout.count:
        with be.guard(x):
            be.feature_ops.batch_norm_elemt(_view(be, x, layout), mean, invstd, weight, bias, y3)
    if finish:
        finish()
    return y


@half_aware(tensors=("dy",), stats=("mean", "invstd"), results=("f32", "f32"))
def batch_norm_backward_reduce(dy, x, mean, invstd, axis=1):
    """The reduction half of the backward: per-feature float64 sums.

    Parameters
    ----------
    dy, x : ndarray of the same shape and dtype (float32 or float64)
        The batch may be empty (the sums are then 0).
    mean, invstd : ndarray ``(C,)``, ``x.dtype`` or float64
        The statistics the forward normalised with.
    axis : int, default 1

    Returns
    -------
    sum_dy, sum_dy_xmu : ndarray ``(C,)`` float64
        ``sum(dy)`` and ``sum(dy * (x - mean))`` over every axis but ``axis``.
        ``invstd * sum_dy_xmu`` and ``sum_dy`` are this batch's ``dweight``
        and ``dbias``.

    Examples
    --------
    >>> sum_dy, sum_dy_xmu = numbabn.batch_norm_backward_reduce(dy, x, mean, invstd)
    >>> dx = numbabn.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy,
    ...                                        sum_dy_xmu, count=x.size // x.shape[1])
    """
    be, layout, x, dy, mean, invstd = _prepare(
        x, axis, allow_empty_batch=True, dy=dy, mean=mean, invstd=invstd)
    v.check_same_as(dy, "dy", x)
    nfeat = layout.shape3[1]
    v.check_stat(mean, "mean", nfeat, x.dtype)
    v.check_stat(invstd, "invstd", nfeat, x.dtype)
    if layout.count == 0:
        return np.zeros(nfeat), np.zeros(nfeat)
    with be.guard(x):
        return be.feature_ops.batch_norm_backward_reduce(
            _view(be, dy, layout), _view(be, x, layout), mean, invstd)


@half_aware(tensors=("dy",), params=("weight",),
            stats=("mean", "invstd", "sum_dy", "sum_dy_xmu"))
def batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis=1,
                              out=None):
    """The elementwise half of the backward: dx from the (merged) sums.

    ``dx = weight * invstd * (dy - sum_dy / count - (x - mean) * invstd**2 * sum_dy_xmu / count)``

    Parameters
    ----------
    dy, x : ndarray of the same shape and dtype
    mean, invstd : ndarray ``(C,)``, ``x.dtype`` or float64, as in the forward
    weight : ndarray ``(C,)`` and ``x.dtype``, or None
    sum_dy, sum_dy_xmu : ndarray ``(C,)``, float64 (or ``x.dtype``)
        From :func:`batch_norm_backward_reduce`, summed over every part of the
        batch.
    count : int >= 1
        Values per feature in the whole batch (all parts).
    axis : int, default 1
    out : ndarray, optional
        Where to write dx; may be ``dy`` or ``x``.

    Returns
    -------
    dx : ndarray like ``x`` (``out`` when given)
    """
    be, layout, x, dy, mean, invstd, weight, sum_dy, sum_dy_xmu, out = _prepare(
        x, axis, allow_empty_batch=True, dy=dy, mean=mean, invstd=invstd, weight=weight,
        sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, out=out)
    v.check_same_as(dy, "dy", x)
    nfeat = layout.shape3[1]
    v.check_stat(mean, "mean", nfeat, x.dtype)
    v.check_stat(invstd, "invstd", nfeat, x.dtype)
    if weight is not None:
        v.check_vector(weight, "weight", nfeat, x.dtype)
    v.check_stat(sum_dy, "sum_dy", nfeat, x.dtype)
    v.check_stat(sum_dy_xmu, "sum_dy_xmu", nfeat, x.dtype)
    count = v.check_count(count, minimum=1)
    dx3, dx, finish = _output(be, x, layout, out, inputs=(x, dy))
    if layout.count:
        with be.guard(x):
            be.feature_ops.batch_norm_backward_elemt(
                _view(be, dy, layout), _view(be, x, layout), mean, invstd, weight, sum_dy,
                sum_dy_xmu, count, dx3)
    if finish:
        finish()
    return dx

def _check_affine(weight, bias, nfeat, dtype):
    if weight is not None:
        v.check_vector(weight, "weight", nfeat, dtype)
    if bias is not None:
        v.check_vector(bias, "bias", nfeat, dtype)
