"""The fast CPU kernels' own guarantees: both paths give identical bits, results
do not depend on the thread count, and the shifted float64 sums stay accurate
when the shift (a feature's first value) is a far outlier."""

import json

import numpy as np
import pytest

import naive
import numbabn as nb
from conftest import assert_close
from harness import run_json
from numbabn._cpu import feature_ops as ops

# (shape, axis): fused NCHW, two-phase NCHW (3 channels, huge inner), dense and
# channels-last two-phase, inner smaller than a vector, several row blocks, and
# whole rows streamed from memory (backward sums one row at a time).
PATH_CASES = [
    ((16, 32, 9, 9), 1),
    ((4, 3, 150, 150), 1),
    ((700, 300), 1),
    ((6, 20, 20, 40), -1),
    ((300, 10, 3), 1),
    ((9000, 64), 1),
]


def test_path_cases_cover_both_channels_last_backward_sums():
    by_row = {shape: ops.plan((int(np.prod(shape)) // shape[axis], shape[axis], 1), 4, 2).by_row
              for shape, axis in PATH_CASES if axis == -1 or len(shape) == 2}
    assert by_row == {(700, 300): 0, (6, 20, 20, 40): 0, (9000, 64): 1}


@pytest.fixture
def force_path(monkeypatch):
    """Force the NCHW fused (True) or two-phase (False) path."""
    plan = ops.plan

    def force(fused):
        def patched(shape3, itemsize, nread):
            g = plan(shape3, itemsize, nread)
            return g if shape3[2] == 1 else g._replace(fused=int(fused))

        monkeypatch.setattr(ops, "plan", patched)
    return force


def _run_all(x, dy, w, b, axis):
    y, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    m, v = nb.batch_stats(x, axis=axis)
    return y, mean, invstd, dx, dw, db, m, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [c for c in PATH_CASES if c[1] == 1 and len(c[0]) > 2])
def test_fused_and_two_phase_paths_give_identical_bits(rng, force_path, dtype, shape, axis):
    x = (5 + 3 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, shape[axis]).astype(dtype)
    b = rng.uniform(-1, 1, shape[axis]).astype(dtype)
    force_path(True)
    fused = _run_all(x, dy, w, b, axis)
    force_path(False)
    two_phase = _run_all(x, dy, w, b, axis)
    for a, c in zip(fused, two_phase):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("shape,axis", PATH_CASES)
def test_batch_stats_equals_training_statistics_bitwise(rng, shape, axis):
    x = (2 + rng.standard_normal(shape)).astype(np.float32)
    _, mean, _ = nb.batch_norm_train(x, axis=axis)
    m, _ = nb.batch_stats(x, axis=axis)
    np.testing.assert_array_equal(m, mean)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", PATH_CASES)
def test_matches_naive_on_both_families(rng, dtype, shape, axis):
    x = (5 + 3 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, shape[axis]).astype(dtype)
    b = rng.uniform(-1, 1, shape[axis]).astype(dtype)
    y, mean, invstd, dx, dw, db, m, v = _run_all(x, dy, w, b, axis)
    ry, rmean, rinvstd = naive.batch_norm_train(x, w, b, axis=axis)
    rdx, rdw, rdb = naive.batch_norm_backward(dy, x, w, axis=axis)
    for what, a, r in [("y", y, ry), ("mean", mean, rmean), ("invstd", invstd, rinvstd),
                       ("dx", dx, rdx), ("stats mean", m, rmean), ("dweight", dw, rdw),
                       ("dbias", db, rdb)]:
        assert_close(a, r, dtype, scale=max(np.max(np.abs(r)), 1.0), what=what)


@pytest.mark.parametrize("shape,axis", [((4000, 3), 1), ((8, 5, 40, 40), 1), ((20, 30, 30, 8), -1)])
def test_outlier_first_value_keeps_variance_accurate(rng, shape, axis):
    """The shift is each feature's first value; make it 1e6 spreads away from
    the rest.  The cancellation in s2/n - (s1/n)**2 then costs (mean - shift)**2
    / var ~ n, harmless in float64 sums."""
    x = rng.standard_normal(shape)
    first = [0] * len(shape)
    first[axis] = slice(None)
    x[tuple(first)] = 1e6
    for dtype in (np.float32, np.float64):
        xd = x.astype(dtype)
        m, v = nb.batch_stats(xd, axis=axis)
        rm, rv = naive.batch_stats(xd, axis)
        tol = 1e-6 if dtype == np.float32 else 1e-9
        np.testing.assert_allclose(v, rv, rtol=tol)
        np.testing.assert_allclose(m, rm, rtol=tol)


@pytest.mark.parametrize("axis,shape", [(1, (64, 6, 33, 35)), (-1, (64, 33, 35, 6))])
def test_large_mean_tiny_spread_through_the_fused_and_two_phase_paths(rng, axis, shape):
    x = (1e6 + rng.standard_normal(shape)).astype(np.float32)
    y, mean, invstd = nb.batch_norm_train(x, axis=axis)
    ry, _, _ = naive.batch_norm_train(x, axis=axis)
    assert np.max(np.abs(y - ry)) <= 1e-4 * np.max(np.abs(ry))


HASH_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import numbabn as nb
cases = json.loads(sys.argv[1])
out = {}
for shape, axis in cases:
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(3)
        x = (7 + rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w = rng.uniform(0.5, 2, shape[axis]).astype(dtype)
        y, mean, invstd = nb.batch_norm_train(x, w, w, axis=axis)
        dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
        m, v = nb.batch_stats(x, axis=axis)
        ye = nb.normalize(x, m, v, w, w, axis=axis)
        h = hashlib.sha256()
        for a in (y, mean, invstd, dx, dw, db, m, v, ye):
            h.update(np.ascontiguousarray(a).tobytes())
        out[f"{shape}-{axis}-{np.dtype(dtype).name}"] = h.hexdigest()
print(json.dumps(out))
"""


def _hashes(threads):
    return run_json(HASH_SCRIPT, json.dumps([[list(s), a] for s, a in PATH_CASES]),
                    threads=threads, timeout=900)


@pytest.mark.slow  # fresh processes
def test_bitwise_identical_for_1_and_2_threads_on_every_path():
    assert _hashes(1) == _hashes(2)
