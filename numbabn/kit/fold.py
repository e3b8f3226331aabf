"""Fold eval-mode batch norm into neighbouring ``Conv2d``/``Linear`` layers for inference.

In eval mode a batch-norm layer is a per-channel affine map
``y = x * s + t`` with ``s = weight / sqrt(running_var + eps)`` and
``t = bias - running_mean * s``.  Where it sits next to a convolution or a
linear layer, the map can be absorbed exactly into that layer's weights:

* **into the preceding layer** (``Conv2d``/``Linear`` directly before the BN):
  ``W'[o] = W[o] * s[o]``, ``b'[o] = b[o] * s[o] + t[o]``;
* **into the following layer** (``Conv2d`` without padding, or ``Linear``,
  possibly after ``Dropout`` and ``Flatten``, which commute with it in eval mode,
  and ``MaxPool2d`` when every ``s > 0``, since a maximum commutes with an
  increasing map): ``W'[:, c] = W[:, c] * s[c]``, ``b' = b + W @ t``.  A padded
  convolution is refused: its zero padding would not go through the map.

Folding happens in float64 and is rounded once to the layers' dtype.
"""

from __future__ import annotations

import copy

import numpy as np

from .activation import Dropout, ReLU
from ..layers.batchnorm import _BatchNorm
from .container import Sequential
from .conv import Conv2d
from .flatten import Flatten
from ..layers.fused import _BatchNormReLU
from .linear import Linear
from .pooling import MaxPool2d

_PASS_THROUGH = (Dropout, Flatten)


def bn_affine(bn):
    """``(s, t)`` in float64: the eval-mode map ``y = x * s + t`` of a batch-norm layer."""
    s = 1.0 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean.astype(np.float64) * s
    if bn.bias is not None:
        t = t + bn.bias
    return s, t


def _set_bias(layer, b):
    if layer.bias is None:
        layer.bias = np.zeros(b.shape, layer.dtype)
        layer.params["bias"] = layer.bias
        layer.grads["bias"] = np.zeros_like(layer.bias)
    layer.bias[...] = b


def _fold_into_previous(layer, s, t):
    """``layer`` (Conv2d or Linear) followed by the map: scale its output channels."""
    w = layer.weight.astype(np.float64)
    b = np.zeros(w.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
    layer.weight[...] = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    _set_bias(layer, b * s + t)


def _fold_into_next(layer, s, t):
    """The map followed by ``layer``: scale its input channels (a Linear after a
    Flatten sees each channel as ``in_features / C`` consecutive features)."""
    w = layer.weight.astype(np.float64)
    b = np.zeros(w.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
    if isinstance(layer, Conv2d):
        layer.weight[...] = w * s[None, :, None, None]
        _set_bias(layer, b + np.einsum("ochw,c->o", w, t))
    else:
        per = w.shape[1] // s.shape[0]
        sf, tf = np.repeat(s, per), np.repeat(t, per)
        layer.weight[...] = w * sf[None, :]
        _set_bias(layer, b + w @ tf)


def _next_target(layers, i, s):
    """The layer after ``layers[i]`` the map can be folded into, or a reason why none."""
    for j in range(i + 1, len(layers)):
        layer = layers[j]
        if isinstance(layer, _PASS_THROUGH):
            continue
        if isinstance(layer, MaxPool2d):
            if np.all(s > 0):
                continue
            return None, f"MaxPool2d ({j}) follows and some scales are not positive"
        if isinstance(layer, Conv2d):
            if any(layer.padding):
                return None, f"the following Conv2d ({j}) pads its input"
            if layer.in_channels != s.shape[0]:
                return None, f"the following Conv2d ({j}) has {layer.in_channels} input channels"
            return j, None
        if isinstance(layer, Linear):
            if layer.in_features % s.shape[0]:
                return None, (f"the following Linear ({j}) has {layer.in_features} inputs, "
                              f"not a multiple of {s.shape[0]} channels")
            return j, None
        return None, f"{type(layer).__name__} ({j}) follows, which does not commute with it"
    return None, "no Conv2d or Linear follows"


def fold_batchnorm(model: Sequential) -> Sequential:
    """An equivalent eval-mode copy of ``model`` with its batch norms folded away.

    Every ``BatchNorm1d/2d/3d`` (and ``BatchRenorm``, whose inference is batch
    norm's) that keeps running statistics is folded into the ``Conv2d``/``Linear``
    directly before it, or else into the next one (see the module docstring); a
    ``BatchNormReLU`` only into the layer before it, leaving a ``ReLU``;
    one that cannot be folded exactly stays, in eval mode.  ``model`` itself is
    not changed.

    Parameters
    ----------
    model : Sequential

    Returns
    -------
    Sequential
        In eval mode; its ``fold_report`` lists, for each batch-norm layer of
        ``model`` (by index), where it was folded or why it was kept.

    Examples
    --------
    >>> fast = fold_batchnorm(model)
    >>> print("\\n".join(fast.fold_report))
    >>> logits = fast.forward(x)       # equals model.eval().forward(x) to rounding
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"fold_batchnorm expects a Sequential; got {type(model).__name__}.")
    layers = [copy.deepcopy(layer) for layer in model.layers]
    keep = [True] * len(layers)
    report = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, _BatchNorm):
            continue
        name = f"{type(layer).__name__} ({i})"
        if not layer.track_running_stats:
            report.append(f"{name}: kept, it has no running statistics (eval uses batch statistics)")
            continue
        s, t = bn_affine(layer)
        prev = next((k for k in range(i - 1, -1, -1) if keep[k]), None)
        if prev is not None and isinstance(layers[prev], (Conv2d, Linear)) and \
                (layers[prev].weight.shape[0] == s.shape[0]):
            _fold_into_previous(layers[prev], s, t)
            where = f"folded into the preceding {type(layers[prev]).__name__} ({prev})"
            if isinstance(layer, _BatchNormReLU):  # its ReLU stays
                layers[i] = ReLU()
                where += ", its ReLU kept"
            else:
                keep[i] = False
            report.append(f"{name}: {where}")
            continue
        if isinstance(layer, _BatchNormReLU):
            report.append(f"{name}: kept, its ReLU comes before any following layer")
            continue
        j, why = _next_target(layers, i, s)
        if j is None:
            report.append(f"{name}: kept, {why}")
            continue
        _fold_into_next(layers[j], s, t)
        keep[i] = False
        report.append(f"{name}: folded into the following {type(layers[j]).__name__} ({j})")
    folded = Sequential(*(layer for layer, k in zip(layers, keep) if k)).eval()
    folded.fold_report = report
    return folded

