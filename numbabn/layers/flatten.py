"""``Flatten``: merge axes ``start_dim..end_dim`` (PyTorch's element order)."""

from __future__ import annotations

import numpy as np

from . import _check
from .base import Layer


class Flatten(Layer):
    """Reshape ``(N, C, H, W)`` to ``(N, C * H * W)`` (by default), in C order.

    The element order is that of the logical shape, as ``torch.flatten``, so a
    channels-last input is copied once into ``(C, H, W)`` order.

    Parameters
    ----------
    start_dim : int, default 1
    end_dim : int, default -1

    Examples
    --------
    >>> y = Flatten().forward(x)     # (N, 64, 12, 12) -> (N, 9216)
    """

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim = int(start_dim)
        self.end_dim = int(end_dim)
        self._x_shape = None
        self._y_shape = None
        self._dtype = None

    def forward(self, x):
        _check.float_input(x, "Flatten")
        start, end = self.start_dim % x.ndim, self.end_dim % x.ndim
        if start > end:
            raise ValueError(f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim}) "
                             f"is empty for an input with {x.ndim} dimensions.")
        shape = x.shape[:start] + (int(np.prod(x.shape[start:end + 1])),) + x.shape[end + 1:]
        self._x_shape, self._y_shape, self._dtype = x.shape, shape, x.dtype
        return np.reshape(x, shape, order="C")

    def backward(self, dy):
        _check.grad_output(dy, "Flatten", self._y_shape, self._dtype)
        return dy.reshape(self._x_shape)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
