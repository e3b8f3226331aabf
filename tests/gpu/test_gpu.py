"""The GPU backend (numbabn._gpu) against the CPU path and a float64 NumPy reference.

Runs under the CUDA simulator by default (see conftest.py) or on a real GPU with
``NUMBA_ENABLE_CUDASIM=0``; skipped when neither is available.  The simulator
runs one Python thread per CUDA thread, so most tests shrink the blocks
(``small_blocks``): 8 threads of 4 values, so that small odd shapes still
split every feature over several blocks, and channel-contiguous data over
several feature tiles.  One test runs the shipped configuration, and one
compiles every kernel to PTX with NVVM (the simulator types nothing).  The
matrix of every public function on both backends is ``test_twins.py``; this
file holds what is GPU-specific (device views, caches, launcher, errors), and
``test_gpu_launches.py`` the launches per operation, the reductions' merge
whatever order their blocks finish in, and the public path taken without
numba-cuda's private names.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import naive
import numbabn
from numbabn import _config

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM is off", allow_module_level=True)

SIMULATOR = bool(int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

# (shape, axis): NCHW-like with several blocks per feature and a 1-value last
# block, channels-last NHWC, dense (N, C) over two feature tiles, 3-D (N, C, L).
CASES = [
    pytest.param((5, 3, 13), 1, id="NCL"),
    pytest.param((2, 4, 3, 3), -1, id="NHWC"),
    pytest.param((21, 5), 1, id="NC"),
    pytest.param((3, 2, 4, 5), 1, id="NCHW"),
]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: 3e-5, np.float64: 1e-11}


def slow(case):
    """``case`` marked slow: NCL's several blocks per feature take seconds per call
    under the simulator; the quick loop (``-m "not slow"``) keeps the smaller cases."""
    return pytest.param(*case.values, id=case.id, marks=[*case.marks, pytest.mark.slow])


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_config, "GPU_THREADS", 8)
    monkeypatch.setattr(_config, "GPU_ITEMS_PER_THREAD", 4)
    monkeypatch.setattr(_config, "GPU_FEATURE_TILE", 4)


def to_host(a):
    return None if a is None else a.copy_to_host()


def dev(a):
    return None if a is None else cuda.to_device(a)


class CAIWrapper:
    """Exposes only ``__cuda_array_interface__`` (what CuPy and PyTorch give)."""

    def __init__(self, device_array):
        self._a = device_array

    @property
    def __cuda_array_interface__(self):
        if SIMULATOR:  # the simulator's arrays are host NumPy arrays
            from numbabn._numba_private import cuda as _private

            return dict(_private.sim_ndarray(self._a).__array_interface__, version=3)
        return self._a.__cuda_array_interface__


def close(got, ref, dtype, what=""):
    ref = np.asarray(ref, dtype=np.float64)
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol, atol=tol * scale,
                               err_msg=what)


# --------------------------------------------------------------------------- #
# float64 reference: the naive twin (tests/naive.py)
# --------------------------------------------------------------------------- #
def ref_train(x, w, b, eps, axis):
    y, mean, invstd = naive.batch_norm_train(x, w, b, eps, axis)
    return y, mean, invstd, naive.batch_stats(x, axis)[1]


def ref_backward(dy, x, w, eps, axis):
    return naive.batch_norm_backward(dy, x, w, eps, axis)


def make(shape, axis, dtype, seed=0, loc=1.0, spread=3.0):
    rng = np.random.default_rng(seed)
    nfeat = shape[axis]
    x = (loc + spread * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, nfeat).astype(dtype)
    b = rng.standard_normal(nfeat).astype(dtype)
    return x, dy, w, b


# --------------------------------------------------------------------------- #
# Agreement with the CPU path and the reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [slow(CASES[0]), *CASES[1:]])
def test_train_backward_stats_match_cpu_and_reference(shape, axis, dtype):
    x, dy, w, b = make(shape, axis, dtype)
    y, mean, invstd = numbabn.batch_norm_train(dev(x), dev(w), dev(b), eps=1e-3, axis=axis)
    assert isinstance(y, type(cuda.device_array(1)))
    assert y.shape == x.shape and y.dtype == x.dtype and mean.dtype == x.dtype
    ry, rmean, rinvstd, rvar = ref_train(x, w, b, 1e-3, axis)
    cy, cmean, cinvstd = numbabn.batch_norm_train(x, w, b, eps=1e-3, axis=axis)
    for got, ref, cpu, what in [(y, ry, cy, "y"), (mean, rmean, cmean, "mean"),
                                (invstd, rinvstd, cinvstd, "invstd")]:
        close(to_host(got), ref, dtype, what)
        close(to_host(got), cpu, dtype, what + " vs cpu")

    dx, dw, db = numbabn.batch_norm_backward(dev(dy), dev(x), mean, invstd, dev(w), axis=axis)
    rdx, rdw, rdb = ref_backward(dy, x, w, 1e-3, axis)
    cdx, cdw, cdb = numbabn.batch_norm_backward(dy, x, to_host(mean), to_host(invstd), w, axis=axis)
    for got, ref, cpu, what in [(dx, rdx, cdx, "dx"), (dw, rdw, cdw, "dweight"),
                                (db, rdb, cdb, "dbias")]:
        assert got.dtype == x.dtype
        close(to_host(got), ref, dtype, what)
        close(to_host(got), cpu, dtype, what + " vs cpu")

    m, v = numbabn.batch_stats(dev(x), axis=axis)
    close(to_host(m), rmean, dtype, "batch_stats mean")
    close(to_host(v), rvar, dtype, "batch_stats var")


@pytest.mark.parametrize("shape, axis", [slow(CASES[0]), CASES[2]])
def test_train_and_backward_out(shape, axis):
    """``out=`` on the device: a separate array, ``x`` itself, and ``dy`` itself."""
    dtype = np.float32
    x, dy, w, b = make(shape, axis, dtype, seed=3)
    y_ref, mean, invstd = numbabn.batch_norm_train(x, w, b, axis=axis)
    dx_ref, _, _ = numbabn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)

    out = dev(np.zeros_like(x))
    y, dmean, dinvstd = numbabn.batch_norm_train(dev(x), dev(w), dev(b), axis=axis, out=out)
    assert y is out
    close(out.copy_to_host(), y_ref, dtype, "train out")
    device_x = dev(x)
    numbabn.batch_norm_train(device_x, dev(w), dev(b), axis=axis, out=device_x)
    close(device_x.copy_to_host(), y_ref, dtype, "train in place")

    device_dy = dev(dy)
    dx, _, _ = numbabn.batch_norm_backward(device_dy, dev(x), dmean, dinvstd, dev(w), axis=axis,
                                           out=device_dy)
    assert dx is device_dy
    close(device_dy.copy_to_host(), dx_ref, dtype, "backward out=dy")


@pytest.mark.parametrize("shape, axis", [CASES[0], CASES[2]])
def test_normalize_eval_and_out(shape, axis):
    dtype = np.float32
    x, _, w, b = make(shape, axis, dtype, seed=1)
    rng = np.random.default_rng(2)
    mean = rng.standard_normal(x.shape[axis]).astype(dtype)
    var = rng.uniform(0.5, 3.0, x.shape[axis]).astype(dtype)
    ref = numbabn.normalize(x, mean, var, w, b, axis=axis)
    y = numbabn.normalize(dev(x), dev(mean), dev(var), dev(w), dev(b), axis=axis)
    close(to_host(y), ref, dtype, "normalize")

    device_x = dev(x)
    out = numbabn.normalize(device_x, dev(mean), dev(var), axis=axis, out=device_x)
    assert out is device_x
    close(device_x.copy_to_host(), numbabn.normalize(x, mean, var, axis=axis), dtype, "in place")

    y_eval = numbabn.batch_norm(dev(x), dev(mean), dev(var), dev(w), dev(b), axis=axis)
    close(to_host(y_eval), ref, dtype, "batch_norm eval")


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_updated_in_place_on_device(dtype):
    shape, axis = (4, 3, 5), 1
    x, _, w, b = make(shape, axis, dtype, seed=3)
    rm = np.linspace(-1, 1, 3).astype(dtype)
    rv = np.linspace(0.5, 2, 3).astype(dtype)
    device_rm, device_rv = dev(rm), dev(rv)
    y = numbabn.batch_norm(dev(x), device_rm, device_rv, dev(w), dev(b), training=True,
                           momentum=0.3, axis=axis)
    rm_cpu, rv_cpu = rm.copy(), rv.copy()
    y_cpu = numbabn.batch_norm(x, rm_cpu, rv_cpu, w, b, training=True, momentum=0.3, axis=axis)
    close(to_host(y), y_cpu, dtype, "y")
    close(device_rm.copy_to_host(), rm_cpu, dtype, "running_mean")
    close(device_rv.copy_to_host(), rv_cpu, dtype, "running_var")
    _, rmean, _, rvar = ref_train(x, w, b, 1e-5, axis)
    n = x.size // 3
    close(device_rv.copy_to_host(), 0.7 * rv + 0.3 * rvar * n / (n - 1), dtype, "vs ref")

    mean, var = numbabn.batch_stats(dev(x), axis=axis)
    numbabn.update_running_stats(device_rm, device_rv, mean, var, count=n, momentum=1.0)
    close(device_rm.copy_to_host(), rmean, dtype, "momentum=1 mean")
    close(device_rv.copy_to_host(), rvar * n / (n - 1), dtype, "momentum=1 var")


def test_cuda_array_interface_inputs_are_views():
    dtype = np.float32
    shape, axis = (2, 4, 3, 3), -1
    x, dy, w, b = make(shape, axis, dtype, seed=4)
    device_rm, device_rv = dev(np.zeros(3, dtype)), dev(np.ones(3, dtype))
    y = numbabn.batch_norm(CAIWrapper(dev(x)), CAIWrapper(device_rm), CAIWrapper(device_rv),
                           CAIWrapper(dev(w)), CAIWrapper(dev(b)), training=True, axis=axis)
    rm_cpu, rv_cpu = np.zeros(3, dtype), np.ones(3, dtype)
    y_cpu = numbabn.batch_norm(x, rm_cpu, rv_cpu, w, b, training=True, axis=axis)
    close(to_host(y), y_cpu, dtype, "y")
    # The running stats were updated through the wrappers, in the original memory.
    close(device_rm.copy_to_host(), rm_cpu, dtype, "running_mean")
    close(device_rv.copy_to_host(), rv_cpu, dtype, "running_var")

    # A Fortran-ordered (N, C) array seen through the interface: a (1, C, N) view.
    xf = np.asfortranarray(make((9, 3), 1, dtype, seed=5)[0])
    yf, _, _ = numbabn.batch_norm_train(CAIWrapper(cuda.to_device(xf)))
    close(to_host(yf), numbabn.batch_norm_train(xf)[0], dtype, "fortran")


def test_strided_device_input_and_output():
    dtype = np.float64
    x, dy, w, b = make((4, 3, 4, 5), 1, dtype, seed=6)
    device_x = dev(x)[:, :, ::2]  # H and W cannot be merged: copied on the device
    ref = numbabn.batch_norm_train(np.ascontiguousarray(x[:, :, ::2]), axis=1)
    got = numbabn.batch_norm_train(device_x, axis=1)
    for g, r in zip(got, ref):
        close(to_host(g), r, dtype)
    out = dev(np.zeros((4, 3, 4, 5), dtype))[:, :, ::2]
    mean, var = numbabn.batch_stats(device_x)
    result = numbabn.normalize(device_x, mean, var, out=out)
    assert result is out
    close(to_host(out), ref[0], dtype, "strided out")


# --------------------------------------------------------------------------- #
# Errors: mixed host/device, and the same bad-input errors as the CPU path
# --------------------------------------------------------------------------- #
def test_mixing_host_and_device_names_the_argument():
    x, dy, w, b = make((4, 3, 5), 1, np.float32)
    with pytest.raises(TypeError, match="weight is a host array"):
        numbabn.batch_norm_train(dev(x), w, dev(b))
    with pytest.raises(TypeError, match="bias is a GPU array"):
        numbabn.batch_norm_train(x, w, dev(b))
    with pytest.raises(TypeError, match="dy is a GPU array"):
        numbabn.batch_norm_backward(dev(dy), x, w, w)
    with pytest.raises(TypeError, match="running_var is a host array"):
        numbabn.batch_norm(dev(x), dev(w), w, training=True)
    with pytest.raises(TypeError, match="var is a GPU array"):
        numbabn.update_running_stats(w.copy(), w.copy(), w, dev(w), count=20)
    with pytest.raises(TypeError, match="out is a host array"):
        numbabn.normalize(dev(x), dev(w), dev(w), out=x)


BAD = {
    "weight length": lambda A, x, v3: numbabn.batch_norm_train(x, weight=A(np.ones(4, np.float32))),
    "weight dtype": lambda A, x, v3: numbabn.batch_norm_train(x, weight=A(np.ones(3))),
    "int x": lambda A, x, v3: numbabn.batch_stats(A(np.ones((4, 3), np.int32))),
    "1-D x": lambda A, x, v3: numbabn.batch_stats(A(np.ones(4, np.float32))),
    "axis": lambda A, x, v3: numbabn.batch_stats(x, axis=3),
    "eps": lambda A, x, v3: numbabn.normalize(x, v3, v3, eps=-1.0),
    "momentum": lambda A, x, v3: numbabn.batch_norm(x, v3, A(np.ones(3, np.float32)),
                                                    training=True, momentum=1.5),
    "one value per feature": lambda A, x, v3: numbabn.batch_norm(
        A(np.ones((1, 3), np.float32)), v3, A(np.ones(3, np.float32)), training=True),
    "dy shape": lambda A, x, v3: numbabn.batch_norm_backward(
        A(np.ones((4, 3), np.float32)), x, v3, v3),
    "running pair": lambda A, x, v3: numbabn.batch_norm(x, v3, None, training=True),
    "eval without stats": lambda A, x, v3: numbabn.batch_norm(x, None, None),
    "count": lambda A, x, v3: numbabn.update_running_stats(v3, A(np.ones(3, np.float32)), v3,
                                                           v3, count=1),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_same_errors_and_nothing_changes(case):
    x = np.random.default_rng(7).standard_normal((4, 3, 2)).astype(np.float32)
    v3 = np.full(3, 0.25, np.float32)
    with pytest.raises((TypeError, ValueError)) as cpu_error:
        BAD[case](lambda a: a, x, v3)
    device_x, device_v3 = dev(x), dev(v3)
    with pytest.raises(cpu_error.type) as gpu_error:
        BAD[case](dev, device_x, device_v3)
    assert str(gpu_error.value) == str(cpu_error.value)
    np.testing.assert_array_equal(device_x.copy_to_host(), x)
    np.testing.assert_array_equal(device_v3.copy_to_host(), v3)


# --------------------------------------------------------------------------- #
# Numerics and reproducibility
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape, axis", [slow(pytest.param((6, 2, 50), 1, id="NCL")),
                                         pytest.param((150, 2), 1, id="NC")])
@pytest.mark.parametrize("loc, spread", [(1e4, 1e-2), (1e6, 1.0)])
def test_ill_conditioned_float32(shape, axis, loc, spread):
    x = make(shape, axis, np.float32, seed=8, loc=loc, spread=spread)[0]
    y, mean, invstd = numbabn.batch_norm_train(dev(x), axis=axis)
    ry = ref_train(x.astype(np.float64), 1.0, 0.0, 1e-5, axis)[0]  # same float32 values
    err = np.abs(to_host(y) - ry).max() / np.abs(ry).max()
    assert err < 1e-4, err


@pytest.mark.filterwarnings("ignore:.*overflow encountered in cast:RuntimeWarning")  # simulator
def test_data_near_1e30_float32():
    """Outputs finite and accurate; the float32 variance is inf (its correct
    float32 value), the float64 one of the layers' path finite, as on the CPU."""
    from numbabn import functional

    x, dy, _, _ = make((8, 3, 5), 1, np.float32, seed=16, loc=0.0, spread=1e30)
    y, mean, invstd, var = functional._batch_norm_train(dev(x), None, None, 1e-5, 1, None)
    ry, _, rinvstd, rvar = ref_train(x, 1.0, 0.0, 1e-5, 1)
    assert np.abs(to_host(y) - ry).max() <= 1e-5 * np.abs(ry).max()
    assert var.dtype == np.float64
    np.testing.assert_allclose(to_host(var), rvar, rtol=1e-12)
    np.testing.assert_allclose(to_host(invstd), rinvstd, rtol=1e-6)
    assert np.isinf(to_host(numbabn.batch_stats(dev(x))[1])).all()
    dx, _, _ = numbabn.batch_norm_backward(dev(dy), dev(x), mean, invstd)
    rdx = ref_backward(dy, x, None, 1e-5, 1)[0]
    assert np.abs(to_host(dx) - rdx).max() <= 1e-5 * np.abs(rdx).max()


