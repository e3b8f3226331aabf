"""Bitwise reproducibility across runs and thread counts, and the on-disk JIT cache."""

import pytest

from harness import run_json

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
from numbabn._cpu import feature_kernels as kernels
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 8, 5, 5)).astype(np.float32)
y, mean, invstd = nb.batch_norm_train(x)
nb.batch_norm_backward(x, x, mean, invstd)
hits = misses = 0
for f in [*vars(kernels).values(), *vars(kernels.serial).values()]:  # serial twins too
    if hasattr(f, "stats"):
        hits += sum(f.stats.cache_hits.values())
        misses += sum(f.stats.cache_misses.values())
print(json.dumps({"hits": hits, "misses": misses}))
"""


def _run(script, threads):
    return run_json(script, threads=threads)


@pytest.mark.slow  # three fresh processes
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


KEYED_SCRIPT = r"""
import hashlib, importlib.util, json, sys
# Load _config first and change a compile-time value before numbabn is imported.
spec = importlib.util.spec_from_file_location("numbabn._config", "numbabn/_config.py")
cfg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cfg)
if sys.argv[1] == "ieee":  # no fused multiply-adds anywhere
    for name in ("CPU_JIT", "CPU_JIT_STRICT", "CPU_JIT_PARALLEL", "CPU_HELPER", "CPU_HELPER_STRICT"):
        setattr(cfg, name, dict(getattr(cfg, name), fastmath=False))
sys.modules["numbabn._config"] = cfg
import numpy as np
import numbabn as nb
from numbabn._cpu import feature_kernels as kernels
rng = np.random.default_rng(5)
x = (3 + rng.standard_normal((512, 24))).astype(np.float32)
w = rng.standard_normal(24).astype(np.float32)
y, mean, invstd = nb.batch_norm_train(x, w, w)
misses = sum(sum(f.stats.cache_misses.values()) for f in vars(kernels).values()
             if hasattr(f, "stats"))
digest = hashlib.sha256(b"".join(a.tobytes() for a in (y, mean, invstd))).hexdigest()
print(json.dumps({"hash": digest, "misses": misses}))
"""


@pytest.mark.slow  # cold compiles in fresh caches, five processes
def test_changing_a_compile_time_value_never_loads_stale_kernels(tmp_path):
    """Numba's cache key ignores flags and constants; numbabn._cache keys the
    cache on _config's compile-time values, so a warm cache never gives the bits
    of other settings."""
    warm, fresh = {"NUMBA_CACHE_DIR": str(tmp_path / "warm")}, {"NUMBA_CACHE_DIR": str(tmp_path / "fresh")}
    default = run_json(KEYED_SCRIPT, "default", env=warm)
    ieee_after_default = run_json(KEYED_SCRIPT, "ieee", env=warm)
    ieee_cold = run_json(KEYED_SCRIPT, "ieee", env=fresh)
    assert ieee_after_default["misses"] > 0  # recompiled, not loaded
    assert ieee_after_default["hash"] == ieee_cold["hash"]
    assert ieee_cold["hash"] != default["hash"]  # the setting does change the bits
    default_again = run_json(KEYED_SCRIPT, "default", env=warm)
    assert default_again["misses"] > 0 and default_again["hash"] == default["hash"]
    assert run_json(KEYED_SCRIPT, "default", env=warm) == dict(default_again, misses=0)
