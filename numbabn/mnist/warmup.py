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
"""

from __future__ import annotations

import copy
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


def group_line(name, seconds):
    """One line of the warm-up's report: the group and its seconds."""
    return f"  {name:<32}{seconds:6.1f} s"


def warm_up(model, optimizer, train_batches, eval_batches, progress=False, log=print):
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
    try:
        for s, (training, passes, (x, y)) in enumerate(stages):
            model.train(training)
            for p, (group, what, i) in enumerate(passes):
                own = s == points[group][0]  # else a repeat at another batch size
                if bar is not None and own:
                    bar.set_description_str(f"compiling {group}")
                began = time.perf_counter()
                if what == "forward":
                    x = layers[i].forward(x)
                elif what == "loss":
                    _, dy = cross_entropy(x, y)
                elif what == "backward" and i > first:
                    dy = layers[i].backward(dy)
                elif what == "backward":  # as the trainer: the images need no gradient
                    layers[i].backward(dy, input_grad=False)
                else:
                    optimizer.step(model.grads)
                seconds = time.perf_counter() - began
                if not own:
                    times.other += seconds
                    continue
                times.groups[group] = times.groups.get(group, 0.0) + seconds
                if points[group] == (s, p):
                    _write(group_line(group, times.groups[group]), log, tqdm)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    times.total = time.perf_counter() - start
    log(group_line(OTHER, times.other))
    log(f"kernels ready in {times.total:.1f} s")
    return times


def _write(line, log, tqdm):
    """``log(line)``, above the progress bar when there is one."""
    if tqdm is None:
        log(line)
    else:
        with tqdm.external_write_mode():
            log(line)
