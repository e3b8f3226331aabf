"""``LayerNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d`` and ``RMSNorm``: PyTorch's
layers on :mod:`numbabn.norms`.

The maths lives in :mod:`numbabn.norms`; these classes keep the parameters (and
instance norm's running statistics) and the forward's saved statistics.
Arguments (in PyTorch's order, ``device=`` and ``dtype=`` included), defaults,
parameter and buffer names are PyTorch 2.13's; ``dtype`` defaults to float32.
Inputs may have empty axes, as PyTorch's: the output is empty, the parameter
gradients are zeros and the running statistics are untouched.
``BatchNorm3d`` is in :mod:`numbabn.layers.batchnorm`.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import _validate
from .. import functional as F
from .. import norms as N
from . import _check
from .base import Layer
from .batchnorm import _BatchNorm


def _shape_tuple(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, (tuple, list)) or not normalized_shape:
        raise TypeError(f"normalized_shape must be an int or a non-empty tuple of ints; got "
                        f"{_validate.describe(normalized_shape)}.")
    return tuple(_check.nonnegative_int(n, "normalized_shape") for n in normalized_shape)


class _RowNorm(Layer):
    """Affine parameters and the checks shared by the layers."""

    def _make_params(self, shape, weight, bias):
        if weight:
            self.weight = np.ones(shape, self.dtype)
            self.params["weight"] = self.weight
            self.grads["weight"] = np.zeros(shape, self.dtype)
        if bias:
            self.bias = np.zeros(shape, self.dtype)
            self.params["bias"] = self.bias
            self.grads["bias"] = np.zeros(shape, self.dtype)

    def _check_input(self, x, patterns):
        """``x`` against the first pattern of its ndim (or the first pattern); any
        axis may be empty."""
        ndim = getattr(x, "ndim", None)
        shape = next((s for s in patterns if len(s) == ndim), patterns[0])
        _check.layer_input(x, type(self).__name__, self.dtype, shape, allow_empty=True,
                           half=True)

    def _check_dy(self, dy):
        _check.grad_output(dy, type(self).__name__, self._y_shape, self.dtype)

    def _store_grads(self, dweight, dbias):
        if "weight" in self.grads:
            self.grads["weight"][...] = dweight
        if "bias" in self.grads:
            self.grads["bias"][...] = dbias


class LayerNorm(_RowNorm):
    """Layer normalisation over the trailing ``normalized_shape`` axes.

    Same arguments, attributes and behaviour as ``torch.nn.LayerNorm``.

    Parameters
    ----------
    normalized_shape : int or tuple of ints
        The trailing axes normalised together (one row per leading index).
    eps : float, default 1e-5
        Added to the biased variance.
    elementwise_affine : bool, default True
        Learn ``weight`` (ones) of shape ``normalized_shape``...
    bias : bool, default True
        ...and ``bias`` (zeros), when ``elementwise_affine``.
    device : None or 'cpu'
    dtype : float32 or float64, default float32
        As NumPy (``np.float64``) or PyTorch (``torch.float64``) spells it;
        ``None`` is float32.

    Examples
    --------
    >>> ln = LayerNorm(768)
    >>> y = ln.forward(x)               # x: (batch, tokens, 768) float32
    >>> dx = ln.backward(dy)            # fills ln.grads['weight'], ln.grads['bias']
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=np.float32):
        super().__init__()
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = _validate.check_eps(eps)
        self.elementwise_affine = _check.flag(elementwise_affine, "elementwise_affine")
        self.has_bias = _check.flag(bias, "bias")
        _check.device(device, type(self).__name__)
        self.dtype = _check.float_dtype(dtype, half=True)
        self.weight = self.bias = None
        if self.elementwise_affine:
            self._make_params(self.normalized_shape, True, self.has_bias)
        self._cache = None
        self._y_shape = None

    def forward(self, x):
        """Normalise each leading index of ``x`` over ``normalized_shape``."""
        k = len(self.normalized_shape)
        ndim = max(getattr(x, "ndim", k) or k, k)
        self._check_input(x, [(None,) * (ndim - k) + self.normalized_shape])
        y, mean, rstd = N.layer_norm_train(x, self.normalized_shape, self.weight, self.bias,
                                           self.eps)
        self._cache = (x, mean, rstd)
        self._y_shape = y.shape
        return y

    def backward(self, dy, input_grad=True):
        """Return ``dL/dx`` (None when ``input_grad`` is False); fill the parameters' grads."""
        self._check_dy(dy)
        x, mean, rstd = self._cache
        dx, dweight, dbias = N.layer_norm_backward(dy, x, mean, rstd, self.normalized_shape,
                                                   self.weight, self.elementwise_affine)
        self._store_grads(dweight, dbias)
        return dx if input_grad else None

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.has_bias}")


