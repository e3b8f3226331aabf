"""Benchmark layer, group and RMS norm: numbabn against PyTorch CPU and a copy.

    PYTHONPATH=. python scripts/bench_norms.py [--budget 2] [--quiet-wait 30]

For each case, the forward (``*_train``: y and the saved statistics) and the
backward (dx and the parameter gradients) of numbabn and of PyTorch's own
kernels (``torch.native_layer_norm`` / ``native_group_norm`` and their
backward; RMS norm, which has no native CPU kernel, through autograd), with
``torch.set_num_threads`` equal to Numba's thread count, next to
``np.copyto`` into a preallocated array.  Every implementation is checked
against PyTorch's float64 result before it is timed; implementations
run in turns (benchmarks.cases.time_interleaved) and the table shows the
median.  GB/s counts the minimal traffic: the forward reads x and writes y (2
passes of the tensor), the backward reads x and dy and writes dx (3), the copy
2.  "/ copy" is numbabn's time over the copy's, scaled to the same passes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numba
import numpy as np
import torch

import numbabn
from benchmarks.cases import time_interleaved, wait_for_quiet

PASSES = {"fwd": 2, "bwd": 3}


def _float64(*arrays):
    """float64 PyTorch copies: the reference every case is validated against."""
    return [torch.from_numpy(a.astype(np.float64)) for a in arrays]


def layer_case(shape, rng):
    d = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 2, d).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    _, mean, rstd = numbabn.layer_norm_train(x, d, w, b)
    tx, tdy, tw, tb = map(torch.from_numpy, (x, dy, w, b))
    _, tmean, trstd = torch.native_layer_norm(tx, (d,), tw, tb, 1e-5)
    mask = [True, True, True]
    impl = {
        "fwd": (lambda: numbabn.layer_norm_train(x, d, w, b)[0],
                lambda: torch.native_layer_norm(tx, (d,), tw, tb, 1e-5)[0].numpy()),
        "bwd": (lambda: numbabn.layer_norm_backward(dy, x, mean, rstd, d, w),
                lambda: [t.numpy() for t in torch.ops.aten.native_layer_norm_backward(
                    tdy, tx, (d,), tmean, trstd, tw, tb, mask)]),
    }
    x64, dy64, w64, b64 = _float64(x, dy, w, b)
    y64, m64, r64 = torch.native_layer_norm(x64, (d,), w64, b64, 1e-5)
    ref = {"fwd": y64.numpy(),
           "bwd": [t.numpy() for t in torch.ops.aten.native_layer_norm_backward(
               dy64, x64, (d,), m64, r64, w64, b64, mask)]}
    return x, impl, ref


def group_case(shape, groups, rng):
    n, c = shape[:2]
    hw = int(np.prod(shape[2:]))
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 2, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    _, mean, rstd = numbabn.group_norm_train(x, groups, w, b)
    tx, tdy, tw, tb = map(torch.from_numpy, (x, dy, w, b))
    _, tmean, trstd = torch.native_group_norm(tx, tw, tb, n, c, hw, groups, 1e-5)
    mask = [True, True, True]
    impl = {
        "fwd": (lambda: numbabn.group_norm_train(x, groups, w, b)[0],
                lambda: torch.native_group_norm(tx, tw, tb, n, c, hw, groups, 1e-5)[0].numpy()),
        "bwd": (lambda: numbabn.group_norm_backward(dy, x, mean, rstd, groups, w),
                lambda: [t.numpy() for t in torch.ops.aten.native_group_norm_backward(
                    tdy, tx, tmean, trstd, tw, n, c, hw, groups, mask)]),
    }
    x64, dy64, w64, b64 = _float64(x, dy, w, b)
    y64, m64, r64 = torch.native_group_norm(x64, w64, b64, n, c, hw, groups, 1e-5)
    ref = {"fwd": y64.numpy(),
           "bwd": [t.numpy() for t in torch.ops.aten.native_group_norm_backward(
               dy64, x64, m64, r64, w64, n, c, hw, groups, mask)]}
    return x, impl, ref


def rms_case(shape, rng):
    d = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 2, d).astype(np.float32)
    _, rstd = numbabn.rms_norm_train(x, d, w)
    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(w).requires_grad_()
    tdy = torch.from_numpy(dy)
    ty = torch.nn.functional.rms_norm(tx, (d,), tw)
    impl = {
        "fwd": (lambda: numbabn.rms_norm_train(x, d, w)[0],
                lambda: torch.nn.functional.rms_norm(tx.detach(), (d,), tw.detach()).numpy()),
        "bwd": (lambda: numbabn.rms_norm_backward(dy, x, rstd, d, w),
                lambda: [t.numpy() for t in torch.autograd.grad(ty, (tx, tw), tdy,
                                                                retain_graph=True)]),
    }
    x64, dy64, w64 = _float64(x, dy, w)
    x64.requires_grad_()
    w64.requires_grad_()
    eps = float(np.finfo(np.float32).eps)  # numbabn's and PyTorch's default for float32 inputs
    y64 = torch.nn.functional.rms_norm(x64, (d,), w64, eps)
    ref = {"fwd": y64.detach().numpy(),
           "bwd": [t.numpy() for t in torch.autograd.grad(y64, (x64, w64), dy64)]}
    return x, impl, ref


CASES = [
    ("LayerNorm 4096x768", lambda rng: layer_case((4096, 768), rng)),
    ("LayerNorm 8192x1024", lambda rng: layer_case((8192, 1024), rng)),
    ("GroupNorm 32x256x28x28 G=32", lambda rng: group_case((32, 256, 28, 28), 32, rng)),
    ("RMSNorm 4096x768", lambda rng: rms_case((4096, 768), rng)),
]


def validate(label, name, got, ref):
    """float32 results within 1e-4 of the float64 reference, relative to each array's scale."""
    got = got if isinstance(got, (list, tuple)) else [got]
    ref = ref if isinstance(ref, (list, tuple)) else [ref]
    for i, (g, r) in enumerate(zip(got, ref)):
        scale = max(1.0, float(np.max(np.abs(r))))
        err = float(np.max(np.abs(np.asarray(g, np.float64) - r)))
        if not err <= 1e-4 * scale:
            raise AssertionError(f"{label} {name} output {i}: error {err:.3g} (scale {scale:.3g})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per case")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="wait up to this many seconds for an idle machine before each case")
    args = ap.parse_args(argv)
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    print(f"# {os.cpu_count()} cores, {threads} Numba and PyTorch threads, load "
          f"{os.getloadavg()[0]:.2f}; median ms")
    print("| case | pass | numbabn ms | GB/s | torch ms | GB/s | x torch | copy ms | copy GB/s "
          "| / copy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, make in CASES:
        x, impl, ref = make(rng)
        nbytes = x.nbytes
        dst = np.empty_like(x)
        for op, (ours, theirs) in impl.items():
            validate(label, "numbabn " + op, ours(), ref[op])
            validate(label, "torch " + op, theirs(), ref[op])
            if args.quiet_wait > 0:
                wait_for_quiet(args.quiet_wait)
            t = time_interleaved({"numbabn": ours, "torch": theirs,
                                  "copy": lambda: np.copyto(dst, x)}, budget_s=args.budget)
            nb, th, cp = (t[k][1] for k in ("numbabn", "torch", "copy"))
            traffic = PASSES[op] * nbytes
            print(f"| {label} | {op} | {nb * 1e3:.3f} | {traffic / nb / 1e9:.1f} "
                  f"| {th * 1e3:.3f} | {traffic / th / 1e9:.1f} | {th / nb:.2f} "
                  f"| {cp * 1e3:.3f} | {2 * nbytes / cp / 1e9:.1f} "
                  f"| {nb / (cp * PASSES[op] / 2):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
