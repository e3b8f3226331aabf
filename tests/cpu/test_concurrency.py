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


def test_small_inputs_run_serially_and_restore_the_thread_count():
    import numba

    import numbabn as nb
    from numbabn import _config
    from numbabn._cpu import runtime as threads

    before = numba.get_num_threads()
    small = np.ones((4, 3))
    with threads.kernel_guard(small):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with threads.kernel_guard(small):
            raise RuntimeError("kernel failed")
    assert numba.get_num_threads() == before
    large = np.ones(_config.SERIAL_MAX_ELEMS + 1)
    with threads.kernel_guard(large):
        assert numba.get_num_threads() == before
    with pytest.raises(ValueError):
        nb.batch_norm_train(np.ones((1, 3)))  # refused before any launch
    assert numba.get_num_threads() == before
