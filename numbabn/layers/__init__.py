"""The normalization layers, with PyTorch's names and semantics, on NumPy arrays.

Every layer has ``forward(x)``, ``backward(dy) -> dx``, ``params`` and ``grads``
(dictionaries with the same keys; ``backward`` overwrites the gradients),
``state_dict()`` / ``load_state_dict()`` and ``train()`` / ``eval()``.  Inputs are
checked once at each layer's boundary.  :class:`Layer` is the base class the
layer kit (:mod:`numbabn.kit`: convolutions, linear layers, activations,
containers) builds on.
"""

from .base import Layer
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .fused import BatchNormReLU1d, BatchNormReLU2d
from .norms import (GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm,
                    RMSNorm)
from .renorm import BatchRenorm1d, BatchRenorm2d

__all__ = [
    "Layer",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "RMSNorm",
]
