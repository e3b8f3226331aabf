"""Fuzzing every operation against the float64 naive twin with hypothesis.

The fast profile runs in CI; the long one is behind a marker:
``pytest -m fuzz_long tests/core/test_fuzz.py``.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import naive
import numbabn as nb
from conftest import LAYOUTS, TOL, relayout

FAST = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def problems(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6 if ndim > 3 else 40), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    layout = draw(st.sampled_from(LAYOUTS))
    log_scale = draw(st.floats(-20, 20))
    rel_loc = draw(st.sampled_from([0.0, 1.0, 100.0, 1e3]))  # offset in units of the spread
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-8, 0.5]))
    momentum = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = 10.0 ** log_scale
    c = shape[axis]
    values = scale * (rel_loc * rng.uniform(-1, 1, c).reshape([c if a == axis % ndim else 1 for a in range(ndim)])
                      + rng.standard_normal(shape))
    x = relayout(values.astype(dtype), layout)
    dy = relayout(rng.standard_normal(shape).astype(dtype), layout)
    params = [rng.uniform(-2, 2, c).astype(dtype) for _ in range(2)]
    running = [rng.uniform(-1, 1, c).astype(dtype), rng.uniform(0.1, 2, c).astype(dtype)]
    return dict(x=x, dy=dy, axis=axis, eps=eps, momentum=momentum,
                weight=params[0], bias=params[1], rm=running[0], rv=running[1])


def _close(actual, ref, dtype, what, scale=0.0):
    """Norm-wise: the error is measured against the largest reference value, or
    against ``scale`` when the result is a cancellation of larger terms."""
    atol, rtol = TOL[dtype]
    ref = np.asarray(ref, np.float64)
    actual = np.asarray(actual, np.float64)
    # A value beyond the dtype's range (a float32 variance of data near 1e20) is inf.
    over = np.abs(ref) > np.finfo(dtype).max
    assert np.array_equal(np.isinf(actual), over), f"{what}: overflow mismatch"
    ref, actual = ref[~over], actual[~over]
    if ref.size == 0:
        return
    scale = max(np.max(np.abs(ref)), scale, 1e-300)
    err = np.max(np.abs(actual - ref))
    assert err <= 10 * (atol + rtol) * scale, f"{what}: error {err:.3g} vs scale {scale:.3g}"


def check_problem(p):
    x, axis, dtype = p["x"], p["axis"], p["x"].dtype
    count = x.size // x.shape[axis]
    m, v = nb.batch_stats(x, axis=axis)
    rm_, rv_ = naive.batch_stats(x, axis)
    _close(m, rm_, dtype, "mean")
    _close(v, rv_, dtype, "var")
    if count < 2:
        with pytest.raises(ValueError, match="more than 1 value"):
            nb.batch_norm_train(x, axis=axis)
        return
    y, mean, invstd = nb.batch_norm_train(x, p["weight"], p["bias"], eps=p["eps"], axis=axis)
    ry, _, rinvstd = naive.batch_norm_train(x, p["weight"], p["bias"], p["eps"], axis)
    _close(y, ry, dtype, "y")
    _close(invstd, rinvstd, dtype, "invstd")
    dx, dw, db = nb.batch_norm_backward(p["dy"], x, mean, invstd, p["weight"], axis=axis)
    rdx, rdw, rdb = naive.batch_norm_backward(p["dy"], x, p["weight"], p["eps"], axis)
    # dx cancels terms of size |weight * invstd * dy|; invstd is returned rounded
    # to the input dtype (as PyTorch's), so that is the scale of the error.
    terms = np.abs(np.asarray(p["dy"], np.float64)).max() * np.max(np.abs(p["weight"] * rinvstd))
    _close(dx, rdx, dtype, "dx", scale=terms)
    _close(dw, rdw, dtype, "dweight")
    _close(db, rdb, dtype, "dbias")
    rm, rv = p["rm"].copy(), p["rv"].copy()
    y2 = nb.batch_norm(x, rm, rv, p["weight"], p["bias"], training=True,
                       momentum=p["momentum"], eps=p["eps"], axis=axis)
    ry2, rrm, rrv = naive.batch_norm(x, p["rm"], p["rv"], p["weight"], p["bias"], True,
                                     p["momentum"], p["eps"], axis)
    _close(y2, ry2, dtype, "batch_norm y")
    _close(rm, rrm, dtype, "running_mean")
    _close(rv, rrv, dtype, "running_var")


@FAST
@given(problems())
def test_fuzz_fast(p):
    check_problem(p)


@pytest.mark.slow  # also out of `pytest -m "not slow"`, which replaces addopts' -m
@pytest.mark.fuzz_long
@LONG
@given(problems())
def test_fuzz_long(p):
    check_problem(p)
