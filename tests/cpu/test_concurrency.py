"""Several Python threads calling the kernels at once, under each threading layer."""

import numpy as np
import pytest

from harness import run_json

SCRIPT = r"""
import json, threading
import numpy as np
import numbabn as nb
from numbabn._cpu.runtime import threading_layer

rng = np.random.default_rng(1)
shapes = [((32, 8, 9, 9), 1), ((2000, 16), 1), ((8, 9, 9, 5), -1), ((4, 3, 3000), 1)]
inputs = [(rng.standard_normal(s).astype(np.float32), a) for s, a in shapes]

def run(x, axis):
    y, mean, invstd = nb.batch_norm_train(x, axis=axis)
    dx, _, _ = nb.batch_norm_backward(y, x, mean, invstd, axis=axis)
    return y, dx

expected = [run(x, a) for x, a in inputs]
errors = []

def worker(k):
    try:
        for it in range(25):
            i = (k + it) % len(inputs)
            y, dx = run(*inputs[i])
            if not (np.array_equal(y, expected[i][0]) and np.array_equal(dx, expected[i][1])):
                errors.append(f"thread {k} iteration {it}: result differs")
    except Exception as e:  # pragma: no cover - reported below
        errors.append(repr(e))

threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"layer": threading_layer(), "errors": errors}))
"""


def _available_layers():
    layers = ["workqueue"]
    try:
        import numba.np.ufunc.omppool  # noqa: F401
        layers.append("omp")
    except ImportError:
        pass
    try:
        import numba.np.ufunc.tbbpool  # noqa: F401
        layers.append("tbb")
    except ImportError:
        pass
    return layers


@pytest.mark.slow  # a fresh process per threading layer
@pytest.mark.parametrize("layer", _available_layers())
def test_four_threads_get_correct_results(layer):
    out = run_json(SCRIPT, threads=2, env={"NUMBA_THREADING_LAYER": layer})
    assert out["layer"] == layer
    assert out["errors"] == []


def test_default_layer_is_threadsafe():
    """Numba picks omp or tbb when present; the guard only locks under workqueue."""
    import numbabn as nb
    from numbabn._cpu import runtime as threads

    nb.batch_stats(np.ones((4, 2)))
    layer = threads.threading_layer()
    guard = threads._lock_if_needed()
    if layer in ("omp", "tbb"):
        assert not hasattr(guard, "acquire")
    else:
        assert hasattr(guard, "acquire")


def _twin_cases(rng):
    """(name, function of no arguments) over every kernel family, small inputs."""
    import numbabn as nb

    def arr(shape, dtype):
        return (3 + 2 * rng.standard_normal(shape)).astype(dtype)

    cases = []
    for dtype in (np.float32, np.float64):
        layouts = [("nchw", (6, 8, 7, 8), 1), ("nhwc", (6, 7, 8, 5), -1)]
        if dtype == np.float32:  # (float64 runs the same code on these)
            layouts += [("planes", (6, 5, 4, 4), 1), ("dense", (40, 5), 1),
                        ("two-phase", (2, 3, 300), 1)]
        for name, shape, axis in layouts:
            x = arr(shape, dtype)
            C = shape[axis]
            w, b = arr(C, dtype), arr(C, dtype)
            dy = arr(shape, dtype)

            def bn(x=x, w=w, b=b, dy=dy, axis=axis):
                y, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
                dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
                ev = nb.batch_norm(x, mean, 1 / invstd ** 2, w, b, axis=axis)
                yr, m2, i2 = nb.batch_norm_relu_train(x, w, b, axis=axis)
                dxr = nb.batch_norm_relu_backward(dy, yr, x, m2, i2, w, axis=axis)[0]
                return y, mean, invstd, dx, dw, db, ev, yr, dxr

            cases.append((f"batch_norm-{name}-{np.dtype(dtype).name}", bn))
        x = arr((6, 8, 5, 5), dtype)
        dy = arr(x.shape, dtype)
        xcl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # NHWC memory

        def family(x=x, dy=dy, xcl=xcl):
            out = []
            y, m, r = nb.layer_norm_train(x, (8, 5, 5))
            out += [y, m, r, *nb.layer_norm_backward(dy, x, m, r, (8, 5, 5))]
            y, r = nb.rms_norm_train(x, (5,))
            out += [y, r, *nb.rms_norm_backward(dy, x, r, (5,))]
            y, m, r = nb.instance_norm_train(x)
            out += [y, m, r, *nb.instance_norm_backward(dy, x, m, r)]
            for xin in (x, xcl):
                y, m, r = nb.group_norm_train(xin, 4)
                out += [y, m, r, *nb.group_norm_backward(dy, xin, m, r, 4)]
            return [o for o in out if o is not None]

        if dtype == np.float32:
            cases.append((f"family-{np.dtype(dtype).name}", family))
    return cases


def test_small_inputs_run_the_serial_twins_with_the_same_bits(monkeypatch, rng):
    """Inputs of at most SERIAL_MAX_ELEMS values run the serial twins of the
    kernels (no parallel loop to compile or wake); with the threshold at 0 the
    same inputs run the parallel kernels, and every result is bitwise equal."""
    from numbabn import _config
    from numbabn._cpu import feature_kernels, feature_ops, row_kernels, row_ops

    for module in (feature_kernels, row_kernels):
        twin = module.serial.forward_nchw if module is feature_kernels else module.serial.backward
        assert twin.py_func.__qualname__.endswith("_serial")
        assert not twin.targetoptions.get("parallel")
    small = np.ones((6, 5, 7, 8), np.float32)
    assert feature_ops._kernels(small) is feature_kernels.serial
    assert row_ops._kernels(small.reshape(1, 1, 6, -1)) is row_kernels.serial
    for name, call in _twin_cases(rng):
        serial = call()
        monkeypatch.setattr(_config, "SERIAL_MAX_ELEMS", 0)
        assert feature_ops._kernels(small) is feature_kernels
        parallel = call()
        monkeypatch.undo()
        assert len(serial) == len(parallel)
        for i, (a, b) in enumerate(zip(serial, parallel)):
            assert np.array_equal(a, b, equal_nan=True), f"{name}: result {i} differs"
