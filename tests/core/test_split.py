"""The split primitives against the fused calls and the float64 twins, and the
layers' running statistics against the functional API's."""

import numpy as np
import pytest

import naive
import numbabn as nb
from conftest import CASES, assert_close, make_array
from numbabn.layers import BatchNorm1d, BatchNorm2d

DTYPES = [np.float32, np.float64]
def _invstd(count, m2, eps=1e-5):
    return 1.0 / np.sqrt(m2 / count + eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_moments_and_elemt_compose_to_the_fused_forward_bitwise(rng, dtype, shape, axis):
    x = make_array(rng, shape, dtype, axis=axis, loc=50.0)
    c = shape[axis]
    w, b = rng.uniform(0.5, 2, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)
    y, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
    count, m, m2 = nb.batch_moments(x, axis=axis)
    assert count == x.size // c and m.dtype == m2.dtype == np.float64
    istd = _invstd(count, m2)
    np.testing.assert_array_equal(m.astype(dtype), mean)
    np.testing.assert_array_equal(istd.astype(dtype), invstd)
    np.testing.assert_array_equal(nb.batch_norm_elemt(x, m, istd, w, b, axis=axis), y)
    rm, rv = naive.batch_stats(x, axis)
    assert_close(m, rm, np.float64, scale=50.0, what="mean")
    assert_close(m2 / count, rv, dtype, what="var")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_reduce_and_elemt_compose_to_the_fused_backward(rng, dtype, shape, axis):
    x = make_array(rng, shape, dtype, axis=axis)
    dy = make_array(rng, shape, dtype, axis=axis)
    c = shape[axis]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    _, mean, invstd = nb.batch_norm_train(x, w, axis=axis)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    count, m, m2 = nb.batch_moments(x, axis=axis)
    istd = _invstd(count, m2)
    sum_dy, sum_dy_xmu = nb.batch_norm_backward_reduce(dy, x, m, istd, axis=axis)
    assert sum_dy.dtype == sum_dy_xmu.dtype == np.float64
    dx2 = nb.batch_norm_backward_elemt(dy, x, m, istd, w, sum_dy, sum_dy_xmu, count, axis=axis)
    rdx, rdw, rdb = naive.batch_norm_backward(dy, x, w, axis=axis)
    scale = max(1.0, np.max(np.abs(rdx)))
    assert_close(dx2, rdx, dtype, scale=scale, what="dx from the split primitives")
    assert_close(dx2, dx, dtype, scale=scale, what="split vs fused dx")
    assert_close(istd * sum_dy_xmu, rdw, dtype, scale=max(1.0, np.max(np.abs(rdw))), what="dweight")
    assert_close(sum_dy, rdb, dtype, scale=max(1.0, np.max(np.abs(rdb))), what="dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cuts", [[3], [0, 8], [1, 1, 40], [17, 0, 5]])
def test_merged_parts_equal_the_whole_batch(rng, dtype, cuts):
    x = (1e4 + 1e-2 * rng.standard_normal((60, 7))).astype(dtype)  # large mean, tiny spread
    parts = np.split(x, np.cumsum(cuts))
    count, mean, m2 = nb.merge_moments(*zip(*(nb.batch_moments(p) for p in parts)))
    rm, rv = naive.batch_stats(x, 1)
    assert count == 60
    np.testing.assert_allclose(mean, rm, rtol=1e-14)
    np.testing.assert_allclose(m2 / count, rv, rtol=1e-6 if dtype == np.float32 else 1e-10)
    # the order is fixed: merging the same parts again gives the same bits
    again = nb.merge_moments(*zip(*(nb.batch_moments(p) for p in parts)))
    np.testing.assert_array_equal(again[1], mean)
    np.testing.assert_array_equal(again[2], m2)


def test_empty_batch_contributes_nothing(rng):
    x = rng.standard_normal((5, 3, 4))
    empty = x[:0]
    assert nb.batch_moments(empty)[0] == 0
    whole = nb.batch_moments(x)
    merged = nb.merge_moments(*zip(nb.batch_moments(empty), whole))
    for a, b in zip(merged, whole):
        np.testing.assert_array_equal(a, b)
    mean, istd = whole[1], _invstd(whole[0], whole[2])
    assert nb.batch_norm_elemt(empty, mean, istd).shape == (0, 3, 4)
    sums = nb.batch_norm_backward_reduce(empty, empty, mean, istd)
    np.testing.assert_array_equal(sums, np.zeros((2, 3)))
    dx = nb.batch_norm_backward_elemt(empty, empty, mean, istd, None, *sums, count=40)
    assert dx.shape == (0, 3, 4)


def test_backward_reduce_is_exact_about_a_float64_mean(rng):
    """A float32 input with a large mean: the sums about the float64 mean must
    not inherit the float32 rounding of that mean."""
    x = (1e4 + 1e-2 * rng.standard_normal((4000, 3))).astype(np.float32)
    dy = rng.standard_normal((4000, 3)).astype(np.float32)
    count, m, m2 = nb.batch_moments(x)
    sum_dy, sum_dy_xmu = nb.batch_norm_backward_reduce(dy, x, m, _invstd(count, m2))
    xd, gd = x.astype(np.float64), dy.astype(np.float64)
    ref = (gd * (xd - xd.mean(0))).sum(0)
    np.testing.assert_allclose(sum_dy_xmu, ref, rtol=1e-5)
    np.testing.assert_allclose(sum_dy, gd.sum(0), rtol=1e-5)


@pytest.mark.parametrize("bad,exc,word", [
    (dict(mean=np.zeros(3, np.float16)), TypeError, "mean"),
    (dict(invstd=np.zeros(4)), ValueError, "invstd"),
    (dict(sum_dy=np.zeros((3, 1))), ValueError, "sum_dy"),
    (dict(count=0), ValueError, "count"),
    (dict(count=2.5), TypeError, "count"),
])
def test_split_primitives_refuse_bad_input_before_writing(rng, bad, exc, word):
    x = rng.standard_normal((6, 3))
    args = dict(dy=rng.standard_normal((6, 3)), x=x, mean=np.zeros(3), invstd=np.ones(3),
                weight=None, sum_dy=np.zeros(3), sum_dy_xmu=np.zeros(3), count=6)
    args.update(bad)
    out = np.full_like(x, 7.0)
    with pytest.raises(exc, match=word):
        nb.batch_norm_backward_elemt(**args, out=out)
    assert np.all(out == 7.0)


def test_merge_moments_refuses_mismatched_parts():
    with pytest.raises(ValueError, match="shape"):
        nb.merge_moments([2, 3], np.zeros((2, 4)), np.zeros((2, 5)))
    with pytest.raises(TypeError, match="counts"):
        nb.merge_moments([2, -1], np.zeros((2, 4)), np.zeros((2, 4)))


@pytest.mark.parametrize("momentum", [1.0, 0.1, None])
@pytest.mark.parametrize("cls,shape", [(BatchNorm1d, (64, 5)), (BatchNorm2d, (8, 4, 6, 6))])
def test_layer_running_stats_equal_the_functional_api(rng, cls, shape, momentum):
    """The layer used to rebuild the variance from invstd (off by 7.6e-5 relative
    for a feature std of 1e-4 in float32); it must match nb.batch_norm's update."""
    layer = cls(shape[1], momentum=momentum)
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    for step in range(3):
        x = (3 + 1e-4 * rng.standard_normal(shape)).astype(np.float32)
        layer.forward(x)
        factor = 1.0 / (step + 1) if momentum is None else momentum
        nb.batch_norm(x, rm, rv, training=True, momentum=factor)
        np.testing.assert_array_equal(layer.running_mean, rm)
        np.testing.assert_array_equal(layer.running_var, rv)
    xd = x.astype(np.float64)
    if momentum == 1.0:
        unbiased = xd.reshape(shape[0], shape[1], -1).transpose(1, 0, 2).reshape(shape[1], -1).var(1, ddof=1)
        np.testing.assert_allclose(layer.running_var, unbiased, rtol=1e-6)
