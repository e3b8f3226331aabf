"""Property tests with hypothesis: invariants that hold for any valid input."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbabn as nb

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw, min_count=2):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < min_count:
        shape = (shape[0] + min_count,) + shape[1:] if axis % ndim != 0 else shape[:1] + (shape[1] + min_count,) + shape[2:]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    loc = draw(st.floats(-1e3, 1e3))
    scale = draw(st.floats(1e-2, 1e2))
    rng = np.random.default_rng(seed)
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    if draw(st.booleans()):  # a non-contiguous view of the same values
        x = np.asfortranarray(x)
    return x, axis, rng


def _per_feature(a, axis):
    return np.moveaxis(np.asarray(a, np.float64), axis, 0).reshape(a.shape[axis], -1)


def _tol(dtype):
    return 5e-5 if dtype == np.float32 else 1e-10


@SETTINGS
@given(batches())
def test_output_has_zero_mean_and_unit_variance(case):
    x, axis, _ = case
    y, _, _ = nb.batch_norm_train(x, axis=axis)
    mean, var = nb.batch_stats(x, axis=axis)
    var64 = np.asarray(var, np.float64)
    yf = _per_feature(y, axis)
    tol = _tol(x.dtype)
    np.testing.assert_allclose(yf.mean(axis=1), 0, atol=tol * 10)
    # var(y) = var / (var + eps): exactly 1 only when eps is negligible.
    np.testing.assert_allclose(yf.var(axis=1), var64 / (var64 + 1e-5), atol=tol * 10)


@SETTINGS
@given(batches(), st.floats(0.1, 10), st.floats(-100, 100))
def test_invariant_to_shift_and_positive_scale(case, s, t):
    x, axis, rng = case
    c = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = c
    scale = (s * rng.uniform(0.5, 2, c)).reshape(shape)
    shift = (t * rng.uniform(-1, 1, c)).reshape(shape)
    x64 = x.astype(np.float64)
    x2 = x64 * scale + shift
    # eps tiny against every feature's variance, so it cannot break the invariance.
    y1, _, _ = nb.batch_norm_train(x64, eps=1e-12, axis=axis)
    y2, _, _ = nb.batch_norm_train(x2, eps=1e-12, axis=axis)
    var1 = nb.batch_stats(x64, axis=axis)[1]
    var2 = nb.batch_stats(x2, axis=axis)[1]
    if min(var1.min(), var2.min()) > 1e-4:
        np.testing.assert_allclose(y2, y1, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(batches())
def test_dx_sums_to_zero_per_feature(case):
    x, axis, rng = case
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    y, mean, invstd = nb.batch_norm_train(x, axis=axis)
    dx, _, _ = nb.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    dxf = _per_feature(dx, axis)
    scale = np.abs(_per_feature(dy, axis)).sum(axis=1) * np.asarray(invstd, np.float64) + 1e-30
    tol = _tol(x.dtype)
    assert np.all(np.abs(dxf.sum(axis=1)) <= tol * scale)


@SETTINGS
@given(st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf"))))
def test_bad_eps_always_refused(eps):
    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="eps"):
        nb.batch_norm_train(x, eps=eps)


@SETTINGS
@given(st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1 + 1e-12), st.just(float("nan"))))
def test_bad_momentum_always_refused(momentum):
    x = np.ones((4, 2), np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    with pytest.raises(ValueError, match="momentum"):
        nb.batch_norm(x, rm, rv, training=True, momentum=momentum)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


@SETTINGS
@given(st.integers(2, 5), st.integers())
def test_bad_axis_always_refused(ndim, axis):
    x = np.ones((2,) * ndim, np.float64)
    if -ndim <= axis < ndim:
        nb.batch_stats(x, axis=axis)
    else:
        with pytest.raises(ValueError, match="axis"):
            nb.batch_stats(x, axis=axis)
