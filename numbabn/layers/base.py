"""The :class:`Layer` base class: parameters, gradients, state and mode.

A layer keeps its arrays in three dictionaries of live ndarrays:

* ``params``: trainable parameters, updated *in place* by an optimizer;
* ``grads``: one array per parameter (same keys, shapes and dtypes), overwritten
  by every :meth:`Layer.backward`;
* ``buffers``: state that is saved but not trained (BatchNorm running statistics).

Because the dictionaries hold references and every update is in place, an
optimizer can keep the ``params`` and ``grads`` dictionaries of a model for its
whole life, and attributes such as ``BatchNorm2d.weight`` always show the
current values.
"""

from __future__ import annotations

import numpy as np

from . import _check


class Layer:
    """Base class of every layer.

    Subclasses implement :meth:`forward` and :meth:`backward` and fill
    ``params``, ``grads`` and ``buffers`` in their constructor.

    Attributes
    ----------
    params, grads : dict of str to ndarray
        Trainable parameters and their gradients (same keys).
    buffers : dict of str to ndarray
        Non-trainable state included in :meth:`state_dict`.
    training : bool
        Training mode (the default) or evaluation mode; see :meth:`train`.
    """

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.training = True

    # -- computation ------------------------------------------------------- #
    def forward(self, x):
        """Compute the layer's output for ``x`` and keep what backward needs."""
        raise NotImplementedError

    def backward(self, dy, input_grad=True):
        """Given ``dL/dy`` for the last forward's output, fill ``grads`` and return ``dL/dx``.

        Layers with parameters also take ``input_grad=False`` (what
        :meth:`Sequential.backward` passes to a model's first such layer when
        its input is data): they fill ``grads``, may skip computing ``dL/dx``,
        and return None.
        """
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # -- mode -------------------------------------------------------------- #
    def train(self, mode=True):
        """Set training mode (``mode=True``) or evaluation mode; return ``self``."""
        self.training = _check.flag(mode, "mode")
        return self

    def eval(self):
        """Set evaluation mode; same as ``train(False)``."""
        return self.train(False)

    # -- state ------------------------------------------------------------- #
    def state_dict(self):
        """Return a copy of every parameter and buffer, keyed like PyTorch.

        Returns
        -------
        dict of str to ndarray
            Copies, so later training does not change a saved state.
        """
        return {key: value.copy() for key, value in self._state_arrays().items()}

    def load_state_dict(self, state):
        """Copy ``state`` into the layer's parameters and buffers, in place.

        Parameters
        ----------
        state : mapping of str to array_like
            Exactly the keys of :meth:`state_dict`, each with the same shape.
            Values are cast to the layer's dtypes (``same_kind`` casting).

        Raises
        ------
        KeyError
            If keys are missing or unexpected (the message lists both).
        ValueError, TypeError
            If a value has the wrong shape or cannot be cast.  Nothing is
            modified unless every entry is valid.
        """
        targets = self._state_arrays()
        values = _check.state_entries(state, targets, type(self).__name__)
        for key, value in values.items():
            np.copyto(targets[key], value, casting="same_kind")

    def _state_arrays(self):
        return {**self.params, **self.buffers}

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self):
        """The constructor arguments shown by ``repr``."""
        return ""
