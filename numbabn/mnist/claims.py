"""What batch normalization does, measured: the tutorials' claims as one experiment.

A grid of short, seeded MNIST runs of the batch-norm paper's MLP
(:func:`numbabn.mnist.models.bn_paper_mlp`: three hidden layers of 100 units,
ReLU by default, the paper's sigmoid with ``activation="sigmoid"``; plain SGD,
batch 60, lr 0.5 unless swept), with and without batch norm, one panel per claim:

``lr``
    Higher learning rates: a learning-rate sweep with and without BN.
``init``
    Poorer initialisation: every Linear weight scaled by 0.1x .. 10x of its
    default draw, with and without BN.
``gradients``
    Stable gradients: each Linear weight's gradient norm and each hidden
    nonlinearity's input statistics over training, with and without BN.
``dropout``
    Regularisation: the train/test gap with and without dropout, with and without BN.
``batch``
    Small batches: batch sizes 2 .. 128 for batch norm, batch renormalization,
    group norm and ghost batch norm, the learning rate scaled with the batch.

:func:`run_grid` trains every run of a grid (in worker processes with one
thread each, so a run's bits do not depend on ``jobs``), :func:`verdicts`
judges each claim from the results by the criteria stated in its verdict, and
:func:`main` (``scripts/bn_claims.py``) writes ``claims.json``, one PNG per
claim and prints the verdict table.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .._extras import MissingExtraError, require
from ..kit import Linear, ReLU, Sigmoid
from ..kit.losses import cross_entropy
from ..kit.optim import SGD
from .models import MODELS, build_model
from .train import epoch_batches, evaluate, prepare_images, smoothed

CLAIMS = ("lr", "init", "gradients", "dropout", "batch")
"""The panels, in the order they run and print."""

TITLES = {
    "lr": "1. higher learning rates",
    "init": "2. poorer initialisation",
    "gradients": "3. gradient stability",
    "dropout": "4. regularisation",
    "batch": "5. small batches",
}

NORM_NAMES = ("none", "batch", "renorm", "group", "ghost")
"""A run's normalization: none, batch norm, batch renormalization, group norm, or
batch norm over ghost batches of ``ghost_batch`` samples."""

BASE_LR = MODELS["mlp"].lr
BASE_BATCH = MODELS["mlp"].batch_size

# The stated criteria's constants.
USABLE_MARGIN = 0.05
"""Panel 1: a learning rate is usable when its mean test accuracy is within this much
(5 points) of the best over the sweep of the same network (with BN, or without)."""
CLEAR_MARGIN = 0.005
"""Panels 4 and 5: an accuracy (or gap) beats another only when it does so by more than
this (half a point)."""
SMALL_BATCH = 8
"""Batches of at most this many samples are the "small" ones of panel 5."""
DEGRADE_MARGIN = 0.01
"""Panel 5: BN "degrades" when it loses this much more accuracy from its best batch
size to the smallest than group norm (which uses no batch statistics) does."""
EVAL_TRAIN = 10000
"""The train accuracy and loss are measured (in eval mode) on at most this many
training images."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: everything that decides its result."""

    claim: str
    norm: str = "batch"
    lr: float = BASE_LR
    batch_size: int = BASE_BATCH
    epochs: int = 1
    limit_train: int = 10000
    init_scale: float = 1.0
    dropout: bool = False
    ghost_batch: int | None = None
    activation: str = "relu"
    seed: int = 0
    record_every: int = 0  # > 0: gradient norms and activation statistics every N steps

    def __post_init__(self):
        if self.claim not in CLAIMS:
            raise ValueError(f"unknown claim {self.claim!r}; choose among {CLAIMS}.")
        if self.norm not in NORM_NAMES:
            raise ValueError(f"unknown norm {self.norm!r}; choose among {NORM_NAMES}.")
        if (self.norm == "ghost") != (self.ghost_batch is not None):
            raise ValueError("ghost_batch is the ghost batch size of norm='ghost', and only of it.")

    def label(self):
        return {"none": "no BN", "batch": "BN", "renorm": "batch renorm", "group": "group norm",
                "ghost": f"ghost BN ({self.ghost_batch})"}[self.norm]


