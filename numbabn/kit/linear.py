"""``Linear``: ``y = x @ weight.T + bias`` with PyTorch's parameter shapes.

Float32 layers with ``in_features`` a multiple of the tiles' vector width and
at least ``_config.LINEAR_DIRECT_MIN_MACS`` multiply-adds per GEMM run on the
register tiles of :mod:`numbabn.kit._kernels.tiles` on a CPU with AVX-512 or
AVX2 and FMA (16 or 8 floats a vector, as Numba compiles); others call BLAS.
"""

from __future__ import annotations

import numba
import numpy as np

from .. import _config
from ..layers import _check
from ._kernels import tiles as _tiles
from ._init import fan_in_uniform
from ..layers.base import Layer


class Linear(Layer):
    """Fully connected layer on ``(N, in_features)`` inputs.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    dtype : float32 or float64, default float32
    rng : numpy.random.Generator or int, optional
        Source of the initial weights, ``U(-1/sqrt(in_features), 1/sqrt(in_features))``
        as PyTorch's default; pass the model's generator for reproducible runs.

    Attributes
    ----------
    weight : ndarray ``(out_features, in_features)``
    bias : ndarray ``(out_features,)`` or None

    Examples
    --------
    >>> fc = Linear(784, 10, rng=0)
    >>> y = fc.forward(x)            # x: (N, 784) float32 -> y: (N, 10)
    >>> dx = fc.backward(dy)         # fills fc.grads['weight'], fc.grads['bias']
    """

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.in_features = _check.positive_int(in_features, "in_features")
        self.out_features = _check.positive_int(out_features, "out_features")
        self.dtype = _check.float_dtype(dtype)
        gen = _check.rng(rng)
        shape = (self.out_features, self.in_features)
        self.weight = fan_in_uniform(gen, shape, self.in_features, self.dtype)
        self.params = {"weight": self.weight}
        self.bias = None
        if _check.flag(bias, "bias"):
            self.bias = fan_in_uniform(gen, self.out_features, self.in_features, self.dtype)
            self.params["bias"] = self.bias
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x = None

    def _direct(self, n):
        """Whether a batch of ``n`` rows runs on the register tiles."""
        least = _config.LINEAR_DIRECT_MIN_MACS
        return (least is not None and _tiles.DIRECT_CONV_CPU and self.dtype == np.float32
                and self.in_features % _tiles.LANES == 0 and self.weight.flags.c_contiguous
                and n * self.in_features * self.out_features >= least)

    def forward(self, x):
        """Return ``x @ weight.T + bias`` of shape ``(N, out_features)``."""
        _check.layer_input(x, "Linear", self.dtype, (None, self.in_features))
        if self._direct(x.shape[0]):
            x = np.ascontiguousarray(x)
            y = np.empty((x.shape[0], self.out_features), self.dtype)
            bias = self.bias if self.bias is not None else np.zeros(self.out_features, self.dtype)
            _tiles.linear_forward(x, self.weight, bias, self.bias is not None,
                                    _config.LINEAR_K_BLOCK, y, numba.get_num_threads())
        else:
            y = np.matmul(x, self.weight.T)
            if self.bias is not None:
                y += self.bias
        self._x = x
        return y

    def backward(self, dy, input_grad=True):
        """Return ``dy @ weight`` (None when ``input_grad`` is False); fill ``grads``
        with ``dy.T @ x`` and ``dy.sum(0)``."""
        y_shape = None if self._x is None else (self._x.shape[0], self.out_features)
        _check.grad_output(dy, "Linear", y_shape, self.dtype)
        direct = self._direct(dy.shape[0]) and self._x.flags.c_contiguous
        if direct:
            dy = np.ascontiguousarray(dy)
            _tiles.linear_weight_grad(dy, self._x, _config.TILE_CHAIN, self.grads["weight"])
        else:
            np.matmul(dy.T, self._x, out=self.grads["weight"])
        if self.bias is not None:
            np.sum(dy, axis=0, out=self.grads["bias"])
        if not input_grad:
            return None
        if direct:
            dx = np.empty(self._x.shape, self.dtype)
            _tiles.linear_input_grad(dy, self.weight, _config.TILE_CHAIN, dx)
            return dx
        return np.matmul(dy, self.weight)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"
