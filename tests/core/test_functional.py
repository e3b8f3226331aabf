"""Every public function against the float64 naive twin, over shapes, axes,
dtypes and memory layouts."""

import numpy as np
import pytest

import naive
import numbabn as nb
from conftest import CASES, LAYOUTS, assert_close, make_array, vector

DTYPES = [np.float32, np.float64]


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_forward_and_backward(rng, dtype, shape, axis, layout):
    x = make_array(rng, shape, dtype, layout, axis, loc=3.0)
    nfeat = shape[axis]
    w = vector(rng, nfeat, dtype, 0.5, 1.5)
    b = vector(rng, nfeat, dtype)
    y, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
    ry, rmean, rinvstd = naive.batch_norm_train(x, w, b, axis=axis)
    assert y.dtype == dtype and mean.dtype == dtype and invstd.dtype == dtype
    assert y.shape == x.shape
    assert_close(y, ry, dtype, what="y")
    assert_close(mean, rmean, dtype, what="mean")
    assert_close(invstd, rinvstd, dtype, what="invstd")

    dy = make_array(rng, shape, dtype, layout, axis)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    rdx, rdw, rdb = naive.batch_norm_backward(dy, x, w, axis=axis)
    assert dx.dtype == dtype and dx.shape == x.shape
    n = x.size // nfeat
    assert_close(dx, rdx, dtype, what="dx")
    assert_close(dw, rdw, dtype, scale=np.sqrt(n), what="dweight")
    assert_close(db, rdb, dtype, scale=np.sqrt(n), what="dbias")


@pytest.mark.parametrize("shape,axis", CASES)
def test_stats_and_normalize(rng, dtype, shape, axis):
    x = make_array(rng, shape, dtype, "c", axis, loc=-5.0, scale=3.0)
    mean, var = nb.batch_stats(x, axis=axis)
    rmean, rvar = naive.batch_stats(x, axis)
    assert mean.dtype == dtype and var.dtype == dtype
    assert_close(mean, rmean, dtype, scale=5, what="mean")
    assert_close(var, rvar, dtype, what="var")

    nfeat = shape[axis]
    w, b = vector(rng, nfeat, dtype), vector(rng, nfeat, dtype)
    for weight, bias in [(None, None), (w, None), (None, b), (w, b)]:
        y = nb.normalize(x, mean, var, weight, bias, eps=1e-3, axis=axis)
        ry = naive.normalize(x, mean, var, weight, bias, 1e-3, axis)
        assert_close(y, ry, dtype, what="normalize")


def test_backward_without_weight_returns_none(rng, dtype):
    x = make_array(rng, (8, 3, 4), dtype)
    dy = make_array(rng, (8, 3, 4), dtype)
    _, mean, invstd = nb.batch_norm_train(x)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd)
    assert dw is None and db is None
    rdx, _, _ = naive.batch_norm_backward(dy, x)
    assert_close(dx, rdx, dtype)


@pytest.mark.parametrize("shape,axis", [((37, 5), 1), ((6, 3, 7, 5), 1), ((6, 7, 5, 3), -1)])
@pytest.mark.parametrize("layout", ["c", "transposed", "stepped"])
def test_batch_norm_training_updates_running_stats(rng, dtype, shape, axis, layout):
    x = make_array(rng, shape, dtype, layout, axis, loc=1.0)
    nfeat = shape[axis]
    rm, rv = vector(rng, nfeat, dtype), vector(rng, nfeat, dtype, 0.5, 2.0)
    w, b = vector(rng, nfeat, dtype), vector(rng, nfeat, dtype)
    ry, rrm, rrv = naive.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-5, axis)
    y = nb.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, axis=axis)
    assert_close(y, ry, dtype, what="y")
    assert_close(rm, rrm, dtype, what="running_mean")
    assert_close(rv, rrv, dtype, what="running_var")