class RMSNorm(_RowNorm):
    """Root-mean-square normalisation over the trailing ``normalized_shape`` axes:
    ``x / sqrt(mean(x**2) + eps) * weight``.

    Same arguments, attributes and behaviour as ``torch.nn.RMSNorm``.

    Parameters
    ----------
    normalized_shape : int or tuple of ints
    eps : float or None, default None
        ``None`` is ``np.finfo(dtype).eps``, as PyTorch.
    elementwise_affine : bool, default True
        Learn ``weight`` (ones) of shape ``normalized_shape``; there is no bias.
    device : None or 'cpu'
    dtype : float32 or float64, default float32 (see :class:`LayerNorm`)

    Examples
    --------
    >>> rms = RMSNorm(768)
    >>> y = rms.forward(x)
    >>> dx = rms.backward(dy)
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=np.float32):
        super().__init__()
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = None if eps is None else _validate.check_eps(eps)
        self.elementwise_affine = _check.flag(elementwise_affine, "elementwise_affine")
        _check.device(device, type(self).__name__)
        self.dtype = _check.float_dtype(dtype, half=True)
        self.weight = None
        if self.elementwise_affine:
            self._make_params(self.normalized_shape, True, False)
        self._cache = None
        self._y_shape = None

    def forward(self, x):
        k = len(self.normalized_shape)
        ndim = max(getattr(x, "ndim", k) or k, k)
        self._check_input(x, [(None,) * (ndim - k) + self.normalized_shape])
        y, rstd = N.rms_norm_train(x, self.normalized_shape, self.weight, self.eps)
        self._cache = (x, rstd)
        self._y_shape = y.shape
        return y

    def backward(self, dy, input_grad=True):
        self._check_dy(dy)
        x, rstd = self._cache
        dx, dweight = N.rms_norm_backward(dy, x, rstd, self.normalized_shape, self.weight,
                                          self.elementwise_affine)
        self._store_grads(dweight, None)
        return dx if input_grad else None

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class GroupNorm(_RowNorm):
    """Group normalisation of ``(N, C, *)`` inputs: each sample's ``C`` channels
    in ``num_groups`` groups, a per-channel affine.

    Same arguments, attributes and behaviour as ``torch.nn.GroupNorm``.

    Parameters
    ----------
    num_groups : int
        Must divide ``num_channels``.
    num_channels : int
    eps : float, default 1e-5
    affine : bool, default True
        Learn per-channel ``weight`` (ones) and, with ``bias``, ``bias`` (zeros).
    device : None or 'cpu'
    dtype : float32 or float64, default float32 (see :class:`LayerNorm`)
    bias : bool, keyword only, default True

    Examples
    --------
    >>> gn = GroupNorm(32, 256)
    >>> y = gn.forward(x)               # x: (N, 256, H, W), any memory layout
    >>> dx = gn.backward(dy)
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None,
                 dtype=np.float32, *, bias=True):
        super().__init__()
        self.num_groups = _check.positive_int(num_groups, "num_groups")
        self.num_channels = _check.nonnegative_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels ({self.num_channels}) must be divisible by "
                             f"num_groups ({self.num_groups}).")
        self.eps = _validate.check_eps(eps)
        self.affine = _check.flag(affine, "affine")
        self.has_bias = _check.flag(bias, "bias")
        _check.device(device, type(self).__name__)
        self.dtype = _check.float_dtype(dtype, half=True)
        self.weight = self.bias = None
        if self.affine:
            self._make_params((self.num_channels,), True, self.has_bias)
        self._cache = None
        self._y_shape = None

    def forward(self, x):
        ndim = max(getattr(x, "ndim", 2) or 2, 2)
        self._check_input(x, [(None, self.num_channels) + (None,) * (ndim - 2)])
        y, mean, rstd = N.group_norm_train(x, self.num_groups, self.weight, self.bias, self.eps)
        self._cache = (x, mean, rstd)
        self._y_shape = y.shape
        return y

    def backward(self, dy, input_grad=True):
        self._check_dy(dy)
        x, mean, rstd = self._cache
        dx, dweight, dbias = N.group_norm_backward(dy, x, mean, rstd, self.num_groups,
                                                   self.weight, self.affine)
        self._store_grads(dweight, dbias)
        return dx if input_grad else None

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
                f"{'' if self.has_bias else ', bias=False'}")


