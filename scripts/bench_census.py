"""The shape census against PyTorch (ATen) and ONNX Runtime: one table, the
geometric means and every case below the peer.

    PYTHONPATH=. python scripts/bench_census.py [--budget 0.3] [--models resnet18,bert]
                                                [--norms batch] [--out runs/census]
    PYTHONPATH=. python -m benchmarks.avx2 python scripts/bench_census.py --out runs/census-avx2
    PYTHONPATH=. python scripts/bench_census.py --ranges runs/census-1 runs/census-2 runs/census-3

Cases come from ``benchmarks/census.py`` (the normalization layers of standard
networks, NCHW and channels-last, float32 and float64 where users run it;
``--dtypes bfloat16,float16``: every shape in half precision against ATen's
half kernels).  Each
case's implementations are validated against float64 first, then timed in turns
(``benchmarks.cases.time_interleaved``, best of the rounds; every call returns
fresh outputs).  Ratios are peer time / numbabn time (> 1: numbabn faster).  The
geometric means weigh each case once; ``--weighted`` also prints them weighted
by how many layers use the case.  Writes ``census.md`` and ``census.json``
under ``--out`` with the machine (CPU model, host AVX2/AVX-512 and what Numba
compiled for).  ``--ranges`` reads several runs' ``census.json`` and prints each
summary figure as a range over them (a lead is claimed only where it holds in
every run).  ONNX Runtime picks its kernels from the host's CPUID and cannot
be pinned to AVX2: under ``benchmarks.avx2`` only numbabn and PyTorch are
lowered.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.cases import machine, set_torch_threads, time_interleaved, wait_for_quiet
from benchmarks.census import CensusInputs, census, implementations, reference, validate

GROUPS = {  # summary rows: (norms, ops)
    "batch train (fwd_train, backward)": (("batch",), ("fwd_train", "backward")),
    "batch eval": (("batch",), ("eval",)),
    "family forward": (("layer", "rms", "group", "instance"), ("forward",)),
    "family backward": (("layer", "rms", "group", "instance"), ("backward",)),
}


def geomean(values, weights=None):
    pairs = [(v, w) for v, w in zip(values, weights or [1] * len(values)) if v]
    if not pairs:
        return None
    return math.exp(sum(w * math.log(v) for v, w in pairs) / sum(w for _, w in pairs))


def run(cases, budget, quiet_wait, ops=None):
    rows = []
    for case in cases:
        inp = CensusInputs(case)
        for op in case.ops:
            if ops and op not in ops:
                continue
            ref = reference(op, inp)
            fns = implementations(op, inp)
            for name, fn in fns.items():
                validate(op, name, fn(), ref, case.dtype)
            if quiet_wait > 0:
                wait_for_quiet(quiet_wait, busy_below=0.15, interval=0.2)
            t = time_interleaved(fns, budget_s=budget, block=3, settle_s=0.005)
            best = {k: v[0] for k, v in t.items()}
            row = {"norm": case.norm, "op": op, "shape": list(case.shape), "layout": case.layout,
                   "dtype": case.dtype, "groups": case.groups, "label": case.label,
                   "uses": case.uses, "models": list(case.models),
                   "us": {k: v * 1e6 for k, v in best.items()}}
            for peer in ("torch", "ort"):
                row[f"vs_{peer}"] = best[peer] / best["numbabn"] if peer in best else None
            rows.append(row)
            print(_line(row), flush=True)
        del inp
    return rows


HEADER = "| op | case | uses | numbabn us | torch us | x torch | ort us | x ort |"


def _line(r):
    us = r["us"]

    def f(k, fmt):
        v = us.get(k) if fmt == "us" else r.get(k)
        return "-" if v is None else (f"{v:.1f}" if fmt == "us" else f"{v:.2f}")

    return (f"| {r['op']} | {r['label']} | {r['uses']} | {us['numbabn']:.1f} | {f('torch', 'us')} "
            f"| {f('vs_torch', 'x')} | {f('ort', 'us')} | {f('vs_ort', 'x')} |")


def summary(rows, weighted=False):
    lines = []
    for title, (norms, ops) in GROUPS.items():
        rs = [r for r in rows if r["norm"] in norms and r["op"] in ops]
        if not rs:
            continue
        text = f"- **{title}** ({len(rs)} cases):"
        for peer in ("torch", "ort"):
            vals = [r[f"vs_{peer}"] for r in rs if r[f"vs_{peer}"]]
            if not vals:
                continue
            below = sum(v < 1.0 for v in vals)
            text += (f" {geomean(vals):.2f}x {peer} (geometric mean), worst {min(vals):.2f}x, "
                     f"{below} of {len(vals)} below 1.0x")
            if weighted:
                w = [r["uses"] for r in rs if r[f"vs_{peer}"]]
                text += f", weighted by uses {geomean(vals, w):.2f}x"
            text += ";"
        lines.append(text)
    by = defaultdict(list)
    for r in rows:
        if r["vs_torch"]:
            by[(r["norm"], r["op"], r["layout"])].append(r["vs_torch"])
    lines.append("")
    lines.append("| norm | op | layout | cases | geomean x torch | worst | below 1.0x |")
    lines.append("|---|---|---|---|---|---|---|")
    for (norm, op, lay), vals in sorted(by.items()):
        lines.append(f"| {norm} | {op} | {lay} | {len(vals)} | {geomean(vals):.2f} | {min(vals):.2f} "
                     f"| {sum(v < 1 for v in vals)} |")
    return lines


def _group_figures(rows):
    """Per summary group and peer: (geomean, worst, cases below 1.0x, cases)."""
    out = {}
    for title, (norms, ops) in GROUPS.items():
        rs = [r for r in rows if r["norm"] in norms and r["op"] in ops]
        for peer in ("torch", "ort"):
            vals = [r[f"vs_{peer}"] for r in rs if r[f"vs_{peer}"]]
            if vals:
                out[(title, peer)] = (geomean(vals), min(vals), sum(v < 1 for v in vals), len(vals))
    by = defaultdict(list)
    for r in rows:
        if r["vs_torch"]:
            by[(r["norm"], r["op"], r["layout"])].append(r["vs_torch"])
    for key, vals in by.items():
        out[key] = (geomean(vals), min(vals), sum(v < 1 for v in vals), len(vals))
    return out


def ranges(folders):
    """Print the summary figures of several runs as ranges (min-max over runs)."""
    runs = [json.loads((Path(f) / "census.json").read_text()) for f in folders]
    figs = [_group_figures(r["rows"]) for r in runs]
    m = runs[0]["machine"]
    print(f"# {len(runs)} runs; {m['cpu']} ({m['llvm_cpu']}), numbabn compiled for "
          f"{m.get('numbabn_isa')}; torch {m['torch']} (ATEN_CPU_CAPABILITY="
          f"{m['environ']['ATEN_CPU_CAPABILITY']}); ort {m.get('ort')}")
    print("| group | peer or layout | cases | geomean x peer | worst | below 1.0x |")
    print("|---|---|---|---|---|---|")
    keys = [k for k in figs[0] if isinstance(k[0], str) and k[0] in GROUPS]
    keys += sorted(k for k in figs[0] if k[0] not in GROUPS)
    for key in keys:
        vals = [f[key] for f in figs if key in f]
        g = [v[0] for v in vals]
        w = [v[1] for v in vals]
        b = [v[2] for v in vals]
        name = key[0] if key[0] in GROUPS else f"{key[0]} {key[1]}"
        peer = key[1] if key[0] in GROUPS else f"torch, {key[2]}"
        print(f"| {name} | {peer} | {vals[0][3]} | {min(g):.2f}-{max(g):.2f} | "
              f"{min(w):.2f}-{max(w):.2f} | {min(b)}-{max(b)} |")
    # cases below PyTorch in every run
    below = None
    for r in runs:
        ids = {(x["op"], x["label"]) for x in r["rows"] if x["vs_torch"] and x["vs_torch"] < 1}
        below = ids if below is None else below & ids
    print(f"\n{len(below)} (case, op) pairs below PyTorch in every run")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--ranges"]:
        return ranges(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per case and op")
    ap.add_argument("--models", help="comma-separated substrings of model names (default: all)")
    ap.add_argument("--norms", help="comma-separated subset of batch,layer,rms,group,instance")
    ap.add_argument("--layouts", default="NCHW,NHWC", help="NCHW and/or NHWC")
    ap.add_argument("--dtypes", help="every case in these dtypes (e.g. bfloat16,float16); "
                                     "default: float32, and float64 where users run it")
    ap.add_argument("--ops", help="comma-separated subset of fwd_train,backward,eval,forward")
    ap.add_argument("--weighted", action="store_true", help="also geomeans weighted by layer uses")
    ap.add_argument("--out", default="runs/census")
    ap.add_argument("--quiet-wait", type=float, default=5.0,
                    help="wait up to this many seconds before each case for an idle machine")
    args = ap.parse_args(argv)
    from benchmarks.census import MODELS
    models = None
    if args.models:
        keys = [k.strip() for k in args.models.split(",")]
        models = [m for m in MODELS if any(k in m for k in keys)]
        if not models:
            ap.error(f"no model matches {args.models!r}; models: {', '.join(MODELS)}")
    cases = census(models, tuple(args.layouts.split(",")),
                   tuple(args.dtypes.split(",")) if args.dtypes else None)
    if args.norms:
        cases = [c for c in cases if c.norm in args.norms.split(",")]
    ops = args.ops.split(",") if args.ops else None
    set_torch_threads()
    info = machine()
    info["ort"] = _ort_version()
    info["cpu_flags_avx512"] = _proc_flag("avx512f")
    info["environ"] = {k: os.environ.get(k) for k in (
        "NUMBA_CPU_NAME", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")}
    isa = "AVX-512" if info["host_avx512f"] and not (info["numba_cpu_features"] or "").count("-avx512f") \
        else "AVX2"
    info["numbabn_isa"] = isa
    head = (f"# {info['cpu']} ({info['llvm_cpu']}), host AVX-512: {info['host_avx512f']}; numbabn "
            f"compiled for {isa}; {info['numba_threads']} threads; torch {info['torch']} "
            f"(ATEN_CPU_CAPABILITY={info['environ']['ATEN_CPU_CAPABILITY']}); ort {info['ort']}; "
            f"{len(cases)} cases")
    print(head)
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|")
    t0 = time.time()
    rows = run(cases, args.budget, args.quiet_wait, ops)
    lines = summary(rows, args.weighted)
    print()
    print("\n".join(lines))
    print(f"({time.time() - t0:.0f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [head, "", HEADER, "|---|---|---|---|---|---|---|---|"] + [_line(r) for r in rows] + [""] + lines
    (out / "census.md").write_text("\n".join(md) + "\n")
    (out / "census.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    print(f"wrote {out / 'census.md'}, {out / 'census.json'}")
    return 0


def _ort_version():
    try:
        import onnxruntime
        return onnxruntime.__version__
    except ImportError:
        return None


def _proc_flag(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
