"""Size sweep: GB/s of batch norm from cache-resident to memory-bound tensors.

    PYTHONPATH=. python scripts/bench_sweep.py [--budget 0.3] [--min-kb 64] [--max-mb 512]
                                               [--threads 1,all] [--out runs/sweep]
    PYTHONPATH=. python scripts/bench_report.py --sweep [the same options]

Two families of float32 shapes with 64 channels: NCHW (``axis=1``, ``(N, 64, H, W)``)
and NHWC (channels-last, ``axis=-1``, ``(N, H, W, 64)``), from 64 KB to 512 MB on a
log scale (one size per factor 4: 64K, 256K, 1M, 4M, 16M, 64M, 256M, then 512M;
H = W grows to 64 up to 1 MB, beyond it H = W = 56 and N grows).  For each size,
operation (fwd_train, backward, eval) and thread count (``--threads``, 1 and all by
default; Numba and PyTorch both set to it): the best time of numbabn with ``out=``
a preallocated array (the ``numbabn_out`` implementation of
``benchmarks/cases.py``), of PyTorch CPU (when installed) and of a copy into a
preallocated array, timed in turns, and their GB/s of minimal traffic
(``benchmarks.cases.TRAFFIC`` passes of the tensor; 2 for the copy, which is
NumPy's ``copyto`` on one thread whatever the thread count).
Implementations are validated against a float64 reference before they are timed,
on sizes up to 64 MB (the reference is slow beyond).

Writes ``sweep.png`` (rows: operations, columns: NCHW / NHWC; solid lines all
threads, dashed 1 thread; dotted verticals at the L2 size of one core and the L3
size), ``sweep.json`` and ``sweep.md`` under ``--out``, and says for each family
and operation where numbabn's curve leaves the caches (the first size past its
peak where its GB/s falls below 70% of the peak).  The default sweep takes about
3 minutes on 2 cores (3 GB of memory at 512 MB), plus up to ``--quiet-wait`` seconds
(10) before each size and thread count while other processes use the CPUs.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np

from benchmarks.cases import (TRAFFIC, Case, Inputs, implementations, reference,
                              machine, set_torch_threads, time_interleaved, torch, validate,
                              wait_for_quiet)

C = 64
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 512 << 20]
FAMILIES = ("NCHW", "NHWC")
OPS = ("fwd_train", "backward", "eval")
IMPLS = ("numbabn_out", "torch", "copy")
VALIDATE_MAX = 64 << 20  # bytes: the float64 reference is slow beyond
DROP = 0.7  # "leaves the caches": first size past the peak below this fraction of it
COLORS = {"numbabn_out": "#1f77b4", "torch": "#ee4c2c", "copy": "#444444"}
LABELS = {"numbabn_out": "numbabn out=", "torch": "PyTorch", "copy": "copy"}


def shape_for(family, target):
    """A float32 shape of about ``target`` bytes with 64 channels."""
    per_pixel = C * 4
    side = int(round((target / per_pixel) ** 0.5))
    if side <= 64:
        n, h = 1, side
    else:
        h = 56
        n = max(1, int(round(target / (per_pixel * h * h))))
    return (n, C, h, h) if family == "NCHW" else (n, h, h, C)


def case_for(family, target):
    return Case(shape_for(family, target), 1 if family == "NCHW" else -1, "float32")


def cache_sizes():
    """``{"L2": bytes of one core's L2, "L3": bytes}`` from sysfs (what is found)."""
    sizes = {}
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            level = int(Path(d, "level").read_text())
            kind = Path(d, "type").read_text().strip()
            text = Path(d, "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        if level not in (2, 3) or kind == "Instruction":
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes[f"L{level}"] = int(text.rstrip("KMGB") or 0) * mult
        except ValueError:
            continue
    return sizes


def thread_counts(spec):
    top = numba.config.NUMBA_NUM_THREADS
    counts = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        n = top if item == "all" else min(int(item), top)
        if n not in counts:
            counts.append(n)
    return counts


def set_threads(n):
    numba.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def timing_plan(nbytes):
    """``time_interleaved`` settings: big tensors get few calls (the budget is per point)."""
    if nbytes >= 128 << 20:
        return {"block": 2, "min_rounds": 2}
    if nbytes >= 16 << 20:
        return {"block": 3, "min_rounds": 2}
    return {"block": 4, "min_rounds": 3}


def fmt_bytes(n):
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if abs(v - round(v)) < 0.05 else f"{v:.2f}{unit}"
    return f"{n}B"


HEADER = ("| layout | shape | bytes | op | threads | numbabn out= ms | GB/s | torch ms | GB/s "
          "| copy ms | GB/s |")


def _line(r):
    t, g = r["times_ms"], r["gbps"]
    cell = lambda name: (f"{t[name]:.4g} | {g[name]:.1f}" if name in t else "- | -")  # noqa: E731
    shape = "x".join(map(str, r["shape"]))
    return (f"| {r['family']} | {shape} | {fmt_bytes(r['nbytes'])} | {r['op']} | {r['threads']} "
            f"| {cell('numbabn_out')} | {cell('torch')} | {cell('copy')} |")


def run(sizes, families, ops, threads, budget, quiet_wait, log=print):
    rows, invalid = [], []
    for family in families:
        for target in sizes:
            case = case_for(family, target)
            inp = Inputs(case)
            fns_by_op = {}
            for op in ops:
                all_fns = implementations(op, inp)
                fns_by_op[op] = {k: all_fns[k] for k in IMPLS if k in all_fns}
            validated = case.nbytes <= VALIDATE_MAX
            for i, n in enumerate(threads):
                set_threads(n)
                busy = wait_for_quiet(quiet_wait) if quiet_wait > 0 else None
                for op in ops:
                    fns = fns_by_op[op]
                    if i == 0 and validated:
                        ref = reference(op, inp)
                        for name in list(fns):
                            try:
                                validate(op, name, fns[name](), ref, case.dtype)
                            except AssertionError as e:
                                log(f"INVALID {family} {case.shape} {op} {name}: {e}")
                                invalid.append({"family": family, "shape": list(case.shape),
                                                "op": op, "impl": name, "error": str(e)})
                                del fns[name]
                        del ref
                    t = time_interleaved(fns, budget_s=budget, **timing_plan(case.nbytes))
                    passes = {name: (2 if name == "copy" else TRAFFIC[op]) for name in t}
                    row = {
                        "family": family, "shape": list(case.shape), "axis": case.axis,
                        "dtype": case.dtype, "nbytes": case.nbytes, "op": op, "threads": n,
                        "times_ms": {k: v[0] * 1e3 for k, v in t.items()},
                        "median_ms": {k: v[1] * 1e3 for k, v in t.items()},
                        "gbps": {k: passes[k] * case.nbytes / v[0] / 1e9 for k, v in t.items()},
                        "validated": validated, "busy_before": busy,
                    }
                    rows.append(row)
                    log(_line(row))
            del inp, fns_by_op, fns, all_fns
            gc.collect()
    return rows, invalid


def cache_exits(rows, impl="numbabn_out", drop=DROP):
    """One sentence per family and op: where ``impl``'s GB/s first falls below
    ``drop`` of its peak, past the peak (per thread count)."""
    sentences = []
    families = list(dict.fromkeys(r["family"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    threads = sorted({r["threads"] for r in rows}, reverse=True)
    for family in families:
        for op in ops:
            parts = []
            for n in threads:
                rs = sorted((r for r in rows if r["family"] == family and r["op"] == op
                             and r["threads"] == n and impl in r["gbps"]), key=lambda r: r["nbytes"])
                if not rs:
                    continue
                g = [r["gbps"][impl] for r in rs]
                top = int(np.argmax(g))
                who = f"{n} thread{'s' if n > 1 else ''}"
                exit_ = next((i for i in range(top + 1, len(rs)) if g[i] < drop * g[top]), None)
                text = f"at {who} it peaks at {g[top]:.1f} GB/s ({fmt_bytes(rs[top]['nbytes'])})"
                if len(rs) == 1:
                    text = f"at {who} {g[0]:.1f} GB/s at {fmt_bytes(rs[0]['nbytes'])} (one size only)"
                elif top == len(rs) - 1:
                    text = (f"at {who} it still rises at the largest size, "
                            f"{fmt_bytes(rs[top]['nbytes'])} ({g[top]:.1f} GB/s): no drop seen")
                elif exit_ is None:
                    text += (f" and stays above {drop:.0%} of that up to "
                             f"{fmt_bytes(rs[-1]['nbytes'])} ({g[-1]:.1f} GB/s)")
                else:
                    text += (f" and leaves the caches at {fmt_bytes(rs[exit_]['nbytes'])} "
                             f"({g[exit_]:.1f} GB/s, {g[exit_] / g[top]:.0%} of the peak"
                             + (f"; {g[-1]:.1f} GB/s at {fmt_bytes(rs[-1]['nbytes'])})"
                                if exit_ < len(rs) - 1 else ")"))
                parts.append(text)
            if parts:
                sentences.append(f"- **{family} {op}**, numbabn out=: " + "; ".join(parts) + ".")
    return sentences


def chart(rows, caches, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    families = list(dict.fromkeys(r["family"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    threads = sorted({r["threads"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(len(ops), len(families), figsize=(6.2 * len(families), 3.4 * len(ops)),
                             squeeze=False, sharex=True)
    for i, op in enumerate(ops):
        for j, family in enumerate(families):
            ax = axes[i, j]
            sizes = sorted({r["nbytes"] for r in rows if r["family"] == family})
            for n in threads:
                rs = sorted((r for r in rows if r["family"] == family and r["op"] == op
                             and r["threads"] == n), key=lambda r: r["nbytes"])
                for name in IMPLS:
                    pts = [(r["nbytes"], r["gbps"][name]) for r in rs if name in r["gbps"]]
                    if not pts:
                        continue
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color=COLORS[name], marker="o", markersize=3,
                            linestyle="-" if n == threads[0] else "--",
                            linewidth=1.6 if name == "numbabn_out" else 1.1,
                            label=f"{LABELS[name]}, {n} thread{'s' if n > 1 else ''}")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(sizes)
            ax.set_xticklabels([fmt_bytes(s) for s in sizes], fontsize=7)
            ax.set_ylim(bottom=0)
            for name, size in caches.items():
                if not sizes[0] / 2 <= size <= sizes[-1] * 2:
                    continue  # a truncated sweep: keep the axis on the data
                ax.axvline(size, color="gray", linestyle=":", linewidth=1)
                ax.text(size, 0.98, f" {name}", transform=ax.get_xaxis_transform(),
                        va="top", ha="left", fontsize=7, color="gray")
            ax.set_title(f"{op} {family} ({TRAFFIC[op]} passes; copy 2)", fontsize=9)
            if j == 0:
                ax.set_ylabel("GB/s")
            if i == len(ops) - 1:
                ax.set_xlabel("tensor bytes (float32, 64 channels)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # One legend column per implementation (its thread counts one under the other).
    order = sorted(range(len(labels)), key=lambda k: [LABELS[n] for n in IMPLS].index(
        labels[k].split(",")[0]))
    fig.legend([handles[k] for k in order], [labels[k] for k in order], loc="lower center",
               ncol=len({labels[k].split(",")[0] for k in order}) or 1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.3,
                    help="seconds of timing per point (big sizes take at least a few calls)")
    ap.add_argument("--min-kb", type=float, default=64, help="smallest tensor, KiB")
    ap.add_argument("--max-mb", type=float, default=512, help="largest tensor, MiB")
    ap.add_argument("--threads", default="1,all", help="comma-separated thread counts ('all')")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    ap.add_argument("--families", default=",".join(FAMILIES), help="NCHW, NHWC or both")
    ap.add_argument("--out", default="runs/sweep", help="folder for sweep.png/.md/.json")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="on a shared machine, wait up to this many seconds before each size "
                         "and thread count for other processes to leave the CPUs idle (0: do not wait)")
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    for op in ops:
        if op not in OPS:
            ap.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    families = [f for f in args.families.upper().split(",") if f]
    for f in families:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r}; choose from {', '.join(FAMILIES)}")
    sizes = [s for s in SIZES if args.min_kb * 1024 <= s <= args.max_mb * (1 << 20)]
    if not sizes:
        ap.error("no size between --min-kb and --max-mb")
    threads = thread_counts(args.threads)
    if torch is None:
        print("# PyTorch is not installed: numbabn and the copy only")
    set_torch_threads()
    info = machine()
    caches = cache_sizes()
    load_before = os.getloadavg()
    print(f"# {info['cpu']} ({info['llvm_cpu']}), {info['cores']} cores, threads {threads}, "
          f"caches {', '.join(f'{k} {fmt_bytes(v)}' for k, v in caches.items()) or 'unknown'}, "
          f"load {load_before[0]:.2f}")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
    t0 = time.time()
    rows, invalid = run(sizes, families, ops, threads, args.budget, args.quiet_wait,
                        log=lambda s: print(s, flush=True))
    wall = time.time() - t0
    set_threads(numba.config.NUMBA_NUM_THREADS)
    info["threading_layer"] = numba.threading_layer()
    load_after = os.getloadavg()
    sentences = cache_exits(rows)
    busy = [r["busy_before"] for r in rows if r["busy_before"] is not None]
    print()
    print("\n".join(sentences))
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; other processes' "
          f"CPU use before each size: max {max(busy, default=0):.0%}; {wall:.0f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"Machine: {info['cpu']} ({info['llvm_cpu']}), {info['cores']} cores "
          f"({info['threading_layer']}); caches "
          f"{', '.join(f'{k} {fmt_bytes(v)}' for k, v in caches.items()) or 'unknown'}; numpy "
          f"{info['numpy']}, numba {info['numba']}, torch {info['torch']}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; other processes' CPU use "
          f"before each size at most {max(busy, default=0):.0%}; {wall:.0f} s.", "",
          "GB/s of minimal traffic (fwd_train and eval 2 passes of the tensor, backward 3, "
          "copy 2); best of the timed calls.", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    md += [_line(r) for r in rows] + ["", f"Where numbabn's curve leaves the caches (first size "
                                          f"past its peak below {DROP:.0%} of it):", ""] + sentences
    if invalid:
        md += ["", "Failed validation (not timed):", ""]
        md += [f"- {v['family']} {v['shape']} {v['op']} {v['impl']}: {v['error']}" for v in invalid]
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    (out / "sweep.json").write_text(json.dumps(
        {"machine": info, "caches": caches, "load": [load_before, load_after], "wall_s": wall,
         "budget_s": args.budget, "threads": threads, "rows": rows, "invalid": invalid}, indent=1))
    chart(rows, caches, out / "sweep.png")
    print(f"wrote {out / 'sweep.png'}, {out / 'sweep.md'}, {out / 'sweep.json'}")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
