"""``Flatten``: merge axes ``start_dim..end_dim`` (PyTorch's element order)."""

from __future__ import annotations

import numpy as np

from ..layers import _check
from ..layers.base import Layer


class Flatten(Layer):
    """Reshape ``(N, C, H, W)`` to ``(N, C * H * W)`` (by default), in C order.

    The element order is that of the logical shape, as ``torch.flatten``, so a
    channels-last input is copied once into ``(C, H, W)`` order; the backward
    returns its gradient in the memory layout of the forward's input (one copy
    back to channels-last), so the layers before it get the layout they wrote.

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
        self._x_axes = None   # the input's axes from the largest stride down, when not C order

    def forward(self, x):
        _check.float_input(x, "Flatten")
        start, end = self.start_dim % x.ndim, self.end_dim % x.ndim
        if start > end:
            raise ValueError(f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim}) "
                             f"is empty for an input with {x.ndim} dimensions.")
        shape = x.shape[:start] + (int(np.prod(x.shape[start:end + 1])),) + x.shape[end + 1:]
        self._x_shape, self._y_shape, self._dtype = x.shape, shape, x.dtype
        self._x_axes = None
        if not x.flags.c_contiguous:
            axes = tuple(int(a) for a in np.argsort([-abs(s) for s in x.strides], kind="stable"))
            if x.transpose(axes).flags.c_contiguous:
                self._x_axes = axes
        return np.reshape(x, shape, order="C")

    def backward(self, dy):
        _check.grad_output(dy, "Flatten", self._y_shape, self._dtype)
        dx = dy.reshape(self._x_shape)
        if self._x_axes is None:
            return dx
        out = np.empty([self._x_shape[a] for a in self._x_axes], dx.dtype)
        np.copyto(out, dx.transpose(self._x_axes))
        return out.transpose(np.argsort(self._x_axes))

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
