"""Fused batch norm + ReLU: the functional pair and the BatchNormReLU layers."""

import numpy as np
import pytest

import naive
import numbabn as nb
from conftest import CASES, LAYOUTS, assert_close, make_array
from numbabn.layers import BatchNorm1d, BatchNorm2d, BatchNormReLU1d, BatchNormReLU2d
from numbabn.kit import Conv2d, ReLU, Sequential, fold_batchnorm

DTYPES = [np.float32, np.float64]


def _reference(x, dy, w, b, axis):
    """float64: relu(batch_norm) forward, and its gradients (mask from the output)."""
    y, _, _ = naive.batch_norm_train(x, w, b, axis=axis)
    g = np.where(y > 0, np.asarray(dy, np.float64), 0.0)
    dx, dw, db = naive.batch_norm_backward(g, x, w, axis=axis)
    return np.maximum(y, 0), dx, dw, db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_fused_pair_matches_relu_of_batch_norm(rng, dtype, shape, axis):
    x = make_array(rng, shape, dtype, axis=axis)
    dy = make_array(rng, shape, dtype, axis=axis)
    c = shape[axis]
    w, b = rng.uniform(0.5, 2, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)
    y, mean, invstd = nb.batch_norm_relu_train(x, w, b, axis=axis)
    y_bn, mean_bn, invstd_bn = nb.batch_norm_train(x, w, b, axis=axis)
    np.testing.assert_array_equal(y, np.where(y_bn < 0, 0, y_bn))  # the same pass, clamped
    np.testing.assert_array_equal(mean, mean_bn)
    np.testing.assert_array_equal(invstd, invstd_bn)
    dx, dw, db = nb.batch_norm_relu_backward(dy, y, x, mean, invstd, w, axis=axis)
    ry, rdx, rdw, rdb = _reference(x, dy, w, b, axis)
    assert_close(y, ry, dtype, what="y")
    assert_close(dx, rdx, dtype, scale=max(1.0, np.abs(rdx).max()), what="dx")
    n = x.size // c
    assert_close(dw, rdw, dtype, scale=max(1.0, np.abs(rdw).max()), what="dweight")
    assert_close(db, rdb, dtype, scale=max(1.0, np.abs(rdb).max()), what="dbias")
    assert n > 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_layout_and_out_in_place(rng, layout):
    shape = (6, 3, 7, 5)
    x = make_array(rng, shape, np.float32, layout=layout)
    dy = make_array(rng, shape, np.float32, layout=layout)
    y, mean, invstd = nb.batch_norm_relu_train(x)
    ref_dx, _, _ = nb.batch_norm_relu_backward(dy, y, x, mean, invstd)
    for target in ("dy", "y"):
        arrays = {"dy": np.array(dy), "y": np.array(y)}
        out = arrays[target]
        dx, _, _ = nb.batch_norm_relu_backward(arrays["dy"], arrays["y"], x, mean, invstd, out=out)
        assert dx is out
        np.testing.assert_array_equal(dx, ref_dx)


def test_relu_semantics_of_torch(rng):
    """NaN and -0.0 pass through the forward; dy counts only where y > 0, even
    a NaN or inf in dy (threshold_backward)."""
    x = rng.standard_normal((50, 2))
    x[0, 1] = np.nan
    y, mean, invstd = nb.batch_norm_relu_train(x)
    assert np.all(np.isnan(y[:, 1])) and not np.any(np.isnan(y[:, 0]))
    assert np.all(y[:, 0] >= 0)
    dy = np.ones_like(x)
    dy[y[:, 0] <= 0, 0] = np.inf
    dx, dw, db = nb.batch_norm_relu_backward(dy, y, x, mean, invstd, np.ones(2))
    assert np.all(np.isfinite(dx[:, 0])) and np.all(np.isfinite(db[:1]))
    assert db[0] == np.sum(y[:, 0] > 0)


def test_validation_of_y(rng):
    x = rng.standard_normal((8, 3))
    y, mean, invstd = nb.batch_norm_relu_train(x)
    with pytest.raises(ValueError, match="y must have the shape"):
        nb.batch_norm_relu_backward(x, y[:4], x, mean, invstd)
    with pytest.raises(TypeError, match="y must have dtype"):
        nb.batch_norm_relu_backward(x, y.astype(np.float32), x, mean, invstd)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused_cls,bn_cls,shape", [(BatchNormReLU2d, BatchNorm2d, (4, 3, 5, 5)),
                                                    (BatchNormReLU1d, BatchNorm1d, (16, 6))])
def test_layer_equals_batch_norm_then_relu(rng, fused_cls, bn_cls, shape, training):
    fused, bn, relu = fused_cls(shape[1], momentum=0.3), bn_cls(shape[1], momentum=0.3), ReLU()
    for layer in (fused, bn):
        layer.weight[...] = np.linspace(0.5, 2, shape[1])
        layer.bias[...] = np.linspace(-0.5, 0.5, shape[1])
        layer.train(training)
    assert sorted(fused.state_dict()) == sorted(bn.state_dict())
    for _ in range(2):
        x = (1 + rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        y = fused.forward(x)
        ry = relu.forward(bn.forward(x))
        assert_close(y, ry, np.float32)
        dx = fused.backward(dy)
        rdx = bn.backward(relu.backward(dy))
        assert_close(dx, rdx, np.float32, scale=max(1.0, np.abs(rdx).max()))
        for k in ("weight", "bias"):
            assert_close(fused.grads[k], bn.grads[k], np.float32, scale=x.size / shape[1])
        for k in ("running_mean", "running_var"):
            np.testing.assert_array_equal(fused.buffers[k], bn.buffers[k])


def test_fold_keeps_the_relu_of_a_fused_layer(rng):
    model = Sequential(Conv2d(2, 3, 3, rng=rng), BatchNormReLU2d(3))
    model[1].running_mean[...] = rng.standard_normal(3)
    model[1].running_var[...] = rng.uniform(0.5, 2, 3)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    ref = model.eval().forward(x).copy()
    folded = fold_batchnorm(model)
    assert folded.fold_report == ["BatchNormReLU2d (1): folded into the preceding Conv2d (0), "
                                  "its ReLU kept"]
    assert isinstance(folded[1], ReLU)
    assert_close(folded.forward(x), ref, np.float32, scale=np.abs(ref).max())
