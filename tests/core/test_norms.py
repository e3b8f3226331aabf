"""Layer, group, instance and RMS norm (numbabn.norms) on the CPU: against the
float64 twins in naive.py and against PyTorch; accuracy, NaN containment,
reproducibility across thread counts and paths, and validation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close, relayout

import naive
import numbabn
from numbabn._cpu import row_ops as cpu_rows

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [np.float32, np.float64]


def channels_last(a):
    """Same values, channels (axis 1) innermost in memory."""
    order = (0,) + tuple(range(2, a.ndim)) + (1,)
    back = tuple(sorted(range(a.ndim), key=order.__getitem__))
    return np.ascontiguousarray(a.transpose(order)).transpose(back)


def lay(a, layout):
    return channels_last(a) if layout == "channels_last" else relayout(a, layout)


def rows_data(rng, shape, dtype, loc=3.0):
    """Fresh values whose rows have different means and spreads."""
    lead = shape[:1] + (1,) * (len(shape) - 1)
    locs = loc + rng.uniform(-2, 2, lead)
    scales = rng.uniform(0.5, 2, lead)
    return (locs + scales * rng.standard_normal(shape)).astype(dtype)


def params(rng, shape, dtype):
    return (rng.uniform(0.5, 2, shape).astype(dtype), rng.standard_normal(shape).astype(dtype))


def close(actual, ref, dtype, what):
    """``atol * max|ref| + rtol * |ref|``: errors relative to the array's scale."""
    scale = max(1.0, float(np.max(np.abs(ref))))
    assert_close(actual, ref, dtype, scale=scale, what=what)


LAYOUTS = ["c", "f", "transposed", "stepped", "flipped"]