@dataclass(frozen=True)
class Grid:
    """The sweeps of each panel and the training they share."""

    limit_train: int
    epochs: int
    lrs: tuple
    init_scales: tuple
    record_every: int
    dropout_limit_train: int
    dropout_epochs: int
    batch_sizes: tuple
    batch_epochs: int
    ghost_batch: int = 16
    seeds: tuple = (0,)


GRIDS = {
    # 36 runs on 10,000 images (2,000 for panel 4), one seed.
    "quick": Grid(limit_train=10000, epochs=1, lrs=(0.01, 0.1, 1.0, 10.0), init_scales=(0.1, 1.0, 10.0),
                  record_every=5, dropout_limit_train=2000, dropout_epochs=15,
                  batch_sizes=(2, 8, 32, 128), batch_epochs=1),
    # 132 runs on all 60,000 images (5,000 for panel 4), two seeds.
    "full": Grid(limit_train=60000, epochs=2, lrs=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                 init_scales=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0), record_every=20,
                 dropout_limit_train=5000, dropout_epochs=40,
                 batch_sizes=(2, 4, 8, 16, 32, 64, 128), batch_epochs=1, seeds=(0, 1)),
}


def grid_runs(grid, claims=CLAIMS, activation="relu"):
    """The :class:`RunSpec` of every run of ``grid`` for the panels ``claims``, in order."""
    runs = []
    for seed in grid.seeds:
        base = dict(seed=seed, activation=activation, limit_train=grid.limit_train, epochs=grid.epochs)
        for claim in claims:
            if claim == "lr":
                runs += [RunSpec("lr", norm=n, lr=lr, **base) for lr in grid.lrs for n in ("none", "batch")]
            elif claim == "init":
                runs += [RunSpec("init", norm=n, init_scale=s, **base)
                         for s in grid.init_scales for n in ("none", "batch")]
            elif claim == "gradients":
                runs += [RunSpec("gradients", norm=n, record_every=grid.record_every, **base)
                         for n in ("none", "batch")]
            elif claim == "dropout":
                runs += [RunSpec("dropout", norm=n, dropout=d, **dict(base, limit_train=grid.dropout_limit_train,
                                                                      epochs=grid.dropout_epochs))
                         for d in (False, True) for n in ("none", "batch")]
            elif claim == "batch":
                for b in grid.batch_sizes:
                    for n in ("batch", "renorm", "group", "ghost"):
                        runs.append(RunSpec("batch", norm=n, batch_size=b, lr=BASE_LR * b / BASE_BATCH,
                                            ghost_batch=min(grid.ghost_batch, b) if n == "ghost" else None,
                                            **dict(base, epochs=grid.batch_epochs)))
            else:
                raise ValueError(f"unknown claim {claim!r}; choose among {CLAIMS}.")
    return runs


# --------------------------------------------------------------------------- #
# One run
# --------------------------------------------------------------------------- #
def build(spec):
    """The run's model (weights from ``default_rng(seed)``, Linear weights times
    ``init_scale``) and its SGD optimizer."""
    rng = np.random.default_rng(spec.seed)
    norm = {"none": "batch", "ghost": "batch"}.get(spec.norm, spec.norm)
    model = build_model("mlp", rng, batch_norm=spec.norm != "none", norm=norm, dropout=spec.dropout,
                        activation=spec.activation, virtual_batch_size=spec.ghost_batch)
    if spec.init_scale != 1.0:
        for layer in model.layers:
            if isinstance(layer, Linear):
                layer.weight *= layer.weight.dtype.type(spec.init_scale)
    return model, SGD(model.params, lr=spec.lr)


def _forward(model, x, stats):
    """``model.forward(x)``, appending each nonlinearity's input's per-unit batch
    mean and std to ``stats`` when it is a list."""
    for layer in model.layers:
        if stats is not None and isinstance(layer, (Sigmoid, ReLU)):
            stats.append((x.mean(axis=0, dtype=np.float64), x.std(axis=0, dtype=np.float64)))
        x = layer.forward(x)
    return x


def _finite(value):
    return float(value) if value is not None and math.isfinite(value) else None


