"""What a first call compiles, in a fresh process with an empty Numba cache:
only the kernels of the path it runs, each once, and no parallel loop for a
small input; a second process compiles nothing.  (How long that takes is measured by ``benchmarks/cold_start.py``,
not here.)"""

import pytest

from harness import run_json

SCRIPT = r"""
import json, sys
import numpy as np
from numba.core import event

compiled = []  # (function, signature, parallel) of every compile, in order

class Listener(event.Listener):
    def on_start(self, ev):
        pass

    def on_end(self, ev):
        d = ev.data["dispatcher"]
        # module, name and dispatcher: closures of one factory share a name
        name = f"{d.py_func.__module__}.{d.py_func.__qualname__}#{id(d)}"
        compiled.append((name, str(ev.data["args"]), id(d) in PARALLEL))

event.register("numba:compile", Listener())
import numbabn as nb
from numbabn._cpu import feature_kernels, row_kernels

PARALLEL = {id(k) for m in (feature_kernels, row_kernels) for k in vars(m).values()
            if hasattr(k, "py_func") and k.targetoptions.get("parallel")}

calls = {}
def record(name, fn):
    start = len(compiled)
    fn()
    calls[name] = compiled[start:]

size = sys.argv[1]
shape = {"small": (8, 8, 12, 12), "large": (64, 16, 24, 24)}[size]
rng = np.random.default_rng(0)
x = rng.standard_normal(shape).astype(np.float32)
w = np.ones(shape[1], np.float32)
b = np.zeros(shape[1], np.float32)
out = {}
record("batch_norm_train", lambda: out.update(bn=nb.batch_norm_train(x, w, b)))
y, mean, invstd = out["bn"]
record("batch_norm_backward", lambda: nb.batch_norm_backward(y, x, mean, invstd, w))
record("batch_norm", lambda: nb.batch_norm(x, mean, invstd, w, b))
record("layer_norm_train", lambda: out.update(ln=nb.layer_norm_train(x, shape[1:])))
y, m, r = out["ln"]
record("layer_norm_backward", lambda: nb.layer_norm_backward(y, x, m, r, shape[1:]))
print(json.dumps(calls))
"""


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_first_call_compiles_each_kernel_once_and_only_its_path(tmp_path, size):
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    calls = run_json(SCRIPT, size, env=env)
    everything = [c for compiled in calls.values() for c in compiled]
    assert everything, "nothing compiled: the cache was not empty"
    names = [name for name, _, _ in everything]
    short = [name.rsplit("#")[0].rsplit(".")[-1] for name in names]
    # One signature per function: no second copy for an unsigned loop index
    # (a prange index is uint64) or for a literal argument (0, False).
    twice = sorted({n for n in names if names.count(n) > 1 and ".ol_" not in n})
    assert twice == [], f"compiled more than once: {twice}"
    assert not any("Literal[int]" in sig or "Literal[bool]" in sig
                   for name, sig, _ in everything if ".ol_" not in name), everything
    parallel = {n for n, (_, _, par) in zip(short, everything) if par}
    if size == "small":
        # at most SERIAL_MAX_ELEMS values: the serial twins, no parallel loop
        assert parallel == set()
        assert {"forward_nchw_serial", "backward_nchw_serial", "forward_one_run_serial",
                "backward_one_run_serial"} <= set(short)
    else:
        assert parallel == {"forward_nchw", "backward_nchw", "normalize_nchw",
                            "forward_one_run", "backward_one_run"}
    # only the path the call runs: the fused forward, not the two-phase one,
    # and layer norm's one-run rows, not the general row loops
    assert not any(n.startswith(("forward_nchw_chunks", "backward_nchw_chunks", "forward_rows",
                                 "forward_chunks", "backward_sums", "_normalize_region",
                                 "_backward_block", "_row_backward_sums", "_dx_row"))
                   for n in short), short
    # and a later process loads every kernel, serial twins included, from the disk cache
    again = run_json(SCRIPT, size, env=env)
    assert [c for compiled in again.values() for c in compiled] == []