def test_out_overlapping_an_input_goes_through_a_temporary():
    """``out`` sharing memory with ``x`` or ``dy`` without being that array (a
    view shifted by one row): the result is as if the inputs were read first."""
    dtype = np.float64
    x, dy, w, b = make((6, 3), 1, dtype, seed=17)
    base = dev(np.concatenate([x, np.zeros((1, 3), dtype)]))
    device_x, out = base[:6], base[1:]
    y_ref = numbabn.batch_norm_train(x, w, b)[0]
    y, mean, invstd = numbabn.batch_norm_train(device_x, dev(w), dev(b), out=out)
    assert y is out
    close(to_host(base)[1:], y_ref, dtype, "forward into x shifted by a row")

    base = dev(np.concatenate([dy, np.zeros((1, 3), dtype)]))
    device_dy, out = base[:6], base[1:]
    mean, invstd = numbabn.batch_norm_train(x)[1:]
    dx_ref = numbabn.batch_norm_backward(dy, x, mean, invstd)[0]
    dx = numbabn.batch_norm_backward(device_dy, dev(x), dev(mean), dev(invstd), out=out)[0]
    assert dx is out
    close(to_host(base)[1:], dx_ref, dtype, "backward into dy shifted by a row")


@pytest.mark.parametrize("shape", [slow(pytest.param((5, 3, 13), id="NCL")),
                                   pytest.param((21, 5, 1), id="NC")])
