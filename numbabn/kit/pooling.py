"""``MaxPool2d`` on channels-last memory (see :mod:`numbabn.kit.conv`)."""

from __future__ import annotations

import numpy as np

from ..layers import _check
from ..layers.base import Layer
from ._kernels import pooling as _pool
from .conv import channels_last


class MaxPool2d(Layer):
    """Max pooling over ``kh x kw`` windows of ``(N, C, H, W)`` inputs.

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size`` (as PyTorch).
    padding : int or (int, int), default 0
        Implicit ``-inf`` padding on each side; at most half the kernel size.

    Notes
    -----
    The gradient of each window goes to its first maximum (PyTorch's rule for
    ties).  Output shape ``(H + 2 * padding - kh) // stride + 1``; the output
    is channels-last in memory with the logical shape ``(N, C, out_h, out_w)``.

    Examples
    --------
    >>> pool = MaxPool2d(2)
    >>> y = pool.forward(x)          # (N, C, 24, 24) -> (N, C, 12, 12)
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _check.pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _check.pair(stride, "stride")
        self.padding = _check.pair(padding, "padding", _check.nonnegative_int)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(
                f"MaxPool2d padding must be at most half the kernel size; got padding "
                f"{self.padding} for kernel_size {self.kernel_size}."
            )
        self._cache = None

    def forward(self, x):
        """Return the window maxima, shape ``(N, C, out_h, out_w)``."""
        _check.float_input(x, "MaxPool2d", ndim=4)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n_img, chans, height, width = x.shape
        out_h = (height + 2 * ph - kh) // sh + 1
        out_w = (width + 2 * pw - kw) // sw + 1
        if out_h < 1 or out_w < 1:
            raise ValueError(f"MaxPool2d input of shape {tuple(x.shape)} is smaller than the kernel "
                             f"{self.kernel_size} even with padding {self.padding}.")
        x_nhwc = channels_last(x)
        y = np.empty((n_img, out_h, out_w, chans), x.dtype)
        argmax = np.empty(y.shape, np.int32)
        _pool.max_pool(x_nhwc, kh, kw, sh, sw, ph, pw, y, argmax)
        self._cache = (argmax, x_nhwc.shape, x.dtype)
        return y.transpose(0, 3, 1, 2)

    def backward(self, dy):
        """Return ``dL/dx``: each ``dy`` entry added at its window's maximum."""
        argmax, x_shape, dtype = self._cache or (None, None, None)
        y_shape = None if argmax is None else (argmax.shape[0], argmax.shape[3]) + argmax.shape[1:3]
        _check.grad_output(dy, "MaxPool2d", y_shape, dtype)
        dx = np.empty(x_shape, dtype)
        if self.stride == self.kernel_size and self.padding == (0, 0):
            _pool.max_pool_backward_tiled(dy.transpose(0, 2, 3, 1), argmax, *self.kernel_size, dx)
        else:
            _pool.max_pool_backward(dy.transpose(0, 2, 3, 1), argmax, dx)
        return dx.transpose(0, 3, 1, 2)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
