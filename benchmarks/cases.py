"""The benchmark cases, shared by ``benchmarks/test_bench_ops.py`` (pytest-benchmark)
and ``scripts/bench_report.py`` (one table and a chart).

Each case is an operation on one input; each runs under several implementations:

``numbabn``  the library, as users call it: every call returns a fresh output;
``numbabn_out`` the same with ``out=`` a preallocated array (not for ``stats``),
             as the copy writes: the kernel alone, without the page faults of a
             fresh output (3.5 ms of a 51 MB one here);
``numpy``    a plain NumPy implementation (float64 statistics, like numbabn's);
``torch``    PyTorch CPU's ATen kernels, same thread count as Numba (when installed);
``copy``     ``np.copyto`` of the input into a preallocated array: 2 passes of the
             tensor, the bandwidth ceiling every operation is compared with.

Minimal traffic, in passes of the tensor (``TRAFFIC``): fwd-train reads ``x`` and
writes ``y`` (2), eval the same (2), backward reads ``x`` and ``dy`` and writes
``dx`` (3), stats reads ``x`` (1).  GB/s = passes * tensor bytes / time.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import numba
import numpy as np

import numbabn as nb

try:  # PyTorch is an optional peer
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

EPS = 1e-5

OPS = ("fwd_train", "backward", "eval", "stats")
TRAFFIC = {"fwd_train": 2, "eval": 2, "backward": 3, "stats": 1}
IMPLS = ("numbabn", "numbabn_out", "numpy", "torch", "copy")


@dataclass(frozen=True)
class Case:
    shape: tuple
    axis: int
    dtype: str

    @property
    def label(self):
        layout = "NHWC" if self.axis == -1 and len(self.shape) == 4 else ""
        return f"{self.shape}{' ' + layout if layout else ''} {self.dtype}"

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


CASES = [
    Case((256, 1024), 1, "float32"),
    Case((4096, 512), 1, "float32"),
    Case((128, 32, 26, 26), 1, "float32"),
    Case((64, 64, 56, 56), 1, "float32"),
    Case((32, 256, 14, 14), 1, "float32"),
    Case((8, 3, 224, 224), 1, "float32"),
    Case((32, 56, 56, 64), -1, "float32"),
    Case((4096, 512), 1, "float64"),
    Case((32, 256, 14, 14), 1, "float64"),
]


class Inputs:
    """Fresh random inputs for one case (feature means and scales vary)."""

    def __init__(self, case: Case, seed=0):
        rng = np.random.default_rng(seed)
        dt = np.dtype(case.dtype)
        self.case = case
        self.axis = case.axis
        nfeat = case.shape[case.axis]
        bshape = [1] * len(case.shape)
        bshape[case.axis] = nfeat
        loc = rng.uniform(-3, 3, nfeat).reshape(bshape)
        scale = rng.uniform(0.5, 2, nfeat).reshape(bshape)
        self.x = (loc + scale * rng.standard_normal(case.shape, dtype=np.float32)).astype(dt)
        self.dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dt)
        self.weight = rng.uniform(0.5, 1.5, nfeat).astype(dt)
        self.bias = rng.uniform(-1, 1, nfeat).astype(dt)
        self.running_mean = rng.uniform(-1, 1, nfeat).astype(dt)
        self.running_var = rng.uniform(0.5, 2, nfeat).astype(dt)
        _, self.mean, self.invstd = nb.batch_norm_train(self.x, self.weight, self.bias, EPS, self.axis)
        self.copy_buffer = np.empty_like(self.x)
        self.out_buffer = np.empty_like(self.x)


# --------------------------------------------------------------------------- #
# Plain NumPy: float64 statistics, elementwise math in float64, cast at the end.
# Also the reference results are validated against.
# --------------------------------------------------------------------------- #
def _red(x, axis):
    axis %= x.ndim
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(a for a in range(x.ndim) if a != axis), tuple(shape)


def numpy_stats(x, axis):
    red, _ = _red(x, axis)
    return x.mean(axis=red, dtype=np.float64), x.var(axis=red, dtype=np.float64)


def numpy_normalize(x, mean, var, weight, bias, axis, dtype=None):
    _, bshape = _red(x, axis)
    scale = weight / np.sqrt(np.asarray(var, np.float64) + EPS)
    y = (x - np.reshape(mean, bshape)) * scale.reshape(bshape) + np.reshape(bias, bshape)
    return y if dtype is None else y.astype(dtype)


def numpy_fwd_train(x, weight, bias, axis, dtype=None):
    mean, var = numpy_stats(x, axis)
    y = numpy_normalize(x, mean, var, weight, bias, axis, dtype)
    return y, mean, 1.0 / np.sqrt(var + EPS)


def numpy_backward(dy, x, weight, axis, dtype=None):
    red, bshape = _red(x, axis)
    mean, var = numpy_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean.reshape(bshape)) * invstd.reshape(bshape)
    sum_dy = dy.sum(axis=red, dtype=np.float64)
    sum_dy_xhat = (dy * xhat).sum(axis=red)
    n = x.size // x.shape[axis]
    dx = (weight * invstd).reshape(bshape) * (
        dy - (sum_dy / n).reshape(bshape) - xhat * (sum_dy_xhat / n).reshape(bshape)
    )
    return (dx if dtype is None else dx.astype(dtype)), sum_dy_xhat, sum_dy


# --------------------------------------------------------------------------- #
# Implementations: name -> zero-argument callable returning comparable arrays.
# --------------------------------------------------------------------------- #
def _torch_view(a, axis):
    t = torch.from_numpy(a)
    if axis % a.ndim != 1:  # channels-last: a (N, C, ...) view, channels_last memory
        perm = (0, a.ndim - 1) + tuple(range(1, a.ndim - 1))
        t = t.permute(perm)
    return t


def _torch_out(t, axis):
    if axis % t.dim() != 1:
        perm = (0,) + tuple(range(2, t.dim())) + (1,)
        t = t.permute(perm)
    return t.numpy()


def implementations(op: str, inp: Inputs) -> dict:
    """``{name: fn}`` for the implementations available for ``op``."""
    x, dy, w, b, axis = inp.x, inp.dy, inp.weight, inp.bias, inp.axis
    dt = x.dtype
    out = inp.out_buffer
    fns = {}
    if op == "fwd_train":
        fns["numbabn"] = lambda: nb.batch_norm_train(x, w, b, EPS, axis)
        fns["numbabn_out"] = lambda: nb.batch_norm_train(x, w, b, EPS, axis, out=out)
        fns["numpy"] = lambda: numpy_fwd_train(x, w, b, axis, dt)
    elif op == "eval":
        rm, rv = inp.running_mean, inp.running_var
        fns["numbabn"] = lambda: (nb.batch_norm(x, rm, rv, w, b, training=False, eps=EPS, axis=axis),)
        fns["numbabn_out"] = lambda: (nb.normalize(x, rm, rv, w, b, EPS, axis, out=out),)
        fns["numpy"] = lambda: (numpy_normalize(x, rm, rv, w, b, axis, dt),)
    elif op == "backward":
        mean, invstd = inp.mean, inp.invstd
        fns["numbabn"] = lambda: nb.batch_norm_backward(dy, x, mean, invstd, w, axis)
        fns["numbabn_out"] = lambda: nb.batch_norm_backward(dy, x, mean, invstd, w, axis, out=out)
        fns["numpy"] = lambda: numpy_backward(dy, x, w, axis, dt)
    elif op == "stats":
        fns["numbabn"] = lambda: nb.batch_stats(x, axis)
        fns["numpy"] = lambda: numpy_stats(x, axis)
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if torch is not None:
        fns["torch"] = _torch_impl(op, inp)
    buf = inp.copy_buffer
    fns["copy"] = lambda: np.copyto(buf, x)
    return fns


def _torch_impl(op, inp):
    axis = inp.axis
    tx, tdy = _torch_view(inp.x, axis), _torch_view(inp.dy, axis)
    tw, tb = torch.from_numpy(inp.weight), torch.from_numpy(inp.bias)
    aten = torch.ops.aten
    if op == "fwd_train":
        def run():
            y, mean, invstd = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, EPS)
            return _torch_out(y, axis), mean.numpy(), invstd.numpy()
    elif op == "eval":
        trm, trv = torch.from_numpy(inp.running_mean), torch.from_numpy(inp.running_var)

        def run():
            y, _, _ = aten.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, EPS)
            return (_torch_out(y, axis),)
    elif op == "backward":
        tmean, tinvstd = torch.from_numpy(inp.mean), torch.from_numpy(inp.invstd)

        def run():
            dx, dw, db = aten.native_batch_norm_backward(
                tdy, tx, tw, None, None, tmean, tinvstd, True, EPS, [True, True, True])
            return _torch_out(dx, axis), dw.numpy(), db.numpy()
    else:
        dims = [d for d in range(tx.dim()) if d != 1]

        def run():
            var, mean = torch.var_mean(tx, dim=dims, correction=0)
            return mean.numpy(), var.numpy()
    return run


# --------------------------------------------------------------------------- #
# Validation: every implementation against the float64 reference, before timing.
# --------------------------------------------------------------------------- #
TOL = {"float32": 1e-4, "float64": 1e-9}


def reference(op: str, inp: Inputs):
    x, axis = inp.x, inp.axis
    if op == "fwd_train":
        return numpy_fwd_train(x.astype(np.float64), inp.weight, inp.bias, axis)
    if op == "eval":
        return (numpy_normalize(x.astype(np.float64), inp.running_mean, inp.running_var,
                                inp.weight, inp.bias, axis),)
    if op == "backward":
        return numpy_backward(inp.dy.astype(np.float64), x.astype(np.float64), inp.weight, axis)
    return numpy_stats(x, axis)


def validate(op: str, name: str, result, ref, dtype):
    """Raise AssertionError unless ``result`` matches ``ref`` (``copy`` is exempt)."""
    if name == "copy":
        return
    tol = TOL[str(dtype)]
    for i, (a, r) in enumerate(zip(result, ref)):
        a = np.asarray(a, np.float64)
        scale = np.max(np.abs(r)) if r.size else 1.0
        err = np.max(np.abs(a - r)) / max(scale, 1.0)
        if not err <= tol:
            raise AssertionError(f"{op}/{name} output {i}: error {err:.3g} > {tol:g} (relative to max |ref|)")


def time_interleaved(fns: dict, budget_s=2.0, block=4, min_rounds=3, max_rounds=200, settle_s=0.01):
    """Best and median seconds per call of each function.

    Rounds of ``block + 1`` calls per function, functions in turn, so that all see
    the same (shared, noisy) machine over time.  Before each block the machine is
    left idle for ``settle_s``: numbabn (Numba's OpenMP) and PyTorch (its own
    OpenMP copy) keep separate thread pools, whose idle workers spin for a while
    after each call and would take the cores from the next block's function.
    The first call of each block is not timed (it wakes the pool).  Returns
    ``{name: (best, median)}``.
    """
    times = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < max_rounds):
        for name, fn in fns.items():
            time.sleep(settle_s)
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: (min(ts), float(np.median(ts))) for name, ts in times.items()}


def _cpu_busy(interval):
    """Fraction of all CPUs busy over ``interval`` seconds (Linux; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        t1, i1 = sample()
        time.sleep(interval)
        t2, i2 = sample()
    except OSError:
        return None
    return 1.0 - (i2 - i1) / max(t2 - t1, 1)


def wait_for_quiet(max_wait_s=120.0, busy_below=0.1, interval=0.5):
    """On a shared machine, wait (at most ``max_wait_s``) until other processes
    leave the CPUs idle, so that a case is timed on an unloaded machine.  Returns
    the busy fraction seen last (None where it cannot be read)."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        busy = _cpu_busy(interval)
        if busy is None or busy < busy_below or time.perf_counter() > deadline:
            return busy


def set_torch_threads():
    """PyTorch uses as many threads as Numba, so ratios compare like with like."""
    if torch is not None:
        import numba

        torch.set_num_threads(numba.get_num_threads())


def machine():
    """The machine a report was measured on: CPU model, instruction-set features, versions."""
    import llvmlite.binding as llvm

    from numbabn.kit._kernels import tiles

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "llvm_cpu": numba.config.CPU_NAME or llvm.get_host_cpu_name(),
        # what the host has, and what Numba compiles for (NUMBA_CPU_FEATURES when set)
        "host_avx512f": "avx512f" in tiles.enabled_features(llvm.get_host_cpu_features().flatten()),
        "host_avx2": "avx2" in tiles.enabled_features(llvm.get_host_cpu_features().flatten()),
        "numba_cpu_features": numba.config.CPU_FEATURES,
        "register_tiles": tiles.DIRECT_CONV_CPU,
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "threading_layer": numba.threading_layer(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "python": platform.python_version(),
    }