class _InstanceNorm(_RowNorm):
    _spatial: int = 1

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=np.float32, *, bias=True):
        super().__init__()
        self.num_features = _check.nonnegative_int(num_features, "num_features")
        self.eps = _validate.check_eps(eps)
        self.momentum = None if momentum is None else _validate.check_momentum(momentum)
        self.affine = _check.flag(affine, "affine")
        self.track_running_stats = _check.flag(track_running_stats, "track_running_stats")
        self.has_bias = _check.flag(bias, "bias")
        _check.device(device, type(self).__name__)
        self.dtype = _check.float_dtype(dtype, half=True)
        c = self.num_features
        self.weight = self.bias = None
        if self.affine:
            self._make_params((c,), True, self.has_bias)
        self.running_mean = self.running_var = self.num_batches_tracked = None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, self.dtype)
            self.running_var = np.ones(c, self.dtype)
            # Kept for PyTorch's state_dict keys; PyTorch's instance norm never counts.
            self.num_batches_tracked = np.zeros((), np.int64)
            self.buffers = {"running_mean": self.running_mean, "running_var": self.running_var,
                            "num_batches_tracked": self.num_batches_tracked}
        self._cache = None
        self._y_shape = None

    def _patterns(self):
        spatial = (None,) * self._spatial
        return [(None, self.num_features) + spatial, (self.num_features,) + spatial]

    def forward(self, x):
        """Normalise each (sample, channel) with its own statistics (training mode,
        or ``track_running_stats=False``), else with the running statistics.
        An unbatched input ``(C, *spatial)`` is one sample."""
        self._check_input(x, self._patterns())
        batched = x.ndim == self._spatial + 2
        xb = x if batched else x[None]
        if self.training or not self.track_running_stats:
            momentum = 0.0 if self.momentum is None else self.momentum
            y, mean, rstd = N._instance_norm_train(xb, self.running_mean, self.running_var,
                                                   self.weight, self.bias, momentum, self.eps)
        elif xb.size == 0:  # eval on an empty input (no channels, perhaps)
            y, mean, rstd = np.empty_like(xb), None, None
        else:
            y = F.normalize(xb, self.running_mean, self.running_var, self.weight, self.bias,
                            self.eps)
            mean = rstd = None
        self._cache = (xb, mean, rstd, batched)
        self._y_shape = x.shape
        return y if batched else y[0]

    def backward(self, dy, input_grad=True):
        self._check_dy(dy)
        x, mean, rstd, batched = self._cache
        dyb = dy if batched else dy[None]
        if mean is not None:
            dx, dweight, dbias = N.instance_norm_backward(dyb, x, mean, rstd, self.weight,
                                                          self.affine)
        elif x.size == 0:
            zeros = np.zeros(self.num_features, self.dtype)
            dx, dweight, dbias = np.empty_like(x), zeros, zeros
        else:
            dx, dweight, dbias = self._backward_eval(dyb, x)
        self._store_grads(dweight, dbias)
        if not input_grad:
            return None
        return dx if batched else dx[0]

    # Eval mode with running statistics is batch norm's eval: the same gradient.
    _backward_eval = _BatchNorm._backward_eval

    def extra_repr(self):
        extra = "" if self.has_bias else ", bias=False"
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}{extra}")


class InstanceNorm1d(_InstanceNorm):
    """Instance normalisation of ``(N, C, L)`` (or unbatched ``(C, L)``) inputs:
    each (sample, channel) over ``L``.

    Same arguments, attributes and behaviour as ``torch.nn.InstanceNorm1d``.

    Parameters
    ----------
    num_features : int
        ``C``.
    eps : float, default 1e-5
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running statistics (``None``: 0, as
        PyTorch's instance norm).
    affine : bool, default False
        Learn per-channel ``weight`` (ones) and, with ``bias``, ``bias`` (zeros).
    track_running_stats : bool, default False
        Keep ``running_mean`` and ``running_var`` (unbiased), updated in
        training mode with the mean over samples of the instances' statistics
        and used in eval mode.  An empty input leaves them untouched (PyTorch
        2.13 writes NaN into them for an empty batch).
    device : None or 'cpu'
    dtype : float32 or float64, default float32 (see :class:`LayerNorm`)
    bias : bool, keyword only, default True
        With ``affine``, learn ``bias`` too.

    Examples
    --------
    >>> inorm = InstanceNorm1d(3, affine=True)
    >>> y = inorm.forward(x)            # x: (N, 3, L)
    >>> dx = inorm.backward(dy)
    """

    _spatial = 1


class InstanceNorm2d(_InstanceNorm):
    """Instance normalisation of ``(N, C, H, W)`` (or unbatched ``(C, H, W)``)
    inputs: each (sample, channel) over ``H, W``.

    Same arguments, attributes and behaviour as ``torch.nn.InstanceNorm2d``;
    see :class:`InstanceNorm1d` for the parameters.

    Examples
    --------
    >>> inorm = InstanceNorm2d(16, track_running_stats=True)
    >>> y = inorm.forward(x)            # updates running_mean, running_var
    >>> y_eval = inorm.eval().forward(x)
    """

    _spatial = 2


class InstanceNorm3d(_InstanceNorm):
    """Instance normalisation of ``(N, C, D, H, W)`` (or unbatched ``(C, D, H, W)``)
    inputs: each (sample, channel) over ``D, H, W``.

    Same arguments, attributes and behaviour as ``torch.nn.InstanceNorm3d``;
    see :class:`InstanceNorm1d` for the parameters.

    Examples
    --------
    >>> inorm = InstanceNorm3d(8, affine=True, bias=False)
    >>> y = inorm.forward(x)            # x: (N, 8, D, H, W)
    """

    _spatial = 3
