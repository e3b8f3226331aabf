"""The layer kit: what a small network needs around numbabn's normalization
layers, with PyTorch's names and semantics, on NumPy arrays.

Layers (:class:`numbabn.layers.Layer` subclasses): :class:`Conv2d`,
:class:`Linear`, :class:`MaxPool2d`, :class:`ReLU`, :class:`Sigmoid`,
:class:`Dropout`, :class:`Flatten`, :class:`Sequential`, and
:func:`fold_batchnorm` for inference.  Optimizers are in :mod:`numbabn.kit.optim`
(``SGD``, ``Adam``), losses in :mod:`numbabn.kit.losses`.  Image layers take
PyTorch's ``(N, C, H, W)`` shapes and work channels-last in memory (see
:mod:`numbabn.kit.conv`).
"""

from .activation import Dropout, ReLU, Sigmoid
from .container import Sequential
from .conv import Conv2d
from .flatten import Flatten
from .fold import fold_batchnorm
from .linear import Linear
from .pooling import MaxPool2d

__all__ = [
    "Linear",
    "Conv2d",
    "ReLU",
    "Sigmoid",
    "MaxPool2d",
    "Flatten",
    "Dropout",
    "Sequential",
    "fold_batchnorm",
]
