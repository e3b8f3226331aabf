"""The GPU backend's launches: how many per operation, the reductions' "last
block done" merge whatever order the blocks finish in, and the public path
taken when numba-cuda's private names are not used (numbabn._numba_private.cuda).

Runs under the CUDA simulator by default (see conftest.py), with the small
blocks of test_gpu.py, or on a GPU with ``NUMBA_ENABLE_CUDASIM=0``.
"""

import logging
import warnings

import numpy as np
import pytest

import numbabn
from numbabn import _config

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM is off", allow_module_level=True)

from test_gpu import SIMULATOR, dev, make, run_every_operation  # noqa: E402


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_config, "GPU_THREADS", 8)
    monkeypatch.setattr(_config, "GPU_ITEMS_PER_THREAD", 4)
    monkeypatch.setattr(_config, "GPU_FEATURE_TILE", 4)


# --------------------------------------------------------------------------- #
# Launches per operation
# --------------------------------------------------------------------------- #
# Before the last-block merge: train 3, backward 3, stats/moments 2, backward_reduce 2.
LAUNCHES = {
    "batch_norm_train": ["moments", "affine"],
    "batch_norm_relu_train": ["moments", "affine"],
    "batch_norm_backward": ["backward_sums", "dx"],
    "batch_norm_relu_backward": ["backward_sums", "dx"],
    "batch_stats": ["moments"],
    "batch_moments": ["moments"],
    "batch_norm_backward_reduce": ["backward_sums"],
    "normalize": ["normalize"],
    "batch_norm_elemt": ["normalize"],
    "batch_norm_backward_elemt": ["backward_elemt"],
    "batch_norm eval": ["normalize"],
    "batch_norm training": ["moments", "affine", "update_running_stats"],
    "update_running_stats": ["update_running_stats"],
}


@pytest.mark.parametrize("shape", [pytest.param((5, 3, 13), id="NCL", marks=pytest.mark.slow),
                                   pytest.param((21, 3), id="NC")])
def test_launches_per_operation(monkeypatch, shape):
    """Counted by wrapping ``Kernel.launch``: 2 launches for a training forward
    or backward, 1 for a reduction alone, 1 for eval."""
    from numbabn._gpu import runtime as launch

    family = "_nchw" if len(shape) == 3 else "_nc"
    log = []
    original = launch.Kernel.launch

    def counting(kernel, *args):
        log.append(kernel.__name__.removesuffix(family))
        return original(kernel, *args)

    monkeypatch.setattr(launch.Kernel, "launch", counting)
    x, dy, w, b = make(shape, 1, np.float32, seed=30)
    v = dev(np.full(3, 0.5, np.float32))
    y, mean, invstd = numbabn.batch_norm_relu_train(dev(x), dev(w), dev(b))
    count, m, _ = numbabn.batch_moments(dev(x))
    sum_dy, sum_dy_xmu = numbabn.batch_norm_backward_reduce(dev(dy), dev(x), m, invstd)
    calls = {
        "batch_norm_train": lambda: numbabn.batch_norm_train(dev(x), dev(w), dev(b)),
        "batch_norm_relu_train": lambda: numbabn.batch_norm_relu_train(dev(x), dev(w), dev(b)),
        "batch_norm_backward": lambda: numbabn.batch_norm_backward(dev(dy), dev(x), mean,
                                                                   invstd, dev(w)),
        "batch_norm_relu_backward": lambda: numbabn.batch_norm_relu_backward(
            dev(dy), y, dev(x), mean, invstd, dev(w)),
        "batch_stats": lambda: numbabn.batch_stats(dev(x)),
        "batch_moments": lambda: numbabn.batch_moments(dev(x)),
        "batch_norm_backward_reduce": lambda: numbabn.batch_norm_backward_reduce(
            dev(dy), dev(x), m, invstd),
        "normalize": lambda: numbabn.normalize(dev(x), mean, v, dev(w), dev(b)),
        "batch_norm_elemt": lambda: numbabn.batch_norm_elemt(dev(x), m, invstd, dev(w)),
        "batch_norm_backward_elemt": lambda: numbabn.batch_norm_backward_elemt(
            dev(dy), dev(x), m, invstd, dev(w), sum_dy, sum_dy_xmu, count),
        "batch_norm eval": lambda: numbabn.batch_norm(dev(x), mean, v, dev(w), dev(b)),
        "batch_norm training": lambda: numbabn.batch_norm(
            dev(x), dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32)), dev(w), dev(b),
            training=True),
        "update_running_stats": lambda: numbabn.update_running_stats(
            dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32)), mean, v, count=10),
    }
    assert set(calls) == set(LAUNCHES)
    got = {}
    for name, call in calls.items():
        log.clear()
        call()
        got[name] = list(log)
    assert got == LAUNCHES


# --------------------------------------------------------------------------- #
# Last block done: the merge does not depend on which block finishes last
# --------------------------------------------------------------------------- #
# (shape, axis, GPU_THREADS) with 4 values per thread and at most 4 features per
# tile: chunks per feature (C) and merge lanes (L); an NC block has T threads.
# Each case takes 4 to 14 s under the simulator: the quick loop keeps the smallest.
SLOW = pytest.mark.slow
ORDER_CASES = [
    pytest.param((1, 2, 80), 1, 4, id="NCL-C5-L4", marks=SLOW),  # lane 0 takes 2 chunks
    pytest.param((1, 2, 50), 1, 3, id="NCL-C5-L3", marks=SLOW),  # lanes not a power of two
    pytest.param((20, 5), 1, 4, id="NC-C5-L4-T3", marks=SLOW),  # more lanes than block threads
    pytest.param((9, 4), 1, 8, id="NC-C2-L2-T8"),  # 4 features merged side by side
    pytest.param((2, 4, 3, 3), -1, 8, id="NHWC-C3-L4-T6", marks=SLOW),
]


