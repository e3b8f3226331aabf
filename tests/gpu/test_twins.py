"""One matrix of cases, both backends.

Every public function runs on the CPU (NumPy arrays) and on the GPU (numba.cuda
device arrays: the CUDA simulator unless ``NUMBA_ENABLE_CUDASIM=0``) over the
same cases (dense, NCHW, NHWC, 3-D, 5-D; float32 and float64; with and without
weight and bias, float64 or input-dtype statistics where a function takes
either), and each result is checked

* against the float64 twins of ``tests/naive.py`` (or, for the split
  primitives, the textbook formula written out here in float64),
* against the other backend's result (float32 within 1e-6, float64 within 1e-12
  of the largest value), and
* for its return dtype, which must be the same on both backends.

The GPU runs with small blocks (8 threads of 4 values, at most 4 features per
tile), so these small shapes still split a feature over several blocks.
Results are computed once per (call, case, dtype, backend) and shared by the
checks.
"""

import zlib
from functools import lru_cache

import numpy as np
import pytest

import naive
import numbabn as nb
from conftest import assert_close, make_array
from numbabn import _config
from numbabn import functional as F

cuda = pytest.importorskip("numba.cuda")
GPU = cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not GPU, reason="no CUDA GPU, and NUMBA_ENABLE_CUDASIM is off")
BACKENDS = ["cpu", pytest.param("gpu", marks=NEEDS_GPU)]
# Under the simulator a GPU call costs 0.2 to 0.5 s: the quick loop (``-m "not slow"``)
# runs the GPU on the dense and NHWC cases; the NCHW family (NCHW, 3d, 5d) on the GPU
# is slow (CI runs it; the quick loop still runs those cases on the CPU).
QUICK_GPU_CASES = {"dense", "NHWC"}

CASES = {
    "dense": ((14, 3), 1),
    "NCHW": ((3, 2, 3, 4), 1),
    "NHWC": ((3, 3, 4, 2), -1),
    "3d": ((4, 3, 5), 1),
    "5d": ((2, 3, 2, 3, 2), 1),
}
DTYPES = {"f32": np.float32, "f64": np.float64}
EPS, MOMENTUM = 1e-3, 0.3
# CPU vs GPU, relative to the largest value of a result.
TWIN_TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}

# (function, variant): "affine" passes weight and bias, "plain" neither;
# "f64" passes float64 statistics (mean, invstd) to the split primitives, "x"
# statistics in the input's dtype.
CALLS = [
    ("batch_stats", ""),
    ("normalize", "affine"), ("normalize", "plain"),
    ("batch_norm_train", "affine"), ("batch_norm_train", "plain"),
    ("_batch_norm_train", "affine"),
    ("batch_norm_backward", "affine"), ("batch_norm_backward", "plain"),
    ("batch_norm", "train-affine"), ("batch_norm", "train-plain"), ("batch_norm", "eval-affine"),
    ("update_running_stats", "x"), ("update_running_stats", "f64"),
    ("batch_moments", ""),
    ("merge_moments", "halves"),
    ("batch_norm_elemt", "affine-f64"), ("batch_norm_elemt", "plain-x"),
    ("batch_norm_backward_reduce", "f64"), ("batch_norm_backward_reduce", "x"),
    ("batch_norm_backward_elemt", "affine-f64"), ("batch_norm_backward_elemt", "plain-x"),
]


@pytest.fixture(scope="module", autouse=True)
def small_blocks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_config, "GPU_THREADS", 8)
        mp.setattr(_config, "GPU_ITEMS_PER_THREAD", 4)
        mp.setattr(_config, "GPU_FEATURE_TILE", 4)
        yield


def put(backend, a):
    """``a`` where ``backend`` computes: itself, or a device copy."""
    if backend == "cpu" or a is None:
        return a
    return cuda.to_device(a)


def host(a):
    """A result as a host value (NumPy array, int or None)."""
    if a is None or isinstance(a, (int, np.integer, np.ndarray)):
        return a
    return a.copy_to_host()


def kind(a):
    """What a result is, for the dtype comparison: None, int, or its dtype."""
    if a is None:
        return None
    if isinstance(a, (int, np.integer)):
        return "int"
    return np.dtype(a.dtype)


