"""Shared pytest set-up: input factories for every layout, per-dtype tolerances,
and the CUDA simulator switch.

GPU tests run under the CUDA simulator unless told otherwise: a plain ``pytest``
sets ``NUMBA_ENABLE_CUDASIM=1`` here, before anything imports ``numba.cuda``
(the flag is read once, when ``numba.cuda`` is first imported).  To run them on
a real GPU, say so explicitly: ``NUMBA_ENABLE_CUDASIM=0 pytest``.
"""

import os
import sys

if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules and "numba.cuda" not in sys.modules:
        from numba.core import config

        config.reload_config()  # numba was imported first (by a plugin, say)

import zlib

import numpy as np
import pytest

# atol + rtol * |ref| per dtype, against the float64 naive twin on the same values.
TOL = {
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float64): (1e-11, 1e-11),
}

# (shape, axis) pairs covering dense, 3-D, NCHW, NHWC, 5-D, feature-first, and
# shapes large enough to cross the chunk and channel-block boundaries.
CASES = [
    ((37, 5), 1),
    ((37, 5), 0),
    ((37, 5), -1),
    ((9, 4, 11), 1),
    ((6, 3, 7, 5), 1),
    ((6, 7, 5, 3), -1),
    ((6, 3, 7, 5), 2),
    ((3, 2, 4, 5, 3), 1),
    ((5000, 3), 1),
    ((2, 3, 9000), 1),
    ((700, 2, 13), 1),
    ((5, 1100), 1),
]

LAYOUTS = ["c", "f", "transposed", "stepped", "flipped", "readonly"]


def assert_close(actual, ref, dtype, scale=1.0, what=""):
    atol, rtol = TOL[np.dtype(dtype)]
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    err = np.abs(actual - ref)
    bound = atol * scale + rtol * np.abs(ref)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (
        f"{what}: max error {err.max():.3g} exceeds tolerance at index "
        f"{np.unravel_index(worst, err.shape)} (value {actual.flat[worst]!r}, ref {ref.flat[worst]!r})"
    )


def make_array(rng, shape, dtype, layout="c", axis=1, loc=0.0, scale=1.0):
    """Fresh random values in the requested memory layout (same logical values)."""
    nfeat = shape[axis]
    per_feature = [1] * len(shape)
    per_feature[axis] = nfeat
    locs = loc + rng.uniform(-2, 2, nfeat).reshape(per_feature)
    scales = scale * rng.uniform(0.5, 2, nfeat).reshape(per_feature)
    values = (locs + scales * rng.standard_normal(shape)).astype(dtype)
    return relayout(values, layout)


def relayout(values, layout):
    """Return an array equal to ``values`` with the memory layout named."""
    if layout == "c":
        return np.ascontiguousarray(values)
    if layout == "f":
        return np.asfortranarray(values)
    if layout == "transposed":
        rev = tuple(range(values.ndim))[::-1]
        return np.ascontiguousarray(values.transpose(rev)).transpose(rev)
    if layout == "stepped":
        big = np.zeros((values.shape[0] * 2,) + values.shape[1:], values.dtype)
        big[::2] = values
        return big[::2]
    if layout == "flipped":
        return np.ascontiguousarray(values[..., ::-1])[..., ::-1]
    if layout == "readonly":
        a = np.array(values)
        a.flags.writeable = False
        return a
    raise ValueError(layout)


# --------------------------------------------------------------------------- #
# Half types: the dtypes (bfloat16 skipped without ml_dtypes) and their ulps
# --------------------------------------------------------------------------- #
def _half_dtypes():
    params = [pytest.param(np.dtype(np.float16), id="float16")]
    try:
        import ml_dtypes
    except ImportError:
        return params + [pytest.param(None, id="bfloat16",
                                      marks=pytest.mark.skip(reason="ml_dtypes not installed"))]
    return params + [pytest.param(np.dtype(ml_dtypes.bfloat16), id="bfloat16")]


HALF = _half_dtypes()
MANTISSA = {"float16": 10, "bfloat16": 7}


def ulp(dtype, value):
    """The spacing of ``dtype`` at ``value`` (normal range)."""
    value = max(float(value), 1e-30)
    return 2.0 ** (np.floor(np.log2(value)) - MANTISSA[dtype.name])


def assert_ulps(actual, ref, dtype, ulps, what=""):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    a = actual.astype(np.float64)
    ref = np.asarray(ref, np.float64)
    assert a.shape == ref.shape
    finite = np.isfinite(ref)
    assert np.array_equal(np.isnan(a), np.isnan(ref)), f"{what}: NaN where the reference has none"
    top = np.abs(ref[finite]).max() if finite.any() else 0.0
    err = np.abs(a[finite] - ref[finite]).max() if finite.any() else 0.0
    bound = ulps * ulp(dtype, top)
    assert err <= bound, f"{what}: max error {err:.3g} > {ulps} ulps of max|y| {top:.3g} ({bound:.3g})"


def vector(rng, n, dtype, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, n).astype(dtype)


@pytest.fixture
def rng(request):
    # A fresh, reproducible stream per test (seeded by the test's name).
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def numbabn_route():
    """numbabn.torch: every call takes numbabn's kernels, whatever the per-shape
    table (numbabn/torch/_dispatch.py) would choose."""
    from numbabn.torch import _dispatch

    with _dispatch.force("numbabn"):
        yield


@pytest.fixture(params=[16, 8], ids=["16-lanes", "8-lanes"])
def tile_kernels(request, monkeypatch):
    """The layer kit's tile kernels of one vector width, AVX-512's 16 floats or
    AVX2's 8, as Conv2d's and Linear's: the host's own width, or
    :func:`tiles.with_lanes`' build of the other (AVX2 code runs on an AVX-512
    host; on an AVX2 host the 16-lane tiles split each vector in two)."""
    from numbabn.kit import conv, linear
    from numbabn.kit._kernels import tiles

    if not tiles.DIRECT_CONV_CPU:
        pytest.skip("the register tiles need AVX2 and FMA or AVX-512 (and a Numba they were "
                    "checked with)")
    kernels = tiles.with_lanes(request.param)
    monkeypatch.setattr(conv, "_tiles", kernels)
    monkeypatch.setattr(linear, "_tiles", kernels)
    return kernels
