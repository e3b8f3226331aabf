"""Warm start: seconds from ``import numpy, numba`` done to the first forward and
backward done, in a fresh process that loads the kernels from the on-disk cache.

    PYTHONPATH=. python -m benchmarks.warm_start     # prints JSON

The first run in a new environment compiles and fills the cache; ``measure``
runs one process to make sure the cache is warm, then times ``repeats`` more.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import time
t0 = time.perf_counter()
import numpy as np
import numba
t1 = time.perf_counter()
import numbabn as nb
t2 = time.perf_counter()
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 8, 12, 12)).astype(np.float32)   # NCHW
w = np.ones(8, np.float32)
b = np.zeros(8, np.float32)
y, mean, invstd = nb.batch_norm_train(x, w, b)
dx, dw, db = nb.batch_norm_backward(y, x, mean, invstd, w)
t3 = time.perf_counter()
xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))           # NHWC, axis=-1
y, mean, invstd = nb.batch_norm_train(xl, w, b, axis=-1)
dx, dw, db = nb.batch_norm_backward(y, xl, mean, invstd, w, axis=-1)
t4 = time.perf_counter()
import json
print(json.dumps({"import_numpy_numba": t1 - t0, "import_numbabn": t2 - t1,
       "first_fwd_bwd_nchw": t3 - t2, "since_numba_import": t3 - t1,
       "then_nhwc_fwd_bwd": t4 - t3}))
"""


def _once():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(repeats=3):
    """Best of ``repeats`` warm starts (after one run that fills the cache)."""
    _once()
    runs = [_once() for _ in range(repeats)]
    return min(runs, key=lambda r: r["since_numba_import"])


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
