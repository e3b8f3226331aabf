"""Compile a model's kernels before training, layer by layer, with a progress bar per group.

With an empty Numba cache the first training step compiles every kernel it
meets, silently.  :func:`warm_up` runs that step and an evaluation on copies of
the model and optimizer, layer by layer and at the run's real batch sizes (the
kernels choose serial or parallel code, and other paths, by size), so the
compiling happens up front, group by group, with a name and a time for each.
The caller's model, optimizer and random generators are left untouched: a run
reaches the same bits with or without a warm-up.

The groups are the passes of each layer kind, in the order a training step and
an evaluation meet them: ``Conv2d forward``, ``ReLU forward``, ...,
``cross-entropy loss``, ``Linear backward``, ..., ``Adam step``; a layer with
running statistics (the batch norms) has three, ``BatchNorm2d train``,
``backward`` and ``eval``, which run different kernels.  A group's time is that
of its passes in the first stage that has it (the training step on the full
batch, or the first evaluation batch for the ``eval`` groups); the passes at
the other batch sizes (a last smaller training batch, the evaluation's) are
timed together, as ``other batch sizes``.

With two or more CPUs the compiling runs in two processes (Numba compiles one
function at a time per process, on one core): a helper process
(:class:`_Helper`) compiles the backward passes while this one compiles the
forward passes.  The helper follows this process's training forward layer by
layer: once this process has compiled layer ``i``'s forward (and Numba has
saved it to the on-disk cache), the helper runs that forward from the cache on
its own copy of the model and batch, then the layer's backward on a zero
gradient shaped like the layer's output, which compiles the backward kernels
into the same cache.  This process, reaching the backward passes from the last
layer down, runs each pass the helper has not started itself (and tells the
helper to skip it) and waits for the ones the helper has started; those then
load from the cache.  The two meet in the middle.  A helper that fails or is
missing changes nothing but the time: every pass still runs here.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .._extras import require
from ..kit.losses import cross_entropy

LOSS = "cross-entropy loss"
OTHER = "other batch sizes"


def group_name(layer, phase):
    """The group of ``layer``'s ``phase`` pass (``"train"``, ``"backward"`` or
    ``"eval"``): the layer's class name and ``forward`` or ``backward``; for
    layers with running statistics (the batch norms), whose training and
    evaluation forwards run different kernels, ``train``, ``backward`` or ``eval``."""
    kind = type(layer).__name__
    if not layer.buffers and phase != "backward":
        phase = "forward"
    return f"{kind} {phase}"


def _step_name(optimizer):
    return f"{type(optimizer).__name__} step"


def _first_with_params(layers):
    """Where :meth:`numbabn.kit.Sequential.backward` stops for a data input
    (``input_grad=False``): the first layer with parameters."""
    return next(i for i, layer in enumerate(layers) if layer.params)


def _training_passes(layers, optimizer):
    """A training step as ``(group, what, layer index)`` passes, in the
    trainer's order: forward, loss, backward down to the first layer with
    parameters, optimizer step."""
    first = _first_with_params(layers)
    return ([(group_name(layer, "train"), "forward", i) for i, layer in enumerate(layers)]
            + [(LOSS, "loss", None)]
            + [(group_name(layers[i], "backward"), "backward", i) for i in reversed(range(first, len(layers)))]
            + [(_step_name(optimizer), "step", None)])


def _evaluation_passes(layers):
    """An evaluation batch as passes: forward in eval mode, loss."""
    return [(group_name(layer, "eval"), "forward", i) for i, layer in enumerate(layers)] + [(LOSS, "loss", None)]


def kernel_groups(model, optimizer):
    """The groups of a training step and an evaluation of ``model`` (a
    :class:`~numbabn.kit.Sequential`), each once, in the order they are met."""
    passes = _training_passes(model.layers, optimizer) + _evaluation_passes(model.layers)
    return list(dict.fromkeys(group for group, _, _ in passes))


def _stages(model, optimizer, train_batches, eval_batches):
    """``(training, passes, (images, labels))`` for each batch: a training
    step on each of ``train_batches``, then an evaluation of each of ``eval_batches``."""
    train = _training_passes(model.layers, optimizer)
    evaluation = _evaluation_passes(model.layers)
    return [(True, train, batch) for batch in train_batches] + [(False, evaluation, batch) for batch in eval_batches]


def _report_points(stages):
    """For each group, ``(stage, pass)`` of its last pass in the first stage
    that has it: where its line is logged."""
    points = {}
    for s, (_, passes, _) in enumerate(stages):
        seen_before = set(points)
        for p, (group, _, _) in enumerate(passes):
            if group not in seen_before:
                points[group] = (s, p)
    return points


@dataclass
class WarmupTimes:
    """Seconds of a warm-up: ``groups`` maps each group to its passes in the
    first stage that has it (a training step on the largest batch, or the first
    evaluation batch), ``other`` is the rest (the other batch sizes), ``total``
    all of it."""

    groups: dict = field(default_factory=dict)
    other: float = 0.0
    total: float = 0.0
    helper: bool = False  # whether a helper process took part
    helped: list = field(default_factory=list)  # the groups it compiled


def group_line(name, seconds):
    """One line of the warm-up's report: the group and its seconds."""
    return f"  {name:<32}{seconds:6.1f} s"