def train_run(spec, data):
    """Train one run; return its settings and measurements as a JSON-ready dict.

    ``data`` is ``(train_x, train_y, test_x, test_y)`` as :func:`prepare_images`
    gives the images.  Each epoch takes the whole batches of a shuffle seeded by
    ``(seed, epoch)``.  A non-finite loss stops the run (``diverged``); its
    accuracies are still measured, its non-finite losses stored as null.
    With ``record_every``, ``probe`` holds, every that many steps: the gradient
    norm of each Linear weight, and for each hidden nonlinearity's input the
    per-unit batch mean and std averaged over the units, and ``shift``: how far
    the per-unit means moved since the last record, in units of the std.
    """
    train_x, train_y, test_x, test_y = data
    n = min(spec.limit_train, len(train_y))
    train_x, train_y = train_x[:n], train_y[:n]
    model, opt = build(spec)
    linears = [layer for layer in model.layers if isinstance(layer, Linear)]
    probe = {"steps": [], "grad_norm": [], "act_mean": [], "act_std": [], "shift": []}
    step_losses, diverged, step, last_means = [], False, 0, None
    start = time.perf_counter()
    with np.errstate(all="ignore"):
        for epoch in range(spec.epochs):
            for idx in epoch_batches(n, spec.batch_size, spec.seed, epoch):
                if len(idx) < spec.batch_size:
                    continue
                record = spec.record_every > 0 and step % spec.record_every == 0
                stats = [] if record else None
                loss, dlogits = cross_entropy(_forward(model, train_x[idx], stats), train_y[idx])
                if not math.isfinite(loss):
                    diverged = True
                    break
                model.backward(dlogits, input_grad=False)
                if record:
                    means = [m for m, _ in stats]
                    probe["steps"].append(step)
                    probe["grad_norm"].append([float(np.linalg.norm(lin.grads["weight"])) for lin in linears])
                    probe["act_mean"].append([float(m.mean()) for m in means])
                    probe["act_std"].append([float(s.mean()) for _, s in stats])
                    probe["shift"].append(None if last_means is None else
                                          [float(np.mean(np.abs(m - m0)) / max(np.mean(s), 1e-12))
                                           for m, m0, (_, s) in zip(means, last_means, stats)])
                    last_means = means
                opt.step(model.grads)
                step_losses.append(float(loss))
                step += 1
            if diverged:
                break
        seconds = time.perf_counter() - start
        m = min(n, EVAL_TRAIN)
        train_loss, train_acc = evaluate(model, train_x[:m], train_y[:m])
        test_loss, test_acc = evaluate(model, test_x, test_y)
    result = {"settings": asdict(spec), "label": spec.label(), "steps": step, "diverged": diverged,
              "train_loss": _finite(train_loss), "train_accuracy": train_acc,
              "test_loss": _finite(test_loss), "test_accuracy": test_acc,
              "seconds": seconds, "step_losses": step_losses}
    if spec.record_every:
        result["probe"] = probe
    return result


# --------------------------------------------------------------------------- #
# The grid, in worker processes
# --------------------------------------------------------------------------- #
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1"}
_DATA = None


def load_data(data_dir=None, limit_test=None):
    """MNIST as :func:`train_run` takes it (images from :func:`prepare_images`)."""
    from .data import load_mnist

    train_x, train_y, test_x, test_y = load_mnist(data_dir=data_dir)
    if limit_test is not None:
        test_x, test_y = test_x[:limit_test], test_y[:limit_test]
    return (prepare_images(train_x), np.asarray(train_y, np.int64),
            prepare_images(test_x), np.asarray(test_y, np.int64))


def _init_worker(data_dir, limit_test):
    global _DATA
    _DATA = load_data(data_dir, limit_test)


def _run_in_worker(spec):
    return train_run(spec, _DATA)


