"""Cold start: seconds of the first call of each public function, each in a
fresh process with an empty Numba cache (a new container, CI job or notebook
VM), on a small input (at most ``SERIAL_MAX_ELEMS`` values: the serial twins of
the kernels) and a large one (the parallel kernels).

    PYTHONPATH=. python -m benchmarks.cold_start                 # table + JSON
    PYTHONPATH=. python -m benchmarks.cold_start --only batch_norm_train layer_norm
    PYTHONPATH=. python -m benchmarks.cold_start --json out.json

The statistics a backward call needs come from NumPy, so each process compiles
only what its one call runs.  The time is the call alone (``import numbabn``,
about 0.3 s, is reported apart).  Compile time is CPU-bound: run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {"small": (16, 8, 12, 12), "large": (64, 32, 28, 28)}

# name -> the call, in terms of the prepared inputs (see PRELUDE).
CALLS = {
    "batch_norm_train": "nb.batch_norm_train(x, w, b)",
    "batch_norm_backward": "nb.batch_norm_backward(dy, x, mean, invstd, w)",
    "batch_norm": "nb.batch_norm(x, mean, var, w, b)",
    "normalize": "nb.normalize(x, mean, var, w, b)",
    "batch_stats": "nb.batch_stats(x)",
    "batch_moments": "nb.batch_moments(x)",
    "merge_moments": "nb.merge_moments(np.full(2, x.size // 8 // 2), np.stack([mean, mean]), "
                     "np.stack([var, var]) * (x.size // 8 // 2))",
    "batch_norm_elemt": "nb.batch_norm_elemt(x, mean, invstd, w, b)",
    "batch_norm_backward_reduce": "nb.batch_norm_backward_reduce(dy, x, mean, invstd)",
    "batch_norm_backward_elemt": "nb.batch_norm_backward_elemt(dy, x, mean, invstd, w, "
                                 "sum_dy, sum_dy_xmu, x.size // x.shape[1])",
    "batch_norm_relu_train": "nb.batch_norm_relu_train(x, w, b)",
    "batch_norm_relu_backward": "nb.batch_norm_relu_backward(dy, np.maximum(x, 0), x, mean, "
                                "invstd, w)",
    "update_running_stats": "nb.update_running_stats(rm, rv, mean, var, x.size // x.shape[1], "
                            "0.1)",
    "layer_norm": "nb.layer_norm(x, x.shape[1:])",
    "layer_norm_train": "nb.layer_norm_train(x, x.shape[1:])",
    "layer_norm_backward": "nb.layer_norm_backward(dy, x, rmean, rrstd, x.shape[1:])",
    "group_norm": "nb.group_norm(x, 4)",
    "group_norm_train": "nb.group_norm_train(x, 4)",
    "group_norm_backward": "nb.group_norm_backward(dy, x, gmean, grstd, 4)",
    "instance_norm": "nb.instance_norm(x)",
    "instance_norm_train": "nb.instance_norm_train(x)",
    "instance_norm_backward": "nb.instance_norm_backward(dy, x, imean, irstd)",
    "rms_norm": "nb.rms_norm(x, x.shape[-1:])",
    "rms_norm_train": "nb.rms_norm_train(x, x.shape[-1:])",
    "rms_norm_backward": "nb.rms_norm_backward(dy, x, qrstd, x.shape[-1:])",
}

# Extra variants of the most used functions: float64, and channels-last memory.
VARIANTS = {
    "batch_norm_train[float64]": ("batch_norm_train", "float64", "nchw"),
    "batch_norm_train[nhwc]": ("batch_norm_train", "float32", "nhwc"),
    "batch_norm_backward[nhwc]": ("batch_norm_backward", "float32", "nhwc"),
}

PRELUDE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import numbabn as nb
t_import = time.perf_counter() - t0
shape, dtype, layout, call = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
x = (3 + rng.standard_normal(shape)).astype(dtype)
dy = rng.standard_normal(shape).astype(dtype)
C = shape[1]
w = np.ones(C, dtype); b = np.zeros(C, dtype)
axes = (0, 2, 3)
x64 = x.astype(np.float64)
mean = x64.mean(axis=axes).astype(dtype); var = x64.var(axis=axes).astype(dtype)
invstd = (1 / np.sqrt(var + 1e-5)).astype(dtype)
sum_dy = dy.astype(np.float64).sum(axis=axes)
sum_dy_xmu = (dy * (x64 - x64.mean(axis=axes, keepdims=True))).sum(axis=axes)
rm = np.zeros(C, dtype); rv = np.ones(C, dtype)
def _row_stats(v):  # mean and 1/std over rows of v (N, ...) -> float64
    v = v.reshape(v.shape[0], -1)
    return v.mean(axis=1), 1 / np.sqrt(v.var(axis=1) + 1e-5)
# the saved statistics in the shapes the *_train functions return them
N = shape[0]
rmean, rrstd = (a.astype(dtype).reshape(N, 1, 1, 1) for a in _row_stats(x64))
gmean, grstd = (a.astype(dtype).reshape(N, 4) for a in _row_stats(x64.reshape(N * 4, -1)))
imean, irstd = (a.astype(dtype).reshape(N, C) for a in _row_stats(x64.reshape(N * C, -1)))
qrstd = (1 / np.sqrt((x64 ** 2).mean(axis=-1, keepdims=True) + 1e-6)).astype(dtype)
if layout == "nhwc":  # the same logical NCHW array in channels-last memory
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
t1 = time.perf_counter()
exec(call)
t2 = time.perf_counter()
print(json.dumps({"import_numbabn": t_import, "first_call": t2 - t1}))
"""


def first_call(call, shape, dtype="float32", layout="nchw"):
    """Seconds of ``call``'s first run in a fresh process with an empty cache."""
    with tempfile.TemporaryDirectory(prefix="numbabn-cold-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", PRELUDE,
                              json.dumps([list(shape), dtype, layout, call])],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cases(only=None):
    """(name, call, dtype, layout) for every measured function and variant."""
    out = [(name, call, "float32", "nchw") for name, call in CALLS.items()]
    out += [(name, CALLS[fn], dtype, layout) for name, (fn, dtype, layout) in VARIANTS.items()]
    if only:
        out = [c for c in out if c[0].split("[")[0] in only or c[0] in only]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="function names (default: all)")
    ap.add_argument("--sizes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    import platform

    import numba

    results = {"cpu": _cpu_model(), "python": platform.python_version(),
               "numba": numba.__version__, "shapes": SHAPES, "first_call_s": {}}
    print(f"{'function':34s} " + " ".join(f"{s:>14s}" for s in args.sizes))
    for name, call, dtype, layout in cases(args.only):
        row = {}
        for size in args.sizes:
            row[size] = first_call(call, SHAPES[size], dtype, layout)["first_call"]
        results["first_call_s"][name] = row
        print(f"{name:34s} " + " ".join(f"{row[s]:13.2f}s" for s in args.sizes), flush=True)
    worst = max(max(r.values()) for r in results["first_call_s"].values())
    print(f"slowest first call: {worst:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


if __name__ == "__main__":
    main()