def two_processes_pay():
    """Whether this process may use at least two CPUs (a helper process then
    compiles alongside it)."""
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) >= 2


def warm_up(model, optimizer, train_batches, eval_batches, progress=False, log=print,
            helper=None):
    """Compile (or load from Numba's cache) every kernel that training steps on
    ``train_batches`` and evaluations of ``eval_batches`` need.

    Runs a training step on each training batch, then an evaluation of each
    evaluation batch, one layer pass at a time, on deep copies of ``model``
    and ``optimizer`` (and so of the Dropout layers' generators): the
    originals are unchanged.  Logs each group's line (:func:`group_line`) once
    its passes in the first stage are done, then the other batch sizes' time
    and the total.

    Parameters
    ----------
    model : numbabn.kit.Sequential
    optimizer : numbabn.kit.optim.Optimizer
        ``model``'s optimizer.
    train_batches, eval_batches : list of (ndarray, ndarray)
        ``(images, labels)`` of each batch size the run trains and evaluates
        on, largest first.  The images are used as given (copy them if a layer
        may work in place).
    progress : bool, default False
        A tqdm bar (from the ``train`` extra) with a step per group, naming the
        group being compiled.
    log : callable, default print
    helper : bool, optional
        Compile the backward passes in a helper process (see the module's
        docstring); default: when :func:`two_processes_pay`.  The group times
        are then each group's compile time wherever it ran, and their sum
        exceeds ``total``.

    Returns
    -------
    WarmupTimes
    """
    model, optimizer = copy.deepcopy((model, optimizer))  # the optimizer's params stay the copy's
    layers, first = model.layers, _first_with_params(model.layers)
    stages = _stages(model, optimizer, train_batches, eval_batches)
    points = _report_points(stages)
    bar = tqdm = None
    if progress:
        tqdm = require("tqdm", "The warm-up's progress bar", otherwise="pass progress=False").tqdm
        bar = tqdm(total=len(points), desc="compiling", unit="group", leave=False)
    times = WarmupTimes()
    start = time.perf_counter()
    if helper is None:
        helper = two_processes_pay()
    aide = _Helper.start(model, train_batches[0][0], first) if helper else None
    times.helper = aide is not None
    try:
        for s, (training, passes, (x, y)) in enumerate(stages):
            model.train(training)
            for p, (group, what, i) in enumerate(passes):
                own = s == points[group][0]  # else a repeat at another batch size
                if bar is not None and own:
                    bar.set_description_str(f"compiling {group}")
                # (the helper serves the first stage only: it is closed after it)
                helped = aide.claim(i) if aide is not None and what == "backward" else None
                began = time.perf_counter()
                if what == "forward":
                    x = layers[i].forward(x)
                elif what == "loss":
                    _, dy = cross_entropy(x, y)
                elif what == "backward":
                    dy = _backward(layers[i], dy, i == first)
                else:
                    optimizer.step(model.grads)
                seconds = time.perf_counter() - began
                if aide is not None and what == "forward":
                    aide.forward_done(i + 1)
                if helped is not None:  # compiled by the helper; here it loaded from the cache
                    seconds += helped
                    if group not in times.helped:
                        times.helped.append(group)
                if not own:
                    times.other += seconds
                    continue
                times.groups[group] = times.groups.get(group, 0.0) + seconds
                if points[group] == (s, p):
                    _write(group_line(group, times.groups[group]), log, tqdm)
                    if bar is not None:
                        bar.update(1)
            if aide is not None:  # the first stage is done
                aide.close()
                aide = None
    finally:
        if aide is not None:
            aide.close()
        if bar is not None:
            bar.close()
    times.total = time.perf_counter() - start
    log(group_line(OTHER, times.other))
    log(f"kernels ready in {times.total:.1f} s"
        + (f" (two processes: {len(times.helped)} backward groups in the helper)"
           if times.helper else ""))
    return times


def _backward(layer, dy, first):
    """``layer``'s backward pass as the trainer runs it: the first layer with
    parameters computes no input gradient (the images need none)."""
    if first:
        return layer.backward(dy, input_grad=False)
    return layer.backward(dy)