def test_fused_relu_is_relu_of_the_plain_operations_bit_for_bit(shape):
    """The GPU twins of the CPU's fused batch-norm + ReLU ops (``relu=True``,
    ``y3``): the forward is ``where(y < 0, 0, y)`` of the plain forward (NaN and
    -0.0 kept), the backward the plain backward of ``where(y > 0, dy, 0)``,
    NaN or inf in ``dy`` masked where ``y <= 0`` or NaN."""
    from numbabn._gpu import feature_ops as ops

    dtype = np.float32
    x, dy, w, b = make(shape, 1, dtype, seed=18)
    x[0, 1, 0] = np.nan  # feature 1 all NaN: y NaN, so its dy is all masked
    mean0, invstd0 = (to_host(a) for a in ops.batch_norm_train(dev(x), dev(w), dev(b), 1e-5,
                                                                 None)[:2])
    plain, fused = dev(np.empty_like(x)), dev(np.empty_like(x))
    ops.batch_norm_train(dev(x), dev(w), dev(b), 1e-5, plain)
    ops.batch_norm_train(dev(x), dev(w), dev(b), 1e-5, fused, True)
    y = to_host(plain)
    y_relu = np.where(y < 0, np.float32(0), y)
    assert to_host(fused).tobytes() == y_relu.tobytes()
    assert np.isnan(y_relu[:, 1]).all() and (y_relu[:, [0, 2]] >= 0).all()

    dy[y_relu <= 0] = np.inf  # masked away: must not reach dx or the sums
    dy[:, 1] = np.nan
    masked_dy = np.where(y_relu > 0, dy, np.float32(0))
    dx_plain, dx_fused = dev(np.empty_like(x)), dev(np.empty_like(x))
    grads_plain = ops.batch_norm_backward(dev(masked_dy), dev(x), dev(mean0), dev(invstd0),
                                          dev(w), dx_plain)
    grads_fused = ops.batch_norm_backward(dev(dy), dev(x), dev(mean0), dev(invstd0), dev(w),
                                          dx_fused, dev(y_relu))
    for got, ref in zip((dx_fused, *grads_fused), (dx_plain, *grads_plain)):
        assert to_host(got).tobytes() == to_host(ref).tobytes()
    assert np.isfinite(to_host(dx_fused)[:, [0, 2]]).all()


