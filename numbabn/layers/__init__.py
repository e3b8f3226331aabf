"""Neural-network layers with PyTorch's names and semantics, on NumPy arrays.

Every layer has ``forward(x)``, ``backward(dy) -> dx``, ``params`` and ``grads``
(dictionaries with the same keys; ``backward`` overwrites the gradients),
``state_dict()`` / ``load_state_dict()`` and ``train()`` / ``eval()``.  Inputs are
checked once at each layer's boundary.  Image layers take PyTorch's ``(N, C, H, W)``
shapes and work channels-last in memory (see :mod:`numbabn.layers.conv`).
"""

from .activation import Dropout, ReLU, Sigmoid
from .base import Layer
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .container import Sequential
from .conv import Conv2d
from .flatten import Flatten
from .fold import fold_batchnorm
from .fused import BatchNormReLU1d, BatchNormReLU2d
from .linear import Linear
from .norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, LayerNorm, RMSNorm
from .pooling import MaxPool2d
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
    "Linear",
    "Conv2d",
    "ReLU",
    "Sigmoid",
    "MaxPool2d",
    "Flatten",
    "Dropout",
    "Sequential",
    "fold_batchnorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "RMSNorm",
]
