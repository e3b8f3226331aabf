"""Host cost per call: the Python a numbabn call spends outside its kernel.

    PYTHONPATH=. python scripts/bench_host.py [--reps 3000] [--cases all] [--profile]

For each public function on a case (the default: (256, 1024) float32, axis 1;
``--cases all`` adds a small NCHW and a small NHWC input), times the public call
(as users make it: a fresh output) and the bare kernel call it makes (the
``numbabn._cpu.feature_kernels`` function called directly with the same arguments,
built once before timing, outputs preallocated), one call of each in turn,
``--reps`` times, and prints both medians and their difference, the host cost,
in microseconds.  The bare call includes Numba's dispatch (typing the arguments),
which no host change can remove.

``in-call`` measures the same thing inside each public call: its time minus
that of the kernel call it made (the kernels are wrapped by a timer), so it is
free of the bare call's own noise (its wrapper, about 0.1 us, counts as host).
``stub`` is the public call with the kernels replaced by a Python function that
does nothing: the host path alone, with its data in cache (after a real kernel
the host code runs colder, hence ``in-call`` > ``stub``).

``--profile`` runs cProfile over the public calls of the first case and prints
the functions with the largest own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

import numbabn as nb
from numbabn import _core
from numbabn._cpu import feature_kernels as k
from numbabn._cpu import feature_ops as ops

CASES = {
    "(256, 1024) f32": ((256, 1024), 1),
    "(16, 32, 16, 16) NCHW f32": ((16, 32, 16, 16), 1),
    "(16, 16, 16, 32) NHWC f32": ((16, 16, 16, 32), -1),
}
FUNCS = ("batch_norm_train", "batch_norm_backward", "normalize", "batch_norm_eval",
         "batch_stats")


def build(shape, axis, dtype=np.float32):
    """The public calls and the bare kernel calls they make, by function name."""
    rng = np.random.default_rng(0)
    x = (1 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    nfeat = shape[axis]
    w = (1 + 0.1 * rng.standard_normal(nfeat)).astype(dtype)
    b = (0.1 * rng.standard_normal(nfeat)).astype(dtype)
    rm = np.zeros(nfeat, dtype)
    rv = np.ones(nfeat, dtype)
    _, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
    mean_, var = nb.batch_stats(x, axis=axis)

    # The (outer, C, inner) view the public call hands its kernel.
    if axis == 1:
        x3 = x.reshape(shape[0], nfeat, -1)
        dy3 = dy.reshape(x3.shape)
    else:  # channels last
        x3 = x.reshape(-1, nfeat, 1)
        dy3 = dy.reshape(x3.shape)
    nc = x3.shape[2] == 1
    y3 = np.empty_like(x3)
    coef = np.empty((_core.NCOEFS, nfeat), dtype)
    stats = np.empty((_core.NSTATS, nfeat))
    sums = np.empty((_core.NSUMS, nfeat))
    dwb = np.empty((2, nfeat), dtype)
    g1 = ops.plan(x3.shape, x3.dtype.itemsize, 1)
    g2 = ops.plan(x3.shape, x3.dtype.itemsize, 2)
    runs = max(1, nb._config.CHUNK_ELEMS // (nfeat if nc else x3.shape[2]))
    no3 = np.empty((1, 1, 1))

    public = {
        "batch_norm_train": lambda: nb.batch_norm_train(x, w, b, axis=axis),
        "batch_norm_backward": lambda: nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis),
        "normalize": lambda: nb.normalize(x, rm, rv, w, b, axis=axis),
        "batch_norm_eval": lambda: nb.batch_norm(x, rm, rv, w, b, training=False, axis=axis),
        "batch_stats": lambda: nb.batch_stats(x, axis=axis),
    }
    # The kernels themselves, bound now: measure() wraps the module's names.
    forward_nc, backward_nc, normalize_nc = k.forward_nc, k.backward_nc, k.normalize_nc
    forward_nchw, backward_nchw = k.forward_nchw, k.backward_nchw
    normalize_nchw = k.normalize_nchw
    if nc:
        x2, dy2, y2 = (a.reshape(a.shape[0], nfeat) for a in (x3, dy3, y3))
        p1 = np.empty((2, -(-x3.shape[0] // g1.rows), nfeat))
        p2 = np.empty((3, -(-x3.shape[0] // g2.rows), nfeat))
        bare = {
            "batch_norm_train": lambda: forward_nc(
                x2, w, b, 1e-5, g1, None, p1, coef, stats, y2),
            "batch_norm_backward": lambda: backward_nc(
                dy2, x2, mean, invstd, w, g2, None, p2, sums, coef, dwb, y2),
            "normalize": lambda: normalize_nc(x2, rm, rv, True, 1e-5, w, b, runs, coef, y2),
            "batch_norm_eval": lambda: normalize_nc(
                x2, rm, rv, True, 1e-5, w, b, runs, coef, y2),
            "batch_stats": lambda: forward_nc(
                x2, w, b, 1.0, g1, None, p1, coef, stats, None),
        }
    else:
        def chunks(g):
            return -(-x3.shape[0] // g.rows) * -(-x3.shape[2] // g.cols)
        p1 = no3 if g1.fused else np.empty((2, nfeat, chunks(g1)))
        p2 = no3 if g2.fused else np.empty((3, nfeat, chunks(g2)))
        bare = {
            "batch_norm_train": (lambda: forward_nchw(x3, w, b, 1e-5, g1, None, coef, stats, y3))
            if g1.fused else
            (lambda: k.forward_nchw_chunks(x3, w, b, 1e-5, g1, None, p1, coef, stats, y3)),
            "batch_norm_backward": (lambda: backward_nchw(
                dy3, x3, mean, invstd, w, g2, None, sums, coef, dwb, y3)) if g2.fused else
            (lambda: k.backward_nchw_chunks(
                dy3, x3, mean, invstd, w, g2, None, p2, sums, coef, dwb, y3)),
            "normalize": lambda: normalize_nchw(x3, rm, rv, True, 1e-5, w, b, runs, coef, y3),
            "batch_norm_eval": lambda: normalize_nchw(
                x3, rm, rv, True, 1e-5, w, b, runs, coef, y3),
            "batch_stats": (lambda: forward_nchw(x3, w, b, 1.0, g1, None, coef, stats, None))
            if g1.fused else
            (lambda: k.forward_nchw_chunks(x3, w, b, 1.0, g1, None, p1, coef, stats, None)),
        }
    return public, bare


class Replaced:
    """Replace the kernels ops calls by ``wrap(kernel)`` for the ``with`` block."""

    NAMES = ("forward_nc", "forward_nchw", "backward_nc", "backward_nchw", "normalize_nc",
             "normalize_nchw")

    def __init__(self, wrap):
        self.wrap = wrap

    def __enter__(self):
        self.saved = {n: getattr(k, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(k, n, self.wrap(self.saved[n]))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(k, n, f)


def _noop(kernel):
    return lambda *args: None


def median_us(ts):
    return float(np.median(ts)) * 1e6


def measure(public, bare, reps):
    """Medians (us) per function: public call, bare kernel call, public minus the
    kernel inside that same call, and the public call with no-op kernels."""
    names = list(public)
    t_pub = {n: [] for n in names}
    t_bare = {n: [] for n in names}
    t_in = {n: [] for n in names}
    t_stub = {n: [] for n in names}
    clock = time.perf_counter
    inside = []

    def timed(kernel):
        def call(*args):
            t0 = clock()
            kernel(*args)
            inside.append(clock() - t0)
        return call

    for n in names:  # warm up (compilation, caches)
        for _ in range(20):
            public[n]()
            bare[n]()
    with Replaced(timed):
        for _ in range(reps):
            for n in names:
                f, g = public[n], bare[n]
                inside.clear()
                t0 = clock()
                f()
                t1 = clock()
                g()
                t2 = clock()
                t_pub[n].append(t1 - t0)
                t_bare[n].append(t2 - t1)
                t_in[n].append(t1 - t0 - inside[0])
    with Replaced(_noop), np.errstate(all="ignore"):  # stub outputs are uninitialised
        for _ in range(min(reps, 2000)):
            for n in names:
                f = public[n]
                t0 = clock()
                f()
                t_stub[n].append(clock() - t0)
    return {n: (median_us(t_pub[n]), median_us(t_bare[n]), median_us(t_in[n]),
                median_us(t_stub[n])) for n in names}


def profile(public, reps):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        for f in public.values():
            f()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--cases", default="first", help="'first' or 'all'")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    cases = list(CASES.items())
    if args.cases != "all":
        cases = cases[:1]
    print(f"{'case':28s} {'function':22s} {'public':>8s} {'kernel':>8s} {'host':>7s} "
          f"{'in-call':>8s} {'stub':>6s}   (us, medians of {args.reps})")
    for label, (shape, axis) in cases:
        public, bare = build(shape, axis)
        if args.profile:
            profile(public, 500)
            args.profile = False
        for n, (p, b, i, s) in measure(public, bare, args.reps).items():
            print(f"{label:28s} {n:22s} {p:8.1f} {b:8.1f} {p - b:7.1f} {i:8.1f} {s:6.1f}")


if __name__ == "__main__":
    main()
