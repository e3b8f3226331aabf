"""Half-precision inputs (float16, ml_dtypes.bfloat16) through every public function.

The reference is the float64 twin (tests/naive.py) on the same half values.
y must be within 2 half ulps of max|y| of it, dx within 4 ulps of max|dx|,
whatever the layout; the saved statistics are float32, outputs in the input's
dtype, parameter gradients in the parameter's dtype.
"""

import numpy as np
import pytest

import naive
import numbabn
from conftest import HALF, assert_ulps, relayout, ulp

F32 = np.dtype(np.float32)


def half_array(rng, shape, dtype, layout="c", loc=0.0, scale=1.0, axis=1):
    nfeat = shape[axis]
    per = [1] * len(shape)
    per[axis] = nfeat
    values = loc + rng.uniform(0.5, 2, nfeat).reshape(per) * scale * rng.standard_normal(shape)
    return relayout(values.astype(dtype), layout)


CASES = [((8, 5, 6, 7), 1), ((6, 7, 5, 3), -1), ((37, 5), 1), ((3, 4, 2, 5, 3), 1), ((5, 300), 1)]
# Every layout in float16; bfloat16 (the same kernel code, other conversions) on
# two, which keeps the compile time of a cold CI run down.
DTYPE_LAYOUTS = [(HALF[0], lay) for lay in ("c", "f", "transposed", "stepped", "flipped")] + [
    (HALF[1], lay) for lay in ("c", "stepped")]


@pytest.mark.parametrize("dtype,layout", [
    pytest.param(p.values[0], lay, id=f"{p.id}-{lay}", marks=p.marks) for p, lay in DTYPE_LAYOUTS])
