"""Layers built with ``dtype=`` a half type (float16, bfloat16): parameters,
running statistics, outputs and gradients in that type, each within a few half
ulps of the float64 twin on the same values."""

import numpy as np
import pytest

import naive
from numbabn import layers as L
from conftest import HALF, assert_ulps

SHAPE = (8, 4, 5, 6)


def _x(rng, dtype, loc=0.0):
    return (loc + rng.standard_normal(SHAPE)).astype(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_batch_norm_layer(rng, dtype):
    layer = L.BatchNorm2d(4, dtype=dtype)
    assert all(p.dtype == dtype for p in layer.state_dict().values()
               if getattr(p, "dtype", None) is not None and p.dtype.kind != "i")
    layer.weight[...] = rng.uniform(0.5, 2, 4).astype(dtype)
    layer.bias[...] = rng.standard_normal(4).astype(dtype)
    x, dy = _x(rng, dtype, 2.0), _x(rng, dtype)
    y = layer.forward(x)
    assert_ulps(y, naive.batch_norm_train(x, layer.weight, layer.bias)[0], dtype, 2, "y")
    dx = layer.backward(dy)
    ref_dx, ref_dw, ref_db = naive.batch_norm_backward(dy, x, layer.weight)
    assert_ulps(dx, ref_dx, dtype, 4, "dx")
    assert_ulps(layer.grads["weight"], ref_dw, dtype, 1, "dweight")
    assert_ulps(layer.grads["bias"], ref_db, dtype, 1, "dbias")
    mean, var = naive.batch_stats(x)
    rm, rv = naive.update_running_stats(np.zeros(4), np.ones(4), mean, var, x.size // 4)
    assert_ulps(layer.running_mean, rm, dtype, 1, "running_mean")
    assert_ulps(layer.running_var, rv, dtype, 1, "running_var")
    layer.eval()
    y = layer.forward(x)
    ref = naive.normalize(x, layer.running_mean, layer.running_var, layer.weight, layer.bias)
    assert_ulps(y, ref, dtype, 2, "eval y")
    assert layer.backward(dy).dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_family_layers(rng, dtype):
    x, dy = _x(rng, dtype, 1.0), _x(rng, dtype)
    checks = [
        (L.LayerNorm((5, 6), dtype=dtype), lambda l: naive.layer_norm(x, (5, 6), l.weight, l.bias),
         lambda l: naive.layer_norm_backward(dy, x, (5, 6), l.weight)),
        (L.GroupNorm(2, 4, dtype=dtype), lambda l: naive.group_norm(x, 2, l.weight, l.bias),
         lambda l: naive.group_norm_backward(dy, x, 2, l.weight)),
        (L.InstanceNorm2d(4, affine=True, dtype=dtype),
         lambda l: naive.instance_norm(x, l.weight, l.bias),
         lambda l: naive.instance_norm_backward(dy, x, l.weight)),
        (L.RMSNorm(6, dtype=dtype),
         lambda l: naive.rms_norm(x, (6,), l.weight, eps=float(np.finfo(np.float32).eps)),
         lambda l: naive.rms_norm_backward(dy, x, (6,), l.weight,
                                           eps=float(np.finfo(np.float32).eps))),
    ]
    for layer, forward, backward in checks:
        name = type(layer).__name__
        layer.weight[...] = rng.uniform(0.5, 2, layer.weight.shape).astype(dtype)
        y = layer.forward(x)
        assert_ulps(y, forward(layer)[0], dtype, 2, name)
        dx = layer.backward(dy)
        assert_ulps(dx, backward(layer)[0], dtype, 4, f"{name} dx")
        assert all(g.dtype == dtype for g in layer.grads.values()), name


@pytest.mark.parametrize("dtype", HALF)
def test_fused_and_renorm_layers_run_in_half(rng, dtype):
    x, dy = _x(rng, dtype), _x(rng, dtype)
    fused = L.BatchNormReLU2d(4, dtype=dtype)
    y = fused.forward(x)
    assert_ulps(y, np.maximum(naive.batch_norm_train(x)[0], 0), dtype, 2, "bn+relu")
    assert fused.backward(dy).dtype == dtype
    renorm = L.BatchRenorm2d(4, dtype=dtype)
    y = renorm.forward(x)
    ref = naive.batch_renorm_train(x, np.zeros(4), np.ones(4), renorm.weight, renorm.bias)[0]
    assert_ulps(y, ref, dtype, 2, "renorm")
    assert renorm.backward(dy).dtype == dtype


def test_dtype_names_spell_half_types():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert L.BatchNorm2d(3, dtype="bfloat16").dtype == np.dtype(ml_dtypes.bfloat16)
    assert L.LayerNorm(3, dtype="float16").weight.dtype == np.float16
    layer = L.BatchNorm2d(3, dtype=np.float16)
    with pytest.raises(TypeError, match="expects dtype float16"):
        layer.forward(np.zeros((2, 3, 2, 2), np.float32))