def _write(line, log, tqdm):
    """``log(line)``, above the progress bar when there is one."""
    if tqdm is None:
        log(line)
    else:
        with tqdm.external_write_mode():
            log(line)


# --------------------------------------------------------------------------- the helper process

class _Helper:
    """The parent's side of the helper process (:func:`_helper_main`).

    They talk through the helper's standard input (the pickled model copy,
    training batch and first layer with parameters, written from a thread, then
    lines ``forward N``: the first N training forwards are compiled; ``take
    I``: this process runs layer I's backward itself; ``stop``) and standard
    output (``start I`` and ``done I SECONDS`` for each backward the helper
    compiles).  This process never waits on the helper for longer than
    :attr:`WAIT_S` a pass."""

    def __init__(self, proc):
        self.proc = proc
        self.started, self.seconds = set(), {}
        self.dead = False
        self.cond = threading.Condition()
        self._writer = None  # the thread writing the model copy (see start)
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def start(cls, model, images, first):
        """A running helper for a training step of ``model`` (a copy is sent) on
        ``images``, or None when one cannot start."""
        try:
            payload = pickle.dumps((model, images, first), protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            return None
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from numbabn.mnist.warmup import _helper_main; _helper_main()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        except OSError:
            return None
        helper = cls(proc)
        # written from a thread: a helper that never reads cannot stop this process
        helper._writer = threading.Thread(target=helper._write, args=(payload,), daemon=True)
        helper._writer.start()
        return helper

    def _write(self, data):
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except OSError:  # the helper has gone: this process runs everything
            with self.cond:
                self.dead = True

    def _read(self):
        for line in self.proc.stdout:
            words = line.split()
            with self.cond:
                try:
                    if words[0] == b"start":
                        self.started.add(int(words[1]))
                    elif words[0] == b"done":
                        self.seconds[int(words[1])] = float(words[2])
                except (IndexError, ValueError):  # not a line of the protocol
                    pass
                self.cond.notify_all()
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def _send(self, line):
        """Write a line after the model copy; while the copy is still being
        written the line is dropped (the lines are hints: ``forward N`` is
        cumulative, and a lost ``take`` costs a duplicate compile at most)."""
        if self.dead or (self._writer is not None and self._writer.is_alive()):
            return
        self._write(line.encode() + b"\n")

    def forward_done(self, n):
        """The first ``n`` training forwards are compiled (and in the cache)."""
        self._send(f"forward {n}")

    # The longest wait for one pass the helper compiles; past it this process
    # compiles the pass too (a helper stuck in a pass must not stop the run).
    WAIT_S = 300.0

    def claim(self, i):
        """Before this process runs layer ``i``'s backward: the seconds the helper
        took to compile it (after waiting for it to finish), or None when the
        helper has not started it (it is told to skip it), failed, or took
        longer than :attr:`WAIT_S`."""
        with self.cond:
            if i not in self.started:
                take = True
            else:
                self.cond.wait_for(lambda: i in self.seconds or self.dead, timeout=self.WAIT_S)
                take = False
        if take:
            self._send(f"take {i}")
            return None
        return self.seconds.get(i)

    def close(self):
        """Stop the helper; kill it if it does not stop within a few seconds (it
        may be compiling a pass this process also ran)."""
        self._send("stop")
        if self._writer is None or not self._writer.is_alive():
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _helper_main():
    """The helper process (see the module's docstring and :class:`_Helper`)."""
    import numpy as np

    stdin, out = sys.stdin.buffer, sys.stdout
    model, x, first = pickle.load(stdin)
    state = {"forward": 0, "taken": set(), "stop": False}
    cond = threading.Condition()

    def read():
        for line in stdin:
            what, _, arg = line.decode().partition(" ")
            with cond:
                if what == "forward":
                    state["forward"] = int(arg)
                elif what == "take":
                    state["taken"].add(int(arg))
                else:
                    state["stop"] = True
                cond.notify_all()
        with cond:
            state["stop"] = True
            cond.notify_all()

    threading.Thread(target=read, daemon=True).start()
    model.train(True)
    for i, layer in enumerate(model.layers):
        with cond:
            cond.wait_for(lambda: state["forward"] > i or state["stop"])
            if state["stop"]:
                return
        y = layer.forward(x)  # compiled by the parent: loads from the cache
        with cond:
            skip = i < first or i in state["taken"]
        if not skip:
            print(f"start {i}", file=out, flush=True)
            began = time.perf_counter()
            # a zero gradient in the layout of the one the layer above returns
            _backward(layer, np.zeros_like(y), i == first)
            print(f"done {i} {time.perf_counter() - began!r}", file=out, flush=True)
        x = y
