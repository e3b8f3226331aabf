"""The two MNIST models of the trainer and their default hyper-parameters.

* ``cnn``: the Keras MNIST example with batch norm,
  Conv2d(1,32,3)-ReLU-BN2d-Conv2d(32,64,3)-ReLU-BN2d-MaxPool2-[Dropout(0.25)]-
  Flatten-Linear(9216,128)-ReLU-BN1d-[Dropout(0.5)]-Linear(128,10); Adam, lr 1e-3
  decayed by 0.7 per epoch, batch 128, training images shifted by up to 2 pixels.
  The two Dropout layers are the Keras example's, at its places; ``dropout=False``
  leaves them out.
* ``mlp``: the network of Figure 1 of Ioffe & Szegedy (2015), three fully
  connected hidden layers of 100 sigmoid units with batch norm before each
  nonlinearity; SGD, batch 60.  ``activation="relu"`` and ``dropout=True`` (a
  Dropout(0.2) after each hidden nonlinearity) are variants for
  :mod:`numbabn.mnist.claims`.

In the batch-norm places either model takes batch norm (with optional ghost
batches, ``virtual_batch_size``), batch renormalization or group norm
(:data:`NORMS`).

Both take ``(N, 1, 28, 28)`` images scaled to [0, 1] and return ``(N, 10)`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ..kit import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential, Sigmoid
from ..layers import BatchNorm1d, BatchNorm2d, BatchRenorm1d, BatchRenorm2d, GroupNorm

GROUPS = 4
"""Groups of the ``group`` norm: a quarter of the channels (features) in each."""

MLP_DROPOUT = 0.2
"""Dropout rate after each hidden nonlinearity of the ``mlp`` with ``dropout=True``."""


def _group_norm(num_channels, dtype=np.float32):
    return GroupNorm(GROUPS, num_channels, dtype=dtype)


NORMS = {"batch": (BatchNorm1d, BatchNorm2d), "renorm": (BatchRenorm1d, BatchRenorm2d),
         "group": (_group_norm, _group_norm)}
"""The normalization layers a model's ``norm`` argument chooses: ``(1d, 2d)``, each
called as ``make(num_features, dtype=dtype)``; ``group`` is :class:`GroupNorm`
with :data:`GROUPS` groups (per sample, so independent of the batch)."""

ACTIVATIONS = {"sigmoid": Sigmoid, "relu": ReLU}
"""The ``mlp``'s hidden nonlinearities."""


def _norm_layers(norm, virtual_batch_size=None):
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(NORMS)}.")
    if virtual_batch_size is None:
        return NORMS[norm]
    if norm != "batch":
        raise ValueError(f"virtual_batch_size (ghost batches) needs norm='batch'; got norm={norm!r}.")
    return tuple(partial(cls, virtual_batch_size=virtual_batch_size) for cls in NORMS[norm])


def mnist_cnn(rng, batch_norm=True, dtype=np.float32, dropout=True, norm="batch",
              virtual_batch_size=None):
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
    norm : {"batch", "renorm", "group"}, default "batch"
        Batch norm, batch renormalization (for small batches) or group norm
        (:data:`GROUPS` groups), in its places.
    virtual_batch_size : int, optional
        With ``norm="batch"``: normalise ghost batches of this many samples in
        training (it must divide every training batch).

    Returns
    -------
    Sequential
    """
    BatchNorm1d, BatchNorm2d = _norm_layers(norm, virtual_batch_size)

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
                 norm="batch", activation="sigmoid", virtual_batch_size=None):
    """The ``mlp`` model of the batch-norm paper's Figure 1.

    ``Flatten - [Linear(.,100) - BN1d - Sigmoid] x 3 - Linear(100, 10)``; without
    batch norm the hidden Linear layers keep their bias, with it the bias is
    dropped (the norm's ``bias`` replaces it).

    Parameters
    ----------
    rng : numpy.random.Generator
    batch_norm : bool, default True
    dtype : float32 or float64, default float32
    init_std : float, optional
        Draw every weight from ``N(0, init_std**2)`` ("small random Gaussian
        values", as the paper) instead of PyTorch's default uniform init.
    dropout : bool, default False
        The paper's network has none; True adds Dropout(:data:`MLP_DROPOUT`)
        after each hidden nonlinearity (masks drawn from ``rng``).
    norm : {"batch", "renorm", "group"}, default "batch"
    activation : {"sigmoid", "relu"}, default "sigmoid"
        The hidden nonlinearity (the paper's is the sigmoid).
    virtual_batch_size : int, optional
        Ghost batches of batch norm, as in :func:`mnist_cnn`.

    Returns
    -------
    Sequential
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    BatchNorm1d = _norm_layers(norm, virtual_batch_size)[0]
    layers = [Flatten()]
    sizes = [784, 100, 100, 100]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers.append(Linear(fan_in, fan_out, bias=not batch_norm, dtype=dtype, rng=rng))
        if batch_norm:
            layers.append(BatchNorm1d(fan_out, dtype=dtype))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(Dropout(MLP_DROPOUT, rng=rng))
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


def build_model(name, rng, batch_norm=True, dtype=np.float32, dropout=None, norm="batch",
                **options):
    """Build model ``name`` (a key of :data:`MODELS`) with weights drawn from ``rng``;
    ``dropout=None`` takes the model's default; ``norm`` chooses the normalization
    layers (see :data:`NORMS`); ``options`` go to the builder (``virtual_batch_size``,
    and the mlp's ``activation``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    spec = MODELS[name]
    return spec.build(rng, batch_norm=batch_norm, dtype=dtype,
                      dropout=spec.dropout if dropout is None else dropout, norm=norm, **options)