def test_nan_stays_in_its_channel():
    x, dy, w, b = make((5, 3, 13), 1, np.float32, seed=9)
    x[2, 1, 7] = np.nan
    y, mean, invstd = numbabn.batch_norm_train(dev(x), dev(w), dev(b))
    dx, dw, db = numbabn.batch_norm_backward(dev(dy), dev(x), mean, invstd, dev(w))
    y, dx = to_host(y), to_host(dx)
    for arr in (y, dx):
        assert np.isnan(arr[:, 1]).all()
        assert np.isfinite(arr[:, [0, 2]]).all()
    _, m, m2 = numbabn.batch_moments(dev(x))
    sums = numbabn.batch_norm_backward_reduce(dev(dy), dev(x), m, invstd)
    for vec in (mean, invstd, dw, m, m2, sums[1]):
        vec = to_host(vec)
        assert np.isnan(vec[1]) and np.isfinite(vec[[0, 2]]).all()


@pytest.mark.parametrize("shape, axis", [slow(CASES[0]), CASES[1]])
def test_bitwise_deterministic(shape, axis):
    x, dy, w, b = make(shape, axis, np.float32, seed=10)

    def run():
        y, mean, invstd = numbabn.batch_norm_train(dev(x), dev(w), dev(b), axis=axis)
        grads = numbabn.batch_norm_backward(dev(dy), dev(x), mean, invstd, dev(w), axis=axis)
        _, m, m2 = numbabn.batch_moments(dev(x), axis=axis)
        sums = numbabn.batch_norm_backward_reduce(dev(dy), dev(x), m, invstd, axis=axis)
        return [to_host(a) for a in (y, mean, invstd, *grads, m, m2, *sums)]

    for a, b_ in zip(run(), run()):
        assert a.tobytes() == b_.tobytes()


