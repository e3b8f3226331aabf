"""Fused batch norm + ReLU against the two separate calls, on the benchmark's NCHW shapes.

    PYTHONPATH=. python scripts/bench_fused.py [--rounds 7]

For each case: the training forward and backward of ``relu(batch_norm(x))`` as
numbabn's fused pair (``batch_norm_relu_train`` + ``batch_norm_relu_backward``)
and as the two separate layers' calls (``batch_norm_train`` + ReLU forward, ReLU
backward + ``batch_norm_backward``; numbabn's own ReLU layer), validated against
each other, timed in alternation (medians of ``--rounds``), with the speed-up
and the GB/s of the fused pair's minimal traffic (forward: read x, write y;
backward: read dy, y, x, write dx).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import numbabn as nb
from numbabn.kit import ReLU
CASES = [(128, 32, 26, 26), (64, 64, 56, 56), (32, 256, 14, 14), (8, 3, 224, 224)]


def fused(x, dy, w, b):
    y, mean, invstd = nb.batch_norm_relu_train(x, w, b)
    return y, nb.batch_norm_relu_backward(dy, y, x, mean, invstd, w)


def separate(x, dy, w, b, relu=ReLU()):
    y, mean, invstd = nb.batch_norm_train(x, w, b)
    z = relu.forward(y)
    g = relu.backward(dy)
    return z, nb.batch_norm_backward(g, x, mean, invstd, w)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print("| shape (float32, NCHW) | fused fwd+bwd ms | separate ms | speed-up | fused GB/s |")
    print("|---|---|---|---|---|")
    for shape in CASES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        w = rng.uniform(0.5, 2, shape[1]).astype(np.float32)
        b = rng.uniform(-1, 1, shape[1]).astype(np.float32)
        yf, (dxf, _, _) = fused(x, dy, w, b)
        ys, (dxs, _, _) = separate(x, dy, w, b)
        np.testing.assert_array_equal(yf, ys)
        np.testing.assert_allclose(dxf, dxs, rtol=1e-4, atol=1e-4 * np.abs(dxs).max())
        times = {"fused": [], "separate": []}
        for _ in range(args.rounds):
            for name, fn in (("fused", fused), ("separate", separate)):
                time.sleep(0.01)  # let the previous call's thread pool go idle
                start = time.perf_counter()
                fn(x, dy, w, b)
                times[name].append(time.perf_counter() - start)
        tf, ts = (float(np.median(times[k])) for k in ("fused", "separate"))
        gbs = 6 * x.nbytes / tf / 1e9
        print(f"| {'x'.join(map(str, shape))} | {tf * 1e3:.2f} | {ts * 1e3:.2f} | "
              f"{ts / tf:.2f}x | {gbs:.1f} |")


if __name__ == "__main__":
    main()
