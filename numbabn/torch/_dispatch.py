"""Which batch-norm calls numbabn.torch hands to ATen: a table decided by the shape.

numbabn's kernels are faster than ATen's on most shapes of standard networks,
not on all (the shape census, docs/performance.md).  Where the census found
ATen faster, the layers call ATen's kernels instead.  The rule reads the input
only as numbabn's kernels see it, ``(outer, C, inner)`` (see
:mod:`numbabn._layout`), with its dtype and size; never a clock.  A given shape,
layout and dtype therefore always takes the same route, and so gets the same
bits on every call.

Each row of :data:`ATEN_ROWS` names an operation, the layout family, the dtypes
and a closed range of the plane size (``inner``), of the input's values or of
its bytes:

- ``"all"``: every operation below;
- ``"train"``: the training forward *and* its backward run ATen's (PyTorch's
  own autograd, running statistics updated by ATen);
- ``"backward"``: numbabn's training forward, ATen's backward
  (``native_batch_norm_backward`` with numbabn's saved mean and invstd);
- ``"eval"``: the eval forward (and its gradients) run ATen's.

Layout families: ``"planes"`` is an input whose feature values lie in runs of
``inner > 1`` (NCHW and its 3-D and 5-D kin); ``"channels"`` an input whose
features are contiguous (``inner == 1``: channels-last, ``(N, C)``); ``"any"``
both.

The first row is host cost: below 2**16 values a call is fixed cost, and
numbabn's host drivers (about 9-12 us per kernel call on the CPU, more inside
an autograd step) cost more than ATen's whole call.  Measured with
``scripts/bench_torch_dropin.py --crossover`` (the layer on numbabn's route
against stock, best of 5 rounds in CPU time of the calling thread, 1 thread,
two runs on the 2-core VM of docs/performance.md while busy), from 512 to 65536
values: NCHW training 0.38-0.89x stock (0.99-1.13x at 131072), channels-last
training 0.36-0.48x, eval 0.53-0.78x.  The census's one case that small,
``(128, 128)`` float32, has ATen as fast or faster in all three operations
(forward 1.05 / 1.14, eval 1.00 / 0.99, backward 0.75 / 0.74).
Every 4-D census case has at least 2**16 values.

The other rows come from the census of the CPU issue (2 threads,
ResNet-18/MobileNetV2/DenseNet-121 for CIFAR and ResNet-50; "x" is ATen's time
over numbabn's, geometric mean over shapes and runs, AVX-512 / AVX2).  The
NCHW rows are from 3 runs with AVX-512 code and 3 with AVX2 code of the batch
norm ``backward`` and ``eval`` at the kernels as they are (the per-run passes
inlined, the small-plane passes for runs under 256 bytes); the channels-last
rows from the earlier full census (3 + 3 runs).  The two builds agree on every
row:

=========  ==========  =========  ================  ====================================
op         layout      dtypes     range             census: x, shapes x runs below 1x
=========  ==========  =========  ================  ====================================
all        any         any        < 2**16 values    host cost (above)
backward   planes      float32    inner 2..64       4x4 0.71 / 0.79, 155 of 162; 7x7
                                                    1.04 / 0.93, 16 of 24; 8x8 0.88 /
                                                    0.85, 169 of 210 (14x14 1.09 /
                                                    0.98, a tie: numbabn)
eval       planes      float32    inner 49..63      7x7 0.84 / 0.88, 18 of 24 (runs on
                                                    the small-plane pass; 4x4 1.08 /
                                                    1.05, 8x8 1.11 / 0.99: numbabn)
eval       planes      float64    inner 2..31       4x4 0.86 / 0.90, 6 of 6 (the
                                                    small-plane pass; 8x8 1.52 / 1.31:
                                                    numbabn)
backward   channels    float32    < 512 KiB         0.86 / 0.83; 17 of 18
train      channels    any        12 MiB..32 MiB    forward 0.85 / 0.94, 125 of 180;
                                                    backward 0.84 / 0.85, 149 of 180
                                                    (x and the output about the size
                                                    of the L3, 32 MiB)
=========  ==========  =========  ================  ====================================

Everything else runs numbabn's kernels (the census: training forward 2.6-6.3x
ATen on NCHW, 1.0-1.3x channels-last; eval 1.3-1.8x channels-last).  The table
applies to CPU tensors; CUDA tensors run numbabn's GPU kernels.

:func:`force` (tests, benchmarks) sends every call one way.
"""

from __future__ import annotations

import contextlib

import numpy as np

KIB, MIB = 1 << 10, 1 << 20
NUMBABN, ATEN = "numbabn", "aten"

ATEN_ROWS = (
    # (op, layout, dtypes (None: any), what the range counts, lowest, highest)
    ("all", "any", None, "values", 1, (1 << 16) - 1),
    ("backward", "planes", (np.float32,), "inner", 2, 64),
    ("eval", "planes", (np.float32,), "inner", 49, 63),
    ("eval", "planes", (np.float64,), "inner", 2, 31),
    ("backward", "channels", (np.float32,), "bytes", 1, 512 * KIB - 1),
    ("train", "channels", None, "bytes", 12 * MIB, 32 * MIB - 1),
)

_forced = [None]  # None: the table; else NUMBABN or ATEN for every call


def _matches(row, op, shape3, dtype, itemsize):
    row_op, layout, dtypes, measure, lo, hi = row
    if row_op not in (op, "all") or (dtypes is not None and dtype not in dtypes):
        return False
    if layout != "any" and (layout == "planes") != (shape3[2] > 1):
        return False
    values = shape3[0] * shape3[1] * shape3[2]
    value = {"inner": shape3[2], "values": values, "bytes": values * itemsize}[measure]
    return lo <= value <= hi


def routes(shape3, dtype) -> tuple[bool, bool, bool]:
    """``(train, backward, eval)``: whether each runs ATen for an input viewed as
    ``shape3 = (outer, C, inner)`` of NumPy ``dtype``.  A training forward by
    ATen takes ATen's backward too."""
    forced = _forced[0]
    if forced is not None:
        aten = forced == ATEN
        return aten, aten, aten
    itemsize = np.dtype(dtype).itemsize
    if itemsize == 2:  # half types: numbabn's kernels (the table was measured for float32/64)
        return False, False, False
    dtype = np.dtype(dtype).type

    def aten(op):
        return any(_matches(row, op, shape3, dtype, itemsize) for row in ATEN_ROWS)

    train = aten("train")
    return train, train or aten("backward"), aten("eval")


_listeners = []  # callables run when the route of future calls changes


@contextlib.contextmanager
def force(route):
    """Within the block, every CPU call takes ``route`` (``"numbabn"`` or
    ``"aten"``; None: the table), for tests and benchmarks."""
    if route not in (None, NUMBABN, ATEN):
        raise ValueError(f"route must be None, {NUMBABN!r} or {ATEN!r}; got {route!r}.")
    before = _forced[0]
    _forced[0] = route
    for forget in _listeners:
        forget()
    try:
        yield
    finally:
        _forced[0] = before
        for forget in _listeners:
            forget()