@pytest.mark.parametrize("shape,axis", [((37, 5), 1), ((6, 3, 7, 5), 1), ((6, 7, 5, 3), -1)])
def test_batch_norm_eval_uses_running_stats_and_changes_nothing(rng, dtype, shape, axis):
    x = make_array(rng, shape, dtype, "c", axis)
    nfeat = shape[axis]
    rm, rv = vector(rng, nfeat, dtype), vector(rng, nfeat, dtype, 0.5, 2.0)
    w, b = vector(rng, nfeat, dtype), vector(rng, nfeat, dtype)
    before = [a.copy() for a in (x, rm, rv, w, b)]
    y = nb.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    assert_close(y, naive.normalize(x, rm, rv, w, b, 1e-5, axis), dtype)
    for a, old in zip((x, rm, rv, w, b), before):
        np.testing.assert_array_equal(a, old)


def test_batch_norm_training_without_running_stats(rng, dtype):
    x = make_array(rng, (16, 4), dtype)
    y = nb.batch_norm(x, None, None, training=True)
    assert_close(y, naive.batch_norm_train(x)[0], dtype)


def test_update_running_stats_matches_naive(rng, dtype):
    rm, rv = vector(rng, 6, dtype), vector(rng, 6, dtype, 0.1, 3)
    mean, var = vector(rng, 6, dtype), vector(rng, 6, dtype, 0.1, 3)
    ref = naive.update_running_stats(rm, rv, mean, var, 17, 0.25)
    nb.update_running_stats(rm, rv, mean, var, 17, momentum=0.25)
    assert_close(rm, ref[0], dtype)
    assert_close(rv, ref[1], dtype)


@pytest.mark.parametrize("momentum,expect_old", [(0.0, True), (1.0, False)])
def test_momentum_extremes(rng, momentum, expect_old):
    rm, rv = np.full(3, 7.0), np.full(3, 9.0)
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    nb.update_running_stats(rm, rv, mean, var, 5, momentum=momentum)
    if expect_old:
        np.testing.assert_array_equal(rm, 7.0)
        np.testing.assert_array_equal(rv, 9.0)
    else:
        np.testing.assert_array_equal(rm, mean)
        np.testing.assert_allclose(rv, var * 5 / 4, rtol=1e-15)


@pytest.mark.parametrize("layout", ["c", "transposed", "stepped"])
def test_normalize_out_argument(rng, layout):
    x = make_array(rng, (10, 3, 6), np.float32, layout)
    mean, var = nb.batch_stats(x)
    out = make_array(rng, (10, 3, 6), np.float32, layout)
    res = nb.normalize(x, mean, var, out=out)
    assert res is out
    assert_close(out, naive.normalize(x, mean, var), np.float32)


def test_normalize_in_place_and_overlapping_out(rng):
    base = make_array(rng, (12, 4), np.float64)
    x = base.copy()
    mean, var = nb.batch_stats(x)
    expected = naive.normalize(x, mean, var)
    nb.normalize(x, mean, var, out=x)  # exactly in place
    assert_close(x, expected, np.float64)

    # out overlaps x shifted by one row: must behave as if x were read first.
    buf = np.concatenate([base, base[:1]])
    x2, out2 = buf[:12], buf[1:13]
    mean2, var2 = nb.batch_stats(x2)
    expected2 = naive.normalize(x2.copy(), mean2, var2)
    nb.normalize(x2, mean2, var2, out=out2)
    assert_close(out2, expected2, np.float64)


