"""Batch renormalization (Ioffe, 2017): batch norm that stays correct for small
or non-i.i.d. batches, on the split primitives of :mod:`numbabn.functional`.

In training, with the batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)``
and the moving ones *before* this step's update, ``mu`` and
``sigma = sqrt(running_var + eps)``::

    r = clip(sigma_B / sigma, rmin, rmax)        (treated as constants:
    d = clip((mu_B - mu) / sigma, -dmax, dmax)    no gradient flows through them)
    y = ((x - mu_B) / sigma_B * r + d) * weight + bias

then the running statistics are updated as batch norm's.  Inference is batch
norm's (the running statistics).  With ``r = 1, d = 0`` (``rmax = 1, dmax = 0``)
this is batch norm.  Clipping follows Keras' ``renorm_clipping``: a dict with
keys ``rmax``, ``rmin`` (default ``1 / rmax``) and ``dmax``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import functional as F
from .._validate import describe
from .batchnorm import _BatchNorm


def _clipping(renorm_clipping):
    """``(rmin, rmax, dmax)`` from a Keras-style dict."""
    clip = dict(rmax=3.0, dmax=5.0) if renorm_clipping is None else renorm_clipping
    if not hasattr(clip, "keys") or set(clip) - {"rmax", "rmin", "dmax"}:
        raise ValueError(f"renorm_clipping must be a dict with keys among 'rmax', 'rmin', "
                         f"'dmax'; got {describe(clip)}.")
    values = {}
    for key, value in clip.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise TypeError(f"renorm_clipping[{key!r}] must be a number; got {describe(value)}.")
        values[key] = float(value)
    rmax = values.get("rmax", math.inf)
    rmin = values.get("rmin", 1.0 / rmax if rmax > 0 else 0.0)
    dmax = values.get("dmax", math.inf)
    if not (0.0 < rmin <= 1.0 <= rmax) or dmax < 0.0:
        raise ValueError(f"renorm_clipping needs 0 < rmin <= 1 <= rmax and dmax >= 0; got "
                         f"rmin={rmin}, rmax={rmax}, dmax={dmax}.")
    return rmin, rmax, dmax


class _BatchRenorm(_BatchNorm):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, device=None,
                 dtype=np.float32, *, bias=True, renorm_clipping=None):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)
        self.rmin, self.rmax, self.dmax = _clipping(renorm_clipping)
        self._corrections = None

    def _train_forward(self, x, out):
        count, mean, m2 = F.batch_moments(x, axis=1)
        var = m2 / count
        sigma_b = np.sqrt(var + self.eps)
        sigma = np.sqrt(self.running_var.astype(np.float64) + self.eps)
        # (training only: renorm always keeps running statistics, so eval never
        # uses batch statistics)
        r = np.clip(sigma_b / sigma, self.rmin, self.rmax)
        d = np.clip((mean - self.running_mean) / sigma, -self.dmax, self.dmax)
        w = np.ones_like(mean) if self.weight is None else self.weight.astype(np.float64)
        b = np.zeros_like(mean) if self.bias is None else self.bias.astype(np.float64)
        # y = (x - mean) * (invstd * r) * w + (d * w + b)
        invstd = 1.0 / sigma_b
        coef = self._coef_dtype()
        y = F.batch_norm_elemt(x, mean, invstd * r, w.astype(coef), (d * w + b).astype(coef),
                               axis=1, out=out)
        self._corrections = (r, d)
        return y, mean.astype(self.dtype), invstd.astype(self.dtype), var

    def _coef_dtype(self):
        """The dtype of the corrected weight and bias passed to the kernels: the
        layer's, or float32 for a half layer (no rounding of ``weight * r`` to
        8 or 11 bits)."""
        return self.dtype if self.dtype.itemsize > 2 else np.dtype(np.float32)

    def _train_backward(self, dy, x, y, mean, invstd, out):
        # r and d are constants: dx is batch norm's with weight * r, and
        # dweight = sum(dy * (xhat * r + d)) = r * sum(dy * xhat) + d * sum(dy).
        r, d = self._corrections
        w = np.ones(self.num_features) if self.weight is None else self.weight.astype(np.float64)
        dx, dxhat_sum, dbias = F.batch_norm_backward(dy, x, mean, invstd,
                                                     (w * r).astype(self._coef_dtype()),
                                                     axis=1, out=out)
        return dx, r * dxhat_sum + d * dbias, dbias

    def extra_repr(self):
        return (super().extra_repr() +
                f", renorm_clipping={{'rmin': {self.rmin}, 'rmax': {self.rmax}, 'dmax': {self.dmax}}}")


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization of ``(N, C)`` or ``(N, C, L)`` inputs.

    Parameters are :class:`numbabn.layers.BatchNorm1d`'s (running statistics are
    always tracked: renormalization corrects towards them), plus
    ``renorm_clipping``: ``{'rmax': 3.0, 'dmax': 5.0}`` by default (the paper's
    final values; ``rmin`` defaults to ``1 / rmax``).

    Examples
    --------
    >>> bn = BatchRenorm1d(64, renorm_clipping={"rmax": 3.0, "dmax": 5.0})
    >>> y = bn.forward(x)          # x: (N, 64) float32, N may be small
    """

    _ndims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization of ``(N, C, H, W)`` inputs; see :class:`BatchRenorm1d`."""

    _ndims = (4,)
