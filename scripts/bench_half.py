"""Half-precision storage: numbabn's batch norm on float32, bfloat16 and float16
inputs, and PyTorch's (ATen's) CPU kernels on float32 and bfloat16, same run.

    PYTHONPATH=. python scripts/bench_half.py [--budget 1.0] [--shapes 64,64,56,56 ...]

Per shape and layout (NCHW, and channels-last NHWC memory), each operation
(``eval``: running statistics; ``fwd_train``: batch statistics and output;
``backward``: dx, dweight, dbias) is timed in turns with every implementation
(``benchmarks.cases.time_interleaved``, best of the rounds), after checking
each result against float64 on the same values.  Parameters are float32 (mixed
precision, as ``torch.autocast`` hands them to batch norm).  Prints the times
and the ratios ``float32 time / half time`` (storage speed-up) and ``torch
bfloat16 time / numbabn bfloat16 time``, with the machine.  For the whole
census in half precision: ``scripts/bench_census.py --dtypes bfloat16``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import numbabn as nb
from benchmarks.cases import EPS, machine, set_torch_threads, time_interleaved, torch

SHAPES = [(64, 64, 56, 56), (32, 256, 14, 14), (32, 512, 4, 4)]


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _layout(a, layout):
    if layout == "NCHW":
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _tensor(a):
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _check(name, got, x, op, vec):
    """Max error of y (or dx) against float64, in units of the dtype's spacing at max |ref|."""
    x64 = x.astype(np.float64)
    axes = (0, 2, 3)
    mean, var = x64.mean(axes, keepdims=True), x64.var(axes, keepdims=True)
    w = vec["w"].reshape(1, -1, 1, 1).astype(np.float64)
    b = vec["b"].reshape(1, -1, 1, 1).astype(np.float64)
    if op == "eval":
        ref = (x64 - vec["rm"].reshape(1, -1, 1, 1)) / np.sqrt(
            vec["rv"].reshape(1, -1, 1, 1) + EPS) * w + b
    elif op == "fwd_train":
        ref = (x64 - mean) / np.sqrt(var + EPS) * w + b
    else:
        dy = vec["dy"].astype(np.float64)
        xhat = (x64 - mean) / np.sqrt(var + EPS)
        ref = w / np.sqrt(var + EPS) * (dy - dy.mean(axes, keepdims=True)
                                        - xhat * (dy * xhat).mean(axes, keepdims=True))
    got = np.asarray(got.float().numpy() if hasattr(got, "float") else got, np.float64)
    mant = {"float32": 23, "bfloat16": 7, "float16": 10}[name]
    top = np.abs(ref).max()
    ulp = 2.0 ** (np.floor(np.log2(top)) - mant)
    err = np.abs(got - ref).max() / ulp
    limit = 2 if op != "backward" else 4
    if name == "float32":
        limit = 1024  # ATen float32 (NHWC fwd_train): about 170
    if not err <= limit:
        raise AssertionError(f"{op} {name}: error {err:.1f} ulps > {limit}")


def _cases(shape, layout, op, rng):
    c = shape[1]
    base = rng.standard_normal(shape, dtype=np.float32) + rng.uniform(-2, 2, (1, c, 1, 1)).astype(
        np.float32)
    dyb = rng.standard_normal(shape, dtype=np.float32)
    vec = dict(w=rng.uniform(0.5, 1.5, c).astype(np.float32),
               b=rng.uniform(-1, 1, c).astype(np.float32),
               rm=rng.uniform(-1, 1, c).astype(np.float32),
               rv=rng.uniform(0.5, 2, c).astype(np.float32))
    fns, checks = {}, {}
    for name in ("float32", "bfloat16", "float16"):
        dt = _dtype(name)
        x = _layout(base.astype(dt), layout)
        dy = _layout(dyb.astype(dt), layout)
        w, b = vec["w"], vec["b"]
        if op == "eval":
            f = (lambda x=x, w=w, b=b: nb.batch_norm(x, vec["rm"], vec["rv"], w, b))
        elif op == "fwd_train":
            f = (lambda x=x, w=w, b=b: nb.batch_norm_train(x, w, b)[0])
        else:
            _, mean, invstd = nb.batch_norm_train(x, w, b)
            f = (lambda x=x, dy=dy, m=mean, s=invstd, w=w: nb.batch_norm_backward(dy, x, m, s, w)[0])
        fns[f"numbabn {name}"] = f
        checks[f"numbabn {name}"] = (name, x, dict(vec, dy=dy))
        if torch is not None and name != "float16":
            tx, tdy = _tensor(x), _tensor(dy)
            tw, tb = torch.from_numpy(w), torch.from_numpy(b)
            trm, trv = torch.from_numpy(vec["rm"]), torch.from_numpy(vec["rv"])
            aten = torch.ops.aten
            if op == "eval":
                g = (lambda tx=tx, tw=tw, tb=tb: aten.native_batch_norm(
                    tx, tw, tb, trm, trv, False, 0.1, EPS)[0])
            elif op == "fwd_train":
                g = (lambda tx=tx, tw=tw, tb=tb: aten.native_batch_norm(
                    tx, tw, tb, None, None, True, 0.1, EPS)[0])
            else:
                _, tm, ts = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, EPS)
                g = (lambda tx=tx, tdy=tdy, tw=tw, tm=tm, ts=ts: aten.native_batch_norm_backward(
                    tdy, tx, tw, None, None, tm, ts, True, EPS, [True, True, True])[0])
            fns[f"torch {name}"] = g
            checks[f"torch {name}"] = (name, x, dict(vec, dy=dy))
    return fns, checks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case")
    ap.add_argument("--shapes", nargs="*", help="N,C,H,W shapes (default: %s)" % SHAPES)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    set_torch_threads()
    info = machine()
    print(f"# {info['cpu']} ({info['llvm_cpu']}), host AVX-512: {info['host_avx512f']}; "
          f"{info['numba_threads']} threads; torch {info['torch']}")
    print("| shape | layout | op | f32 us | bf16 us | f16 us | f32/bf16 | f32/f16 "
          "| torch bf16 us | x torch bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in shapes:
        for layout in ("NCHW", "NHWC"):
            for op in ("eval", "fwd_train", "backward"):
                fns, checks = _cases(shape, layout, op, rng)
                for key, fn in fns.items():
                    name, x, vec = checks[key]
                    _check(name, fn(), x, op, vec)
                best = {k: v[0] * 1e6 for k, v in time_interleaved(fns, args.budget).items()}
                f32, bf, f16 = best["numbabn float32"], best["numbabn bfloat16"], \
                    best["numbabn float16"]
                tb = best.get("torch bfloat16")
                print(f"| {shape} | {layout} | {op} | {f32:.0f} | {bf:.0f} | {f16:.0f} | "
                      f"{f32 / bf:.2f} | {f32 / f16:.2f} | "
                      f"{'-' if tb is None else f'{tb:.0f}'} | "
                      f"{'-' if tb is None else f'{tb / bf:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
