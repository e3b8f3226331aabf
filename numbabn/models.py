"""The two MNIST models of the trainer and their default hyper-parameters.

* ``cnn``: the Keras MNIST example with batch norm,
  Conv2d(1,32,3)-ReLU-BN2d-Conv2d(32,64,3)-ReLU-BN2d-MaxPool2-Flatten-
  Linear(9216,128)-ReLU-BN1d-Linear(128,10); Adam, lr 1e-3, batch 128.
* ``mlp``: the network of Figure 1 of Ioffe & Szegedy (2015), three fully
  connected hidden layers of 100 sigmoid units with batch norm before each
  nonlinearity; SGD, batch 60.

Both take ``(N, 1, 28, 28)`` images scaled to [0, 1] and return ``(N, 10)`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import (BatchNorm1d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU,
                     Sequential, Sigmoid)


def mnist_cnn(rng, batch_norm=True, dtype=np.float32):
    """The ``cnn`` model (with or without its three BatchNorm layers).

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the initial weights.
    batch_norm : bool, default True
    dtype : float32 or float64, default float32

    Returns
    -------
    Sequential
    """
    def bn(layer):
        return [layer] if batch_norm else []

    return Sequential(
        Conv2d(1, 32, 3, dtype=dtype, rng=rng), ReLU(inplace=True),
        *bn(BatchNorm2d(32, dtype=dtype)),
        Conv2d(32, 64, 3, dtype=dtype, rng=rng), ReLU(inplace=True),
        *bn(BatchNorm2d(64, dtype=dtype)),
        MaxPool2d(2), Flatten(),
        Linear(9216, 128, dtype=dtype, rng=rng), ReLU(inplace=True),
        *bn(BatchNorm1d(128, dtype=dtype)),
        Linear(128, 10, dtype=dtype, rng=rng),
    )


def bn_paper_mlp(rng, batch_norm=True, dtype=np.float32, init_std=None):
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

    Returns
    -------
    Sequential
    """
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
    """A model's builder and its default optimizer, learning rate and batch size."""

    build: object
    optimizer: str
    lr: float
    batch_size: int


MODELS = {
    "cnn": ModelSpec(mnist_cnn, optimizer="adam", lr=1e-3, batch_size=128),
    "mlp": ModelSpec(bn_paper_mlp, optimizer="sgd", lr=0.5, batch_size=60),
}


def build_model(name, rng, batch_norm=True, dtype=np.float32):
    """Build model ``name`` (a key of :data:`MODELS`) with weights drawn from ``rng``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    return MODELS[name].build(rng, batch_norm=batch_norm, dtype=dtype)
