"""Bad input matrix for every layer: the exception type, a message that says what
was expected, and no parameter, gradient or running statistic changed."""

import numpy as np
import pytest

from numbabn.layers import BatchNorm1d, BatchNorm2d
from numbabn.kit import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential, Sigmoid

# name -> (factory, a valid float32 input)
LAYERS = {
    "Linear": (lambda: Linear(4, 3), (5, 4)),
    "Conv2d": (lambda: Conv2d(2, 3, 3, padding=1), (2, 2, 6, 6)),
    "BatchNorm1d": (lambda: BatchNorm1d(4), (5, 4)),
    "BatchNorm2d": (lambda: BatchNorm2d(2), (3, 2, 4, 4)),
    "MaxPool2d": (lambda: MaxPool2d(2), (2, 2, 4, 4)),
    "ReLU": (lambda: ReLU(), (5, 4)),
    "Sigmoid": (lambda: Sigmoid(), (5, 4)),
    "Dropout": (lambda: Dropout(0.5, rng=np.random.default_rng(0)), (5, 4)),
    "Flatten": (lambda: Flatten(), (2, 2, 3)),
    "Sequential": (lambda: Sequential(Linear(4, 3), BatchNorm1d(3), ReLU()), (5, 4)),
}


def _bad_inputs(shape):
    good = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return {
        "list": (good.tolist(), TypeError),
        "python-float": (1.5, TypeError),
        "int-array": (good.astype(np.int64), TypeError),
        "string": ("x", TypeError),
        "empty-batch": (good[:0], ValueError),
    }


def _snapshot(layer):
    state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    grads = {k: np.array(v, copy=True) for k, v in layer.grads.items()}
    return state, grads


# Batch norm accepts an empty batch, as PyTorch (tests/layers/test_batchnorm_family.py).
ACCEPTS_EMPTY_BATCH = {"BatchNorm1d", "BatchNorm2d"}
CASES = [pytest.param(name, bad, id=f"{name}-{bad}")
         for name in LAYERS for bad in ["list", "python-float", "int-array", "string", "empty-batch"]
         if not (bad == "empty-batch" and name in ACCEPTS_EMPTY_BATCH)]


@pytest.mark.parametrize("name,bad", CASES)
def test_layer_refuses_bad_input_and_changes_nothing(name, bad):
    make, shape = LAYERS[name]
    layer = make()
    layer.train()
    value, error = _bad_inputs(shape)[bad]
    state, grads = _snapshot(layer)
    with pytest.raises(error) as info:
        layer.forward(value)
    message = str(info.value)
    assert "got" in message or "expected" in message.lower() or "must" in message, message
    new_state, new_grads = _snapshot(layer)
    assert state.keys() == new_state.keys()
    for k in state:
        np.testing.assert_array_equal(new_state[k], state[k], err_msg=f"{k} changed")
    for k in grads:
        np.testing.assert_array_equal(new_grads[k], grads[k], err_msg=f"grad {k} changed")


@pytest.mark.parametrize("cls,shape", [(BatchNorm1d, (1, 4)), (BatchNorm2d, (1, 4, 1, 1))])
def test_batchnorm_one_value_per_feature_in_training(cls, shape):
    bn = cls(4)
    state, _ = _snapshot(bn)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn.forward(np.ones(shape, np.float32))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    bn.eval()  # eval mode normalises a single sample with the running statistics
    assert np.all(np.isfinite(bn.forward(np.ones(shape, np.float32))))