def run_reductions(shape, axis, dtype):
    """The bytes of every result of the operations that reduce (both
    reduction kernels, with and without weight, masked, float64 or input-dtype
    statistics), and of the passes that use their coefficients."""
    x, dy, w, b = make(shape, axis, dtype, seed=31)
    y, mean, invstd = numbabn.batch_norm_relu_train(dev(x), dev(w), dev(b), axis=axis)
    plain = numbabn.batch_norm_train(dev(x), axis=axis)
    grads = numbabn.batch_norm_relu_backward(dev(dy), y, dev(x), mean, invstd, dev(w), axis=axis)
    dx_plain = numbabn.batch_norm_backward(dev(dy), dev(x), *plain[1:], axis=axis)[0]
    _, m, m2 = numbabn.batch_moments(dev(x), axis=axis)
    sums = numbabn.batch_norm_backward_reduce(dev(dy), dev(x), m, invstd, axis=axis)
    sums_x = numbabn.batch_norm_backward_reduce(dev(dy), dev(x), mean, invstd, axis=axis)
    results = [y, mean, invstd, *plain, *grads, dx_plain, m, m2, *sums, *sums_x]
    return [a.copy_to_host().tobytes() for a in results]


@pytest.mark.parametrize("shape, axis, threads", ORDER_CASES)
def test_last_block_merge_is_bitwise_independent_of_block_order(monkeypatch, shape, axis,
                                                                threads):
    """``GPU_REVERSE_BLOCKS`` maps block b to place nblocks - 1 - b, so under the
    simulator (blocks run in index order) the block holding chunk 0 finishes
    last, not the one holding the last chunk.  Every result stays bitwise the
    same, with the partials' scratch filled with NaN before each call (a merge
    reading a partial not yet written would show), and the ticket counters are
    all zero after every call."""
    from numbabn._gpu import feature_ops as ops, runtime as launch

    monkeypatch.setattr(_config, "GPU_THREADS", threads)
    reference = run_reductions(shape, axis, np.float32)

    def poisoned_scratch(shape3):
        return cuda.to_device(np.full(shape3, np.nan))

    monkeypatch.setattr(ops, "scratch", poisoned_scratch)
    for reverse in (False, True):
        monkeypatch.setattr(_config, "GPU_REVERSE_BLOCKS", reverse)
        assert run_reductions(shape, axis, np.float32) == reference, f"reverse={reverse}"
        assert not launch.counters(1).copy_to_host().any()


def test_reversed_geometry_reverses_the_blocks(monkeypatch):
    """The test hook does what the test above relies on: the plan's geometry
    carries it, and a kernel sees block 0 at the last place of the partition."""
    from numbabn._gpu import feature_kernels as k
    from numbabn._gpu import feature_ops as ops

    monkeypatch.setattr(_config, "GPU_REVERSE_BLOCKS", True)
    plan = ops._plan((2, 3, 32))
    assert plan.geom.reverse == 1 and plan.geom.lanes == 2 and plan.nchunks == 2

    @cuda.jit
    def places(geom, out):
        if cuda.threadIdx.x == 0:
            out[cuda.blockIdx.x] = k._block_id(geom)

    out = dev(np.full(6, -1, np.int64))
    places[6, 1](plan.geom, out)
    assert out.copy_to_host().tolist() == [5, 4, 3, 2, 1, 0]


# --------------------------------------------------------------------------- #
# numba-cuda's private names: the public path gives the same bits
# --------------------------------------------------------------------------- #
def test_private_names_version_check():
    from numbabn._numba_private import cuda as _private

    name, version = _private.provider()
    assert name in ("numba", "numba-cuda")
    assert version is None or (len(version) == 2 and all(isinstance(n, int) for n in version))
    assert _private.TESTED["gpu"] == {"numba-cuda": ((0, 30), (0, 30))}
    assert _private._parse("0.30.4") == (0, 30) and _private._parse("dev") is None


@pytest.mark.slow  # every operation twice per case: 11 to 24 s each under the simulator
@pytest.mark.parametrize("shape, axis, dtype", [((5, 3, 13), 1, np.float32),
                                                ((21, 5), 1, np.float64),
                                                ((3, 2, 4, 5), 1, np.float32)],
                         ids=["NCL", "NC", "NCHW"])
def test_public_path_gives_the_same_bits(monkeypatch, caplog, shape, axis, dtype):
    """Failing the version check (as an untested numba-cuda would) makes every
    group of private names fall back to the public path: plain launches,
    ``cuda.device_array`` result tables, sliced scratch views.  Results are
    bitwise those of the private path, and the fallback is reported once."""
    from numbabn._gpu import runtime as launch
    from numbabn._numba_private import cuda as _private

    monkeypatch.setattr(_private, "version_tested", lambda: True)
    launch.reset()
    try:
        private = run_every_operation(shape, axis, dtype)
        assert _private.fast("views")
        assert launch._slabs.by_context  # result tables were cut from a slab

        monkeypatch.setattr(_private, "version_tested", lambda: False)
        launch.reset()
        with caplog.at_level(logging.INFO, logger="numbabn"), \
                warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            public = run_every_operation(shape, axis, dtype)
        assert not _private.fast("views") and not launch._slabs.by_context
        reports = [r for r in caplog.records if "public path" in r.getMessage()] if SIMULATOR \
            else [w for w in warned if issubclass(w.category, RuntimeWarning)
                  and "public path" in str(w.message)]
        assert len(reports) == (1 if SIMULATOR else 2)  # once per group ("launch": GPU only)
    finally:
        monkeypatch.undo()
        launch.reset()
    assert public == private
