"""Elementwise layers: ``ReLU``, ``Sigmoid`` and ``Dropout``.

Outputs keep the input's memory layout (NumPy's ``order='K'``), so a
channels-last activation stays channels-last.
"""

from __future__ import annotations

import numpy as np

from . import _check, _kernels
from .base import Layer


def _flat_views(*arrays):
    """1-D views of arrays with the same shape and strides that cover their
    memory without gaps (in any axis order), so an elementwise kernel can walk
    them flat in memory order; None when they cannot."""
    first = arrays[0]
    if any(a.strides != first.strides or a.shape != first.shape for a in arrays[1:]):
        return None
    order = np.argsort([-abs(s) for s in first.strides], kind="stable")
    if not first.transpose(order).flags.c_contiguous:
        return None
    return [a.transpose(order).reshape(-1) for a in arrays]


class _Elementwise(Layer):
    """Shared input checks; subclasses set ``self._saved`` (array saved for backward)."""

    def __init__(self):
        super().__init__()
        self._saved = None

    def _check_backward(self, dy):
        saved = self._saved
        _check.grad_output(dy, type(self).__name__, None if saved is None else saved.shape,
                           None if saved is None else saved.dtype)


class ReLU(_Elementwise):
    """``max(x, 0)`` elementwise.

    Parameters
    ----------
    inplace : bool, default False
        Overwrite the input with the output (saves a buffer; the input must not
        be needed elsewhere).

    Examples
    --------
    >>> relu = ReLU()
    >>> y = relu.forward(x)
    >>> dx = relu.backward(dy)       # dy where y > 0, else 0
    """

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = _check.flag(inplace, "inplace")

    def forward(self, x):
        _check.float_input(x, "ReLU")
        y = x if self.inplace else np.empty_like(x)
        flat = _flat_views(x, y)
        if flat is None:
            np.maximum(x, 0, out=y)
        else:
            _kernels.relu_forward(*flat)
        self._saved = y
        return y

    def backward(self, dy):
        """``dy`` where the output is positive, else 0 (also where ``dy`` is NaN or
        inf, as PyTorch's ``threshold_backward``)."""
        self._check_backward(dy)
        y = self._saved
        dx = np.empty_like(y)
        flat = _flat_views(dy, y, dx)
        if flat is None:
            np.copyto(dx, np.where(y > 0, dy, 0))
        else:
            _kernels.relu_backward(*flat)
        return dx

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class Sigmoid(_Elementwise):
    """``1 / (1 + exp(-x))`` elementwise, from ``e = exp(-|x|)`` as ``1 / (1 + e)``
    or ``e / (1 + e)``: no overflow, and full relative accuracy in both tails.

    Examples
    --------
    >>> y = Sigmoid().forward(x)
    """

    def forward(self, x):
        _check.float_input(x, "Sigmoid")
        e = np.exp(-np.abs(x))
        y = np.where(x >= 0, 1.0, e)
        y /= 1.0 + e
        self._saved = y
        return y

    def backward(self, dy):
        self._check_backward(dy)
        y = self._saved
        return dy * y * (1 - y)


class Dropout(_Elementwise):
    """Zero each value with probability ``p`` in training mode, scaling the rest
    by ``1 / (1 - p)``; the identity in eval mode (as PyTorch).

    Each forward draws one 64-bit seed from ``rng``; the mask comes from a
    counter-based stream (SplitMix64) over the values in memory order, made in
    parallel and independent of the thread count.

    Parameters
    ----------
    p : float in [0, 1), default 0.5
    rng : numpy.random.Generator or int, optional
        Source of the masks; pass the model's generator for reproducible runs.

    Examples
    --------
    >>> drop = Dropout(0.25, rng=np.random.default_rng(0))
    >>> y = drop.forward(x)
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        self.p = _check.probability(p, "p")
        self.rng = _check.rng(rng)

    def forward(self, x):
        _check.float_input(x, "Dropout")
        if not self.training or self.p == 0.0:
            self._saved = np.ones_like(x)
            return x.copy()
        y, scale = np.empty_like(x), np.empty_like(x)
        flat = _flat_views(x, y, scale)
        if flat is None:  # not dense (or odd strides): C order
            x = np.ascontiguousarray(x)
            y, scale = np.empty_like(x), np.empty_like(x)
            flat = _flat_views(x, y, scale)
        seed = self.rng.integers(2 ** 64, dtype=np.uint64)
        threshold = np.uint64(round(self.p * 2.0 ** 32))
        factor = x.dtype.type(1.0 / (1.0 - self.p))
        _kernels.dropout_forward(flat[0], seed, threshold, factor, flat[1], flat[2])
        self._saved = scale
        return y

    def backward(self, dy):
        self._check_backward(dy)
        return dy * self._saved

    def extra_repr(self):
        return f"p={self.p}"
