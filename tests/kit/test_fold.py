"""fold_batchnorm: exact inference models without batch norm, and honest reports."""

import numpy as np
import pytest

from numbabn.layers import BatchNorm1d, BatchNorm2d
from numbabn.kit import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential, fold_batchnorm
from numbabn.layers.batchnorm import _BatchNorm
from numbabn.mnist.models import mnist_cnn


def _randomize_bn(model, rng, positive=True):
    """Running statistics and affine parameters far from their defaults."""
    for layer in model.layers:
        if isinstance(layer, _BatchNorm) and layer.track_running_stats:
            c = layer.num_features
            layer.running_mean[...] = rng.standard_normal(c)
            layer.running_var[...] = rng.uniform(0.2, 3.0, c)
            if layer.weight is not None:
                w = rng.uniform(0.5, 2.0, c)
                layer.weight[...] = w if positive else w * rng.choice([-1, 1], c)
                layer.bias[...] = rng.standard_normal(c)
    return model


def _assert_equivalent(model, x, rtol=1e-5):
    ref = model.eval().forward(x).astype(np.float64)
    folded = fold_batchnorm(model)
    got = folded.forward(x).astype(np.float64)
    scale = np.max(np.abs(ref))
    assert np.max(np.abs(got - ref)) <= rtol * scale, np.max(np.abs(got - ref)) / scale
    return folded


def test_cnn_folds_every_batch_norm_and_keeps_its_outputs(rng):
    model = _randomize_bn(mnist_cnn(rng), rng)
    x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
    folded = _assert_equivalent(model, x)
    assert not any(isinstance(layer, _BatchNorm) for layer in folded.layers)
    assert len(folded.fold_report) == 3
    assert all("folded into the following" in line for line in folded.fold_report)
    # the original model is untouched, and still has its batch norms
    assert sum(isinstance(layer, _BatchNorm) for layer in model.layers) == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_into_the_preceding_layer(rng, dtype):
    model = _randomize_bn(Sequential(
        Conv2d(3, 4, 3, padding=1, bias=False, dtype=dtype, rng=rng), BatchNorm2d(4, dtype=dtype),
        ReLU(), Flatten(), Linear(4 * 36, 5, dtype=dtype, rng=rng), BatchNorm1d(5, dtype=dtype)), rng)
    x = rng.standard_normal((3, 3, 6, 6)).astype(dtype)
    folded = _assert_equivalent(model, x, rtol=1e-5 if dtype == np.float32 else 1e-12)
    assert folded.fold_report == ["BatchNorm2d (1): folded into the preceding Conv2d (0)",
                                  "BatchNorm1d (5): folded into the preceding Linear (4)"]
    assert folded[0].bias is not None and "bias" in folded[0].params


def test_layers_that_cannot_be_folded_are_kept_with_a_reason(rng):
    model = _randomize_bn(Sequential(
        Conv2d(2, 3, 3, rng=rng), ReLU(), BatchNorm2d(3), Conv2d(3, 3, 3, padding=1, rng=rng),
        ReLU(), BatchNorm2d(3), ReLU(), Flatten(), Linear(3 * 36, 4, rng=rng),
        ReLU(), BatchNorm1d(4, track_running_stats=False)), rng)
    x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
    folded = _assert_equivalent(model, x)
    assert folded.fold_report == [
        "BatchNorm2d (2): kept, the following Conv2d (3) pads its input",
        "BatchNorm2d (5): kept, ReLU (6) follows, which does not commute with it",
        "BatchNorm1d (10): kept, it has no running statistics (eval uses batch statistics)",
    ]


def test_max_pool_is_crossed_only_with_positive_scales(rng):
    def build(positive):
        return _randomize_bn(Sequential(
            Conv2d(1, 4, 3, rng=rng), ReLU(), BatchNorm2d(4), MaxPool2d(2), Dropout(0.5, rng=rng),
            Flatten(), Linear(4 * 9, 3, rng=rng)), np.random.default_rng(1), positive)

    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    assert _assert_equivalent(build(True), x).fold_report == [
        "BatchNorm2d (2): folded into the following Linear (6)"]
    negative = build(False)
    assert np.any(negative[2].weight < 0)
    assert _assert_equivalent(negative, x).fold_report == [
        "BatchNorm2d (2): kept, MaxPool2d (3) follows and some scales are not positive"]


def test_fold_refuses_other_models():
    with pytest.raises(TypeError, match="Sequential"):
        fold_batchnorm(BatchNorm1d(3))