@pytest.mark.parametrize("shape,axis", CASES, ids=str)
def test_batch_norm_train_and_backward(rng, dtype, layout, shape, axis):
    x = half_array(rng, shape, dtype, layout, loc=1.5, axis=axis)
    dy = half_array(rng, shape, dtype, layout, axis=axis)
    c = shape[axis]
    weight = rng.uniform(0.5, 2, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(dtype)
    y, mean, invstd = numbabn.batch_norm_train(x, weight, bias, axis=axis)
    ref_y, ref_mean, ref_invstd = naive.batch_norm_train(x, weight, bias, axis=axis)
    assert_ulps(y, ref_y, dtype, 2, "y")
    assert y.strides == np.empty_like(x).strides or y.flags.c_contiguous
    assert mean.dtype == invstd.dtype == F32
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(invstd, ref_invstd, rtol=1e-6)
    dx, dweight, dbias = numbabn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    ref_dx, ref_dw, ref_db = naive.batch_norm_backward(dy, x, weight, axis=axis)
    assert_ulps(dx, ref_dx, dtype, 4, "dx")
    assert dweight.dtype == dbias.dtype == F32  # the dtype of weight
    np.testing.assert_allclose(dweight, ref_dw, rtol=1e-4, atol=1e-4 * np.abs(ref_dw).max())
    np.testing.assert_allclose(dbias, ref_db, rtol=1e-4, atol=1e-4 * np.abs(ref_db).max())


@pytest.mark.parametrize("dtype", HALF)
def test_half_parameters_give_half_gradients_and_running_stats(rng, dtype):
    x = half_array(rng, (16, 4, 5, 5), dtype)
    weight, bias = rng.uniform(0.5, 2, 4).astype(dtype), rng.standard_normal(4).astype(dtype)
    running_mean, running_var = np.zeros(4, dtype), np.ones(4, dtype)
    y = numbabn.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                           momentum=0.25)
    assert_ulps(y, naive.batch_norm_train(x, weight, bias)[0], dtype, 2, "y")
    mean, var = naive.batch_stats(x)
    rm, rv = naive.update_running_stats(np.zeros(4), np.ones(4), mean, var, x.size // 4, 0.25)
    assert running_mean.dtype == running_var.dtype == dtype
    assert_ulps(running_mean, rm, dtype, 1, "running_mean")
    assert_ulps(running_var, rv, dtype, 1, "running_var")
    y, m, s = numbabn.batch_norm_train(x, weight, bias)
    dy = half_array(rng, x.shape, dtype)
    dx, dw, db = numbabn.batch_norm_backward(dy, x, m, s, weight)
    assert dw.dtype == db.dtype == dtype
    ref = naive.batch_norm_backward(dy, x, weight)
    assert_ulps(dw, ref[1], dtype, 1, "dweight")
    assert_ulps(db, ref[2], dtype, 1, "dbias")
    # eval with half running statistics
    y = numbabn.batch_norm(x, running_mean, running_var, weight, bias, training=False)
    assert_ulps(y, naive.normalize(x, running_mean, running_var, weight, bias), dtype, 2, "eval")


@pytest.mark.parametrize("dtype", HALF)
def test_out_and_relu(rng, dtype):
    x = half_array(rng, (9, 3, 4, 4), dtype)
    out = np.full_like(x, 7)
    y, mean, invstd = numbabn.batch_norm_relu_train(x, out=out)
    assert y is out
    ref = np.maximum(naive.batch_norm_train(x)[0], 0)
    assert_ulps(y, ref, dtype, 2, "relu y")
    dy = half_array(rng, x.shape, dtype)
    dx, dw, db = numbabn.batch_norm_relu_backward(dy, y, x, mean, invstd)
    ref_dx = naive.batch_norm_backward(np.where(y.astype(np.float64) > 0, dy.astype(np.float64), 0),
                                       x)[0]
    assert_ulps(dx, ref_dx, dtype, 4, "relu dx")
    assert dw is None and db is None
    x2 = x.copy()
    z = numbabn.batch_norm_elemt(x2, mean, invstd, out=x2)
    assert z is x2
    assert_ulps(z, naive.batch_norm_train(x)[0], dtype, 2, "elemt in place")


@pytest.mark.parametrize("dtype", HALF)
def test_split_primitives(rng, dtype):
    x = half_array(rng, (12, 3, 5, 2), dtype, loc=3)
    dy = half_array(rng, x.shape, dtype)
    count, mean, m2 = numbabn.batch_moments(x)
    ref_mean, ref_var = naive.batch_stats(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(m2 / count, ref_var, rtol=1e-10)
    smean, svar = numbabn.batch_stats(x)
    assert smean.dtype == svar.dtype == F32
    invstd = (1 / np.sqrt(ref_var + 1e-5)).astype(np.float32)
    sum_dy, sum_dy_xmu = numbabn.batch_norm_backward_reduce(dy, x, smean, invstd)
    dx = numbabn.batch_norm_backward_elemt(dy, x, smean, invstd, None, sum_dy, sum_dy_xmu, count)
    assert_ulps(dx, naive.batch_norm_backward(dy, x)[0], dtype, 4, "elemt dx")
    y = numbabn.batch_norm_elemt(x, smean, invstd)
    assert_ulps(y, naive.batch_norm_train(x)[0], dtype, 2, "elemt y")


@pytest.mark.parametrize("dtype,layout", [
    pytest.param(p.values[0], lay, id=f"{p.id}-{lay}", marks=p.marks)
    for p in HALF for lay in (("c", "transposed", "stepped") if p.id == "float16" else ("c",))])
def test_family(rng, dtype, layout):
    x = half_array(rng, (4, 6, 5, 8), dtype, layout, loc=2)
    dy = half_array(rng, x.shape, dtype, layout)
    lw, lb = rng.uniform(0.5, 2, (5, 8)).astype(dtype), rng.standard_normal((5, 8)).astype(F32)
    y, mean, rstd = numbabn.layer_norm_train(x, (5, 8), lw, lb)
    assert mean.dtype == rstd.dtype == F32
    assert_ulps(y, naive.layer_norm(x, (5, 8), lw, lb)[0], dtype, 2, "layer_norm")
    dx, dw, db = numbabn.layer_norm_backward(dy, x, mean, rstd, (5, 8), lw)
    ref = naive.layer_norm_backward(dy, x, (5, 8), lw)
    assert_ulps(dx, ref[0], dtype, 4, "layer_norm dx")
    assert dw.dtype == db.dtype == dtype
    gw, gb = rng.uniform(0.5, 2, 6).astype(F32), rng.standard_normal(6).astype(F32)
    y, mean, rstd = numbabn.group_norm_train(x, 3, gw, gb)
    assert_ulps(y, naive.group_norm(x, 3, gw, gb)[0], dtype, 2, "group_norm")
    dx, dw, db = numbabn.group_norm_backward(dy, x, mean, rstd, 3, gw)
    assert_ulps(dx, naive.group_norm_backward(dy, x, 3, gw)[0], dtype, 4, "group_norm dx")
    assert dw.dtype == F32
    y, mean, rstd = numbabn.instance_norm_train(x)
    assert_ulps(y, naive.instance_norm(x)[0], dtype, 2, "instance_norm")
    dx, _, _ = numbabn.instance_norm_backward(dy, x, mean, rstd)
    assert_ulps(dx, naive.instance_norm_backward(dy, x)[0], dtype, 4, "instance_norm dx")
    eps = float(np.finfo(np.float32).eps)  # PyTorch's default for half inputs (float opmath)
    y, rstd = numbabn.rms_norm_train(x, 8, lw[0])
    assert_ulps(y, naive.rms_norm(x, (8,), lw[0], eps=eps)[0], dtype, 2, "rms_norm")
    dx, dw = numbabn.rms_norm_backward(dy, x, rstd, 8, lw[0])
    assert_ulps(dx, naive.rms_norm_backward(dy, x, (8,), lw[0], eps=eps)[0], dtype, 4, "rms dx")
    running_mean, running_var = np.zeros(6, dtype), np.ones(6, dtype)
    y = numbabn.instance_norm(x, running_mean, running_var, use_input_stats=True)
    assert running_mean.dtype == dtype and np.any(running_mean.astype(np.float32) != 0)


@pytest.mark.parametrize("dtype", HALF)
def test_hard_cases(rng, dtype):
    """A large mean next to a tiny spread (values a few ulps apart), values near
    the top of the range, and a NaN and an inf that stay in their feature."""
    top = 2.0 ** (15 if dtype.name == "float16" else 120)
    for loc, step in ((1024.0, ulp(dtype, 1024.0)), (top, ulp(dtype, top))):
        steps = rng.integers(-8, 9, (64, 3, 4, 4))
        x = (loc + steps * step).astype(dtype)
        assert len(np.unique(x.astype(np.float64))) > 4
        y, mean, invstd = numbabn.batch_norm_train(x)
        assert_ulps(y, naive.batch_norm_train(x)[0], dtype, 2, f"y at {loc:g}")
        dy = half_array(rng, x.shape, dtype)
        dx = numbabn.batch_norm_backward(dy, x, mean, invstd)[0]
        assert_ulps(dx, naive.batch_norm_backward(dy, x)[0], dtype, 4, f"dx at {loc:g}")
    x = half_array(rng, (16, 3, 4, 4), dtype)
    x[3, 1, 2, 2] = np.nan
    x[5, 2, 0, 1] = np.inf
    y, mean, invstd = numbabn.batch_norm_train(x)
    yf = y.astype(np.float64)
    assert np.isnan(yf[:, 1]).all() and np.isnan(mean[1])
    assert np.isnan(yf[:, 2]).any()  # inf - mean and inf / inf
    assert_ulps(y[:, :1], naive.batch_norm_train(x[:, :1])[0], dtype, 2, "clean feature")


@pytest.mark.parametrize("dtype", HALF)
def test_results_are_bitwise_reproducible_for_any_thread_count(rng, dtype):
    import numba
    x = half_array(rng, (64, 8, 32, 32), dtype)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = numbabn.batch_norm_train(x)[0]
        numba.set_num_threads(before)
        two = numbabn.batch_norm_train(x)[0]
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one.view(np.uint16), two.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF)
def test_bad_half_arguments_are_refused_before_anything_changes(rng, dtype):
    x = half_array(rng, (8, 3, 4), dtype)
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    with pytest.raises(TypeError, match=rf"weight must have dtype float32 or {dtype}"):
        numbabn.batch_norm(x, rm, rv, np.ones(3, np.float64), training=True)
    assert not rm.astype(np.float32).any() and (rv.astype(np.float32) == 1).all()
    dy = half_array(rng, x.shape, np.float32)
    with pytest.raises(TypeError, match=rf"dy must have dtype {dtype}"):
        numbabn.batch_norm_backward(dy, x, np.zeros(3, F32), np.ones(3, F32))
    out = np.zeros(x.shape, np.float32)
    with pytest.raises(TypeError, match=rf"out must have dtype {dtype}"):
        numbabn.batch_norm_train(x, out=out)
    assert not out.any()
    with pytest.raises(ValueError, match="eps"):
        numbabn.batch_norm_train(x, eps=-1.0)


@pytest.mark.parametrize("dtype", HALF)
def test_the_wrapper_short_paths_give_the_full_path_bits(rng, dtype, monkeypatch):
    # A native CPU call with float32 per-feature arguments converts nothing;
    # with half ones it widens only those (numbabn._half._half_vectors); an
    # ``out`` takes the full path (_call). All three must give the same bits.
    import numbabn._half as half_module
    full_calls = []
    full_path = half_module._call
    monkeypatch.setattr(half_module, "_call", lambda *a: full_calls.append(a) or full_path(*a))
    x = half_array(rng, (8, 6, 5, 5), dtype, loc=2.0)
    dy = half_array(rng, x.shape, dtype)
    w16, b16 = rng.uniform(0.5, 2, 6).astype(dtype), rng.standard_normal(6).astype(dtype)
    w32, b32 = w16.astype(F32), b16.astype(F32)

    def same(a, b):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()

    f32 = numbabn.batch_norm_train(x, w32, b32, 1e-5)
    f16 = numbabn.batch_norm_train(x, w16, b16, 1e-5)
    assert not full_calls
    full = numbabn.batch_norm_train(x, w16, b16, 1e-5, out=np.empty_like(x))
    assert len(full_calls) == 1
    for a, b, c in zip(f32, f16, full):
        same(a, b)
        same(a, c)
    mean, invstd = f32[1], f32[2]
    d32 = numbabn.batch_norm_backward(dy, x, mean, invstd, w32)
    d16 = numbabn.batch_norm_backward(dy, x, mean, invstd, w16)
    dfull = numbabn.batch_norm_backward(dy, x, mean, invstd, w16, out=np.empty_like(x))
    assert d32[1].dtype == F32 and d16[1].dtype == dtype  # the weight's dtype
    for k in range(3):
        same(d16[k], dfull[k])
    same(d32[0], d16[0])
    same(d32[1].astype(dtype), d16[1])
    rm, rv = rng.standard_normal(6).astype(dtype), rng.uniform(0.5, 2, 6).astype(dtype)
    for training in (False, True):
        r32, v32 = rm.astype(F32), rv.astype(F32)
        r16, v16 = rm.copy(), rv.copy()
        same(numbabn.batch_norm(x, r32, v32, w32, b32, training=training),
             numbabn.batch_norm(x, r16, v16, w16, b16, training=training))
        same(r32.astype(dtype), r16)  # half running statistics updated in their dtype
        same(v32.astype(dtype), v16)
    m16, s16 = mean.astype(dtype), invstd.astype(dtype)
    e16 = numbabn.batch_norm_elemt(x, m16, s16, w16, b16)
    same(e16, numbabn.batch_norm_elemt(x, m16, s16, w16, b16, out=np.empty_like(x)))
    same(e16, numbabn.batch_norm_elemt(x, m16.astype(F32), s16.astype(F32), w32, b32))
    lw = rng.uniform(0.5, 2, x.shape[1:]).astype(dtype)
    for fn, args32, args16 in (
            (numbabn.layer_norm_train, (x, x.shape[1:], lw.astype(F32)), (x, x.shape[1:], lw)),
            (numbabn.group_norm_train, (x, 3, w32, b32), (x, 3, w16, b16)),
            (numbabn.rms_norm_train, (x, x.shape[-1:], w32[:5]), (x, x.shape[-1:], w16[:5]))):
        same(fn(*args32)[0], fn(*args16)[0])
    n = len(full_calls)
    # what the full path refuses, it still refuses, with its message
    with pytest.raises(TypeError, match=rf"weight must have dtype float32 or {dtype}"):
        numbabn.batch_norm_train(x, w32.astype(np.float64))
    with pytest.raises(TypeError, match=rf"dy must have dtype {dtype}"):
        numbabn.batch_norm_backward(dy.astype(F32), x, mean, invstd, w16)
    assert len(full_calls) == n + 2


@pytest.mark.parametrize("shape", [(4, 8, 5, 6), (2, 8, 40, 50)], ids=str)
@pytest.mark.parametrize("dtype,layout", [
    pytest.param(p.values[0], lay, id=f"{p.id}-{lay}", marks=p.marks)
    for p in HALF for lay in ("c", "transposed", "channels_last")])
def test_family_backward_kernels_give_the_float32_kernels_bits_rounded(rng, dtype, layout,
                                                                        shape):
    """The family's backward reads and writes half values in its own kernels
    (one-run rows, rows of runs, whole runs, channels-last; serial and
    parallel): dx is the float32 kernels' dx on the widened values, rounded,
    and the parameter gradients are theirs."""
    if layout == "channels_last":
        def relay(a):
            return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    else:
        def relay(a):
            return relayout(a, layout)
    x = relay(half_array(rng, shape, dtype, loc=2))
    dy = relay(half_array(rng, shape, dtype))
    x32, dy32 = relay(x.astype(F32)), relay(dy.astype(F32))
    tail = shape[2:]
    w = rng.uniform(0.5, 2, tail).astype(F32)
    cw = rng.uniform(0.5, 2, shape[1]).astype(F32)
    _, lm, lr = numbabn.layer_norm_train(x32, tail)
    _, rr = numbabn.rms_norm_train(x32, tail[-1:])
    _, gm, gr = numbabn.group_norm_train(x32, 4)
    _, im, ir = numbabn.instance_norm_train(x32)
    calls = [
        (numbabn.layer_norm_backward, lambda d, a: (d, a, lm, lr, tail, w)),
        (numbabn.rms_norm_backward, lambda d, a: (d, a, rr, tail[-1:], w[0])),
        (numbabn.group_norm_backward, lambda d, a: (d, a, gm, gr, 4, cw)),
        (numbabn.instance_norm_backward, lambda d, a: (d, a, im, ir, cw)),
    ]
    for fn, args in calls:
        got, want = fn(*args(dy, x)), fn(*args(dy32, x32))
        assert got[0].dtype == dtype, fn.__name__
        np.testing.assert_array_equal(got[0].view(np.uint16),
                                      _rounded(want[0], dtype).view(np.uint16), fn.__name__)
        for a, b32 in zip(got[1:], want[1:]):
            assert a.dtype == F32  # the weight's dtype
            np.testing.assert_array_equal(a, b32, fn.__name__)


@pytest.mark.parametrize("dtype", HALF)
def test_family_backward_two_phase_rows_and_half_weights(rng, dtype):
    """Few long rows (the two-phase backward, parallel) and half weights
    (their gradients rounded to the weight's dtype)."""
    x = half_array(rng, (4, 20000), dtype, loc=3, axis=0)
    dy = half_array(rng, x.shape, dtype, axis=0)
    x32, dy32 = x.astype(F32), dy.astype(F32)
    w = rng.uniform(0.5, 2, 20000).astype(dtype)
    _, mean, rstd = numbabn.layer_norm_train(x32, 20000)
    got = numbabn.layer_norm_backward(dy, x, mean, rstd, 20000, w)
    want = numbabn.layer_norm_backward(dy32, x32, mean, rstd, 20000, w.astype(F32))
    np.testing.assert_array_equal(got[0].view(np.uint16), _rounded(want[0], dtype).view(np.uint16))
    assert got[1].dtype == got[2].dtype == dtype
    np.testing.assert_array_equal(got[1].view(np.uint16), _rounded(want[1], dtype).view(np.uint16))
    np.testing.assert_array_equal(got[2].view(np.uint16), _rounded(want[2], dtype).view(np.uint16))
    assert_ulps(got[0], naive.layer_norm_backward(dy, x, (20000,), w)[0], dtype, 4, "dx")


def test_conversions_match_numpy_and_ml_dtypes_on_every_value():
    """The CPU conversions, F16C and integer code alike, against NumPy's float16
    and ml_dtypes' bfloat16 casts, on every 16-bit pattern and on float32
    values from subnormal to overflow."""
    from numbabn._cpu import half as H
    from numbabn._half import BFLOAT16_KIND, FLOAT16_KIND
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.arange(1 << 16, dtype=np.uint16)
    rng = np.random.default_rng(5)
    values = np.concatenate([
        (rng.standard_normal(1 << 16) * 10.0 ** rng.integers(-12, 8, 1 << 16)).astype(np.float32),
        np.arange(0, 1 << 32, 65521, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    saved = H.HAS_F16C
    try:
        for kind, dtype in ((BFLOAT16_KIND, np.dtype(ml_dtypes.bfloat16)),
                            (FLOAT16_KIND, np.dtype(np.float16))):
            for f16c in (True, False):
                H.HAS_F16C = f16c
                wide = np.empty(bits.size, np.float32)
                H.to_float32(bits, wide, kind)
                ref = bits.view(dtype).astype(np.float32)
                np.testing.assert_array_equal(wide, ref)  # NaN where NaN
                narrow = np.empty(values.size, np.uint16)
                H.from_float32(values, narrow, kind)
                with np.errstate(all="ignore"):
                    expected = values.astype(dtype)
                nan = np.isnan(values)
                np.testing.assert_array_equal(narrow[~nan], expected.view(np.uint16)[~nan])
                assert np.isnan(narrow[nan].view(dtype).astype(np.float32)).all()
    finally:
        H.HAS_F16C = saved


def test_gpu_twin_agrees_with_the_cpu_on_float16(rng):
    cuda = pytest.importorskip("numba.cuda")
    if not cuda.is_available():
        pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM is off")
    x = half_array(rng, (4, 3, 2, 3), np.dtype(np.float16), "transposed")
    dy = half_array(rng, x.shape, np.dtype(np.float16))
    w = rng.uniform(0.5, 2, 3).astype(np.float32)
    y, mean, invstd = numbabn.batch_norm_train(x, w)
    gy, gmean, ginvstd = numbabn.batch_norm_train(cuda.to_device(x), cuda.to_device(w))
    gy = gy.copy_to_host()
    assert gy.dtype == np.float16 and gmean.copy_to_host().dtype == F32
    assert_ulps(gy, naive.batch_norm_train(x, w)[0], np.dtype(np.float16), 2, "gpu y")
    assert np.abs(gy.astype(np.float32) - y.astype(np.float32)).max() <= ulp(
        np.dtype(np.float16), np.abs(y.astype(np.float32)).max())
    dx = numbabn.batch_norm_backward(cuda.to_device(dy), cuda.to_device(x), gmean, ginvstd,
                                     cuda.to_device(w))[0].copy_to_host()
    assert_ulps(dx, naive.batch_norm_backward(dy, x, w)[0], np.dtype(np.float16), 4, "gpu dx")
    y2 = numbabn.layer_norm(cuda.to_device(x), (2, 3)).copy_to_host()
    assert_ulps(y2, naive.layer_norm(x, (2, 3))[0], np.dtype(np.float16), 2, "gpu layer_norm")


def _rounded(a32, dtype):
    with np.errstate(all="ignore"):
        return a32.astype(dtype)


KERNEL_CASES = [
    ((8, 6, 9, 9), 1, "c"),            # small planes (the plane passes)
    ((4, 3, 40, 40), 1, "c"),          # long runs, fused per feature
    ((2, 2, 300, 300), 1, "c"),        # few features: two-phase chunks
    ((6, 5, 7, 3), 1, "stepped"),      # strided runs
    ((6, 7, 5, 3), -1, "c"),           # channel-contiguous (aligned segments)
]


@pytest.mark.parametrize("dtype,shape,axis,layout", [  # bfloat16 on two of the paths
    pytest.param(p.values[0], *case, id=f"{p.id}-{case}", marks=p.marks)
    for p in HALF for case in (KERNEL_CASES if p.id == "float16" else KERNEL_CASES[::4])])
def test_half_kernels_give_the_float32_kernels_bits_rounded(rng, dtype, shape, axis, layout):
    """The kernels that read half values directly (forward, normalize,
    backward) compute in float32 exactly as the float32 kernels do on the
    widened values."""
    x = half_array(rng, shape, dtype, layout, loc=2, axis=axis)
    c = shape[axis]
    w, b = rng.uniform(0.5, 2, c).astype(F32), rng.standard_normal(c).astype(F32)
    x32 = relayout(x.astype(F32), layout)  # the same layout: the same kernel paths
    dy = half_array(rng, shape, dtype, layout, axis=axis)
    dy32 = relayout(dy.astype(F32), layout)
    for relu in (False, True):
        train = numbabn.batch_norm_relu_train if relu else numbabn.batch_norm_train
        y, mean, invstd = train(x, w, b, axis=axis)
        y32, mean32, invstd32 = train(x32, w, b, axis=axis)
        np.testing.assert_array_equal(y.view(np.uint16), _rounded(y32, dtype).view(np.uint16))
        np.testing.assert_array_equal(mean, mean32)
        np.testing.assert_array_equal(invstd, invstd32)
        if relu:  # the mask from the half output
            dx, dw, db = numbabn.batch_norm_relu_backward(dy, y, x, mean, invstd, w, axis=axis)
            dx32, dw32, db32 = numbabn.batch_norm_relu_backward(
                dy32, relayout(y.astype(F32), layout), x32, mean, invstd, w, axis=axis)
        else:
            dx, dw, db = numbabn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
            dx32, dw32, db32 = numbabn.batch_norm_backward(dy32, x32, mean, invstd, w, axis=axis)
        np.testing.assert_array_equal(dx.view(np.uint16), _rounded(dx32, dtype).view(np.uint16))
        np.testing.assert_array_equal(dw, dw32)
        np.testing.assert_array_equal(db, db32)
    var = (1 / invstd.astype(np.float64) ** 2).astype(F32)
    y = numbabn.normalize(x, mean, var, w, b, axis=axis)
    y32 = numbabn.normalize(x32, mean, var, w, b, axis=axis)
    np.testing.assert_array_equal(y.view(np.uint16), _rounded(y32, dtype).view(np.uint16))
    y = numbabn.batch_norm_elemt(x, mean, invstd, w, b, axis=axis)
    y32 = numbabn.batch_norm_elemt(x32, mean, invstd, w, b, axis=axis)
    np.testing.assert_array_equal(y.view(np.uint16), _rounded(y32, dtype).view(np.uint16))


@pytest.mark.parametrize("dtype", HALF)
def test_channels_last_half_results_do_not_depend_on_the_address(rng, dtype):
    """The channel-contiguous passes start their aligned segments at x's first
    64-byte boundary, counted in half values: every offset gives the same bits."""
    base = half_array(rng, (16, 6, 6, 24), dtype, "c", axis=-1)
    dy = half_array(rng, base.shape, dtype, "c", axis=-1)
    w = rng.uniform(0.5, 2, 24).astype(F32)
    results = []
    for offset in range(0, 40, 3):  # 2-byte steps through a 64-byte line
        buf = np.empty(base.size + 64, dtype)
        x = buf[offset:offset + base.size].reshape(base.shape)
        x[...] = base
        y, mean, invstd = numbabn.batch_norm_train(x, w, axis=-1)
        dx = numbabn.batch_norm_backward(dy, x, mean, invstd, w, axis=-1)[0]
        z = numbabn.normalize(x, mean, invstd, w, axis=-1)
        results.append((y.view(np.uint16), dx.view(np.uint16), z.view(np.uint16)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype,layout", [
    pytest.param(p.values[0], lay, id=f"{p.id}-{lay}", marks=p.marks)
    for p in HALF for lay in ("c", "transposed", "channels_last")])
def test_family_forward_kernels_give_the_float32_kernels_bits_rounded(rng, dtype, layout):
    """Layer, RMS, group and instance norm forwards read and write half values
    in their own kernels (rows, runs, channels-last): the float32 kernels' bits
    on the widened values, rounded."""
    if layout == "channels_last":  # NHWC memory (the group norm's channels-last kernels)
        def relay(a):
            return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    else:
        def relay(a):
            return relayout(a, layout)
    x = relay(half_array(rng, (4, 8, 5, 6), dtype, loc=2))
    x32 = relay(x.astype(F32))
    w, b = rng.uniform(0.5, 2, (5, 6)).astype(F32), rng.standard_normal((5, 6)).astype(F32)
    cw, cb = rng.uniform(0.5, 2, 8).astype(F32), rng.standard_normal(8).astype(F32)
    pairs = [
        (numbabn.layer_norm_train(x, (5, 6), w, b), numbabn.layer_norm_train(x32, (5, 6), w, b)),
        (numbabn.rms_norm_train(x, 6, w[0]), numbabn.rms_norm_train(x32, 6, w[0])),
        (numbabn.group_norm_train(x, 4, cw, cb), numbabn.group_norm_train(x32, 4, cw, cb)),
        (numbabn.instance_norm_train(x, cw, cb), numbabn.instance_norm_train(x32, cw, cb)),
    ]
    for got, want in pairs:
        np.testing.assert_array_equal(got[0].view(np.uint16),
                                      _rounded(want[0], dtype).view(np.uint16))
        for a, b32 in zip(got[1:], want[1:]):
            assert a.dtype == F32
            np.testing.assert_array_equal(a, b32)