# (x shape, normalized_shape): odd sizes, several trailing axes, a row longer
# than a chunk (two-phase path: fewer rows than FUSE_MIN_TASKS).
LAYER_CASES = [
    ((37, 13), (13,)),
    ((6, 5, 7), (5, 7)),
    ((2, 3, 4, 5), (4, 5)),
    ((3, 1100), (1100,)),
    ((9,), (9,)),
    ((2, 40000), (40000,)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,nshape", LAYER_CASES)
def test_layer_norm_matches_naive(rng, dtype, layout, shape, nshape):
    x = rows_data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = params(rng, nshape, dtype)
    xl, dyl = lay(x, layout), lay(dy, layout)
    y, mean, rstd = numbabn.layer_norm_train(xl, nshape, w, b)
    ry, rmean, rrstd = naive.layer_norm(x, nshape, w, b)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == rmean.shape and mean.dtype == x.dtype
    close(y, ry, dtype, "y")
    close(mean, rmean, dtype, "mean")
    close(rstd, rrstd, dtype, "rstd")
    np.testing.assert_array_equal(numbabn.layer_norm(xl, nshape, w, b), y)
    dx, dw, db = numbabn.layer_norm_backward(dyl, xl, mean, rstd, nshape, w)
    rdx, rdw, rdb = naive.layer_norm_backward(dy, x, nshape, w)
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")
    close(db, rdb, dtype, "dbias")
    assert dw.shape == nshape and dw.dtype == x.dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_without_affine_and_with_bias_only(rng, dtype):
    shape, nshape = (11, 6, 5), (6, 5)
    x = rows_data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    _, b = params(rng, nshape, dtype)
    y, mean, rstd = numbabn.layer_norm_train(x, nshape)
    close(y, naive.layer_norm(x, nshape)[0], dtype, "no affine")
    close(numbabn.layer_norm(x, nshape, bias=b), naive.layer_norm(x, nshape, bias=b)[0], dtype,
          "bias only")
    dx, dw, db = numbabn.layer_norm_backward(dy, x, mean, rstd, nshape)
    rdx, rdw, rdb = naive.layer_norm_backward(dy, x, nshape)
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")
    close(db, rdb, dtype, "dbias")
    dx2, dw2, db2 = numbabn.layer_norm_backward(dy, x, mean.astype(np.float64),
                                                rstd.reshape(11), nshape, param_grads=False)
    assert dw2 is None and db2 is None
    close(dx2, rdx, dtype, "dx, float64 and squeezed statistics")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_over_axes_permuted_in_memory(rng, dtype):
    """normalized_shape axes stored in another order: the weight follows."""
    shape, nshape = (4, 6, 5), (6, 5)
    x = rows_data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = params(rng, nshape, dtype)
    for order in [(0, 2, 1), (2, 1, 0), (1, 2, 0)]:
        back = tuple(sorted(range(3), key=order.__getitem__))
        xl = np.ascontiguousarray(x.transpose(order)).transpose(back)
        dyl = np.ascontiguousarray(dy.transpose(order)).transpose(back)
        y, mean, rstd = numbabn.layer_norm_train(xl, nshape, w, b)
        close(y, naive.layer_norm(x, nshape, w, b)[0], dtype, f"y {order}")
        dx, dw, db = numbabn.layer_norm_backward(dyl, xl, mean, rstd, nshape, w)
        rdx, rdw, rdb = naive.layer_norm_backward(dy, x, nshape, w)
        close(dx, rdx, dtype, f"dx {order}")
        close(dw, rdw, dtype, f"dweight {order}")
        close(db, rdb, dtype, f"dbias {order}")


GROUP_CASES = [
    ((4, 6, 5, 3), 1),
    ((4, 6, 5, 3), 2),
    ((4, 6, 5, 3), 3),
    ((4, 6, 5, 3), 6),
    ((3, 4, 7), 2),
    ((5, 6), 3),
    ((2, 8, 3, 4, 5), 4),
    ((2, 4, 150, 150), 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS + ["channels_last"])
@pytest.mark.parametrize("shape,groups", GROUP_CASES)
def test_group_norm_matches_naive(rng, dtype, layout, shape, groups):
    x = rows_data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = params(rng, shape[1], dtype)
    xl, dyl = lay(x, layout), lay(dy, layout)
    y, mean, rstd = numbabn.group_norm_train(xl, groups, w, b)
    ry, rmean, rrstd = naive.group_norm(x, groups, w, b)
    assert mean.shape == (shape[0], groups) and y.dtype == x.dtype
    close(y, ry, dtype, "y")
    close(mean, rmean, dtype, "mean")
    close(rstd, rrstd, dtype, "rstd")
    dx, dw, db = numbabn.group_norm_backward(dyl, xl, mean, rstd, groups, w)
    rdx, rdw, rdb = naive.group_norm_backward(dy, x, groups, w)
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")
    close(db, rdb, dtype, "dbias")


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (2, 4, 3, 2, 5)])
def test_group_norm_output_keeps_channels_last(rng, shape):
    x = channels_last(rows_data(rng, shape, np.float32))
    y = numbabn.group_norm(x, 2)
    assert y.strides == x.strides
    np.testing.assert_array_equal(y, numbabn.group_norm(np.ascontiguousarray(x), 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["c", "channels_last", "stepped"])
@pytest.mark.parametrize("shape", [(4, 3, 7), (3, 5, 4, 6), (2, 3, 2, 3, 4)])
def test_instance_norm_matches_naive(rng, dtype, layout, shape):
    x = rows_data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = params(rng, shape[1], dtype)
    xl, dyl = lay(x, layout), lay(dy, layout)
    y, mean, rstd = numbabn.instance_norm_train(xl, w, b)
    ry, rmean, rrstd = naive.instance_norm(x, w, b)
    close(y, ry, dtype, "y")
    close(mean, rmean, dtype, "mean")
    close(rstd, rrstd, dtype, "rstd")
    np.testing.assert_array_equal(numbabn.instance_norm(xl, weight=w, bias=b), y)
    dx, dw, db = numbabn.instance_norm_backward(dyl, xl, mean, rstd, w)
    rdx, rdw, rdb = naive.instance_norm_backward(dy, x, w)
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")
    close(db, rdb, dtype, "dbias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_running_statistics(rng, dtype):
    shape = (5, 3, 4, 6)
    x = rows_data(rng, shape, dtype)
    w, b = params(rng, 3, dtype)
    rm = rng.standard_normal(3).astype(dtype)
    rv = rng.uniform(0.5, 2, 3).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y = numbabn.instance_norm(x, rm, rv, w, b, momentum=0.3)
    close(y, naive.instance_norm(x, w, b)[0], dtype, "y")
    ref_m, ref_v = naive.instance_running_stats(rm0, rv0, x, momentum=0.3)
    close(rm, ref_m, dtype, "running_mean")
    close(rv, ref_v, dtype, "running_var")
    # Running statistics in use: the per-channel normalisation, nothing updated.
    before = rm.copy(), rv.copy()
    y_eval = numbabn.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    close(y_eval, naive.normalize(x, rm, rv, w, b), dtype, "eval")
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])


RMS_CASES = [((37, 13), (13,)), ((6, 5, 7), (5, 7)), ((3, 1100), (1100,)), ((2, 40000), (40000,))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,nshape", RMS_CASES)
def test_rms_norm_matches_naive(rng, dtype, layout, shape, nshape):
    x = rows_data(rng, shape, dtype, loc=0.5)
    dy = rng.standard_normal(shape).astype(dtype)
    w, _ = params(rng, nshape, dtype)
    xl, dyl = lay(x, layout), lay(dy, layout)
    for eps in (None, 1e-3):
        y, rstd = numbabn.rms_norm_train(xl, nshape, w, eps=eps)
        ry, rrstd = naive.rms_norm(x, nshape, w, eps=eps)
        close(y, ry, dtype, "y")
        close(rstd, rrstd, dtype, "rstd")
        dx, dw = numbabn.rms_norm_backward(dyl, xl, rstd, nshape, w)
        rdx, rdw = naive.rms_norm_backward(dy, x, nshape, w, eps=eps)
        close(dx, rdx, dtype, "dx")
        close(dw, rdw, dtype, "dweight")
    close(numbabn.rms_norm(xl, nshape), naive.rms_norm(x, nshape)[0], dtype, "no weight")


# --------------------------------------------------------------------------- #
# The naive twins against finite differences
# --------------------------------------------------------------------------- #
def _check_fd(loss, arrays, analytic):
    numeric = naive.finite_difference(loss, arrays)
    for a, n in zip(analytic, numeric):
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-7)


def test_naive_twins_backward_match_finite_differences(rng):
    x = rng.standard_normal((3, 2, 4)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    w2, b2 = rng.uniform(0.5, 1.5, (2, 4)), rng.standard_normal((2, 4))
    _check_fd(lambda: np.sum(dy * naive.layer_norm(x, (2, 4), w2, b2)[0]), [x, w2, b2],
              naive.layer_norm_backward(dy, x, (2, 4), w2))
    w4 = rng.uniform(0.5, 1.5, 4)
    _check_fd(lambda: np.sum(dy * naive.rms_norm(x, (4,), w4, eps=1e-5)[0]), [x, w4],
              naive.rms_norm_backward(dy, x, (4,), w4, eps=1e-5))
    xg = rng.standard_normal((2, 4, 3)) * 2 + 1
    dyg = rng.standard_normal(xg.shape)
    wg, bg = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    for groups in (1, 2, 4):
        _check_fd(lambda: np.sum(dyg * naive.group_norm(xg, groups, wg, bg)[0]), [xg, wg, bg],
                  naive.group_norm_backward(dyg, xg, groups, wg))


# --------------------------------------------------------------------------- #
# Accuracy, NaN
# --------------------------------------------------------------------------- #
def test_large_mean_tiny_spread_float32_is_accurate(rng):
    """Rows with mean 1e4 and spread 1e-2: float32 ``y`` within 1e-6 (relative
    to its scale) of float64 maths on the same float32 values."""
    x = (1e4 + 1e-2 * rng.standard_normal((64, 1000))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = params(rng, 1000, np.float32)
    y, mean, rstd = numbabn.layer_norm_train(x, 1000, w, b)
    ry = naive.layer_norm(x, (1000,), w, b)[0]
    assert np.max(np.abs(y - ry)) <= 1e-6 * np.max(np.abs(ry))
    dx, _, _ = numbabn.layer_norm_backward(dy, x, mean, rstd, 1000, w)
    rdx = naive.layer_norm_backward(dy, x, (1000,), w)[0]
    assert np.max(np.abs(dx - rdx)) <= 1e-5 * np.max(np.abs(rdx))
    xg = (1e4 + 1e-2 * rng.standard_normal((8, 8, 30, 30))).astype(np.float32)
    yg = numbabn.group_norm(xg, 4)
    ryg = naive.group_norm(xg, 4)[0]
    assert np.max(np.abs(yg - ryg)) <= 1e-6 * np.max(np.abs(ryg))
    yr = numbabn.rms_norm(x, 1000)
    assert np.max(np.abs(yr - naive.rms_norm(x, (1000,))[0])) <= 1e-6


@pytest.mark.parametrize("layout", ["c", "channels_last"])
def test_nan_stays_in_its_row(rng, layout):
    x = rows_data(rng, (4, 6, 5, 3), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    x[1, 2, 3, 1] = np.nan  # group 1 of 3 (channels 2, 3) of sample 1
    xl, dyl = lay(x, layout), lay(dy, layout)
    y, mean, rstd = numbabn.group_norm_train(xl, 3)
    bad = np.zeros(x.shape, bool)
    bad[1, 2:4] = True
    assert np.isnan(y[bad]).all() and np.isfinite(y[~bad]).all()
    assert np.isnan(mean[1, 1]) and np.isfinite(np.delete(mean.ravel(), 4)).all()
    dx, _, _ = numbabn.group_norm_backward(dyl, xl, mean, rstd, 3)
    assert np.isnan(dx[bad]).all() and np.isfinite(dx[~bad]).all()
    y = numbabn.instance_norm(xl)
    assert np.isnan(y[1, 2]).all() and np.isfinite(np.delete(y.reshape(24, -1), 8, 0)).all()
    x2 = x.reshape(12, 30)  # the NaN is in row (90 + 30 + 10) // 30 = 4
    for y2 in (numbabn.layer_norm(x2, 30), numbabn.rms_norm(x2, 30)):
        assert np.isnan(y2[4]).all() and np.isfinite(np.delete(y2, 4, 0)).all()


# --------------------------------------------------------------------------- #
# Reproducibility: paths and thread counts
# --------------------------------------------------------------------------- #
@pytest.fixture
def force_path(monkeypatch):
    """Force the fused (True) or two-phase (False) per-row path."""
    plan = cpu_rows.plan

    def force(fused):
        monkeypatch.setattr(cpu_rows, "plan",
                            lambda *a: plan(*a)._replace(fused=int(fused)))
    return force


def _run_family(x, dy, w, b):
    """Every forward and backward of the family on one (N, C, H, W) input."""
    c = x.shape[1]
    out = []
    out += numbabn.layer_norm_train(x, x.shape[1:], None, None)
    out += numbabn.layer_norm_backward(dy, x, out[1], out[2], x.shape[1:])
    y, mean, rstd = numbabn.group_norm_train(x, 2, w, b)
    out += [y, mean, rstd, *numbabn.group_norm_backward(dy, x, mean, rstd, 2, w)]
    y, mean, rstd = numbabn.instance_norm_train(x, w, b)
    out += [y, mean, rstd, *numbabn.instance_norm_backward(dy, x, mean, rstd, w)]
    y, rstd = numbabn.rms_norm_train(x, x.shape[-1], w[:1].repeat(x.shape[-1]))
    out += [y, rstd, *numbabn.rms_norm_backward(dy, x, rstd, x.shape[-1])]
    assert c % 2 == 0
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 6, 30, 40), (2, 4, 90, 100)])
@pytest.mark.parametrize("layout", ["c", "channels_last"])
def test_fused_and_two_phase_paths_give_identical_bits(rng, force_path, dtype, shape, layout):
    x = lay(rows_data(rng, shape, dtype), layout)
    dy = lay(rng.standard_normal(shape).astype(dtype), layout)
    w, b = params(rng, shape[1], dtype)
    force_path(True)
    fused = _run_family(x, dy, w, b)
    force_path(False)
    two_phase = _run_family(x, dy, w, b)
    for a, c in zip(fused, two_phase):
        np.testing.assert_array_equal(a, c)


HASH_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
sys.path[:0] = ["tests/core", "tests"]
from test_norms import _run_family, channels_last
out = {}
for shape in json.loads(sys.argv[1]):
    for dtype in (np.float32, np.float64):
        for layout in ("c", "channels_last"):
            rng = np.random.default_rng(3)
            x = (7 + rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w = rng.uniform(0.5, 2, shape[1]).astype(dtype)
            if layout == "channels_last":
                x, dy = channels_last(x), channels_last(dy)
            h = hashlib.sha256()
            for a in _run_family(x, dy, w, w):
                h.update(np.ascontiguousarray(a).tobytes())
            out[f"{shape}-{np.dtype(dtype).name}-{layout}"] = h.hexdigest()
print(json.dumps(out))
"""

# Fused rows, fused with chunked long rows, two-phase (few rows), and parameter
# blocks of several rows.
HASH_SHAPES = [[16, 4, 24, 32], [2, 4, 150, 150], [128, 2, 5, 50]]


def _hashes(threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", HASH_SCRIPT, json.dumps(HASH_SHAPES)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh processes
def test_bitwise_identical_for_1_and_2_threads():
    assert _hashes(1) == _hashes(2)


# --------------------------------------------------------------------------- #
# Validation: every bad argument raises before anything changes
# --------------------------------------------------------------------------- #
def _bad_calls(x, w, rm, rv):
    f32 = np.float32
    x2 = x.reshape(x.shape[0], -1)
    return [
        (TypeError, lambda: numbabn.layer_norm(x.astype(np.int32), x.shape[-1])),
        (TypeError, lambda: numbabn.layer_norm(x.tolist(), x.shape[-1])),
        (ValueError, lambda: numbabn.layer_norm(x, x.shape[-1] + 1)),
        (ValueError, lambda: numbabn.layer_norm(x, (x.shape[-2] + 1, x.shape[-1]))),
        (TypeError, lambda: numbabn.layer_norm(x, "4")),
        (TypeError, lambda: numbabn.layer_norm(x, ())),
        (ValueError, lambda: numbabn.layer_norm(x, x.shape[-1], np.ones(x.shape[-1] + 1, f32))),
        (TypeError, lambda: numbabn.layer_norm(x, x.shape[-1], np.ones(x.shape[-1]))),
        (ValueError, lambda: numbabn.layer_norm(x, x.shape[-1], eps=-1.0)),
        # one spatial element is refused even in an empty batch (as PyTorch)
        (ValueError, lambda: numbabn.instance_norm(x[:0, :, :1, :1], rm, rv)),
        (ValueError, lambda: numbabn.layer_norm_backward(
            x[:1], x, np.zeros((x.shape[0], 1)), np.ones((x.shape[0], 1)), x.shape[-1])),
        (ValueError, lambda: numbabn.layer_norm_backward(
            x, x, np.zeros(3, f32), np.ones(3, f32), x.shape[-1])),
        (TypeError, lambda: numbabn.layer_norm_backward(
            x, x, np.zeros(x.shape[:-1] + (1,), np.int64), np.ones(x.shape[:-1] + (1,), f32),
            x.shape[-1])),
        (ValueError, lambda: numbabn.group_norm(x, 5)),
        (ValueError, lambda: numbabn.group_norm(x, 0)),
        (TypeError, lambda: numbabn.group_norm(x, 2.0)),
        (ValueError, lambda: numbabn.group_norm(x, 2, w[:-1])),
        (TypeError, lambda: numbabn.group_norm(x, 2, w.astype(np.float64))),
        (ValueError, lambda: numbabn.group_norm(x[0, 0, 0], 1)),
        (ValueError, lambda: numbabn.group_norm_backward(x, x, np.zeros((2, 3), f32),
                                                         np.ones((2, 3), f32), 2)),
        (ValueError, lambda: numbabn.instance_norm(x2, rm, rv)),
        (ValueError, lambda: numbabn.instance_norm(x[:, :, :1, :1], rm, rv)),
        (ValueError, lambda: numbabn.instance_norm(x, rm, None)),
        (ValueError, lambda: numbabn.instance_norm(x, rm, rv[:-1])),
        (ValueError, lambda: numbabn.instance_norm(x, rm, rv, momentum=1.5)),
        (ValueError, lambda: numbabn.instance_norm(x, use_input_stats=False)),
        (TypeError, lambda: numbabn.instance_norm(x, rm, rv, use_input_stats=1)),
        (ValueError, lambda: numbabn.rms_norm(x, x.shape[-1] + 1)),
        (ValueError, lambda: numbabn.rms_norm(x, x.shape[-1], eps=0.0)),
        (TypeError, lambda: numbabn.rms_norm_backward(x, x, np.ones(x.shape[:-1] + (1,), f32),
                                                      x.shape[-1], param_grads=None)),
    ]


def test_validation_raises_before_anything_changes(rng):
    x = rows_data(rng, (3, 4, 5, 6), np.float32)
    w = np.ones(4, np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    saved = [a.copy() for a in (x, w, rm, rv)]
    for i, (error, call) in enumerate(_bad_calls(x, w, rm, rv)):
        with pytest.raises(error):
            call()
        for a, s in zip((x, w, rm, rv), saved):
            np.testing.assert_array_equal(a, s, err_msg=f"call {i} changed an argument")


def test_messages_say_what_was_expected():
    x = np.zeros((2, 6, 3), np.float32)
    with pytest.raises(ValueError, match=r"divide.*6 channels"):
        numbabn.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"normalized_shape \(4,\) must equal the trailing"):
        numbabn.layer_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        numbabn.rms_norm(x, 3, np.ones(4, np.float32))


# --------------------------------------------------------------------------- #
# Empty inputs: PyTorch's results (no kernel runs)
# --------------------------------------------------------------------------- #
EMPTY_CASES = [  # (family, x shape, normalized_shape or num_groups)
    ("layer", (0, 5), (5,)),
    ("layer", (3, 0), (0,)),
    ("layer", (0,), (0,)),
    ("layer", (2, 0, 4), (0, 4)),
    ("layer", (0, 3, 2, 4), (2, 4)),
    ("rms", (0, 5), (5,)),
    ("rms", (3, 0), (0,)),
    ("rms", (2, 3, 0), (3, 0)),
    ("group", (0, 4, 3), 2),
    ("group", (0, 4), 2),
    ("group", (2, 4, 0), 2),
    ("group", (2, 0, 3), 1),
    ("instance", (0, 3, 5), None),
    ("instance", (2, 3, 0), None),
    ("instance", (2, 0, 5, 2), None),
]


def _empty_ours(family, x, arg, w, b):
    """(y, saved statistics, dx, parameter gradients) of an empty ``x``."""
    if family == "layer":
        y, mean, rstd = numbabn.layer_norm_train(x, arg, w, b)
        dx, *grads = numbabn.layer_norm_backward(x, x, mean, rstd, arg, w)
        return y, (mean, rstd), dx, grads
    if family == "rms":
        y, rstd = numbabn.rms_norm_train(x, arg, w)
        dx, dw = numbabn.rms_norm_backward(x, x, rstd, arg, w)
        return y, (rstd,), dx, [dw]
    if family == "group":
        y, mean, rstd = numbabn.group_norm_train(x, arg, w, b)
        dx, *grads = numbabn.group_norm_backward(x, x, mean, rstd, arg, w)
        return y, (mean, rstd), dx, grads
    y, mean, rstd = numbabn.instance_norm_train(x, w, b)
    dx, *grads = numbabn.instance_norm_backward(x, x, mean, rstd, w)
    return y, (mean, rstd), dx, grads


def _empty_torch(torch, family, x, arg, w, b):
    """PyTorch's (y, saved statistics, parameter gradients), the gradients None
    where PyTorch 2.13 has none to compare: affine instance norm with no
    instances raises IndexError, group norm's dweight is NaN for empty rows."""
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    if family in ("layer", "rms"):
        if family == "layer":
            y, mean, rstd = torch.native_layer_norm(tx, arg, tw, tb, 1e-5)
            stats = (mean, rstd)
        else:
            y = torch.nn.functional.rms_norm(tx, arg, tw)
            stats = None  # not returned by PyTorch
    else:
        n, c = x.shape[:2]
        groups = c if family == "instance" else arg
        stats = None  # (no channels: PyTorch's native group norm wants a group)
        if groups:
            stats = torch.native_group_norm(tx.detach(), None, None, n, c,
                                            int(np.prod(x.shape[2:])), groups, 1e-5)[1:]
        if family == "group":
            y = torch.nn.functional.group_norm(tx, groups, tw, tb)
        elif n * c == 0:  # affine and no instances: an IndexError (the docs say so)
            with pytest.raises(IndexError):
                torch.nn.functional.instance_norm(tx, weight=tw, bias=tb)
            return torch.nn.functional.instance_norm(tx), stats, None
        else:
            y = torch.nn.functional.instance_norm(tx, weight=tw, bias=tb)
    y.sum().backward()
    if family == "group" and x.shape[0] > 0:
        # Rows with no values: PyTorch's group norm gives dweight = sum(...) * rstd = 0 * NaN;
        # its instance norm (and numbabn) the sum over no values, 0.
        assert np.isnan(tw.grad.numpy()).all()
        return y, stats, None
    return y, stats, [tw.grad] + ([] if family == "rms" else [tb.grad])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family,shape,arg", EMPTY_CASES)
def test_empty_inputs_give_pytorchs_results(rng, dtype, family, shape, arg):
    x = np.empty(shape, dtype)
    pshape = arg if family in ("layer", "rms") else shape[1:2]
    w, b = params(rng, pshape, dtype)
    y, stats, dx, grads = _empty_ours(family, x, arg, w, b)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    for g in grads:
        assert g.shape == pshape and g.dtype == dtype
        np.testing.assert_array_equal(g, 0)
    for s in stats:
        assert s.dtype == dtype
        np.testing.assert_array_equal(np.isnan(s), s is stats[-1])  # mean 0, rstd NaN
    torch = pytest.importorskip("torch")
    ty, tstats, tgrads = _empty_torch(torch, family, x, arg, w, b)
    assert tuple(ty.shape) == shape
    if tstats is not None:
        for s, t in zip(stats, tstats):
            t = t.detach().numpy().reshape(s.shape)  # group norm's are (N, G) as ours
            np.testing.assert_array_equal(s, t)
    if tgrads is not None:
        for g, t in zip(grads, tgrads):
            np.testing.assert_array_equal(g, t.numpy())


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 3, 0)])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_empty_instance_norm_leaves_running_statistics_untouched(rng, shape, use_input_stats):
    rm = rng.standard_normal(3).astype(np.float32)
    rv = rng.uniform(0.5, 2, 3).astype(np.float32)
    saved = rm.copy(), rv.copy()
    y = numbabn.instance_norm(np.empty(shape, np.float32), rm, rv,
                              use_input_stats=use_input_stats, momentum=0.5)
    assert y.shape == shape
    np.testing.assert_array_equal(rm, saved[0])
    np.testing.assert_array_equal(rv, saved[1])