@pytest.mark.parametrize("layout", ["c", "transposed", "stepped"])
def test_train_and_backward_out_argument(rng, layout):
    shape = (10, 3, 6)
    x = make_array(rng, shape, np.float32, layout, loc=2.0)
    dy = make_array(rng, shape, np.float32, layout)
    w = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    y_ref, mean, invstd = nb.batch_norm_train(x, w)
    out = make_array(rng, shape, np.float32, layout)
    y, mean2, invstd2 = nb.batch_norm_train(x, w, out=out)
    assert y is out
    np.testing.assert_array_equal(out, y_ref)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(invstd2, invstd)

    dx_ref, dw_ref, db_ref = nb.batch_norm_backward(dy, x, mean, invstd, w)
    out = make_array(rng, shape, np.float32, layout)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, out=out)
    assert dx is out
    np.testing.assert_array_equal(out, dx_ref)
    np.testing.assert_array_equal(dw, dw_ref)
    np.testing.assert_array_equal(db, db_ref)
    assert_close(out, naive.batch_norm_backward(dy, x, w)[0], np.float32)


@pytest.mark.parametrize("shape, axis", [((12, 40), 1), ((6, 20, 3, 4), 1), ((5, 4, 4, 16), -1)])
def test_train_and_backward_in_place(rng, shape, axis):
    """``out=x`` (forward) and ``out=dy`` or ``out=x`` (backward) give the same bits
    as a fresh output: every path reads a feature's inputs before writing it."""
    x = make_array(rng, shape, np.float64, loc=-3.0)
    dy = make_array(rng, shape, np.float64)
    y_ref, mean, invstd = nb.batch_norm_train(x, axis=axis)
    xc = x.copy()
    y, _, _ = nb.batch_norm_train(xc, axis=axis, out=xc)
    assert y is xc
    np.testing.assert_array_equal(xc, y_ref)

    dx_ref, _, _ = nb.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    for target in ("dy", "x"):
        xi, dyi = x.copy(), dy.copy()
        out = dyi if target == "dy" else xi
        dx, _, _ = nb.batch_norm_backward(dyi, xi, mean, invstd, axis=axis, out=out)
        assert dx is out
        np.testing.assert_array_equal(out, dx_ref, err_msg=f"out={target}")


def test_backward_out_overlapping_dy(rng):
    """``out`` overlapping ``dy`` shifted by one row: as if ``dy`` were read first."""
    base = make_array(rng, (13, 4), np.float64)
    x = make_array(rng, (12, 4), np.float64, loc=1.0)
    _, mean, invstd = nb.batch_norm_train(x)
    dy, out = base[:12], base[1:13]
    expected, _, _ = nb.batch_norm_backward(dy.copy(), x, mean, invstd)
    nb.batch_norm_backward(dy, x, mean, invstd, out=out)
    np.testing.assert_array_equal(out, expected)


def test_output_follows_input_memory_order(rng):
    x = make_array(rng, (4, 3, 5, 6), np.float32, "c").transpose(0, 2, 3, 1)  # NHWC view
    y, _, _ = nb.batch_norm_train(x, axis=-1)
    assert y.strides == x.strides
    xf = np.asfortranarray(make_array(rng, (40, 3), np.float32))
    yf = nb.normalize(xf, *nb.batch_stats(xf))
    assert yf.flags.f_contiguous


def test_onnx_batchnorm_example():
    # ONNX backend test "test_batchnorm_example" (onnx/backend/test/case/node/batchnorm.py):
    # inputs as published, expected y = s * (x - mean) / sqrt(var + 1e-5) + bias.
    x = np.array([[[[-1, 0, 1]], [[2, 3, 4]]]], dtype=np.float32)
    s = np.array([1.0, 1.5], dtype=np.float32)
    bias = np.array([0, 1], dtype=np.float32)
    mean = np.array([0, 3], dtype=np.float32)
    var = np.array([1, 1.5], dtype=np.float32)
    expected = np.array(
        [[[[-0.999995, 0.0, 0.999995]], [[-0.22474074, 1.0, 2.2247407]]]], dtype=np.float32
    )
    y = nb.batch_norm(x, mean, var, s, bias, training=False)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)
    y2 = nb.normalize(x, mean, var, s, bias)
    np.testing.assert_array_equal(y, y2)