@pytest.mark.parametrize("shape, axis", [slow(CASES[0]), CASES[1], CASES[2]])
def test_eval_kernel_derives_the_training_parameters(shape, axis):
    """float64: eval mode with the batch mean and var gives the training output
    bit for bit (the one-launch eval kernel computes what the merge stores)."""
    x, _, w, b = make(shape, axis, np.float64, seed=14)
    y, _, _ = numbabn.batch_norm_train(dev(x), dev(w), dev(b), eps=1e-3, axis=axis)
    mean, var = numbabn.batch_stats(dev(x), axis=axis)
    y_eval = numbabn.normalize(dev(x), mean, var, dev(w), dev(b), eps=1e-3, axis=axis)
    assert to_host(y_eval).tobytes() == to_host(y).tobytes()
    y_eval = numbabn.normalize(dev(x), mean, var, eps=1e-3, axis=axis)
    y_plain, _, _ = numbabn.batch_norm_train(dev(x), eps=1e-3, axis=axis)
    assert to_host(y_eval).tobytes() == to_host(y_plain).tobytes()


def run_every_operation(shape, axis, dtype, seed=12):
    """The bytes of every result of every GPU operation on one case: training
    forward and backward (with and without weight and bias, fused ReLU),
    statistics, the split primitives, eval, running statistics, a
    CUDA-array-interface input and (4-D) a strided input copied on the device."""
    x, dy, w, b = make(shape, axis, dtype, seed=seed)
    nfeat = x.shape[axis]
    y, mean, invstd = numbabn.batch_norm_train(dev(x), dev(w), dev(b), axis=axis)
    y_plain, mean_plain, invstd_plain = numbabn.batch_norm_train(dev(x), axis=axis)
    y_relu = numbabn.batch_norm_relu_train(dev(x), dev(w), dev(b), axis=axis)[0]
    grads = numbabn.batch_norm_backward(dev(dy), dev(x), mean, invstd, dev(w), axis=axis)
    dx_plain = numbabn.batch_norm_backward(dev(dy), dev(x), mean_plain, invstd_plain,
                                           axis=axis)[0]
    relu_grads = numbabn.batch_norm_relu_backward(dev(dy), y_relu, dev(x), mean, invstd,
                                                  dev(w), axis=axis)
    stats = numbabn.batch_stats(dev(x), axis=axis)
    count, m, m2 = numbabn.batch_moments(dev(x), axis=axis)
    sums = numbabn.batch_norm_backward_reduce(dev(dy), dev(x), m, invstd, axis=axis)
    sums_x = numbabn.batch_norm_backward_reduce(dev(dy), dev(x), mean, invstd, axis=axis)
    dx_elemt = numbabn.batch_norm_backward_elemt(dev(dy), dev(x), m, invstd, dev(w), *sums,
                                                 count, axis=axis)
    y_elemt = numbabn.batch_norm_elemt(dev(x), m, invstd, dev(w), dev(b), axis=axis)
    rm, rv = dev(np.zeros(nfeat, dtype)), dev(np.ones(nfeat, dtype))
    y_train = numbabn.batch_norm(dev(x), rm, rv, dev(w), dev(b), training=True, axis=axis)
    y_eval = numbabn.batch_norm(dev(x), rm, rv, dev(w), dev(b), axis=axis)
    y_cai = numbabn.batch_norm_train(CAIWrapper(dev(x)), CAIWrapper(dev(w)), axis=axis)[0]
    results = [y, mean, invstd, y_plain, mean_plain, invstd_plain, y_relu, *grads, dx_plain,
               *relu_grads, *stats, m, m2, *sums, *sums_x, dx_elemt, y_elemt, y_train, rm, rv,
               y_eval, y_cai]
    if x.ndim == 4 and axis == 1:
        results += numbabn.batch_norm_train(dev(x)[:, :, ::2], axis=axis)
    return [to_host(a).tobytes() for a in results]