def test_empty_inputs_are_still_validated():
    x = np.empty((0, 4, 3), np.float32)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        numbabn.instance_norm_train(np.empty((0, 3, 1), np.float32))
    with pytest.raises(ValueError, match="divide"):
        numbabn.group_norm(x, 3)
    with pytest.raises(ValueError, match="trailing axes"):
        numbabn.layer_norm(x, (4, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        numbabn.group_norm(x, 2, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="mean must have shape"):
        numbabn.layer_norm_backward(x, x, np.zeros((1, 4, 1), np.float32),
                                    np.zeros((0, 4, 1), np.float32), 3)


def test_empty_inputs_on_device_arrays():
    """The GPU twins return device arrays for empty inputs too (simulator by default)."""
    cuda = pytest.importorskip("numba.cuda")
    if not cuda.is_available():
        pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM is off")
    x = cuda.to_device(np.zeros((2, 4, 0), np.float32))
    y, mean, rstd = numbabn.group_norm_train(x, 2)
    dx, dw, db = numbabn.group_norm_backward(x, x, mean, rstd, 2)
    assert y.shape == dx.shape == (2, 4, 0)
    np.testing.assert_array_equal(mean.copy_to_host(), np.zeros((2, 2)))
    assert np.isnan(rstd.copy_to_host()).all()
    np.testing.assert_array_equal(dw.copy_to_host(), np.zeros(4))
    rm = cuda.to_device(np.full(4, 0.5, np.float32))
    rv = cuda.to_device(np.full(4, 2.0, np.float32))
    assert numbabn.instance_norm(cuda.to_device(np.zeros((0, 4, 3), np.float32)), rm, rv,
                                 momentum=1.0).shape == (0, 4, 3)
    np.testing.assert_array_equal(rm.copy_to_host(), 0.5)
    np.testing.assert_array_equal(rv.copy_to_host(), 2.0)
