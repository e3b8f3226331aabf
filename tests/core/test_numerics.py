"""Hard numerics: ill-conditioned data, extreme magnitudes, NaN/inf, constants."""

import numpy as np
import pytest

import naive
import numbabn as nb


def _rel_err(a, ref):
    a = np.asarray(a, np.float64)
    return np.max(np.abs(a - ref)) / np.max(np.abs(ref))


@pytest.mark.parametrize("loc,spread", [(1e4, 1e-2), (1e6, 1.0), (-3e5, 0.05)])
@pytest.mark.parametrize("shape,axis", [((512, 4), 1), ((16, 3, 33, 17), 1), ((16, 9, 9, 3), -1)])
def test_large_mean_tiny_spread_float32(rng, loc, spread, shape, axis):
    x = (loc + spread * rng.standard_normal(shape)).astype(np.float32)
    ry, rmean, rinvstd = naive.batch_norm_train(x, axis=axis)  # float64 on the same values
    y, mean, invstd = nb.batch_norm_train(x, axis=axis)
    assert _rel_err(y, ry) <= 1e-4
    assert _rel_err(invstd, rinvstd) <= 1e-4
    m, v = nb.batch_stats(x, axis=axis)
    rm, rv = naive.batch_stats(x, axis)
    assert _rel_err(v, rv) <= 1e-4

    # The backward stays accurate although the saved mean was rounded to float32.
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, _, _ = nb.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    rdx, _, _ = naive.batch_norm_backward(dy, x, axis=axis)
    assert _rel_err(dx, rdx) <= 1e-4


@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 1e-20, 1e20])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_magnitudes(rng, magnitude, dtype):
    x = (magnitude * rng.standard_normal((64, 3, 5))).astype(dtype)
    y, mean, invstd = nb.batch_norm_train(x)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(invstd))
    ry, _, _ = naive.batch_norm_train(x)
    assert _rel_err(y, ry) <= 1e-5
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, np.ones(3, dtype))
    rdx, _, _ = naive.batch_norm_backward(dy, x, np.ones(3))
    assert np.all(np.isfinite(dx))
    assert _rel_err(dx, rdx) <= 1e-4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape,axis", [((64, 4), 1), ((8, 4, 5, 6), 1), ((8, 5, 6, 4), -1)])
def test_nonfinite_stays_in_its_feature(rng, bad, shape, axis):
    x = rng.standard_normal(shape).astype(np.float32)
    idx = [0] * len(shape)
    idx[axis] = 2
    x[tuple(idx)] = bad
    y, mean, invstd = nb.batch_norm_train(x, axis=axis)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, np.ones(4, np.float32), axis=axis)
    m, v = nb.batch_stats(x, axis=axis)
    for arr in (y, dx):
        moved = np.moveaxis(arr, axis, 0)
        assert np.all(np.isfinite(np.delete(moved, 2, axis=0))), "non-finite leaked to another feature"
        assert not np.all(np.isfinite(moved[2]))
    for vec in (mean, invstd, dw, m, v):
        assert np.all(np.isfinite(np.delete(vec, 2)))
    assert np.isnan(v[2])


def test_constant_feature(rng):
    x = rng.standard_normal((50, 3)).astype(np.float32)
    x[:, 1] = 4.25
    w = np.array([1.0, 2.0, 3.0], np.float32)
    b = np.array([0.5, -1.5, 2.0], np.float32)
    y, mean, invstd = nb.batch_norm_train(x, w, b)
    np.testing.assert_array_equal(y[:, 1], b[1])
    assert mean[1] == 4.25
    assert invstd[1] == pytest.approx(1 / np.sqrt(1e-5), rel=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    rdx, _, _ = naive.batch_norm_backward(dy, x, w)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # reads 2**31 values
def test_index_arithmetic_beyond_2_31_elements():
    """An (N, C) view with N * C > 2**31 elements, built with overlapping strides
    (x[i, c] = base[i + c], a Hankel view) so nothing that large is allocated."""
    n, c = 2**20 + 3, 2**11
    assert n * c > 2**31
    base = np.random.default_rng(5).standard_normal(n + c - 1).astype(np.float32)
    x = np.lib.stride_tricks.as_strided(base, shape=(n, c), strides=(4, 4), writeable=False)
    mean, var = nb.batch_stats(x, axis=1)
    b64 = base.astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(b64)])
    csq = np.concatenate([[0.0], np.cumsum(b64 * b64)])
    ref_mean = (csum[n:n + c] - csum[:c]) / n
    ref_var = (csq[n:n + c] - csq[:c]) / n - ref_mean**2
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)