# --------------------------------------------------------------------------- #
# Host-side caches: reused scratch memory, fresh results, compiled overloads
# --------------------------------------------------------------------------- #
def pointer(a):
    """Device address of the first element."""
    if SIMULATOR:
        from numbabn._numba_private import cuda as _private

        return _private.sim_ndarray(a).__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


@pytest.mark.slow  # four cases run three times: 20 s under the simulator
def test_reused_scratch_gives_the_results_of_a_fresh_buffer():
    from numbabn._gpu import runtime as launch

    cases = [((5, 3, 13), 1, np.float32), ((21, 5), 1, np.float64),
             ((2, 4, 3, 3), -1, np.float32), ((3, 2, 4, 5), 1, np.float64)]

    def run(shape, axis, dtype):
        x, dy, w, b = make(shape, axis, dtype, seed=12)
        y, mean, invstd = numbabn.batch_norm_train(dev(x), dev(w), dev(b), axis=axis)
        grads = numbabn.batch_norm_backward(dev(dy), dev(x), mean, invstd, dev(w), axis=axis)
        stats = numbabn.batch_stats(dev(x), axis=axis)
        return [to_host(a).tobytes() for a in (y, mean, invstd, *grads, *stats)]

    fresh = []
    for case in cases:
        launch.clear_scratch()
        fresh.append(run(*case))
    launch.clear_scratch()
    # One buffer, grown and shrunk into, across shapes, dtypes and layouts.
    reused = [run(*case) for case in cases + cases[::-1]]
    assert len(launch._scratch.by_context) == 1
    assert reused == fresh + fresh[::-1]


@pytest.mark.parametrize("slab_bytes", [
    pytest.param(1 << 20, id="slab"),
    pytest.param(1024, id="small-slab", marks=pytest.mark.slow),  # 6 s each under the simulator
    pytest.param(64, id="no-slab", marks=pytest.mark.slow),
])
def test_results_of_consecutive_calls_do_not_alias(monkeypatch, slab_bytes):
    """Results stay fresh memory: parameter tables cut from slabs (one slab for
    every call, a new slab every few calls, or tables allocated one by one)."""
    from numbabn._gpu import runtime as launch

    monkeypatch.setattr(_config, "GPU_RESULT_SLAB_BYTES", slab_bytes)
    launch.clear_scratch()
    x, dy, w, b = make((5, 3, 13), 1, np.float32, seed=13)
    rm, rv = dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32))
    results, snapshots = [], []
    for shift in (0.0, 1.5):
        xs = x + np.float32(shift)
        y, mean, invstd = numbabn.batch_norm_train(dev(xs), dev(w), dev(b))
        grads = numbabn.batch_norm_backward(dev(dy), dev(xs), mean, invstd, dev(w))
        stats = numbabn.batch_stats(dev(xs))
        y_eval = numbabn.batch_norm(dev(xs), rm, rv, dev(w), dev(b))
        new = [y, mean, invstd, *grads, *stats, y_eval]
        results += new
        snapshots += [to_host(a).tobytes() for a in new]
    assert [to_host(a).tobytes() for a in results] == snapshots  # nothing overwritten
    assert len({pointer(a) for a in results}) == len(results)


