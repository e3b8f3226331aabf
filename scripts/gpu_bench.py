"""Benchmark numbabn's GPU kernels against PyTorch CUDA and a device-to-device copy.

Usage (on a machine with an NVIDIA GPU; not under NUMBA_ENABLE_CUDASIM)::

    python scripts/gpu_bench.py [--reps 50] [--warmup 10] [--channels-last] [--host-calls 200]

For each float32 shape it validates numbabn against PyTorch, then times
fwd-train (``batch_norm_train``), eval (``batch_norm`` with running stats) and
backward (``batch_norm_backward``) with CUDA events after warm-up (medians over
``--reps`` calls, each call bracketed by its own events, so host launch overhead
counts whenever it exceeds the GPU time, as it does for a user).

Bandwidth is that of the minimal traffic, with B = x.nbytes:
fwd-train and eval read x and write y (2 B); backward reads x and dy and writes
dx (3 B); the copy reads and writes B (2 B).  Per-feature vectors are ignored.
PyTorch is timed with cuDNN on and off; its backward runs through autograd on a
graph holding only the batch norm (``torch.autograd.grad``).  numbabn is given
numba device arrays made once, outside the timed region.

A second table gives the host time per call: ``--host-calls`` calls issued back
to back, then one synchronisation, wall-clock time divided by the number of
calls.  Where the GPU finishes a call faster than the host issues the next, this
is the host work (argument checks, allocations, launches) per call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

SHAPES = [(256, 1024), (4096, 512), (128, 32, 26, 26), (64, 64, 56, 56), (32, 256, 56, 56),
          (8, 3, 224, 224)]
EPS = 1e-5


def fail(message):
    print(f"gpu_bench: {message}", file=sys.stderr)
    sys.exit(1)


def check_environment():
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        fail("NUMBA_ENABLE_CUDASIM is set; timings under the CUDA simulator mean nothing. "
             "Unset it and run on a machine with an NVIDIA GPU.")
    try:
        from numba import cuda
    except ImportError as e:
        fail(f"numba.cuda cannot be imported ({e}); pip install 'numbabn[cuda]'.")
    if not cuda.is_available():
        fail("no CUDA GPU is available (numba.cuda.is_available() is False): this benchmark "
             "needs an NVIDIA GPU with its driver. Nothing was timed.")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and not torch.cuda.is_available():
        print("gpu_bench: PyTorch has no CUDA support here; its columns are left out.",
              file=sys.stderr)
        torch = None
    return cuda, torch


def median_ms(cuda, fn, reps, warmup):
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = cuda.event(), cuda.event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def host_us(cuda, fn, calls, warmup):
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def rel_err(got, ref):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def bench_shape(shape, cuda, torch, numbabn, args):
    rng = np.random.default_rng(0)
    axis = 1
    if args.channels_last and len(shape) > 2:  # the same tensor in NHWC memory
        axis = -1
        shape = (shape[0], *shape[2:], shape[1])
    nfeat = shape[axis]
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 2.0, nfeat).astype(np.float32)
    b = rng.standard_normal(nfeat).astype(np.float32)
    rm = np.zeros(nfeat, np.float32)
    rv = np.ones(nfeat, np.float32)
    d = {name: cuda.to_device(a) for name, a in
         dict(x=x, dy=dy, w=w, b=b, rm=rm, rv=rv).items()}
    nbytes = x.nbytes

    def train():
        return numbabn.batch_norm_train(d["x"], d["w"], d["b"], EPS, axis=axis)

    y, mean, invstd = train()

    def evaluate():
        return numbabn.batch_norm(d["x"], d["rm"], d["rv"], d["w"], d["b"], eps=EPS, axis=axis)

    def backward():
        return numbabn.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["w"], axis=axis)

    copy_dst = cuda.device_array_like(d["x"])

    row = {"shape": shape, "bytes": nbytes}
    ops = [("fwd-train", train), ("eval", evaluate), ("backward", backward)]
    row["numbabn"] = {op: median_ms(cuda, fn, args.reps, args.warmup) for op, fn in ops}
    row["host"] = {op: host_us(cuda, fn, args.host_calls, args.warmup) for op, fn in ops}
    row["copy"] = median_ms(cuda, lambda: copy_dst.copy_to_device(d["x"]), args.reps, args.warmup)

    if torch is not None:
        row["torch"] = bench_torch(torch, cuda, x, dy, w, b, rm, rv, axis, args,
                                   numbabn_results=(y, mean, invstd, evaluate(), backward()))
    return row


def bench_torch(torch, cuda, x, dy, w, b, rm, rv, axis, args, numbabn_results):
    import torch.nn.functional as F

    fmt = torch.channels_last if axis == -1 else torch.contiguous_format
    to = dict(device="cuda")
    if axis == -1:  # torch's feature axis is 1: give it the NCHW view of NHWC memory
        tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).to(**to).contiguous(memory_format=fmt)
        tdy = torch.from_numpy(np.moveaxis(dy, -1, 1).copy()).to(**to).contiguous(memory_format=fmt)
    else:
        tx = torch.from_numpy(x).to(**to)
        tdy = torch.from_numpy(dy).to(**to)
    tw, tb = torch.from_numpy(w).to(**to), torch.from_numpy(b).to(**to)
    trm, trv = torch.from_numpy(rm).to(**to), torch.from_numpy(rv).to(**to)

    def nchw(a):  # numbabn result (numba device array, axis=-1 or 1) -> NCHW host
        h = a.copy_to_host()
        return np.moveaxis(h, -1, 1) if axis == -1 else h

    y, mean, invstd, y_eval, (dx, dw, db) = numbabn_results
    results = {}
    for cudnn in (True, False):
        with torch.backends.cudnn.flags(enabled=cudnn):
            xg = tx.detach().requires_grad_(True)
            wg, bg = tw.detach().requires_grad_(True), tb.detach().requires_grad_(True)
            ty = F.batch_norm(xg, None, None, wg, bg, training=True, eps=EPS)
            tdx, tdw, tdb = torch.autograd.grad(ty, (xg, wg, bg), tdy, retain_graph=True)
            ty_eval = F.batch_norm(tx, trm, trv, tw, tb, training=False, eps=EPS)
            errors = {
                "y": rel_err(nchw(y), ty.detach().cpu().numpy()),
                "eval": rel_err(nchw(y_eval), ty_eval.cpu().numpy()),
                "dx": rel_err(nchw(dx), tdx.cpu().numpy()),
                "dweight": rel_err(dw.copy_to_host(), tdw.cpu().numpy()),
                "dbias": rel_err(db.copy_to_host(), tdb.cpu().numpy()),
            }
            bad = {k: v for k, v in errors.items() if not v < 1e-3}
            if bad:
                fail(f"numbabn disagrees with PyTorch (cudnn={cudnn}) on shape {x.shape}: "
                     f"relative errors {bad}; not timing a wrong result.")
            # Like numbabn.batch_norm_train: batch statistics, no running-stat update.
            run_train = lambda: F.batch_norm(tx, None, None, tw, tb, training=True, eps=EPS)  # noqa: E731
            run_eval = lambda: F.batch_norm(tx, trm, trv, tw, tb, training=False, eps=EPS)  # noqa: E731
            run_backward = lambda: torch.autograd.grad(ty, (xg, wg, bg), tdy, retain_graph=True)  # noqa: E731
            ops = [("fwd-train", run_train), ("eval", run_eval), ("backward", run_backward)]
            name = "cudnn" if cudnn else "native"
            results[name] = {op: median_ms(cuda, fn, args.reps, args.warmup) for op, fn in ops}
            results[name + " host"] = {op: host_us(cuda, fn, args.host_calls, args.warmup)
                                       for op, fn in ops}
    return results


TRAFFIC = {"fwd-train": 2, "eval": 2, "backward": 3}


def print_table(rows, device_name, have_torch):
    print(f"\nnumbabn GPU benchmark on {device_name}: float32, median ms and GB/s of minimal "
          f"traffic (fwd/eval 2B, backward 3B, copy 2B)\n")
    head = f"{'shape':>18} {'op':>9} | {'numbabn':>16}"
    if have_torch:
        head += f" | {'torch cuDNN':>16} | {'torch native':>16}"
    head += f" | {'d2d copy':>16} | {'% of copy BW':>12}"
    if have_torch:
        head += f" | {'vs best torch':>13}"
    print(head)
    print("-" * len(head))

    def cell(ms, traffic_bytes):
        return f"{ms:7.3f} {traffic_bytes / ms / 1e6:7.1f}"

    for row in rows:
        copy_gbs = 2 * row["bytes"] / max(row["copy"], 1e-9) / 1e6
        for op, factor in TRAFFIC.items():
            traffic = factor * row["bytes"]
            ms = row["numbabn"][op]
            line = f"{str(row['shape']):>18} {op:>9} | {cell(ms, traffic):>16}"
            if have_torch:
                t = row["torch"]
                line += f" | {cell(t['cudnn'][op], traffic):>16} | {cell(t['native'][op], traffic):>16}"
            line += f" | {cell(row['copy'], 2 * row['bytes']):>16}"
            line += f" | {100 * (traffic / ms / 1e6) / copy_gbs:11.0f}%"
            if have_torch:
                best = min(row["torch"]["cudnn"][op], row["torch"]["native"][op])
                line += f" | {best / ms:12.2f}x"
            print(line)


def print_host_table(rows, have_torch, calls):
    print(f"\nHost time per call, microseconds ({calls} calls back to back, then one "
          f"synchronisation)\n")
    head = f"{'shape':>18} {'op':>9} | {'numbabn':>8}"
    if have_torch:
        head += f" | {'torch cuDNN':>11} | {'torch native':>12}"
    print(head)
    print("-" * len(head))
    for row in rows:
        for op in TRAFFIC:
            line = f"{str(row['shape']):>18} {op:>9} | {row['host'][op]:8.0f}"
            if have_torch:
                t = row["torch"]
                line += f" | {t['cudnn host'][op]:11.0f} | {t['native host'][op]:12.0f}"
            print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--host-calls", type=int, default=200,
                        help="calls per host-time measurement")
    parser.add_argument("--channels-last", action="store_true",
                        help="4-D shapes in NHWC memory (numbabn axis=-1, torch channels_last)")
    args = parser.parse_args(argv)
    cuda, torch = check_environment()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numbabn

    rows = [bench_shape(shape, cuda, torch, numbabn, args) for shape in SHAPES]
    name = cuda.get_current_device().name
    print_table(rows, name.decode() if isinstance(name, bytes) else name, torch is not None)
    print_host_table(rows, torch is not None, args.host_calls)


if __name__ == "__main__":
    main()