# --------------------------------------------------------------------------- #
# Inputs, the same for both backends
# --------------------------------------------------------------------------- #
class Data:
    def __init__(self, case, dtype):
        shape, axis = CASES[case]
        rng = np.random.default_rng(zlib.crc32(f"{case}-{np.dtype(dtype)}".encode()))
        self.shape, self.axis, self.dtype = shape, axis, np.dtype(dtype)
        nfeat = shape[axis]
        self.x = make_array(rng, shape, dtype, axis=axis)
        self.dy = rng.standard_normal(shape).astype(dtype)
        self.w = rng.uniform(0.5, 2.0, nfeat).astype(dtype)
        self.b = rng.uniform(-1.0, 1.0, nfeat).astype(dtype)
        self.rm = rng.uniform(-1.0, 1.0, nfeat).astype(dtype)
        self.rv = rng.uniform(0.5, 2.0, nfeat).astype(dtype)
        self.given_mean = rng.uniform(-1.0, 1.0, nfeat).astype(dtype)  # eval statistics
        self.given_var = rng.uniform(0.5, 2.0, nfeat).astype(dtype)
        self.n = self.x.size // nfeat
        self.red = tuple(a for a in range(len(shape)) if a != axis % len(shape))
        # The batch statistics in float64 (naive), and rounded to the input's dtype.
        self.mean64, self.var64 = naive.batch_stats(self.x, axis)
        self.invstd64 = 1.0 / np.sqrt(self.var64 + EPS)

    def stats(self, variant):
        """(mean, invstd) for the split primitives: float64 or the input's dtype."""
        if "f64" in variant:
            return self.mean64, self.invstd64
        return self.mean64.astype(self.dtype), self.invstd64.astype(self.dtype)

    def bcast(self, v):
        shape = [1] * len(self.shape)
        shape[self.axis] = -1
        return np.asarray(v, np.float64).reshape(shape)

    def sums_about(self, mean):
        """Float64 ``sum(dy)`` and ``sum(dy * (x - mean))`` per feature."""
        g = self.dy.astype(np.float64)
        xc = self.x.astype(np.float64) - self.bcast(mean)
        return g.sum(axis=self.red), (g * xc).sum(axis=self.red)


@lru_cache(maxsize=None)
def data(case, dtype):
    return Data(case, dtype)


