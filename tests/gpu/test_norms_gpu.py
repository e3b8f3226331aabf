"""The GPU twins of the per-row norms (numbabn._gpu.row_ops) against the float64
twins and the CPU path.

Runs under the CUDA simulator by default (see conftest.py), on small shapes
with small blocks (8 threads of 4 values: rows span several chunks) and small
parameter blocks (several blocks per affine group).  One test compiles every
kernel to PTX for a real GPU when NVVM is installed.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import naive
import numbabn
from numbabn import _config

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM is off", allow_module_level=True)

# float64 runs the simulator's same Python as float32, at the same cost: in CI, not the quick loop.
DTYPES = [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)]
TOL = {np.float32: 3e-5, np.float64: 1e-11}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_config, "GPU_THREADS", 8)
    monkeypatch.setattr(_config, "GPU_ITEMS_PER_THREAD", 4)
    monkeypatch.setattr(_config, "CHUNK_ELEMS", 48)


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


def close(got, ref, dtype, what=""):
    ref = np.asarray(ref, np.float64)
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(host(got), np.float64), ref, rtol=tol,
                               atol=tol * scale, err_msg=what)


def device(a, layout="c"):
    """A device array with the values of ``a`` and the layout named."""
    from numbabn._gpu.layout import strided_view

    if layout == "c":
        return cuda.to_device(np.ascontiguousarray(a))
    if layout == "channels_last":
        order = (0,) + tuple(range(2, a.ndim)) + (1,)
        d = cuda.to_device(np.ascontiguousarray(a.transpose(order)))
        strides = [0] * a.ndim
        for i, axis in enumerate(order):
            strides[axis] = d.strides[i]
        return strided_view(d, a.shape, tuple(strides))
    if layout == "stepped":
        big = np.zeros((a.shape[0] * 2,) + a.shape[1:], a.dtype)
        big[::2] = a
        d = cuda.to_device(big)
        return strided_view(d, a.shape, (d.strides[0] * 2,) + tuple(d.strides[1:]))
    raise ValueError(layout)


def data(shape, dtype, seed=0, loc=3.0):
    rng = np.random.default_rng(seed)
    x = (loc + rng.uniform(0.5, 2) * rng.standard_normal(shape)).astype(dtype)
    return x, rng.standard_normal(shape).astype(dtype), rng


LAYOUTS = ["c", "channels_last", "stepped"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,nshape", [((5, 3, 4), (3, 4)), ((7, 13), (13,)),
                                          ((3, 2, 3, 4), (2, 3, 4))])
def test_layer_norm_on_device(dtype, layout, shape, nshape):
    x, dy, rng = data(shape, dtype)
    w = rng.uniform(0.5, 2, nshape).astype(dtype)
    b = rng.standard_normal(nshape).astype(dtype)
    y, mean, rstd = numbabn.layer_norm_train(device(x, layout), nshape, cuda.to_device(w),
                                             cuda.to_device(b))
    assert isinstance(y, type(cuda.device_array(1))) and y.dtype == x.dtype
    ry, rmean, rrstd = naive.layer_norm(x, nshape, w, b)
    cy, cmean, crstd = numbabn.layer_norm_train(x, nshape, w, b)
    assert mean.shape == cmean.shape
    for got, ref, cpu, what in [(y, ry, cy, "y"), (mean, rmean, cmean, "mean"),
                                (rstd, rrstd, crstd, "rstd")]:
        close(got, ref, dtype, what)
        close(got, cpu, dtype, what + " vs cpu")
    dx, dw, db = numbabn.layer_norm_backward(device(dy, layout), device(x, layout), mean, rstd,
                                             nshape, cuda.to_device(w))
    rdx, rdw, rdb = naive.layer_norm_backward(dy, x, nshape, w)
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")
    close(db, rdb, dtype, "dbias")
    assert dw.shape == nshape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,groups", [((2, 6, 3, 3), 1), ((2, 6, 3, 3), 2),
                                          pytest.param((2, 6, 3, 3), 6, marks=pytest.mark.slow),
                                          ((3, 4, 5), 2)])
def test_group_norm_on_device(dtype, layout, shape, groups):
    x, dy, rng = data(shape, dtype, seed=1)
    c = shape[1]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    y, mean, rstd = numbabn.group_norm_train(device(x, layout), groups, cuda.to_device(w),
                                             cuda.to_device(b))
    ry, rmean, rrstd = naive.group_norm(x, groups, w, b)
    close(y, ry, dtype, "y")
    close(mean, rmean, dtype, "mean")
    close(rstd, rrstd, dtype, "rstd")
    dx, dw, db = numbabn.group_norm_backward(device(dy, layout), device(x, layout), mean, rstd,
                                             groups, cuda.to_device(w))
    rdx, rdw, rdb = naive.group_norm_backward(dy, x, groups, w)
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")
    close(db, rdb, dtype, "dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["c", "channels_last"])
def test_instance_norm_and_running_stats_on_device(dtype, layout):
    shape = (3, 2, 3, 4)
    x, dy, rng = data(shape, dtype, seed=2)
    w = rng.uniform(0.5, 2, 2).astype(dtype)
    b = rng.standard_normal(2).astype(dtype)
    rm = rng.standard_normal(2).astype(dtype)
    rv = rng.uniform(0.5, 2, 2).astype(dtype)
    drm, drv = cuda.to_device(rm), cuda.to_device(rv)
    y = numbabn.instance_norm(device(x, layout), drm, drv, cuda.to_device(w), cuda.to_device(b),
                              momentum=0.3)
    close(y, naive.instance_norm(x, w, b)[0], dtype, "y")
    ref_m, ref_v = naive.instance_running_stats(rm, rv, x, momentum=0.3)
    close(drm, ref_m, dtype, "running_mean")
    close(drv, ref_v, dtype, "running_var")
    _, mean, rstd = numbabn.instance_norm_train(device(x, layout), cuda.to_device(w))
    dx, dw, db = numbabn.instance_norm_backward(device(dy, layout), device(x, layout), mean,
                                                rstd, cuda.to_device(w))
    rdx, rdw, rdb = naive.instance_norm_backward(dy, x, w)
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")
    close(db, rdb, dtype, "dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["c", "stepped"])
def test_rms_norm_on_device(dtype, layout):
    shape, nshape = (6, 3, 5), (3, 5)
    x, dy, rng = data(shape, dtype, seed=3, loc=0.5)
    w = rng.uniform(0.5, 2, nshape).astype(dtype)
    y, rstd = numbabn.rms_norm_train(device(x, layout), nshape, cuda.to_device(w))
    ry, rrstd = naive.rms_norm(x, nshape, w)
    close(y, ry, dtype, "y")
    close(rstd, rrstd, dtype, "rstd")
    dx, dw = numbabn.rms_norm_backward(device(dy, layout), device(x, layout), rstd, nshape,
                                       cuda.to_device(w))
    rdx, rdw = naive.rms_norm_backward(dy, x, nshape, w)
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")
    y = numbabn.rms_norm(device(x, layout), nshape)
    close(y, naive.rms_norm(x, nshape)[0], dtype, "no weight")


def test_large_mean_tiny_spread_and_nan_on_device():
    rng = np.random.default_rng(4)
    x = (1e4 + 1e-2 * rng.standard_normal((4, 40))).astype(np.float32)
    ry = naive.layer_norm(x, (40,))[0]
    y = host(numbabn.layer_norm(cuda.to_device(x), 40))
    assert np.max(np.abs(y - ry)) <= 1e-6 * np.max(np.abs(ry))
    x[2, 7] = np.nan
    y = host(numbabn.layer_norm(cuda.to_device(x), 40))
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, 0)).all()


def test_mixed_host_and_device_arrays_raise():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError, match="same device"):
        numbabn.layer_norm(cuda.to_device(x), 4, np.ones(4, np.float32))


# Compiles every per-row kernel for a real GPU (sm_90) with NVVM, in a process
# without the simulator; prints NO-NVVM where NVVM is not installed.
_PTX_CHECK = r"""
import sys, types as pytypes
from numba import cuda, typeof
from numba.core import types
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    print("NO-NVVM")
    sys.exit(0)
