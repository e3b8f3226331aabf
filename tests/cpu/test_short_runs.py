"""The passes for short runs: NCHW-like batch norm over small planes (the
elementwise passes over runs of fewer than ``PLANE_MAX_BYTES`` bytes go along
whole samples, see ``feature_kernels.affine_planes`` and ``dx_planes``),
channels-last group/instance norm (per sample along the channels,
``row_kernels.forward_cl``) and NCHW group/instance norm's backward by whole
weight runs (``row_kernels.backward_runs``).

Elementwise passes must give the per-run pass's bits (the per-run pass is what
runs with ``PLANE_MAX_BYTES = 0``); sums taken in another order must match the
float64 reference and stay the same bits for any thread count."""

import numba
import numpy as np
import pytest

import naive
import numbabn as nb
from numbabn import _config as cfg
from conftest import assert_close

PLANES = [((32, 64, 4, 4), np.float32), ((16, 40, 7, 7), np.float32), ((8, 24, 5, 5), np.float64),
          ((4, 10, 3, 5), np.float32), ((130, 3, 4, 8), np.float32)]


def _data(rng, shape, dtype, loc=0.0):
    c = shape[1]
    x = (loc + rng.uniform(-3, 3, (1, c) + (1,) * (len(shape) - 2))
         + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.uniform(-1, 1, c).astype(dtype)
    return x, dy, w, b


@pytest.fixture
def per_run(monkeypatch):
    """Call a function with the per-run passes (no plane path)."""
    def call(f, *args, **kw):
        with monkeypatch.context() as m:
            m.setattr(cfg, "PLANE_MAX_BYTES", 0)
            return f(*args, **kw)
    return call


@pytest.mark.parametrize("shape,dtype", PLANES)
def test_plane_elementwise_passes_have_the_per_run_bits(rng, per_run, shape, dtype):
    x, dy, w, b = _data(rng, shape, dtype, loc=100.0)
    rm, rv = x.mean(axis=(0, 2, 3)).astype(dtype), x.var(axis=(0, 2, 3)).astype(dtype)
    y = nb.normalize(x, rm, rv, w, b)
    assert np.array_equal(y, per_run(nb.normalize, x, rm, rv, w, b))
    for f in (nb.batch_norm_train, nb.batch_norm_relu_train):
        got, want = f(x, w, b), per_run(f, x, w, b)
        for a, e in zip(got, want):
            assert np.array_equal(a, e), f.__name__
    mean, invstd = nb.batch_norm_train(x, w, b)[1:]
    sum_dy, sum_dy_xmu = nb.batch_norm_backward_reduce(dy, x, mean, invstd)
    n = x.size // x.shape[1]
    dx = nb.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, n)
    assert np.array_equal(dx, per_run(nb.batch_norm_backward_elemt, dy, x, mean, invstd, w,
                                      sum_dy, sum_dy_xmu, n))
    assert_close(y, naive.normalize(x, rm, rv, w, b), dtype, what="normalize")


@pytest.mark.parametrize("shape,dtype", PLANES)
def test_small_plane_backward(rng, shape, dtype):
    x, dy, w, b = _data(rng, shape, dtype)
    _, mean, invstd = nb.batch_norm_train(x, w, b)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w)
    rdx, rdw, rdb = naive.batch_norm_backward(dy, x, w)
    scale = np.abs(rdx).max()
    assert_close(dx, rdx, dtype, scale=scale, what="dx")
    assert_close(dw, rdw, dtype, scale=np.abs(rdw).max(), what="dweight")
    assert_close(db, rdb, dtype, scale=np.abs(rdb).max(), what="dbias")
    # the fused ReLU's masked backward and the split reduce agree with the sums above
    y = nb.batch_norm_relu_train(x, w, b)[0]
    mdx = nb.batch_norm_relu_backward(dy, y, x, mean, invstd, w)[0]
    assert_close(mdx, nb.batch_norm_backward(np.where(y > 0, dy, 0).astype(dtype), x, mean,
                                             invstd, w)[0], dtype, scale=scale, what="relu dx")
    sum_dy = nb.batch_norm_backward_reduce(dy, x, mean, invstd)[0]
    assert np.array_equal(sum_dy.astype(dtype), db)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = nb.batch_norm_backward(dy, x, mean, invstd, w)
    finally:
        numba.set_num_threads(threads)
    for a, e in zip(one, (dx, dw, db)):
        assert np.array_equal(a, e)


