"""The host fast path: numbabn.functional's remembered plans, ops.plan's memo and
the kernel guard.  Same bits and output strides as the general path, the same
errors (before anything is modified), tunables and thread count read per call."""

import sys
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest

# The bad-input cases of tests/core/test_validation.py (importable however this file is run).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from test_validation import CASES as BAD_CASES  # noqa: E402
from test_validation import _args, _call, assert_refused_unchanged  # noqa: E402

import numbabn as nb
from numbabn import _config
from numbabn import functional as F
from numbabn._cpu import feature_ops as ops, runtime as threads

BAD = [pytest.param(func, build, exc, word, id=f"{func}-{cid}")
       for cid, funcs, build, exc, word in BAD_CASES for func in funcs
       if func != "update_running_stats"]


@pytest.mark.parametrize("func,build,exc,word", BAD)
def test_bad_input_after_a_good_call_is_refused_and_nothing_changes(rng, func, build, exc, word):
    a = _args(rng)
    _call(func, a)  # remembers x's plan
    assert F._plan_of(a["x"], 1) is not None
    assert_refused_unchanged(func, a, build, exc, word)


def _layouts(rng):
    base = (3 + 2 * rng.standard_normal((6, 5, 7, 8))).astype(np.float32)
    return [  # (name, x, axis, viewable without a copy)
        ("nchw", base, 1, True),
        ("nhwc", np.ascontiguousarray(base.transpose(0, 2, 3, 1)), -1, True),
        ("transposed", base.transpose(0, 2, 3, 1), -1, True),
        ("fortran", np.asfortranarray(base.reshape(30, 56)), 1, True),
        ("axis0", base.reshape(30, 56), 0, True),
        ("reversed", base[::-1], 1, True),
        ("stepped", base[:, :, ::2], 1, False),
    ]


def _all_results(x, axis, rng_seed=3):
    rng = np.random.default_rng(rng_seed)
    c = x.shape[axis]
    w = (1 + 0.1 * rng.standard_normal(c)).astype(x.dtype)
    b = (0.1 * rng.standard_normal(c)).astype(x.dtype)
    dy = np.empty_like(x)  # x's strides: the fast path's backward takes it
    dy[...] = rng.standard_normal(x.shape)
    rm, rv = np.zeros(c, x.dtype), np.ones(c, x.dtype)
    y, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
    yr, mr, sr = nb.batch_norm_relu_train(x, w, b, axis=axis)
    out = [y, mean, invstd, yr, mr, sr,
           *nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis),
           *nb.batch_norm_relu_backward(dy, yr, x, mr, sr, w, axis=axis),
           nb.normalize(x, mean, invstd, w, b, axis=axis),
           nb.batch_norm(x, rm, rv, w, b, axis=axis),
           nb.batch_norm(x, rm, rv, w, b, training=True, momentum=0.25, axis=axis), rm, rv,
           *nb.batch_stats(x, axis=axis)]
    return out


@pytest.mark.parametrize("case", range(7))
def test_fast_path_gives_the_general_paths_bits_and_strides(rng, case):
    name, x, axis, viewable = _layouts(rng)[case]
    F._plans.clear()
    general = _all_results(x, axis)  # first calls: the general path, which remembers
    assert (F._plan_of(x, axis) is not None) == viewable, name
    fast = _all_results(x, axis)
    for g, f in zip(general, fast):
        assert g.shape == f.shape and g.strides == f.strides and g.dtype == f.dtype, name
        np.testing.assert_array_equal(f, g, err_msg=name)


def test_plans_are_bounded(rng, monkeypatch):
    monkeypatch.setattr(F, "_MAX_PLANS", 2)
    F._plans.clear()
    for n in (4, 5, 6):
        nb.batch_stats(rng.standard_normal((n, 3)))
    assert 1 <= len(F._plans) <= 2