# --------------------------------------------------------------------------- #
# The calls, and their float64 references
# --------------------------------------------------------------------------- #
def call(name, variant, d, backend):
    """Run one public function on ``backend``; return its results by name."""
    P = lambda a: put(backend, a)  # noqa: E731
    affine = "affine" in variant
    w, b = (P(d.w), P(d.b)) if affine else (None, None)
    axis = d.axis
    if name == "batch_stats":
        mean, var = nb.batch_stats(P(d.x), axis=axis)
        return dict(mean=mean, var=var)
    if name == "normalize":
        y = nb.normalize(P(d.x), P(d.given_mean), P(d.given_var), w, b, eps=EPS, axis=axis)
        return dict(y=y)
    if name == "batch_norm_train":
        y, mean, invstd = nb.batch_norm_train(P(d.x), w, b, eps=EPS, axis=axis)
        return dict(y=y, mean=mean, invstd=invstd)
    if name == "_batch_norm_train":  # what the layers call: also the float64 variance
        y, mean, invstd, var = F._batch_norm_train(P(d.x), w, b, EPS, axis, None)
        return dict(y=y, mean=mean, invstd=invstd, var=var)
    if name == "batch_norm_backward":
        mean, invstd = d.stats("x")
        dx, dw, db = nb.batch_norm_backward(P(d.dy), P(d.x), P(mean), P(invstd), w, axis=axis)
        return dict(dx=dx, dweight=dw, dbias=db)
    if name == "batch_norm":
        rm, rv = P(d.rm.copy()), P(d.rv.copy())
        training = variant.startswith("train")
        y = nb.batch_norm(P(d.x), rm, rv, w, b, training=training, momentum=MOMENTUM, eps=EPS,
                          axis=axis)
        return dict(y=y, running_mean=rm, running_var=rv)
    if name == "update_running_stats":
        rm, rv = P(d.rm.copy()), P(d.rv.copy())
        mean, var = d.mean64, d.var64
        if variant == "x":
            mean, var = mean.astype(d.dtype), var.astype(d.dtype)
        nb.update_running_stats(rm, rv, P(mean), P(var), count=d.n, momentum=MOMENTUM)
        return dict(running_mean=rm, running_var=rv)
    if name == "batch_moments":
        count, mean, m2 = nb.batch_moments(P(d.x), axis=axis)
        return dict(count=count, mean=mean, m2=m2)
    if name == "merge_moments":  # the batch in two halves (along the first axis)
        half = d.shape[0] // 2
        parts = [nb.batch_moments(P(np.ascontiguousarray(xs)), axis=axis)
                 for xs in (d.x[:half], d.x[half:])]
        counts, means, m2s = zip(*[(c, host(m), host(q)) for c, m, q in parts])
        count, mean, m2 = nb.merge_moments(counts, means, m2s)
        return dict(count=count, mean=mean, m2=m2, part_mean=parts[0][1], part_m2=parts[0][2])
    if name == "batch_norm_elemt":
        mean, invstd = d.stats(variant)
        y = nb.batch_norm_elemt(P(d.x), P(mean), P(invstd), w, b, axis=axis)
        return dict(y=y)
    if name == "batch_norm_backward_reduce":
        mean, invstd = d.stats(variant)
        sum_dy, sum_dy_xmu = nb.batch_norm_backward_reduce(P(d.dy), P(d.x), P(mean), P(invstd),
                                                           axis=axis)
        return dict(sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    if name == "batch_norm_backward_elemt":
        mean, invstd = d.stats(variant)
        sum_dy, sum_dy_xmu = d.sums_about(mean)
        dx = nb.batch_norm_backward_elemt(P(d.dy), P(d.x), P(mean), P(invstd), w, P(sum_dy),
                                          P(sum_dy_xmu), d.n, axis=axis)
        return dict(dx=dx)
    raise AssertionError(name)


def reference(name, variant, d):
    """The float64 results :func:`call` must give (None where it must give None)."""
    affine = "affine" in variant
    w, b = (d.w, d.b) if affine else (None, None)
    x, axis = d.x, d.axis
    if name == "batch_stats":
        return dict(mean=d.mean64, var=d.var64)
    if name == "normalize":
        return dict(y=naive.normalize(x, d.given_mean, d.given_var, w, b, EPS, axis))
    if name in ("batch_norm_train", "_batch_norm_train"):
        y, mean, invstd = naive.batch_norm_train(x, w, b, EPS, axis)
        out = dict(y=y, mean=mean, invstd=invstd)
        if name == "_batch_norm_train":
            out["var"] = d.var64
        return out
    if name == "batch_norm_backward":
        dx, dw, db = naive.batch_norm_backward(d.dy, x, w, EPS, axis)
        return dict(dx=dx, dweight=dw if affine else None, dbias=db if affine else None)
    if name == "batch_norm":
        y, rm, rv = naive.batch_norm(x, d.rm, d.rv, w, b, variant.startswith("train"), MOMENTUM,
                                     EPS, axis)
        return dict(y=y, running_mean=rm, running_var=rv)
    if name == "update_running_stats":
        mean, var = d.mean64, d.var64
        if variant == "x":
            mean, var = mean.astype(d.dtype), var.astype(d.dtype)
        rm, rv = naive.update_running_stats(d.rm, d.rv, mean, var, d.n, MOMENTUM)
        return dict(running_mean=rm, running_var=rv)
    if name == "batch_moments":
        return dict(count=d.n, mean=d.mean64, m2=d.var64 * d.n)
    if name == "merge_moments":
        half = d.shape[0] // 2
        pm, pv = naive.batch_stats(x[:half], axis)
        return dict(count=d.n, mean=d.mean64, m2=d.var64 * d.n, part_mean=pm,
                    part_m2=pv * (d.n * half // d.shape[0]))
    if name == "batch_norm_elemt":
        mean, invstd = d.stats(variant)
        y = (x.astype(np.float64) - d.bcast(mean)) * d.bcast(invstd)
        if affine:
            y = y * d.bcast(w) + d.bcast(b)
        return dict(y=y)
    if name == "batch_norm_backward_reduce":
        sum_dy, sum_dy_xmu = d.sums_about(d.stats(variant)[0])
        return dict(sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    if name == "batch_norm_backward_elemt":
        # dx = w * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)
        mean, invstd = (np.asarray(v, np.float64) for v in d.stats(variant))
        sum_dy, sum_dy_xmu = d.sums_about(mean)
        wf = np.ones_like(mean) if w is None else w.astype(np.float64)
        xc = x.astype(np.float64) - d.bcast(mean)
        dx = d.bcast(wf * invstd) * (d.dy - d.bcast(sum_dy / d.n)
                                     - xc * d.bcast(invstd**2 * sum_dy_xmu / d.n))
        return dict(dx=dx)
    raise AssertionError(name)


# The return kinds every backend must give: the input's dtype ("x"), float64, int.
EXPECTED_KINDS = {
    "batch_stats": dict(mean="x", var="x"),
    "_batch_norm_train": dict(y="x", mean="x", invstd="x", var="f64"),
    "batch_moments": dict(count="int", mean="f64", m2="f64"),
    "merge_moments": dict(count="int", mean="f64", m2="f64", part_mean="f64", part_m2="f64"),
    "batch_norm_backward_reduce": dict(sum_dy="f64", sum_dy_xmu="f64"),
}


@lru_cache(maxsize=None)
def results(name, variant, case, dtype_id, backend):
    """``{result: (host value, kind)}`` of one call on one backend (computed once)."""
    d = data(case, DTYPES[dtype_id])
    return {key: (host(v), kind(v)) for key, v in call(name, variant, d, backend).items()}


def _matrix_id(name, variant, case, dt):
    return f"{name}-{variant}-{case}-{dt}".replace("--", "-")


def _on_backends(cases, slow_on_gpu):
    """``{id: values}`` crossed with the backends, as ``pytest.param(*values, backend)``
    with the ids stacked parametrizations would give (``<id>-cpu``, ``<id>-gpu``); the
    GPU half of the cases in ``slow_on_gpu`` is marked slow."""
    return [pytest.param(*values, backend, id=f"{cid}-{backend}",
                         marks=[] if backend == "cpu" else
                         [NEEDS_GPU] + ([pytest.mark.slow] if cid in slow_on_gpu else []))
            for backend in ("cpu", "gpu") for cid, values in cases.items()]


# Every (call, case, dtype); the slow marks are for the GPU: the CPU half of the
# reference test drops them.
MATRIX = [pytest.param(name, variant, case, dt, id=_matrix_id(name, variant, case, dt),
                       marks=[] if case in QUICK_GPU_CASES else [pytest.mark.slow])
          for name, variant in CALLS for case in CASES for dt in DTYPES]
MATRIX_ON_BACKENDS = [
    pytest.param(*p.values, backend, id=f"{p.id}-{backend}",
                 marks=[] if backend == "cpu" else [NEEDS_GPU, *p.marks])
    for backend in ("cpu", "gpu") for p in MATRIX]


@pytest.mark.parametrize("name, variant, case, dtype_id, backend", MATRIX_ON_BACKENDS)
def test_against_float64_reference(name, variant, case, dtype_id, backend):
    d = data(case, DTYPES[dtype_id])
    got = results(name, variant, case, dtype_id, backend)
    ref = reference(name, variant, d)
    assert list(got) == list(ref)
    for key, r in ref.items():
        value, k = got[key]
        what = f"{backend} {name} {key}"
        if r is None or k == "int":
            assert value == r, what
            continue
        if backend == "gpu" and key in ("y", "dx"):
            assert value.shape == d.shape, what
        assert_close(value, r, d.dtype, scale=max(1.0, float(np.abs(r).max())), what=what)
    expected = dict.fromkeys(ref, "x")  # by default every array is in the input's dtype
    expected.update(EXPECTED_KINDS.get(name, {}))
    for key, (value, k) in got.items():
        want = {"x": d.dtype, "f64": np.dtype(np.float64), "int": "int"}[expected[key]]
        assert k == (None if value is None else want), f"{backend} {name} {key}: {k}"


@NEEDS_GPU
@pytest.mark.parametrize("name, variant, case, dtype_id", MATRIX)
def test_cpu_and_gpu_agree(name, variant, case, dtype_id):
    cpu = results(name, variant, case, dtype_id, "cpu")
    gpu = results(name, variant, case, dtype_id, "gpu")
    assert {k: v[1] for k, v in cpu.items()} == {k: v[1] for k, v in gpu.items()}, "return kinds"
    tol = TWIN_TOL[np.dtype(DTYPES[dtype_id])]
    for key, (c, _) in cpu.items():
        g = gpu[key][0]
        if c is None or isinstance(c, (int, np.integer)):
            assert g == c, key
            continue
        c64, g64 = c.astype(np.float64), g.astype(np.float64)
        err = np.abs(g64 - c64).max()
        assert err <= tol * np.abs(c64).max(), f"{name} {key}: |gpu - cpu| {err:.3g}"


# --------------------------------------------------------------------------- #
# The split primitives give the fused operations' results
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("case, dtype_id, backend", _on_backends(
    {f"{case}-{dt}": (case, dt) for dt in DTYPES for case in ("NCHW", "NHWC")},
    slow_on_gpu={"NCHW-f32", "NCHW-f64"}))
def test_split_primitives_compose_to_the_fused_operations(case, dtype_id, backend):
    """batch_moments -> batch_norm_elemt gives batch_norm_train's y; and
    batch_norm_backward_reduce -> batch_norm_backward_elemt its backward's dx."""
    d = data(case, DTYPES[dtype_id])
    P = lambda a: put(backend, a)  # noqa: E731
    axis = d.axis
    x, dy, w, b = P(d.x), P(d.dy), P(d.w), P(d.b)
    y, mean, invstd = nb.batch_norm_train(x, w, b, eps=EPS, axis=axis)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)

    count, m, m2 = nb.batch_moments(x, axis=axis)
    invstd64 = 1.0 / np.sqrt(host(m2) / count + EPS)
    y_split = nb.batch_norm_elemt(x, m, P(invstd64), w, b, axis=axis)
    sum_dy, sum_dy_xmu = nb.batch_norm_backward_reduce(dy, x, m, P(invstd64), axis=axis)
    dx_split = nb.batch_norm_backward_elemt(dy, x, m, P(invstd64), w, sum_dy, sum_dy_xmu, count,
                                            axis=axis)
    scale = lambda a: max(1.0, float(np.abs(a).max()))  # noqa: E731
    for split, fused, what in [(y_split, y, "y"), (dx_split, dx, "dx")]:
        split, fused = host(split), host(fused)
        assert_close(split, fused, d.dtype, scale=scale(fused), what=f"{backend} {what}")
    # dweight, dbias of the batch are invstd * sum_dy_xmu and sum_dy.
    assert_close(invstd64 * host(sum_dy_xmu), host(dw), d.dtype, scale=scale(host(dw)))
    assert_close(host(sum_dy), host(db), d.dtype, scale=scale(host(db)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_split_primitives(backend):
    """A process may hold no values of the batch: zero moments and sums, and
    nothing written by the elementwise halves."""
    P = lambda a: put(backend, a)  # noqa: E731
    x = P(np.empty((0, 3, 4), np.float32))
    v = P(np.ones(3))
    count, mean, m2 = nb.batch_moments(x)
    assert count == 0
    for a in (mean, m2, *nb.batch_norm_backward_reduce(x, x, v, v)):
        a = host(a)
        assert a.dtype == np.float64 and not a.any()
    assert nb.batch_norm_elemt(x, v, v).shape == (0, 3, 4)
    assert nb.batch_norm_backward_elemt(x, x, v, v, None, v, v, count=5).shape == (0, 3, 4)


# --------------------------------------------------------------------------- #
# Ill-conditioned float32 data, both backends
# --------------------------------------------------------------------------- #
def _rel(got, ref):
    got = np.asarray(host(got), np.float64)
    return np.abs(got - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("shape, axis, backend", _on_backends(
    {"NCL": ((6, 2, 50), 1), "NC": ((150, 2), 1), "NHWC": ((3, 5, 4, 2), -1)},
    slow_on_gpu={"NCL", "NC"}))  # 10 s and 5 s on the simulator
def test_large_mean_tiny_spread_float32(shape, axis, backend):
    """``1e4 + 1e-2 * randn`` in float32: within 1e-6 of float64 on the same values."""
    rng = np.random.default_rng(20)
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    P = lambda a: put(backend, a)  # noqa: E731
    ry, rmean, rinvstd = naive.batch_norm_train(x, axis=axis)
    rdx, rdw, rdb = naive.batch_norm_backward(dy, x, np.ones(x.shape[axis]), axis=axis)
    y, mean, invstd = nb.batch_norm_train(P(x), axis=axis)
    dx, _, _ = nb.batch_norm_backward(P(dy), P(x), mean, invstd, axis=axis)
    _, var = nb.batch_stats(P(x), axis=axis)
    for got, ref, what in [(y, ry, "y"), (mean, rmean, "mean"), (invstd, rinvstd, "invstd"),
                           (var, naive.batch_stats(x, axis)[1], "var"), (dx, rdx, "dx")]:
        assert _rel(got, ref) <= 1e-6, what
    # The split primitives, with float64 statistics.
    count, m, m2 = nb.batch_moments(P(x), axis=axis)
    invstd64 = 1.0 / np.sqrt(host(m2) / count + 1e-5)
    assert _rel(nb.batch_norm_elemt(P(x), m, P(invstd64), axis=axis), ry) <= 1e-6
    sum_dy, sum_dy_xmu = nb.batch_norm_backward_reduce(P(dy), P(x), m, P(invstd64), axis=axis)
    assert _rel(sum_dy, rdb) <= 1e-6 and _rel(invstd64 * host(sum_dy_xmu), rdw) <= 1e-6
    dx = nb.batch_norm_backward_elemt(P(dy), P(x), m, P(invstd64), None, sum_dy, sum_dy_xmu,
                                      count, axis=axis)
    assert _rel(dx, rdx) <= 1e-6
