"""Bitwise reproducibility across runs and thread counts, and the on-disk JIT cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HASH_SCRIPT = r"""
import hashlib, json
import numpy as np
import numbabn as nb
out = {}
for dtype in (np.float32, np.float64):
    for shape, axis in [((4096, 24), 1), ((16, 3, 40, 40), 1), ((8, 20, 20, 7), -1), ((3, 5, 20000), 1)]:
        rng = np.random.default_rng(7)
        x = (3 + rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        c = shape[axis]
        w = rng.standard_normal(c).astype(dtype)
        b = rng.standard_normal(c).astype(dtype)
        y, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
        dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
        m, v = nb.batch_stats(x, axis=axis)
        h = hashlib.sha256()
        for a in (y, mean, invstd, dx, dw, db, m, v):
            h.update(np.ascontiguousarray(a).tobytes())
        out[f"{np.dtype(dtype).name}-{shape}-{axis}"] = h.hexdigest()
print(json.dumps(out))
"""

CACHE_SCRIPT = r"""
import json
import numpy as np
import numbabn as nb
from numbabn._cpu import kernels
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 8, 5, 5)).astype(np.float32)
y, mean, invstd = nb.batch_norm_train(x)
nb.batch_norm_backward(x, x, mean, invstd)
hits = misses = 0
for name in dir(kernels):
    f = getattr(kernels, name)
    if hasattr(f, "stats"):
        hits += sum(f.stats.cache_hits.values())
        misses += sum(f.stats.cache_misses.values())
print(json.dumps({"hits": hits, "misses": misses}))
"""


def _run(script, threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_bitwise_identical_for_1_and_2_threads_and_across_runs():
    one = _run(HASH_SCRIPT, 1)
    two = _run(HASH_SCRIPT, 2)
    again = _run(HASH_SCRIPT, 2)
    assert one == two
    assert two == again


def test_second_process_loads_kernels_from_disk_cache():
    _run(CACHE_SCRIPT, 2)  # populates the cache if needed
    second = _run(CACHE_SCRIPT, 2)
    assert second["misses"] == 0, second
    assert second["hits"] > 0, second