import numba.cuda.dispatcher
numba.cuda.dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(
    compute_capability=(9, 0))
from numbabn._config import GPU_JIT
from numbabn._gpu import row_kernels as k
from numbabn._core import Affine

geom, aff = typeof(k.RowGeometry(32, 3, 2, 4)), typeof(Affine(2, 3, 1))
f64, flag, i64 = types.float64, types.boolean, types.int64
count = 0
for dt in (types.float32, types.float64):
    x, v, v64 = types.Array(dt, 4, "A"), types.Array(dt, 1, "A"), types.Array(f64, 1, "A")
    p3, t64, tx = types.Array(f64, 3, "C"), types.Array(f64, 2, "C"), types.Array(dt, 2, "C")
    sigs = [
        ("moments_partials", (x, geom, p3)),
        ("merge_moments", (p3, geom, i64, f64, flag, tx, t64)),
        ("normalize", (x, v, v, aff, tx, t64, geom, x)),
        ("backward_partials", (x, x, v, v, aff, geom, p3)),
        ("merge_backward", (p3, geom, i64, v, v64, flag, tx, t64)),
        ("dx_pass", (x, x, v, aff, tx, geom, x)),
        ("grad_partials", (x, x, aff, tx, t64, geom, p3)),
        ("merge_grads", (p3, geom, i64, t64)),
        ("to_dtype", (v64, v)),
    ]
    for name, sig in sigs:
        ptx, _ = cuda.compile_ptx(getattr(k, name).py_func, sig, cc=(9, 0),
                                  fastmath=GPU_JIT["fastmath"])
        count += 1
print("compiled", count)
"""


@pytest.mark.slow  # compiles every kernel to PTX in a fresh process
def test_row_kernels_compile_for_a_gpu():
    """The simulator types nothing: compile each kernel to PTX as a GPU would."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    result = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    if "NO-NVVM" in result.stdout:
        pytest.skip("the CUDA toolkit's NVVM is not installed")
    assert "compiled 18" in result.stdout
