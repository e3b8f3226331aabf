"""The float64 reference itself is checked against central finite differences."""

import numpy as np
import pytest

import naive


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 3), -1)])
def test_naive_backward_matches_finite_differences(rng, shape, axis):
    x = rng.standard_normal(shape) * 2 + 1
    nfeat = shape[axis]
    w = rng.uniform(0.5, 1.5, nfeat)
    b = rng.standard_normal(nfeat)
    dy = rng.standard_normal(shape)

    def loss():
        y, _, _ = naive.batch_norm_train(x, w, b, 1e-5, axis)
        return float(np.sum(dy * y))

    num_dx, num_dw, num_db = naive.finite_difference(loss, [x, w, b])
    dx, dw, db = naive.batch_norm_backward(dy, x, w, 1e-5, axis)
    np.testing.assert_allclose(dx, num_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, num_dw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, num_db, rtol=1e-6, atol=1e-7)


def test_naive_stats_are_textbook(rng):
    x = rng.standard_normal((4, 3, 5))
    mean, var = naive.batch_stats(x, 1)
    for c in range(3):
        vals = x[:, c, :].ravel()
        assert mean[c] == pytest.approx(sum(vals) / vals.size, rel=1e-13)
        assert var[c] == pytest.approx(sum((v - mean[c]) ** 2 for v in vals) / vals.size, rel=1e-12)
