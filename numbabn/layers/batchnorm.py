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
                 track_running_stats=True, device=None, dtype=np.float32, *, bias=True,
                 virtual_batch_size=None):
        super().__init__()
        self.num_features = _check.positive_int(num_features, "num_features")
        self.eps = _validate.check_eps(eps)
        self.momentum = None if momentum is None else _validate.check_momentum(momentum)
        self.affine = _check.flag(affine, "affine")
        self.track_running_stats = _check.flag(track_running_stats, "track_running_stats")
        if device not in (None, "cpu"):
            raise ValueError(f"numbabn layers run on the CPU: device must be None or 'cpu'; "
                             f"got {device!r}.")
        self.dtype = _check.float_dtype(dtype, half=True)
        self.has_bias = _check.flag(bias, "bias")
        self.virtual_batch_size = (None if virtual_batch_size is None else
                                   _check.positive_int(virtual_batch_size, "virtual_batch_size"))
        c = self.num_features
        self.weight = self.bias = None
        if self.affine:
            self.weight = np.ones(c, self.dtype)
            self.params["weight"] = self.weight
            self.grads["weight"] = np.zeros(c, self.dtype)
            if self.has_bias:
                self.bias = np.zeros(c, self.dtype)
                self.params["bias"] = self.bias
                self.grads["bias"] = np.zeros(c, self.dtype)
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
        _check.layer_input(x, name, self.dtype, shape, allow_empty_batch=True, half=True)

    def _patterns(self):
        return [(None, self.num_features) + (None,) * (n - 2) for n in self._ndims]

    def _uses_batch_stats(self):
        return self.training or not self.track_running_stats

    def forward(self, x):
        """Normalise ``x`` over every axis except axis 1 (the features).

        Training mode (or ``track_running_stats=False``) uses the batch's
        statistics and, when tracking, updates the running statistics; eval
        mode uses the running statistics.  An empty batch (0 samples) gives an
        empty output and, in training, only counts the step (as PyTorch).
        With ``virtual_batch_size``, training normalises each ghost batch of
        that many samples with its own statistics (Keras' semantics).
        """
        self._check_input(x)
        if not self._uses_batch_stats():
            y = F.normalize(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.eps, axis=1)
            self._cache = ("eval", x, None, y.shape)
            return y
        ghosts = self._ghost_slices(x.shape[0])
        if ghosts:  # refuse a batch too small to train on before anything changes
            per_sample = x.size // (x.shape[0] * self.num_features)
            samples = x[ghosts[0]].shape[0]
            _validate.check_training_count(samples * per_sample, x[ghosts[0]].shape, 1)
        if not ghosts:  # an empty batch: only counted, as PyTorch does
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
            self._cache = ("empty", x, None, x.shape)
            return np.empty_like(x)
        y = np.empty_like(x) if len(ghosts) > 1 else None
        saved, means, variances = [], [], []
        for sl in ghosts:
            yg, mean, invstd, var = self._train_forward(x[sl], None if y is None else y[sl])
            y = yg if y is None else y
            saved.append((sl, yg, mean, invstd))
            means.append(mean)
            variances.append(var)
        if self.training and self.track_running_stats:
            count = x[ghosts[0]].size // self.num_features
            self._update_running_stats(np.mean(np.asarray(means, np.float64), axis=0),
                                       np.mean(np.asarray(variances, np.float64), axis=0), count)
        self._cache = ("train", x, saved, y.shape)
        return y

    def _ghost_slices(self, n):
        """Slices of the batch axis normalised together: the whole batch, or ghost
        batches of ``virtual_batch_size`` samples in training (checked to divide
        the batch, as Keras does, before anything changes)."""
        if n == 0:
            return []
        v = self.virtual_batch_size
        if v is None or not self.training or v == n:
            return [slice(None)]
        if n % v:
            raise ValueError(
                f"{type(self).__name__}: virtual_batch_size={v} must divide the batch size; "
                f"got a batch of {n} samples. Use a batch size that is a multiple of {v}.")
        return [slice(i, i + v) for i in range(0, n, v)]

    def _train_forward(self, x, out):
        """Batch-statistics forward of one (ghost) batch: ``(y, mean, invstd, var)``
        with ``var`` the biased batch variance in float64 (for the running statistics)."""
        return F._batch_norm_train(x, self.weight, self.bias, self.eps, 1, out)

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
        mode, x, saved, y_shape = self._cache or (None, None, None, None)
        _check.grad_output(dy, type(self).__name__, y_shape, self.dtype)
        if mode == "eval":
            dx, dweight, dbias = self._backward_eval(dy, x)
        elif mode == "empty":
            zeros = np.zeros(self.num_features, self.dtype)
            dx, dweight, dbias = np.empty_like(x), zeros, zeros
        else:
            dx = np.empty_like(x) if len(saved) > 1 else None
            dweight = np.zeros(self.num_features, np.float64)
            dbias = np.zeros(self.num_features, np.float64)
            for sl, yg, mean, invstd in saved:
                dxg, dw, db = self._train_backward(dy[sl], x[sl], yg, mean, invstd,
                                                   None if dx is None else dx[sl])
                dx = dxg if dx is None else dx
                if self.affine:
                    dweight += dw
                    dbias += db
        if self.affine:
            self.grads["weight"][...] = dweight
            if self.has_bias:
                self.grads["bias"][...] = dbias
        return dx if input_grad else None

    def _train_backward(self, dy, x, y, mean, invstd, out):
        """Gradients of one (ghost) batch; ``y`` is its forward output."""
        weight = self.weight if self.affine else None
        return F.batch_norm_backward(dy, x, mean, invstd, weight, axis=1, out=out)

    def _backward_eval(self, dy, x):
        """Gradient through ``(x - running_mean) * invstd * weight + bias`` (constants)."""
        zeros = np.zeros(self.num_features, self.dtype)
        dx = F.normalize(dy, zeros, self.running_var, self.weight, None, self.eps)
        if not self.affine:
            return dx, None, None
        axes = tuple(a for a in range(x.ndim) if a != 1)
        xhat = F.normalize(x, self.running_mean, self.running_var, None, None, self.eps)
        dy64 = dy.astype(np.float64)  # half types have no fast NumPy arithmetic
        dweight = np.sum(dy64 * xhat.astype(np.float64), axis=axes).astype(self.dtype)
        dbias = np.sum(dy64, axis=axes).astype(self.dtype)
        return dx, dweight, dbias

    def extra_repr(self):
        extra = "" if self.has_bias else ", bias=False"
        if self.virtual_batch_size is not None:
            extra += f", virtual_batch_size={self.virtual_batch_size}"
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}{extra}")


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


class BatchNorm3d(_BatchNorm):
    """Batch normalisation of ``(N, C, D, H, W)`` inputs per channel ``C``.

    Same arguments, attributes and behaviour as ``torch.nn.BatchNorm3d``; see
    :class:`BatchNorm1d` for the parameters.
    """

    _ndims = (5,)
