"""Run the benchmark cases outside pytest; print one table and save a chart.

    PYTHONPATH=. python scripts/bench_report.py [--budget 2] [--ops fwd_train,backward]
                                                [--out runs/bench]

For every operation and case: numbabn's best time, its GB/s of minimal traffic
(``benchmarks.cases.TRAFFIC``), the speed-up over PyTorch CPU and over plain
NumPy (all three return fresh outputs), and numbabn's time with ``out=`` a
preallocated array over the time of a copy into a preallocated array (the
bandwidth ceiling).
Every implementation is validated against a float64 reference before it is
timed, and all of a case's implementations are timed in turns (the machine may be
shared).  Writes ``bench.png``, ``bench.md`` and ``bench.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np

from benchmarks import warm_start
from benchmarks.cases import (CASES, OPS, TRAFFIC, Inputs, implementations, machine,
                              reference, set_torch_threads, time_interleaved, validate,
                              wait_for_quiet)

TARGETS = {  # speed-up over PyTorch (geometric mean, worst case) and time over copy (geometric mean)
    "fwd_train": (2.5, 1.0, 1.4),
    "backward": (1.8, 1.0, 2.2),
    "eval": (1.2, 1.0, None),
    "stats": (None, None, None),
}


def run(ops, budget, quiet_wait):
    rows = []
    for op in ops:
        for case in CASES:
            inp = Inputs(case)
            fns = implementations(op, inp)
            ref = reference(op, inp)
            for name, fn in fns.items():
                validate(op, name, fn(), ref, case.dtype)
            busy = wait_for_quiet(quiet_wait) if quiet_wait > 0 else None
            t = time_interleaved(fns, budget_s=budget)
            best = {name: v[0] for name, v in t.items()}
            nb_t = best["numbabn"]
            nb_out_t = best.get("numbabn_out", nb_t)
            row = {
                "op": op, "shape": list(case.shape), "axis": case.axis, "dtype": case.dtype,
                "label": case.label, "mbytes": case.nbytes / 1e6,
                "times_ms": {k: v * 1e3 for k, v in best.items()},
                "median_ms": {k: v[1] * 1e3 for k, v in t.items()},
                "gbps": {k: TRAFFIC[op] * case.nbytes / v / 1e9 for k, v in best.items() if k != "copy"},
                "copy_gbps": 2 * case.nbytes / best["copy"] / 1e9,
                "vs_torch": best["torch"] / nb_t if "torch" in best else None,
                "vs_numpy": best["numpy"] / nb_t,
                "over_copy": nb_out_t / best["copy"],
                "busy_before": busy,
            }
            rows.append(row)
            print(_line(row), flush=True)
    return rows


HEADER = ("| op | shape | dtype | numbabn ms | GB/s | torch ms | x torch | numpy ms | x numpy "
          "| out= ms | copy ms | copy GB/s | out= / copy |")


def _line(r):
    t = r["times_ms"]
    torch_ms = f"{t['torch']:.3f}" if "torch" in t else "-"
    vs_torch = f"{r['vs_torch']:.2f}" if r["vs_torch"] else "-"
    out_ms = f"{t['numbabn_out']:.3f}" if "numbabn_out" in t else "-"
    shape = "x".join(map(str, r["shape"])) + (" NHWC" if r["axis"] == -1 and len(r["shape"]) == 4 else "")
    return (f"| {r['op']} | {shape} | {r['dtype']} | {t['numbabn']:.3f} | {r['gbps']['numbabn']:.1f} "
            f"| {torch_ms} | {vs_torch} | {t['numpy']:.2f} | {r['vs_numpy']:.1f} "
            f"| {out_ms} | {t['copy']:.3f} | {r['copy_gbps']:.1f} | {r['over_copy']:.2f} |")


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(rows, ops):
    lines = []
    for op in ops:
        rs = [r for r in rows if r["op"] == op]
        g_torch = geomean(r["vs_torch"] for r in rs)
        worst = min((r["vs_torch"] for r in rs if r["vs_torch"]), default=None)
        g_copy = geomean(r["over_copy"] for r in rs)
        worst_copy = max(r["over_copy"] for r in rs)
        target = TARGETS[op]
        text = f"- **{op}**:"
        if g_torch:
            text += f" {g_torch:.2f}x PyTorch (geometric mean), worst {worst:.2f}x"
            if target[0]:
                ok = g_torch >= target[0] and (target[1] is None or worst >= target[1])
                text += f" (target >= {target[0]}x" + (f", none below {target[1]}x" if target[1] else "")
                text += f": {'met' if ok else 'NOT met'})"
            text += ";"
        text += f" time (out=) / copy {g_copy:.2f} (geometric mean), worst {worst_copy:.2f}"
        if target[2]:
            over = [f"{r['label']} {r['over_copy']:.2f}" for r in rs if r["over_copy"] > target[2]]
            text += (f" (target: geometric mean <= {target[2]}: "
                     f"{'met' if g_copy <= target[2] else 'NOT met'}"
                     + (f"; above it: {', '.join(over)}" if over else "") + ")")
        lines.append(text)
    return lines


def chart(rows, ops, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["numbabn", "numbabn_out", "torch", "numpy"]
    colors = {"numbabn": "#1f77b4", "numbabn_out": "#9ecae1", "torch": "#ee4c2c", "numpy": "#7f7f7f"}
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rs = [r for r in rows if r["op"] == op]
        xs = np.arange(len(rs))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = [r["gbps"].get(name, 0.0) for r in rs]
            ax.bar(xs + (i - 1.5) * width, vals, width, label=name.replace("_out", " out="),
                   color=colors[name])
        # The copy's own bandwidth: a kernel moving its minimal traffic at copy speed.
        ceiling = [r["copy_gbps"] for r in rs]
        ax.scatter(xs, ceiling, marker="_", s=900, color="black", zorder=3, label="copy speed")
        ax.set_xticks(xs)
        ax.set_xticklabels([r["label"].replace(" float", "\nfloat") for r in rs], fontsize=7)
        ax.set_ylabel("GB/s (minimal traffic)")
        ax.set_title(f"{op}: {TRAFFIC[op]} passes of the tensor")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), markerscale=0.3)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per case")
    ap.add_argument("--out", default="runs/bench", help="folder for bench.png/.md/.json")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="on a shared machine, wait up to this many seconds before each case "
                         "for other processes to leave the CPUs idle (0: do not wait)")
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    for op in ops:
        if op not in OPS:
            ap.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    set_torch_threads()
    info = machine()
    load_before = os.getloadavg()
    print(f"# {info['cpu']} ({info['llvm_cpu']}), {info['cores']} cores, "
          f"{info['numba_threads']} Numba threads ({info['threading_layer'] or '?'}), "
          f"load {load_before[0]:.2f}")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    t0 = time.time()
    rows = run(ops, args.budget, args.quiet_wait)
    info["threading_layer"] = numba.threading_layer()
    warm = warm_start.measure()
    load_after = os.getloadavg()
    lines = summary(rows, ops)
    print()
    print("\n".join(lines))
    lines.append(f"- **warm start** (new process, kernels from the on-disk cache): first "
                 f"forward + backward {warm['since_numba_import']:.2f} s after importing numpy "
                 f"and numba (import numbabn {warm['import_numbabn']:.2f} s; target <= 1 s: "
                 f"{'met' if warm['since_numba_import'] <= 1.0 else 'NOT met'})")
    print(lines[-1])
    busy = [r["busy_before"] for r in rows if r["busy_before"] is not None]
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"other processes' CPU use before each case: max {max(busy, default=0):.0%} "
          f"({time.time() - t0:.0f} s)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"Machine: {info['cpu']} ({info['llvm_cpu']}), {info['cores']} cores, "
          f"{info['numba_threads']} threads ({info['threading_layer']}); numpy {info['numpy']}, "
          f"numba {info['numba']}, torch {info['torch']}; load average {load_before[0]:.2f} "
          f"before, {load_after[0]:.2f} after; other processes' CPU use before each case "
          f"at most {max(busy, default=0):.0%}.", "", HEADER,
          "|" + "---|" * (HEADER.count("|") - 1)]
    md += [_line(r) for r in rows] + [""] + lines
    (out / "bench.md").write_text("\n".join(md) + "\n")
    (out / "bench.json").write_text(json.dumps(
        {"machine": info, "load": [load_before, load_after], "warm_start": warm, "rows": rows},
        indent=1))
    chart(rows, ops, out / "bench.png")
    print(f"wrote {out / 'bench.png'}, {out / 'bench.md'}, {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
