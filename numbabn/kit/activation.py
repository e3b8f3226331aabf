"""Elementwise layers: ``ReLU``, ``Sigmoid`` and ``Dropout``.

Outputs keep the input's memory layout (NumPy's ``order='K'``), so a
channels-last activation stays channels-last.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .. import _config
from ..layers import _check
from ..layers.base import Layer
from ._kernels import activation as _act
from ._kernels import dropout as _dropout


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
        flat = _flat_views(x, y) if x.size > _config.SERIAL_MAX_ELEMS else None
        if flat is None:  # small (waking the threads costs more) or not dense: NumPy
            np.maximum(x, 0, out=y)
        else:
            _act.relu_forward(*flat)
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
            _act.relu_backward(*flat)
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

    The masks are ``rng.random(x.shape, dtype=x.dtype) >= p``.  For float32
    inputs of at most 4 dimensions, more than ``_config.SERIAL_MAX_ELEMS``
    values, and a PCG64 generator (``default_rng``'s)
    they are drawn by a parallel kernel that reproduces NumPy's stream, jumping
    ahead to each thread's share, and leaves the generator in NumPy's state:
    the same masks, and the same generator state, as NumPy's own draw.  The
    output is C order (as ``x * mask`` with a C-order mask), and the gradient
    takes the input's layout.

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
        self._x_axes = None  # the input's axes by stride, when the fast path changed the layout

    def forward(self, x):
        _check.float_input(x, "Dropout")
        self._x_axes = None
        if not self.training or self.p == 0.0:
            self._saved = np.ones_like(x)
            return x.copy()
        bitgen = self.rng.bit_generator
        if (x.dtype != np.float32 or x.ndim > 4 or x.size <= _config.SERIAL_MAX_ELEMS
                or type(bitgen) is not np.random.PCG64):  # NumPy's draw, the same masks
            keep = self.rng.random(x.shape, dtype=x.dtype) >= self.p
            scale = np.multiply(keep, 1.0 / (1.0 - self.p), dtype=x.dtype)
            self._saved = scale
            return x * scale
        y, scale = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)
        state = bitgen.state
        s, inc = state["state"]["state"], state["state"]["inc"]
        mask64 = (1 << 64) - 1
        # rng.random(dtype=float32) >= p  <=>  (next_uint32() >> 8) * 2**-24 >= float32(p)
        threshold = np.uint32(math.ceil(float(np.float32(self.p)) * 2.0 ** 24))
        as4 = (lambda a: a.reshape((1,) * (4 - a.ndim) + a.shape))  # noqa: E731
        hi, lo, has_u32, uinteger = _dropout.dropout_forward(
            as4(x), np.uint64(s >> 64), np.uint64(s & mask64), np.uint64(inc >> 64),
            np.uint64(inc & mask64), bool(state["has_uint32"]), np.uint64(state["uinteger"]),
            threshold, x.dtype.type(1.0 / (1.0 - self.p)), as4(y), as4(scale), numba.get_num_threads())
        bitgen.state = {"bit_generator": "PCG64", "state": {"state": (int(hi) << 64) | int(lo), "inc": inc},
                        "has_uint32": int(has_u32), "uinteger": int(uinteger)}
        self._saved = scale
        axes = tuple(int(a) for a in np.argsort([-abs(st) for st in x.strides], kind="stable"))
        if not x.flags.c_contiguous and x.transpose(axes).flags.c_contiguous:
            self._x_axes = axes
        return y

    def backward(self, dy):
        """``dy`` times the forward's mask scale, in the memory layout of the
        forward's input (a channels-last activation gets a channels-last gradient)."""
        self._check_backward(dy)
        if self._x_axes is None:
            return dy * self._saved
        axes = self._x_axes
        dx_mem = np.empty([dy.shape[a] for a in axes], dy.dtype)   # dx in memory order
        as4 = (lambda a: a.reshape((1,) * (4 - a.ndim) + a.shape))  # noqa: E731
        _act.scale_into(as4(dy.transpose(axes)), as4(self._saved.transpose(axes)), as4(dx_mem))
        return dx_mem.transpose(np.argsort(axes))

    def extra_repr(self):
        return f"p={self.p}"
