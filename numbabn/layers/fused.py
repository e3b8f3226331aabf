"""``BatchNormReLU1d/2d``: batch norm followed by a ReLU in one pass, for
conv-BN-ReLU models (what cuDNN and oneDNN offer as a fused operation).

Training runs :func:`numbabn.batch_norm_relu_train` (the ReLU applied as the
output is written) and :func:`numbabn.batch_norm_relu_backward` (the ReLU's mask
read from the output inside the batch-norm backward's passes), so the tensor
between the two layers is never written or read.  Eval mode normalises with the
running statistics, then clamps in place.  Same arguments and state as
:class:`numbabn.layers.BatchNorm1d` (``state_dict`` keys included), so a
``BatchNorm2d`` followed by a ``ReLU`` can be swapped for one of these.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .batchnorm import _BatchNorm


class _BatchNormReLU(_BatchNorm):
    def _train_forward(self, x, out):
        return F._batch_norm_train(x, self.weight, self.bias, self.eps, 1, out, relu=True)

    def _train_backward(self, dy, x, y, mean, invstd, out):
        weight = self.weight if self.affine else None
        return F.batch_norm_relu_backward(dy, y, x, mean, invstd, weight, axis=1, out=out)

    def forward(self, x):
        y = super().forward(x)
        if not self._uses_batch_stats():  # eval: normalize, then the ReLU in place
            np.maximum(y, 0, out=y)
            self._eval_output = y
        return y

    def _backward_eval(self, dy, x):
        masked = np.where(self._eval_output > 0, dy, 0).astype(dy.dtype, copy=False)
        return super()._backward_eval(masked, x)


class BatchNormReLU1d(_BatchNormReLU):
    """``relu(BatchNorm1d(x))`` on ``(N, C)`` or ``(N, C, L)`` inputs, fused.

    Examples
    --------
    >>> layer = BatchNormReLU1d(128)
    >>> y = layer.forward(x)           # = ReLU().forward(BatchNorm1d(128).forward(x))
    """

    _ndims = (2, 3)


class BatchNormReLU2d(_BatchNormReLU):
    """``relu(BatchNorm2d(x))`` on ``(N, C, H, W)`` inputs, fused.

    Examples
    --------
    >>> model = Sequential(Conv2d(3, 64, 3, padding=1), BatchNormReLU2d(64), ...)
    """

    _ndims = (4,)