def _channels_last(a):
    perm = (0,) + tuple(range(2, a.ndim)) + (1,)
    inv = (0, a.ndim - 1) + tuple(range(1, a.ndim - 1))
    return np.ascontiguousarray(a.transpose(perm)).transpose(inv)


# the last two have more positions than one block of the channels-last
# backward's sums (BWD_NC_ROWS), ending in a short block
GROUPS = [((8, 64, 7, 7), 32, np.float32), ((4, 48, 5, 6), 4, np.float64),
          ((2, 6, 5, 3), 3, np.float32), ((3, 16, 4, 4, 4), 8, np.float32),
          ((2, 32, 12, 11), 8, np.float32), ((3, 24, 10, 9), 24, np.float64)]


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape,groups,dtype", GROUPS)
def test_group_norm_short_and_whole_runs(rng, shape, groups, dtype, layout):
    """Channels-last: per sample along the channels; NCHW: the backward by
    whole weight runs (``row_kernels.backward_runs``)."""
    relayout = _channels_last if layout == "channels_last" else np.ascontiguousarray
    x, dy, w, b = (relayout(a) if a.ndim > 1 else a for a in _data(rng, shape, dtype, 1e3))
    y, mean, rstd = nb.group_norm_train(x, groups, w, b)
    assert y.strides == x.strides  # same memory order out
    assert_close(y, naive.group_norm(x, groups, w, b)[0], dtype, scale=np.abs(y).max(), what="y")
    dx, dw, db = nb.group_norm_backward(dy, x, mean, rstd, groups, w)
    rdx, rdw, rdb = naive.group_norm_backward(dy, x, groups, w)
    assert_close(dx, rdx, dtype, scale=np.abs(rdx).max(), what="dx")
    assert_close(dw, rdw, dtype, scale=np.abs(rdw).max(), what="dweight")
    assert_close(db, rdb, dtype, scale=np.abs(rdb).max(), what="dbias")
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1 = nb.group_norm_train(x, groups, w, b)[0]
        g1 = nb.group_norm_backward(dy, x, mean, rstd, groups, w)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(y1, y)
    for a, e in zip(g1, (dx, dw, db)):
        assert np.array_equal(a, e)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_instance_norm_short_and_whole_runs(rng, layout):
    relayout = _channels_last if layout == "channels_last" else np.ascontiguousarray
    x, dy, w, b = (relayout(a) if a.ndim > 1 else a
                   for a in _data(rng, (4, 16, 6, 5), np.float32, 50.0))
    y, mean, rstd = nb.instance_norm_train(x, w, b)
    assert_close(y, naive.instance_norm(x, w, b)[0], np.float32, scale=np.abs(y).max(), what="y")
    dx, dw, db = nb.instance_norm_backward(dy, x, mean, rstd, w)
    rdx, rdw, rdb = naive.instance_norm_backward(dy, x, w)
    assert_close(dx, rdx, np.float32, scale=np.abs(rdx).max(), what="dx")
    assert_close(dw, rdw, np.float32, scale=np.abs(rdw).max(), what="dweight")


def test_small_plane_backward_into_a_strided_out(rng):
    x, dy, w, b = _data(rng, (16, 12, 4, 4), np.float32)
    _, mean, invstd = nb.batch_norm_train(x, w, b)
    dx = nb.batch_norm_backward(dy, x, mean, invstd, w)[0]
    big = np.full((16, 24, 4, 4), np.nan, np.float32)
    out = big[:, ::2]  # not C-contiguous: the per-run dx pass
    nb.batch_norm_backward(dy, x, mean, invstd, w, out=out)
    assert np.array_equal(out, dx)
    assert np.isnan(big[:, 1::2]).all()
