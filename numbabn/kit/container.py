"""``Sequential``: layers applied in order, with PyTorch's ``"<index>.<name>"`` keys."""

from __future__ import annotations

from ..layers import _check
from ..layers.base import Layer


class Sequential(Layer):
    """A chain of layers; ``backward`` runs them in reverse.

    ``params``, ``grads`` and ``buffers`` are dictionaries of the children's live
    arrays under keys ``"<index>.<name>"`` (``"0.weight"``), as PyTorch's
    ``state_dict`` names them, so a state dict can be moved between the two.

    Parameters
    ----------
    *layers : Layer

    Examples
    --------
    >>> model = Sequential(Linear(784, 100, rng=rng), BatchNorm1d(100), Sigmoid(), Linear(100, 10, rng=rng))
    >>> logits = model.forward(x)
    >>> dx = model.backward(dlogits)
    >>> optimizer.step(model.grads)
    """

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential expects Layer instances; item {i} is {type(layer).__name__}.")
        self.layers = list(layers)
        self.training = True

    def _collect(self, attr):
        return {f"{i}.{key}": value
                for i, layer in enumerate(self.layers)
                for key, value in getattr(layer, attr).items()}

    @property
    def params(self):
        return self._collect("params")

    @property
    def grads(self):
        return self._collect("grads")

    @property
    def buffers(self):
        return self._collect("buffers")

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy, input_grad=True):
        """Run the layers' backward passes in reverse and return ``dL/dx``.

        ``input_grad=False`` says the model's input is data, as a tensor without
        ``requires_grad`` in PyTorch: the first layer with parameters fills its
        ``grads`` without computing ``dL/dx``, the layers before it (which have
        no parameters) are skipped, and None is returned.
        """
        if _check.flag(input_grad, "input_grad"):
            for layer in reversed(self.layers):
                dy = layer.backward(dy)
            return dy
        first = next((i for i, layer in enumerate(self.layers) if layer.params), None)
        if first is None:
            return None
        for layer in reversed(self.layers[first + 1:]):
            dy = layer.backward(dy)
        return self.layers[first].backward(dy, input_grad=False)

    def train(self, mode=True):
        self.training = _check.flag(mode, "mode")
        for layer in self.layers:
            layer.train(mode)
        return self

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        body = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({body}\n)"