@contextmanager
def _environment(values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_grid(specs, data_dir=None, limit_test=None, jobs=2, log=print):
    """Train every run of ``specs`` in ``jobs`` worker processes (spawned with one
    BLAS and one Numba thread each, so the results do not depend on ``jobs``);
    return the results in the order of ``specs``."""
    ctx = multiprocessing.get_context("spawn")
    with _environment(ONE_THREAD):  # the workers start here, with these settings
        pool = ctx.Pool(max(1, jobs), initializer=_init_worker, initargs=(data_dir, limit_test))
    results = []
    try:
        for i, result in enumerate(pool.imap(_run_in_worker, specs)):
            s = result["settings"]
            log(f"[{i + 1}/{len(specs)}] {s['claim']:9s} {result['label']:16s} lr {s['lr']:<8.4g} "
                f"batch {s['batch_size']:<4d} init x{s['init_scale']:<4g} dropout {int(s['dropout'])} "
                f"seed {s['seed']}: test acc {result['test_accuracy']:.4f}"
                + (" (diverged)" if result["diverged"] else "") + f", {result['seconds']:.1f} s")
            results.append(result)
    finally:
        pool.terminate()
        pool.join()
    return results


# --------------------------------------------------------------------------- #
# Verdicts: each claim judged from the results by a stated criterion
# --------------------------------------------------------------------------- #
@dataclass
class Verdict:
    claim: str
    statement: str
    criterion: str
    supported: bool
    evidence: str
    numbers: dict = field(default_factory=dict)

    @property
    def answer(self):
        return "supported" if self.supported else "not supported here"


def _of(results, claim):
    return [r for r in results if r["settings"]["claim"] == claim]


def _mean_by(results, key, metric="test_accuracy", **match):
    """``{value of settings[key]: mean of metric over the runs (seeds)}`` for the runs
    whose settings match ``match``, in ascending key order."""
    groups = {}
    for r in results:
        s = r["settings"]
        if all(s[k] == v for k, v in match.items()):
            groups.setdefault(s[key], []).append(r[metric])
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


def _pct(x):
    return f"{100 * x:.1f}%"


def steps_to_reach(losses, target, span):
    """The first step at which the moving average (span ``span``) of ``losses`` is at
    most ``target``; None if it never is."""
    for i, v in enumerate(smoothed(losses, span)):
        if v <= target:
            return i
    return None


def _smoothed_final(losses, span):
    return smoothed(losses, span)[-1] if losses else math.inf


def verdict_lr(results):
    """Claim 1 (and "trains faster", from the same runs)."""
    runs = _of(results, "lr")
    acc = {n: _mean_by(runs, "lr", norm=n) for n in ("none", "batch")}
    top = {n: max(acc[n].values()) for n in acc}
    usable = {n: [lr for lr, a in acc[n].items() if a >= top[n] - USABLE_MARGIN] for n in acc}
    supported = top["batch"] > top["none"] and len(usable["batch"]) > len(usable["none"])

    def span(lrs):
        return (f"{min(lrs):g}" + (f"..{max(lrs):g}" if len(lrs) > 1 else "")
                + f" ({len(lrs)} of {len(acc['batch'])})")

    out = [Verdict(
        "lr", "BN tolerates higher learning rates",
        f"BN's best test accuracy over the sweep is higher and more learning rates are usable "
        f"(mean test accuracy within {100 * USABLE_MARGIN:g} points of the same network's best)",
        supported,
        f"best {_pct(top['batch'])} with BN, {_pct(top['none'])} without; usable lr {span(usable['batch'])} "
        f"with BN, {span(usable['none'])} without",
        {"accuracy": acc, "usable": usable})]
    # Trains faster: at each lr (and seed) where neither run diverged, which reaches first
    # the higher of the two final smoothed losses.
    faster, compared = 0, 0
    pairs = {}
    for r in runs:
        s = r["settings"]
        pairs.setdefault((s["lr"], s["seed"]), {})[s["norm"]] = r
    for pair in pairs.values():
        if len(pair) < 2 or any(r["diverged"] or not r["step_losses"] for r in pair.values()):
            continue
        spn = max(1, len(pair["batch"]["step_losses"]) // 10)
        target = max(_smoothed_final(r["step_losses"], spn) for r in pair.values())
        reach = {n: steps_to_reach(r["step_losses"], target, spn) for n, r in pair.items()}
        compared += 1
        faster += reach["batch"] < reach["none"]
    out.append(Verdict(
        "lr", "BN trains faster",
        "at most learning rates of the sweep (and seeds) where neither run diverged, BN's smoothed "
        "training loss reaches the worse of the two final losses in fewer steps",
        compared > 0 and faster > compared / 2,
        f"BN first in {faster} of {compared} comparisons",
        {"faster": faster, "compared": compared}))
    return out


def verdict_init(results):
    runs = _of(results, "init")
    acc = {n: _mean_by(runs, "init_scale", norm=n) for n in ("none", "batch")}
    worst = {n: min(a.values()) for n, a in acc.items()}
    spread = {n: max(a.values()) - min(a.values()) for n, a in acc.items()}
    scales = list(acc["batch"])
    return [Verdict(
        "init", "BN tolerates poorer weight initialisation",
        f"over init scales {min(scales):g}x..{max(scales):g}x, BN's worst test accuracy is higher "
        "and its spread (best minus worst) smaller",
        worst["batch"] > worst["none"] and spread["batch"] < spread["none"],
        f"worst {_pct(worst['batch'])} with BN, {_pct(worst['none'])} without; spread "
        f"{100 * spread['batch']:.1f} points with BN, {100 * spread['none']:.1f} without",
        {"accuracy": acc})]


def gradient_measures(probe):
    """``(layer_spread, time_spread, shift)`` of one run's probe: the mean over records of
    log10(largest / smallest layer gradient norm); the mean over layers of the std over
    records (after the first) of log10 of the gradient norm; the mean per-record shift
    of the nonlinearity inputs' per-unit means, in stds (see :func:`train_run`)."""
    g = np.log10(np.maximum(np.asarray(probe["grad_norm"], np.float64), 1e-30))
    layer_spread = float(np.mean(g.max(axis=1) - g.min(axis=1)))
    time_spread = float(np.mean(g[1:].std(axis=0))) if len(g) > 2 else 0.0
    shifts = [s for s in probe["shift"] if s is not None]
    shift = float(np.mean(shifts)) if shifts else 0.0
    return layer_spread, time_spread, shift


def verdict_gradients(results):
    runs = _of(results, "gradients")
    measures = {}
    for n in ("none", "batch"):
        m = [gradient_measures(r["probe"]) for r in runs if r["settings"]["norm"] == n]
        measures[n] = tuple(float(np.mean(col)) for col in zip(*m))
    (ls_b, ts_b, sh_b), (ls_n, ts_n, sh_n) = measures["batch"], measures["none"]
    return [
        Verdict("gradients", "BN gives more stable gradients",
                "with BN the layers' gradient norms are closer together (mean log10 of largest/smallest) "
                "and vary less over training (mean std over records of each layer's log10 norm)",
                ls_b < ls_n and ts_b < ts_n,
                f"layer spread {ls_b:.2f} with BN, {ls_n:.2f} without (log10); over time {ts_b:.2f} "
                f"with BN, {ts_n:.2f} without",
                {"layer_spread": {"batch": ls_b, "none": ls_n}, "time_spread": {"batch": ts_b, "none": ts_n}}),
        Verdict("gradients", "BN reduces internal covariate shift",
                "the per-unit means of each nonlinearity's input move less between records with BN "
                "(in units of their std)",
                sh_b < sh_n,
                f"mean shift {sh_b:.3f} std with BN, {sh_n:.3f} without",
                {"shift": {"batch": sh_b, "none": sh_n}}),
    ]


def verdict_dropout(results):
    runs = _of(results, "dropout")
    test = {(n, d): _mean_by(runs, "norm", dropout=d)[n] for n in ("none", "batch") for d in (False, True)}
    train = {(n, d): _mean_by(runs, "norm", "train_accuracy", dropout=d)[n]
             for n in ("none", "batch") for d in (False, True)}
    gap = {k: train[k] - test[k] for k in test}
    gain = {n: test[(n, True)] - test[(n, False)] for n in ("none", "batch")}
    return [
        Verdict("dropout", "BN regularises",
                f"without dropout, the train-test accuracy gap is smaller with BN (by more than "
                f"{100 * CLEAR_MARGIN:g} point)",
                gap[("batch", False)] < gap[("none", False)] - CLEAR_MARGIN,
                f"gap {100 * gap[('batch', False)]:.1f} points with BN, {100 * gap[('none', False)]:.1f} "
                f"without (test {_pct(test[('batch', False)])} and {_pct(test[('none', False)])})",
                {"gap": {f"{n}/dropout={d}": v for (n, d), v in gap.items()}}),
        Verdict("dropout", "with BN, dropout can be reduced",
                f"dropout's test-accuracy gain is smaller with BN than without (by more than "
                f"{100 * CLEAR_MARGIN:g} point)",
                gain["batch"] < gain["none"] - CLEAR_MARGIN,
                f"dropout changes test accuracy by {100 * gain['batch']:+.1f} points with BN, "
                f"{100 * gain['none']:+.1f} without",
                {"gain": gain}),
    ]


def verdict_batch(results):
    runs = _of(results, "batch")
    acc = {n: _mean_by(runs, "batch_size", norm=n) for n in ("batch", "renorm", "group", "ghost")}
    sizes = list(acc["batch"])
    smallest, small = sizes[0], [b for b in sizes if b <= SMALL_BATCH] or sizes[:1]

    def drop(n):
        return max(acc[n].values()) - acc[n][smallest]

    def small_mean(n):
        return float(np.mean([acc[n][b] for b in small]))

    out = [Verdict(
        "batch", "BN degrades at small batch sizes",
        f"from its best batch size to the smallest ({smallest}), BN loses at least "
        f"{100 * DEGRADE_MARGIN:g} point more test accuracy than group norm (which uses no batch statistics)",
        drop("batch") > drop("group") + DEGRADE_MARGIN,
        f"BN {_pct(acc['batch'][smallest])} at batch {smallest} against {_pct(max(acc['batch'].values()))} "
        f"at its best (-{100 * drop('batch'):.1f} points); group norm -{100 * drop('group'):.1f} points",
        {"accuracy": acc})]
    names = {"renorm": "batch renormalization helps", "group": "group norm helps",
             "ghost": "ghost batches help"}
    for n in ("renorm", "group", "ghost"):
        same = n == "ghost" and all(r["settings"]["ghost_batch"] == r["settings"]["batch_size"]
                                    for r in runs if r["settings"]["norm"] == "ghost"
                                    and r["settings"]["batch_size"] in small)
        out.append(Verdict(
            "batch", f"{names[n]} at small batches",
            f"mean test accuracy over batch sizes {', '.join(map(str, small))} higher than BN's by more "
            f"than {100 * CLEAR_MARGIN:g} point",
            small_mean(n) > small_mean("batch") + CLEAR_MARGIN,
            f"{_pct(small_mean(n))} against BN's {_pct(small_mean('batch'))}"
            + (" (a ghost batch is the whole batch at these sizes: it is BN)" if same else "")))
    largest = sizes[-1]
    out.append(Verdict(
        "batch", "ghost batches help at large batches",
        f"at the largest batch ({largest}) ghost BN's test accuracy is higher than BN's by more than "
        f"{100 * CLEAR_MARGIN:g} point",
        acc["ghost"][largest] > acc["batch"][largest] + CLEAR_MARGIN,
        f"{_pct(acc['ghost'][largest])} against BN's {_pct(acc['batch'][largest])}"))
    return out


VERDICTS = {"lr": verdict_lr, "init": verdict_init, "gradients": verdict_gradients,
            "dropout": verdict_dropout, "batch": verdict_batch}


def verdicts(results):
    """Every claim's :class:`Verdict` s, for the panels present in ``results``."""
    present = {r["settings"]["claim"] for r in results}
    return [v for claim in CLAIMS if claim in present for v in VERDICTS[claim](results)]


def verdict_table(items):
    """The verdicts as a fixed-width text table."""
    rows = [(TITLES[v.claim], v.statement, v.answer, v.evidence) for v in items]
    heads = ("panel", "claim", "verdict", "evidence")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads[:3])]
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths)) + "  " + heads[3]
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- #
# Figures, one per claim
# --------------------------------------------------------------------------- #
def _pyplot():
    matplotlib = require("matplotlib", "bn_claims' figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=72, metadata={"Software": None})
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


STYLE = {"none": ("C3", "--", "no BN"), "batch": ("C0", "-", "BN"), "renorm": ("C1", "-", "batch renorm"),
         "group": ("C2", "-", "group norm"), "ghost": ("C4", ":", "ghost BN")}


def _sweep_figure(results, claim, key, xlabel, path, title):
    plt = _pyplot()
    runs = _of(results, claim)
    fig, (ax_acc, *ax_loss) = plt.subplots(1, 3, figsize=(14, 4))
    for n in ("none", "batch"):
        color, style, label = STYLE[n]
        acc = _mean_by(runs, key, norm=n)
        ax_acc.plot(list(acc), list(acc.values()), style + "o", color=color, label=label)
    ax_acc.set(xscale="log", xlabel=xlabel, ylabel="final test accuracy", ylim=(0, 1),
               title="test accuracy (mean over seeds)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    values = sorted({r["settings"][key] for r in runs})
    cmap = plt.get_cmap("viridis")
    seed0 = min(r["settings"]["seed"] for r in runs)
    for ax, n in zip(ax_loss, ("none", "batch")):
        for r in runs:
            s = r["settings"]
            if s["norm"] != n or s["seed"] != seed0 or not r["step_losses"]:
                continue
            losses = r["step_losses"]
            color = cmap(values.index(s[key]) / max(1, len(values) - 1))
            ax.plot(smoothed(losses, max(1, len(losses) // 20)), color=color,
                    label=f"{s[key]:g}" + (" (diverged)" if r["diverged"] else ""))
        ax.set(yscale="log", xlabel="training step", ylabel="training loss (moving average)",
               ylim=(0.03, 10), title=f"{STYLE[n][2]}: loss curves, seed {seed0}")
        ax.grid(alpha=0.3)
        ax.legend(title=xlabel, fontsize=7, ncol=2)
    fig.suptitle(title)
    _save(fig, path)


def figure_gradients(results, path):
    plt = _pyplot()
    runs = [r for r in _of(results, "gradients")]
    seed0 = min(r["settings"]["seed"] for r in runs)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True, sharey="row")
    for col, n in enumerate(("none", "batch")):
        r = next(r for r in runs if r["settings"]["norm"] == n and r["settings"]["seed"] == seed0)
        p = r["probe"]
        g, mean, std = (np.asarray(p[k], np.float64) for k in ("grad_norm", "act_mean", "act_std"))
        for j in range(g.shape[1]):
            axes[0, col].plot(p["steps"], g[:, j], color=f"C{j}", label=f"Linear {j + 1}")
        for j in range(mean.shape[1]):
            axes[1, col].plot(p["steps"], mean[:, j], color=f"C{j}", label=f"hidden {j + 1}: mean")
            axes[1, col].fill_between(p["steps"], mean[:, j] - std[:, j], mean[:, j] + std[:, j],
                                      color=f"C{j}", alpha=0.15)
        axes[0, col].set(yscale="log", ylabel="weight gradient norm", title=f"{STYLE[n][2]}: gradient norms")
        axes[1, col].set(xlabel="training step", ylabel="nonlinearity input",
                         title=f"{STYLE[n][2]}: per-unit mean ± std (averaged over units)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"3. gradient stability (seed {seed0}, training batches)")
    _save(fig, path)


def figure_dropout(results, path):
    plt = _pyplot()
    runs = _of(results, "dropout")
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, trains, tests = [], [], []
    for n in ("none", "batch"):
        for d in (False, True):
            labels.append(f"{STYLE[n][2]}\n{'dropout' if d else 'no dropout'}")
            trains.append(_mean_by(runs, "norm", "train_accuracy", dropout=d)[n])
            tests.append(_mean_by(runs, "norm", dropout=d)[n])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, trains, 0.4, label="train (eval mode)")
    ax.bar(x + 0.2, tests, 0.4, label="test")
    for i, (a, b) in enumerate(zip(trains, tests)):
        ax.annotate(f"gap {100 * (a - b):.1f}", (x[i], max(a, b)), ha="center", va="bottom", fontsize=8)
    lo = min(trains + tests)
    ax.set(xticks=x, xticklabels=labels, ylabel="accuracy", ylim=(max(0.0, lo - 0.05), 1.01),
           title="4. regularisation: train/test accuracy (mean over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    _save(fig, path)


def figure_batch(results, path):
    plt = _pyplot()
    runs = _of(results, "batch")
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in ("batch", "renorm", "group", "ghost"):
        color, style, label = STYLE[n]
        acc = _mean_by(runs, "batch_size", norm=n)
        ax.plot(list(acc), list(acc.values()), style + "o", color=color, label=label)
    ax.set(xscale="log", xlabel="batch size (lr scaled with it)", ylabel="final test accuracy",
           title="5. small batches (mean over seeds)")
    ax.set_xticks(sorted({r["settings"]["batch_size"] for r in runs}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def figures(results, out_dir):
    """One PNG per panel present in ``results``; returns ``{claim: path}``."""
    paths = {}
    present = {r["settings"]["claim"] for r in results}
    for claim in CLAIMS:
        if claim not in present:
            continue
        path = os.path.join(out_dir, f"claim_{claim}.png")
        if claim == "lr":
            _sweep_figure(results, "lr", "lr", "learning rate", path, "1. higher learning rates (SGD)")
        elif claim == "init":
            _sweep_figure(results, "init", "init_scale", "init scale", path, "2. weight initialisation scale")
        elif claim == "gradients":
            figure_gradients(results, path)
        elif claim == "dropout":
            figure_dropout(results, path)
        else:
            figure_batch(results, path)
        paths[claim] = path
    return paths


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #
def build_parser():
    p = argparse.ArgumentParser(
        prog="bn_claims", description="Measure the batch-norm tutorials' claims on MNIST (the paper's MLP).")
    p.add_argument("--quick", action="store_true", help="the reduced grid (under 5 minutes on 2 cores)")
    p.add_argument("--claims", nargs="+", choices=CLAIMS, default=list(CLAIMS), help="panels to run")
    p.add_argument("--limit-train", type=int, metavar="N", help="training images of panels 1, 2, 3 and 5")
    p.add_argument("--epochs", type=int, help="epochs of panels 1-3 (panel 5 takes the grid's, 4 its own)")
    p.add_argument("--seeds", type=int, metavar="K", help="seeds 0..K-1 (default: 1 quick, 2 full)")
    p.add_argument("--limit-test", type=int, metavar="N", help="test on the first N test images")
    p.add_argument("--activation", choices=["relu", "sigmoid"], default="relu",
                   help="the hidden nonlinearity (the paper's is the sigmoid)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    p.add_argument("--data-dir")
    p.add_argument("--out", default=os.path.join("runs", "bn_claims"))
    p.add_argument("--replot", action="store_true",
                   help="train nothing: recompute the verdicts and figures from OUT/claims.json")
    return p


def grid_from_args(args):
    grid = GRIDS["quick" if args.quick else "full"]
    changes = {}
    if args.limit_train is not None:
        changes.update(limit_train=args.limit_train,
                       dropout_limit_train=min(grid.dropout_limit_train, args.limit_train))
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    for name in ("limit_train", "epochs"):
        if changes.get(name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1.")
    if args.seeds is not None and args.seeds < 1:
        raise ValueError("--seeds must be >= 1.")
    return replace(grid, **changes)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv=None, log=print):
    """Run the grid, write ``claims.json`` and the figures to ``--out``, print the
    verdict table; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _pyplot()
        grid = grid_from_args(args)
    except (MissingExtraError, ValueError) as e:
        print(f"bn_claims: error: {e}", file=sys.stderr)
        return 2
    if args.replot:
        return _replot(args.out, log)
    specs = grid_runs(grid, args.claims, args.activation)
    os.makedirs(args.out, exist_ok=True)
    log(f"{len(specs)} runs, {args.jobs} worker process(es); results in {args.out}")
    start = time.perf_counter()
    results = run_grid(specs, data_dir=args.data_dir, limit_test=args.limit_test, jobs=args.jobs, log=log)
    train_seconds = time.perf_counter() - start
    items = verdicts(results)
    paths = figures(results, args.out)
    report = {
        "command": "bn_claims " + " ".join(sys.argv[1:] if argv is None else argv),
        "grid": "quick" if args.quick else "full", "settings": asdict(grid),
        "activation": args.activation, "limit_test": args.limit_test,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "jobs": args.jobs, "seconds": train_seconds,
        "figures": {c: os.path.basename(p) for c, p in paths.items()},
        "verdicts": [dict(asdict(v), answer=v.answer) for v in items],
        "runs": results,
    }
    with open(os.path.join(args.out, "claims.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=1)
    log("")
    log(verdict_table(items))
    log(f"\n{len(specs)} runs in {train_seconds:.0f} s; claims.json and "
        f"{', '.join(os.path.basename(p) for p in paths.values())} in {args.out}")
    return 0


def _replot(out_dir, log):
    """``--replot``: the verdicts and figures of ``out_dir/claims.json`` again (after a
    change to the plotting or the criteria), written back into it."""
    path = os.path.join(out_dir, "claims.json")
    with open(path) as f:
        report = json.load(f)
    items = verdicts(report["runs"])
    paths = figures(report["runs"], out_dir)
    report["figures"] = {c: os.path.basename(p) for c, p in paths.items()}
    report["verdicts"] = [dict(asdict(v), answer=v.answer) for v in items]
    with open(path, "w") as f:
        json.dump(_jsonable(report), f, indent=1)
    log(verdict_table(items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
