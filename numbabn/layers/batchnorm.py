"""``BatchNorm1d`` and ``BatchNorm2d``: PyTorch's layers on numbabn's functional API.

The maths lives in :mod:`numbabn.functional`; these classes keep the state
(affine parameters, running statistics, ``num_batches_tracked``) and choose
between batch and running statistics.  Conventions are those of the README's
"Conventions" section: ``momentum`` is the weight of the new batch, the running
variance is unbiased, ``eps`` is added to the variance.
"""

from __future__ import annotations

import numpy as np

from .. import _validate
from .. import functional as F
from . import _check
from .base import Layer


class _BatchNorm(Layer):
    _ndims: tuple = ()
    _shape_names: str = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32):
        super().__init__()
        self.num_features = _check.positive_int(num_features, "num_features")
        self.eps = _validate.check_eps(eps)
        self.momentum = None if momentum is None else _validate.check_momentum(momentum)
        self.affine = _check.flag(affine, "affine")
        self.track_running_stats = _check.flag(track_running_stats, "track_running_stats")
        self.dtype = _check.float_dtype(dtype)
        c = self.num_features
        self.weight = self.bias = None
        if self.affine:
            self.weight = np.ones(c, self.dtype)
            self.bias = np.zeros(c, self.dtype)
            self.params = {"weight": self.weight, "bias": self.bias}
            self.grads = {"weight": np.zeros(c, self.dtype), "bias": np.zeros(c, self.dtype)}
        self.running_mean = self.running_var = self.num_batches_tracked = None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, self.dtype)
            self.running_var = np.ones(c, self.dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
            self.buffers = {
                "running_mean": self.running_mean,
                "running_var": self.running_var,
                "num_batches_tracked": self.num_batches_tracked,
            }
        self._cache = None

    def _check_input(self, x):
        name = type(self).__name__
        ndim = getattr(x, "ndim", None)
        shape = next((s for s in self._patterns() if len(s) == ndim), self._patterns()[0])
        _check.layer_input(x, name, self.dtype, shape)

    def _patterns(self):
        return [(None, self.num_features) + (None,) * (n - 2) for n in self._ndims]

    def forward(self, x):
        """Normalise ``x`` over every axis except axis 1 (the features).

        Training mode (or ``track_running_stats=False``) uses the batch's
        statistics and, when tracking, updates the running statistics; eval
        mode uses the running statistics.
        """
        self._check_input(x)
        if self.training or not self.track_running_stats:
            y, mean, invstd, var = F._batch_norm_train(x, self.weight, self.bias, self.eps, 1, None)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, x.size // self.num_features)
            self._cache = (x, mean, invstd, y.shape)
        else:
            y = F.normalize(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
            self._cache = (x, None, None, y.shape)
        return y

    def _update_running_stats(self, mean, var, count):
        """``var``: the biased batch variance in float64, straight from the kernel."""
        self.num_batches_tracked += 1
        if self.momentum is None:  # cumulative moving average, as PyTorch
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        F.update_running_stats(self.running_mean, self.running_var, mean, var, count, factor)

    def backward(self, dy, input_grad=True):
        """Return ``dL/dx`` (None when ``input_grad`` is False); fill
        ``grads['weight']`` and ``grads['bias']`` when affine."""
        x, mean, invstd, y_shape = self._cache or (None, None, None, None)
        _check.grad_output(dy, type(self).__name__, y_shape, self.dtype)
        if mean is not None:
            dx, dweight, dbias = F.batch_norm_backward(dy, x, mean, invstd, self.weight)
        else:
            dx, dweight, dbias = self._backward_eval(dy, x)
        if self.affine:
            self.grads["weight"][...] = dweight
            self.grads["bias"][...] = dbias
        return dx if input_grad else None

    def _backward_eval(self, dy, x):
        """Gradient through ``(x - running_mean) * invstd * weight + bias`` (constants)."""
        zeros = np.zeros(self.num_features, self.dtype)
        dx = F.normalize(dy, zeros, self.running_var, self.weight, None, self.eps)
        if not self.affine:
            return dx, None, None
        axes = tuple(a for a in range(x.ndim) if a != 1)
        xhat = F.normalize(x, self.running_mean, self.running_var, None, None, self.eps)
        dweight = np.sum(dy * xhat, axis=axes, dtype=np.float64).astype(self.dtype)
        dbias = np.sum(dy, axis=axes, dtype=np.float64).astype(self.dtype)
        return dx, dweight, dbias

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of ``(N, C)`` or ``(N, C, L)`` inputs over all axes but ``C``.

    Same arguments, attributes and behaviour as ``torch.nn.BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        ``C``, the number of features.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running statistics; ``None`` gives the
        cumulative average (factor ``1 / num_batches_tracked``).
    affine : bool, default True
        Learn a per-feature ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean`` (zeros), ``running_var`` (ones, unbiased) and
        ``num_batches_tracked``, used in eval mode.  Without them, batch
        statistics are used in both modes.
    dtype : float32 or float64, default float32
        Dtype of the parameters, the statistics and the accepted inputs.

    Examples
    --------
    >>> bn = BatchNorm1d(3)
    >>> y = bn.forward(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32))
    >>> dx = bn.backward(np.ones_like(y))
    >>> y_eval = bn.eval().forward(x)     # uses running_mean and running_var
    """

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of ``(N, C, H, W)`` inputs per channel ``C``.

    Same arguments, attributes and behaviour as ``torch.nn.BatchNorm2d``; see
    :class:`BatchNorm1d` for the parameters.  Any memory layout is accepted (a
    channels-last array viewed as NCHW keeps its layout in the output).

    Examples
    --------
    >>> bn = BatchNorm2d(16)
    >>> y = bn.forward(x)            # x: (N, 16, H, W) float32
    >>> dx = bn.backward(dy)
    """

    _ndims = (4,)