def test_geometry_follows_the_tunables_and_thread_count(monkeypatch):
    shape3 = (4096, 8, 64)
    before = ops.plan(shape3, 4, 1)
    monkeypatch.setattr(_config, "CHUNK_ELEMS", _config.CHUNK_ELEMS // 4)
    assert ops.plan(shape3, 4, 1).rows == before.rows // 4
    monkeypatch.setattr(_config, "FUSE_BYTES", 0)
    assert ops.plan(shape3, 4, 1).fused == 0
    monkeypatch.undo()
    assert ops.plan(shape3, 4, 1) == before
    threads_now = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert ops.plan(shape3, 4, 1).threads == 1
    finally:
        numba.set_num_threads(threads_now)
    assert ops.plan(shape3, 4, 1).threads == threads_now


def test_the_serial_threshold_is_read_per_call(monkeypatch):
    from numbabn._cpu import feature_kernels

    x = np.ones((8, 3))
    monkeypatch.setattr(_config, "SERIAL_MAX_ELEMS", 0)
    assert not threads.is_small(x) and ops._kernels(x) is feature_kernels
    monkeypatch.setattr(_config, "SERIAL_MAX_ELEMS", 100)
    assert threads.is_small(x) and ops._kernels(x) is feature_kernels.serial


def test_float32_statistics_overflow_to_inf_without_a_warning(rng):
    x = rng.standard_normal((64, 3)).astype(np.float32)
    x[:, 1] = 2.0  # var 0: invstd = 1 / sqrt(eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # general path, then the fast path
            _, _, invstd = nb.batch_norm_train(x, eps=1e-80)
            assert np.isinf(invstd[1]) and np.all(np.isfinite(invstd[[0, 2]]))
            _, _, invstd = nb.batch_norm_train(x, eps=1e-76)
            assert invstd[1] == np.float32(1e38)
            _, var = nb.batch_stats(1e30 * x)
            assert np.isinf(var[0]) and var[1] == 0


def test_large_outputs_are_whole_aligned_huge_page_mappings():
    from numbabn import _layout

    from numbabn import _config

    n = _config.LARGE_OUTPUT_BYTES // 4 + 3
    a = _layout.empty((n,), np.float32)  # untouched: no memory is used
    if _layout._MADV_HUGEPAGE is not None:
        assert a.__array_interface__["data"][0] % _layout.HUGE_PAGE == 0
    assert a.shape == (n,) and a.dtype == np.float32
    assert a.flags.writeable and a.flags.c_contiguous and a.flags.aligned
    small = _layout.empty((3, 4), np.float64)
    assert small.flags.owndata and small.shape == (3, 4)


@pytest.fixture
def small_pool(monkeypatch):
    """Outputs of 64 bytes and more on pooled mappings, in a pool of this test's own."""
    from numbabn import _config, _layout

    if _layout._MADV_HUGEPAGE is None or not _layout._POOLING:
        pytest.skip("no huge-page mappings (not Linux) or no exact refcounts (free-threaded)")
    monkeypatch.setattr(_config, "LARGE_OUTPUT_BYTES", 64)
    monkeypatch.setattr(_layout, "_pool", [])
    return _layout


def _addr(a):
    return a.__array_interface__["data"][0]


def test_pool_reuses_only_outputs_nothing_refers_to(rng, small_pool):
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    first = nb.batch_norm_train(x)[0]
    expected = first.copy()
    kept = {"view": first[1:, 2], "memoryview": memoryview(first),
            "array over a memoryview": np.asarray(memoryview(first)), "output": first}  # last
    address = _addr(first)
    del first
    for name in list(kept):
        y = nb.batch_norm_train(x)[0]
        assert _addr(y) != address, f"handed out again while a {name} refers to it"
        np.testing.assert_array_equal(kept["output"], expected)  # not written over
        del kept[name], y
    y = nb.batch_norm_train(2 * x)[0]  # nothing refers to the first output any more
    assert _addr(y) == address
    np.testing.assert_array_equal(y, nb.batch_norm_train(2 * x, out=np.empty_like(x))[0])
    assert len(small_pool._pool) <= small_pool.cfg.POOL_BUFFERS


def test_pool_is_bounded_and_never_shared_between_threads(rng, small_pool, monkeypatch):
    import threading

    monkeypatch.setattr(small_pool.cfg, "POOL_BUFFERS", 3)
    xs = [rng.standard_normal((8, 3, 4, 5)).astype(np.float32) for _ in range(4)]
    want = [nb.batch_norm_train(x, out=np.empty_like(x))[0] for x in xs]
    errors = []

    def work(i):
        for _ in range(30):
            y = nb.batch_norm_train(xs[i])[0]
            if not np.array_equal(y, want[i]):
                errors.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    assert len(small_pool._pool) <= 3


def test_outputs_on_huge_page_mappings_give_the_same_bits(rng, monkeypatch):
    from numbabn import _layout

    monkeypatch.setattr(_layout, "_pool", [])
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, invstd = nb.batch_norm_train(x)
    before = [y, mean, invstd, nb.batch_norm_backward(dy, x, mean, invstd)[0]]
    monkeypatch.setattr(_layout.cfg, "LARGE_OUTPUT_BYTES", 64)
    y, mean, invstd = nb.batch_norm_train(x)
    dx = nb.batch_norm_backward(dy, x, mean, invstd)[0]
    if _layout._MADV_HUGEPAGE is not None:  # on a mapping of its own
        assert y.__array_interface__["data"][0] % _layout.HUGE_PAGE == 0
    for a, b in zip(before, [y, mean, invstd, dx]):
        assert a.strides == b.strides
        np.testing.assert_array_equal(a, b)