def test_scratch_is_per_thread_and_reused_within_one():
    from numbabn._gpu import runtime as launch

    mine = launch.scratch((2, 3))
    assert launch.scratch((2, 3)) is mine
    other = []
    worker = threading.Thread(target=lambda: other.append(launch.scratch((2, 3))))
    worker.start()
    worker.join()
    assert pointer(other[0]) != pointer(mine)


def test_kernel_launcher_types_each_signature_once():
    """The launcher's bookkeeping, against a stand-in for numba's dispatcher."""
    from numbabn._gpu import runtime as launch

    log = []

    class Overload:
        launch_config_sensitive = False

        def launch(self, args, griddim, blockdim, stream, sharedmem):
            log.append(("overload", griddim, blockdim, stream, len(args)))

    class Config:
        def __init__(self, dispatcher, grid, block):
            self.dispatcher, self.griddim, self.blockdim = dispatcher, grid, block
            self.stream, self.sharedmem = "default stream", 0

        def __call__(self, *args):  # numba's path: type, compile if new, launch
            argtypes = tuple(self.dispatcher.typeof_pyval(a) for a in args)
            if argtypes not in self.dispatcher.overloads:
                log.append("compile")
                self.dispatcher.overloads[argtypes] = self.dispatcher.new_overload()
            log.append(("dispatcher", len(args)))

    class Dispatcher:
        __name__ = "stub"
        new_overload = Overload

        def __init__(self):
            self.overloads = {}

        def configure(self, grid, block):
            log.append("configure")
            return Config(self, grid, block)

        def __getitem__(self, grid_block):  # the public path: kernel[grid, block](*args)
            log.append(("public", grid_block))
            return lambda *args: log.append(("called", len(args)))

        def typeof_pyval(self, a):
            return (type(a), getattr(a, "dtype", None), getattr(a, "strides", None))

    kernel = launch.Kernel(Dispatcher())
    kernel._fast = True
    a = np.zeros((4, 3), np.float32)
    grid, block = launch.dim3(2), launch.dim3((8, 4))
    assert (grid, block) == ((2, 1, 1), (8, 4, 1))
    kernel.launch(grid, block, a, 3, True, np.float64(0.5))
    kernel.launch(grid, block, np.ones((4, 3), np.float32), 5, False, np.float64(2.0))
    kernel.launch(grid, block, a, 3, True, np.float64(0.5))
    assert log == ["configure", "compile", ("dispatcher", 4),
                   ("overload", grid, block, "default stream", 4),
                   ("overload", grid, block, "default stream", 4)]
    log.clear()
    kernel.launch(grid, block, a.T, 3, True, np.float64(0.5))  # other strides: new key
    kernel.launch(grid, block, a.astype(np.float64), 3, True, np.float64(0.5))  # other dtype
    assert log == ["compile", ("dispatcher", 4)] * 2

    class Unlaunchable(Overload):
        launch = None

    Dispatcher.new_overload = Unlaunchable  # no launch method: keep numba's path
    kernel = launch.Kernel(Dispatcher())
    kernel._fast = True
    log.clear()
    kernel.launch(grid, block, a)
    kernel.launch(grid, block, a)
    assert log == ["configure", "compile", ("dispatcher", 1), ("dispatcher", 1)]

    kernel = launch.Kernel(Dispatcher())
    kernel._fast = False  # the public path (private names untested or missing)
    log.clear()
    kernel.launch(grid, block, a, 3)
    assert log == [("public", (grid, block)), ("called", 2)]


