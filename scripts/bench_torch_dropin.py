"""Time a PyTorch training step with stock BatchNorm2d and with numbabn.torch's.

The network: 4 blocks of Conv2d(3x3, no bias) - BatchNorm2d - ReLU with 64
channels at 56x56 (the first block takes 3 input channels), global average
pooling and a Linear(64, 10) head; batch 32, float32, on the CPU with
``torch.set_num_threads(THREADS)``.  One step is forward, cross-entropy,
backward and an SGD step (lr 0.01, momentum 0.9).  The numbabn model is a deep
copy of the stock one passed through ``numbabn.torch.replace_batchnorm``.

Before timing, both models' losses and outputs on the same batch from the same
weights are checked to agree (1e-5 relative).  Timing interleaves the two
models: each round runs STEPS steps of one then STEPS of the other (the order
alternating between rounds), after 10 ms of idle so the previous OpenMP pool
(PyTorch's or Numba's) has stopped spinning; the median step time over rounds
is reported for each.  For context, the same is done for the four BatchNorm
layers alone (forward and backward of one BatchNorm2d on a (32, 64, 56, 56)
tensor, 4 times).

``--per-call`` times one layer call instead (the per-call overhead): eval under
``no_grad``, eval with gradients enabled, and a training forward+backward, on a
tiny (4, 8, 4, 4) tensor and on (32, 64, 32, 32), interleaved: stock, numbabn's
layer as it dispatches (the table of ``numbabn.torch._dispatch``, which sends
the tiny tensor to ATen) and numbabn's layer forced onto numbabn's kernels
(``_dispatch.force("numbabn")``), with the kernels numbabn calls
(``numbabn._cpu.feature_ops`` on NumPy views) timed alone for the large tensor.
Each figure is the best and the median over rounds of the mean over many
calls, in CPU time of the calling thread (``--clock cpu``, the default: steadier
on a busy machine, though a VM's stolen time still lands in it, hence the best;
it does not count other threads, so use it with ``--threads 1``) or wall time
(``--clock wall``).

``--crossover`` times numbabn's route against stock on small and mid-size
inputs (NCHW and channels-last, training forward+backward and eval): the
measurement behind the first row of the dispatch table.

    PYTHONPATH=. python scripts/bench_torch_dropin.py [--rounds 7] [--steps 3]
        [--memory-format nchw|channels_last|both]
    PYTHONPATH=. python scripts/bench_torch_dropin.py --per-call --threads 1 [--clock cpu|wall]
    PYTHONPATH=. python scripts/bench_torch_dropin.py --crossover --threads 1

Whole networks (ResNet-18, MobileNetV2): ``scripts/bench_torch_models.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import numba
import numpy as np
import torch
from torch import nn

import numbabn.torch as nbt
from numbabn.torch import _dispatch

BATCH, CHANNELS, SIZE, BLOCKS, CLASSES = 32, 64, 56, 4, 10


def network():
    layers, cin = [], 3
    for _ in range(BLOCKS):
        layers += [nn.Conv2d(cin, CHANNELS, 3, padding=1, bias=False),
                   nn.BatchNorm2d(CHANNELS), nn.ReLU(inplace=True)]
        cin = CHANNELS
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, CLASSES)]
    return nn.Sequential(*layers)


def make_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, t):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        return loss

    return step


def bn_alone(cls, fmt):
    bn = cls(CHANNELS)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(x.shape).contiguous(memory_format=fmt)

    def run():
        for _ in range(BLOCKS):
            x.grad = None
            bn(x).backward(dy)

    return run


CLOCK = [time.perf_counter]  # --clock: wall time, or time.thread_time


def timed(fn, reps):
    time.sleep(0.01)  # let the other framework's OpenMP pool go quiet
    clock = CLOCK[0]
    t0 = clock()
    for _ in range(reps):
        fn()
    return (clock() - t0) / reps * 1e3


def interleave(fns, rounds, reps, routes=None):
    """Median ms per call of each fn, rounds alternating the order; ``routes``
    maps a name to the dispatch route forced while it runs."""
    times = {name: [] for name in fns}
    names = list(fns)
    routes = routes or {}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            route = routes.get(name)
            with _dispatch.force(route) if route else contextlib.nullcontext():
                times[name].append(timed(fns[name], reps))
    return {name: statistics.median(v) for name, v in times.items()}, times


def validate(stock, mine, x, t):
    with torch.no_grad():
        out1, out2 = stock(x), mine(x)
    rel = ((out1 - out2).abs().max() / out1.abs().max()).item()
    loss1 = nn.functional.cross_entropy(out1, t).item()
    loss2 = nn.functional.cross_entropy(out2, t).item()
    print(f"  check: loss stock {loss1:.7f}, numbabn {loss2:.7f}; logits max rel diff {rel:.1e}")
    assert abs(loss1 - loss2) <= 1e-5 * abs(loss1) and rel <= 1e-5, "results differ"


def bench(fmt_name, rounds, steps):
    fmt = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}[fmt_name]
    torch.manual_seed(0)
    stock = network().to(memory_format=fmt)
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    x = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=fmt)
    t = torch.randint(0, CLASSES, (BATCH,))
    print(f"\n== {fmt_name}: batch {BATCH}, {BLOCKS} x (Conv 3x3 - BN - ReLU), {CHANNELS} ch "
          f"at {SIZE}x{SIZE}, float32 ==")
    validate(stock, mine, x, t)  # training mode: batch statistics
    step_stock, step_mine = make_step(stock), make_step(mine)
    for _ in range(2):  # warm-up (kernels compiled, allocator warm)
        step_stock(x, t), step_mine(x, t)
    med, _ = interleave({"stock": lambda: step_stock(x, t), "numbabn": lambda: step_mine(x, t)},
                        rounds, steps)
    print(f"  training step: stock {med['stock']:.1f} ms, numbabn {med['numbabn']:.1f} ms, "
          f"speed-up {med['stock'] / med['numbabn']:.3f}x")
    bn_fns = {"stock": bn_alone(nn.BatchNorm2d, fmt), "numbabn": bn_alone(nbt.BatchNorm2d, fmt)}
    for fn in bn_fns.values():
        fn()
    med_bn, _ = interleave(bn_fns, rounds, max(steps, 3))
    print(f"  the {BLOCKS} BN layers alone (fwd+bwd): stock {med_bn['stock']:.1f} ms, "
          f"numbabn {med_bn['numbabn']:.1f} ms, speed-up "
          f"{med_bn['stock'] / med_bn['numbabn']:.2f}x")
    return med, med_bn


def per_call(rounds):
    """Stock vs numbabn per layer call; results checked first."""
    from numbabn import _backend
    from numbabn import functional as nbf

    fo = _backend.CPU.feature_ops
    routes = {"forced": _dispatch.NUMBABN}
    for shape, reps in (((4, 8, 4, 4), 2000), ((32, 64, 32, 32), 20)):
        c = shape[1]
        x = torch.randn(shape)
        dy = torch.randn(shape)
        layers = {"stock": nn.BatchNorm2d(c), "table": nbt.BatchNorm2d(c),
                  "forced": nbt.BatchNorm2d(c)}
        with torch.no_grad(), _dispatch.force(_dispatch.NUMBABN):
            y1, y2 = layers["stock"].eval()(x), layers["forced"].eval()(x)
        assert ((y1 - y2).abs().max() <= 1e-5 * y1.abs().max()).item(), "eval outputs differ"
        print(f"\n== per call, {shape}, float32 (best/median of {rounds} rounds, us; table: "
              f"the dispatch table's route, forced: numbabn's kernels) ==")
        for op in ("train", "backward", "eval"):
            print(f"  route of {op}: {nbt._tensors.route_of(x, op)}")

        def evals(bn):
            def run():
                with torch.no_grad():
                    bn.eval()(x)
            return run

        def evals_grad(bn):
            return lambda: bn.eval()(x)

        xr = x.clone().requires_grad_()

        def train(bn):
            def run():  # gradients reset: no accumulation into .grad (an add of x's size)
                xr.grad = bn.weight.grad = bn.bias.grad = None
                bn.train()(xr).backward(dy)
            return run

        layer = {}
        for what, make in (("eval, no_grad", evals), ("eval, grad enabled", evals_grad),
                           ("train fwd+bwd", train)):
            fns = {name: make(bn) for name, bn in layers.items()}
            for name, fn in fns.items():
                with _dispatch.force(routes.get(name)):
                    fn()
            med, times = interleave(fns, rounds, reps, routes)
            best = {name: min(v) for name, v in times.items()}
            layer[what] = best["forced"]
            print(f"  {what:20s} " + "  ".join(
                f"{name} {best[name] * 1e3:7.1f}/{med[name] * 1e3:7.1f}" + (
                    "" if name == "stock" else
                    f" (+{(best[name] - best['stock']) * 1e3:.1f}/"
                    f"+{(med[name] - med['stock']) * 1e3:.1f})") for name in fns))
        if shape[0] == 32:
            # the kernels alone, on NumPy views, as the layer calls them: into
            # fresh outputs from numbabn's allocator (the layer's, from 4 MiB)
            import numbabn.torch._tensors as nbtt

            xa = x.numpy()
            nbf.batch_norm_train(xa)  # the functional API remembers x's layout
            plan = nbf._plan_of(xa, 1)
            w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
            rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
            dya = dy.numpy()
            mean, invstd, _ = fo.batch_norm_train(plan.view(xa), w, b, 1e-5,
                                                  plan.view(np.empty_like(xa)))

            def kernel_eval():
                y3, _ = plan.empty(xa.dtype)
                with _backend.CPU.guard(xa):
                    fo.normalize(plan.view(xa), rm, rv, w, b, 1e-5, y3)

            def kernel_train():
                y3, _ = plan.empty(xa.dtype)
                dx3, _ = plan.empty(xa.dtype)
                with _backend.CPU.guard(xa):
                    _, _, var = fo.batch_norm_train(plan.view(xa), w, b, 1e-5, y3)
                    fo.update_running_stats(rm, rv, mean, var, xa.size // c, 0.1)
                    fo.batch_norm_backward(plan.view(dya), plan.view(xa), mean, invstd, w, dx3)

            nbtt.follow_torch_threads(xa.size)
            _, times = interleave({"eval": kernel_eval, "train": kernel_train}, rounds, reps)
            best = {name: min(v) for name, v in times.items()}
            print(f"  kernels alone (best): eval {best['eval'] * 1e3:.1f} (forced layer/kernel "
                  f"{layer['eval, no_grad'] / best['eval']:.2f}), train fwd+bwd with the running "
                  f"statistics {best['train'] * 1e3:.1f} (forced layer/kernel "
                  f"{layer['train fwd+bwd'] / best['train']:.2f})")


CROSSOVER_SHAPES = ((4, 8, 4, 4), (8, 16, 8, 8), (16, 32, 8, 8), (32, 32, 8, 8), (32, 64, 8, 8),
                    (16, 32, 16, 16), (32, 64, 16, 16), (32, 16, 32, 32))


def crossover(rounds):
    """numbabn's route (forced) against stock, per layer call, on small and
    mid-size inputs: where the first row of the dispatch table comes from."""
    print(f"\n== numbabn's route vs stock per layer call (best of {rounds} rounds, us; x: "
          f"stock's time over numbabn's) ==")
    for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
        for shape in CROSSOVER_SHAPES:
            c = shape[1]
            x = torch.randn(shape).contiguous(memory_format=fmt)
            dy = torch.randn(shape).contiguous(memory_format=fmt)
            xr = x.clone().requires_grad_()
            reps = max(10, int(2000 / (1 + x.numel() / 8192)))
            row = []
            for what in ("eval", "train"):
                def make(bn, what=what):
                    if what == "eval":
                        bn.eval()

                        def run():
                            with torch.no_grad():
                                bn(x)
                        return run
                    bn.train()
                    return lambda: bn(xr).backward(dy)

                fns = {"stock": make(nn.BatchNorm2d(c)), "numbabn": make(nbt.BatchNorm2d(c))}
                routes = {"numbabn": _dispatch.NUMBABN}
                for name, fn in fns.items():
                    with _dispatch.force(routes.get(name)):
                        fn()
                _, times = interleave(fns, rounds, reps, routes)
                best = {name: min(v) for name, v in times.items()}
                row.append(f"{what} stock {best['stock'] * 1e3:8.1f} numbabn "
                           f"{best['numbabn'] * 1e3:8.1f} ({best['stock'] / best['numbabn']:.2f}x)")
            print(f"  {fmt_name} {str(shape):18s} {x.numel():7d} values  " + "   ".join(row),
                  flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-format", choices=["nchw", "channels_last", "both"], default="both")
    ap.add_argument("--per-call", action="store_true", help="time single layer calls instead")
    ap.add_argument("--crossover", action="store_true",
                    help="numbabn's route vs stock on small and mid-size inputs")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="thread CPU time (default for --per-call and --crossover) or wall time")
    args = ap.parse_args()
    clock = args.clock or ("cpu" if args.per_call or args.crossover else "wall")
    CLOCK[0] = time.thread_time if clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)  # numbabn.torch's layers follow it
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba "
          f"{numba.__version__} ({numba.get_num_threads()} threads); "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    print(f"clock: {clock}")
    if args.per_call:
        per_call(args.rounds)
        return
    if args.crossover:
        crossover(args.rounds)
        return
    fmts = ["nchw", "channels_last"] if args.memory_format == "both" else [args.memory_format]
    for fmt in fmts:
        bench(fmt, args.rounds, args.steps)
    print(f"\nnumba threading layer: {numba.threading_layer()}")


if __name__ == "__main__":
    main()
