"""The two MNIST models of the trainer and their default hyper-parameters.

* ``cnn``: the Keras MNIST example with batch norm,
  Conv2d(1,32,3)-ReLU-BN2d-Conv2d(32,64,3)-ReLU-BN2d-MaxPool2-[Dropout(0.25)]-
  Flatten-Linear(9216,128)-ReLU-BN1d-[Dropout(0.5)]-Linear(128,10); Adam, lr 1e-3
  decayed by 0.7 per epoch, batch 128, training images shifted by up to 2 pixels.
  The two Dropout layers are the Keras example's, at its places; ``dropout=False``
  leaves them out.
* ``mlp``: the network of Figure 1 of Ioffe & Szegedy (2015), three fully
  connected hidden layers of 100 sigmoid units with batch norm before each
  nonlinearity; SGD, batch 60.

Both take ``(N, 1, 28, 28)`` images scaled to [0, 1] and return ``(N, 10)`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kit import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential, Sigmoid
from ..layers import BatchNorm1d, BatchNorm2d, BatchRenorm1d, BatchRenorm2d

NORMS = {"batch": (BatchNorm1d, BatchNorm2d), "renorm": (BatchRenorm1d, BatchRenorm2d)}
"""The normalization layers a model's ``norm`` argument chooses: ``(1d, 2d)``."""


def _norm_layers(norm):
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(NORMS)}.")
    return NORMS[norm]


def mnist_cnn(rng, batch_norm=True, dtype=np.float32, dropout=True, norm="batch"):
    """The ``cnn`` model (with or without its three BatchNorm layers).

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the initial weights and of the dropout masks.
    batch_norm : bool, default True
    dtype : float32 or float64, default float32
    dropout : bool, default True
        Keep the Keras example's Dropout(0.25) after the pooling and Dropout(0.5)
        before the last layer.
    norm : {"batch", "renorm"}, default "batch"
        Batch norm, or batch renormalization (for small batches), in its places.

    Returns
    -------
    Sequential
    """
    BatchNorm1d, BatchNorm2d = _norm_layers(norm)

    def bn(layer):
        return [layer] if batch_norm else []

    def drop(p):
        return [Dropout(p, rng=rng)] if dropout else []

    return Sequential(
        Conv2d(1, 32, 3, dtype=dtype, rng=rng), ReLU(inplace=True),
        *bn(BatchNorm2d(32, dtype=dtype)),
        Conv2d(32, 64, 3, dtype=dtype, rng=rng), ReLU(inplace=True),
        *bn(BatchNorm2d(64, dtype=dtype)),
        MaxPool2d(2), *drop(0.25), Flatten(),
        Linear(9216, 128, dtype=dtype, rng=rng), ReLU(inplace=True),
        *bn(BatchNorm1d(128, dtype=dtype)), *drop(0.5),
        Linear(128, 10, dtype=dtype, rng=rng),
    )


def bn_paper_mlp(rng, batch_norm=True, dtype=np.float32, init_std=None, dropout=False,
                 norm="batch"):
    """The ``mlp`` model of the batch-norm paper's Figure 1.

    ``Flatten - [Linear(.,100) - BN1d - Sigmoid] x 3 - Linear(100, 10)``; without
    batch norm the hidden Linear layers keep their bias, with it the bias is
    dropped (BN's ``bias`` replaces it).

    Parameters
    ----------
    rng : numpy.random.Generator
    batch_norm : bool, default True
    dtype : float32 or float64, default float32
    init_std : float, optional
        Draw every weight from ``N(0, init_std**2)`` ("small random Gaussian
        values", as the paper) instead of PyTorch's default uniform init.
    dropout : bool, default False
        Must be False: the paper's network has no dropout.
    norm : {"batch", "renorm"}, default "batch"

    Returns
    -------
    Sequential
    """
    if dropout:
        raise ValueError("the mlp model (the batch-norm paper's network) has no dropout layers.")
    BatchNorm1d = _norm_layers(norm)[0]
    layers = [Flatten()]
    sizes = [784, 100, 100, 100]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers.append(Linear(fan_in, fan_out, bias=not batch_norm, dtype=dtype, rng=rng))
        if batch_norm:
            layers.append(BatchNorm1d(fan_out, dtype=dtype))
        layers.append(Sigmoid())
    layers.append(Linear(100, 10, dtype=dtype, rng=rng))
    model = Sequential(*layers)
    if init_std is not None:
        for key, p in model.params.items():
            if key.endswith("weight") and p.ndim == 2:
                p[...] = rng.normal(0.0, init_std, size=p.shape)
    return model


@dataclass(frozen=True)
class ModelSpec:
    """A model's builder and its training defaults: optimizer, learning rate and
    its per-epoch decay factor, batch size, dropout, and the random shift (pixels)
    applied to training images."""

    build: object
    optimizer: str
    lr: float
    batch_size: int
    lr_decay: float = 1.0
    dropout: bool = False
    shift: int = 0


MODELS = {
    "cnn": ModelSpec(mnist_cnn, optimizer="adam", lr=1e-3, batch_size=128, lr_decay=0.7,
                     dropout=True, shift=2),
    "mlp": ModelSpec(bn_paper_mlp, optimizer="sgd", lr=0.5, batch_size=60),
}


def build_model(name, rng, batch_norm=True, dtype=np.float32, dropout=None, norm="batch"):
    """Build model ``name`` (a key of :data:`MODELS`) with weights drawn from ``rng``;
    ``dropout=None`` takes the model's default; ``norm`` chooses the normalization
    layers (see :data:`NORMS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    spec = MODELS[name]
    return spec.build(rng, batch_norm=batch_norm, dtype=dtype,
                      dropout=spec.dropout if dropout is None else dropout, norm=norm)