@pytest.mark.skipif(SIMULATOR, reason="the simulator launches through the dispatcher")
def test_launches_use_compiled_overloads_on_a_gpu(monkeypatch):
    """On a GPU with a tested numba-cuda: kernels launch their compiled
    overloads; and the public path (plain launches, ``cuda.device_array``
    tables, interface views), forced by failing the version check, gives the
    same bits for every operation."""
    from numbabn._gpu import feature_ops as ops, runtime as launch
    from numbabn._numba_private import cuda as _private

    launch.reset()
    if not _private.version_tested():
        pytest.skip(f"{_private.provider()} is not a numba-cuda release in {_private.TESTED}")
    x = make((5, 3, 13), 1, np.float32, seed=15)[0]
    rm, rv = dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32))
    numbabn.batch_norm(dev(x), rm, rv)
    kernel = ops._NORMALIZE[0]
    assert kernel._fast and kernel._overloads
    known = len(kernel._overloads)
    numbabn.batch_norm(dev(x), rm, rv)
    assert len(kernel._overloads) == known

    cases = [((5, 3, 13), 1, np.float32), ((21, 5), 1, np.float64), ((2, 4, 3, 3), -1, np.float32)]
    fast = [run_every_operation(*case) for case in cases]
    assert _private.fast("launch") and _private.fast("views")
    monkeypatch.setattr(_private, "version_tested", lambda: False)
    launch.reset()
    try:
        with pytest.warns(RuntimeWarning, match="public path"):
            public = [run_every_operation(*case) for case in cases]
        assert not kernel._fast and not _private.fast("views")
    finally:
        monkeypatch.undo()
        launch.reset()
    assert public == fast


def test_shipped_configuration(monkeypatch):
    """The block sizes that run on a GPU (256 threads), on one small input."""
    monkeypatch.undo()
    assert _config.GPU_THREADS == 256
    x, dy, w, b = make((40, 2), 1, np.float32, seed=11)
    y, mean, invstd = numbabn.batch_norm_train(dev(x), dev(w), dev(b))
    close(to_host(y), ref_train(x, w, b, 1e-5, 1)[0], np.float32, "y")


# Compiles every kernel for a real GPU (sm_90) with NVVM, in a process without
# the simulator; prints NO-NVVM where the CUDA toolkit's NVVM is not installed.
_PTX_CHECK = r"""
import sys
from numba import cuda, typeof
from numba.core import types
from numbabn._numba_private import cuda as _private
if not _private.nvvm_available():
    print("NO-NVVM")
    sys.exit(0)
# No GPU here: device functions ask the current device for its compute capability.
_private.assume_compute_capability((9, 0))
from numbabn._config import GPU_JIT
from numbabn._gpu import feature_kernels as k, feature_ops as ops

geom, f64, flag = typeof(ops.Geometry(4, 32, 100, 8, 0)), types.float64, types.boolean
counters = types.Array(types.int32, 1, "C")
for dt in (types.float32, types.float64):
    x, v, v64, tx = (types.Array(dt, 3, "A"), types.Array(dt, 1, "A"),
                     types.Array(f64, 1, "A"), types.Array(dt, 2, "C"))
    p3, t64 = types.Array(f64, 3, "C"), types.Array(f64, 2, "C")
    sigs = []
    for fam in ("nchw", "nc"):
        sigs += [
            ("moments_" + fam, (x, v, v, flag, flag, f64, p3, counters, t64, geom, tx)),
            ("affine_" + fam, (x, tx, flag, geom, x)),
            ("dx_" + fam, (x, x, tx, x, flag, geom, x)),
        ]
        for m in (v, v64):  # statistics in the input's dtype or float64
            sigs += [
                ("normalize_" + fam, (x, m, m, flag, f64, v, v, flag, flag, geom, x)),
                ("backward_sums_" + fam, (x, x, m, x, flag, v, v, flag, flag, p3, counters, t64,
                                          geom, tx)),
                ("backward_elemt_" + fam, (x, x, m, m, v, flag, v64, v64, f64, geom, x)),
            ]
    sigs += [
        ("update_running_stats", (v, v, v64, v64, f64, f64)),
    ]
    for name, sig in sigs:
        ptx, _ = cuda.compile_ptx(getattr(k, name).py_func, sig, cc=(9, 0),
                                  fastmath=GPU_JIT["fastmath"])
        if dt == types.float32 and name.startswith(("affine_", "dx_")):
            assert ".f64" not in ptx, name + ": float64 in a float32 elementwise pass"
        if name.startswith(("moments_", "backward_sums_")):  # the last-block merge is there
            assert "atom.global.add" in ptx and "membar.gl" in ptx, name
print("compiled", len(sigs) * 2)
"""


@pytest.mark.slow  # compiles every kernel to PTX in a fresh process
def test_kernels_compile_for_a_gpu():
    """The simulator runs kernels as Python and types nothing: compile each
    kernel, for every argument type it is launched with, to PTX as a GPU would
    (and check that float32 elementwise passes hold no float64 arithmetic)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    if "NO-NVVM" in result.stdout:
        pytest.skip("the CUDA toolkit's NVVM is not installed")
    assert "compiled" in result.stdout


def test_cpu_only_import_does_not_load_numba_cuda():
    code = ("import sys, numpy as np, numbabn; numbabn.batch_norm_train(np.ones((4, 3)));"
            "assert 'numba.cuda' not in sys.modules, 'numba.cuda was imported'")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=ROOT)
