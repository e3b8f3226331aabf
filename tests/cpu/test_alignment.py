"""Elementwise passes split their runs at x's first 64-byte boundary (aligned
vector loads and stores); results must not depend on where the data lives.

Each case copies the same values to every offset of a 64-byte line (0 to 15
float32 or 0 to 7 float64 elements past a boundary, inputs and output alike,
and with the output at another offset than the inputs) and asks for the same
bits as the first placement, and for the float64 reference's values."""

import numpy as np
import pytest

import naive
import numbabn as nb
from conftest import assert_close

# (shape, axis, dtype): a row of 64 bytes' multiple (one offset for all rows),
# the same streamed from memory (backward sums row by row), C = 3
# (rows of 12 bytes: a segment spans 16 rows), a wide row, channels-last 4-D,
# and a strided (non-contiguous) channel-contiguous view.
CASES = [
    ((37, 64), 1, np.float32),
    ((8200, 64), 1, np.float32),
    ((50, 3), 1, np.float32),
    ((9, 520), 1, np.float64),
    ((3, 5, 4, 32), -1, np.float32),
    ("strided", 1, np.float32),
]


def _placed(a, offset):
    """A copy of ``a`` whose data starts ``offset`` elements past a 64-byte boundary."""
    per_line = 64 // a.itemsize
    raw = np.empty(a.size + 2 * per_line, a.dtype)
    start = (-raw.ctypes.data % 64) // a.itemsize + offset
    out = raw[start:start + a.size].reshape(a.shape)
    out[...] = a
    return out


def _inputs(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if shape == "strided":  # columns 0, 2, 4, ... of a (40, 96) array: C = 48
        full = (3.0 + rng.standard_normal((40, 96))).astype(dtype)
        return full, (lambda a: a[:, ::2])
    return (3.0 + rng.standard_normal(shape)).astype(dtype), (lambda a: a)


@pytest.mark.parametrize("shape, axis, dtype", CASES, ids=lambda v: str(v))
def test_elementwise_results_do_not_depend_on_the_address(shape, axis, dtype):
    base, view = _inputs(shape, dtype, 0)
    dy_base, _ = _inputs(shape, dtype, 1)
    nfeat = view(base).shape[axis]
    rng = np.random.default_rng(2)
    w = rng.uniform(0.5, 1.5, nfeat).astype(dtype)
    b = rng.uniform(-1, 1, nfeat).astype(dtype)
    rm = rng.uniform(2, 4, nfeat).astype(dtype)
    rv = rng.uniform(0.5, 2, nfeat).astype(dtype)
    per_line = 64 // np.dtype(dtype).itemsize
    first = None
    for offset in range(per_line):
        x = view(_placed(base, offset))
        dy = view(_placed(dy_base, offset))
        out_offset = (offset * 5 + 3) % per_line  # the output at another offset
        outs = [view(_placed(np.zeros_like(base), o)) for o in (offset, out_offset)]
        got = []
        for out in outs:
            y, mean, invstd = nb.batch_norm_train(x, w, b, 1e-5, axis, out=out)
            got.append(y.copy())
            got.append(nb.normalize(x, rm, rv, w, b, 1e-5, axis, out=out).copy())
            got.append(nb.batch_norm_backward(dy, x, mean, invstd, w, axis, out=out)[0].copy())
            yr = nb.batch_norm_relu_train(x, w, b, 1e-5, axis)[0]
            got.append(yr)
            got.append(nb.batch_norm_relu_backward(dy, yr, x, mean, invstd, w, axis,
                                                   out=out)[0].copy())
        if first is None:
            first = got
            xd, dyd = x.astype(np.float64), dy.astype(np.float64)
            assert_close(got[0], naive.batch_norm_train(xd, w, b, 1e-5, axis)[0], dtype)
            assert_close(got[1], naive.normalize(xd, rm, rv, w, b, 1e-5, axis), dtype)
            assert_close(got[2], naive.batch_norm_backward(dyd, xd, w, 1e-5, axis)[0], dtype)
            assert np.array_equal(got[3], np.maximum(got[0], 0))
        for a, e in zip(got, first):
            assert np.array_equal(a, e), f"offset {offset}: results differ from offset 0"
