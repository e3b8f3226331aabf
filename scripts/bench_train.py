"""Time training steps of the ``cnn`` model: numbabn against PyTorch on the CPU.

Both frameworks train the same model (same weights, same batches, Adam lr 1e-3,
the same two Dropout layers).  Before timing, the two models' eval-mode losses
on one batch are checked to agree in this process (the same weights give the
same logits; dropout masks differ, so training losses cannot be compared).
Each timed round then runs in a fresh process of its own, as a user runs one
framework at a time: in one process, the thread pool of whichever framework ran
last keeps spinning into the other's steps (here numbabn lost 10% that way).
numbabn's round runs with the trainer's settings (``numbabn.mnist.train.cli``: quiet
thread pools), PyTorch's with its defaults and numba's thread count.  Rounds
alternate between the two so that load from other processes on the machine hits
both alike; the best and the median round are reported, in images per second.

    PYTHONPATH=. python scripts/bench_train.py --steps 20 --rounds 5
    PYTHONPATH=. python -m benchmarks.avx2 python scripts/bench_train.py --steps 20 --rounds 5

The second line times AVX2 code on any x86 host: numbabn compiled for Haswell
with AVX-512 off (its own kernel cache), PyTorch and OpenBLAS pinned to AVX2.
``--both-paths`` adds numbabn on the path of convolutions and linear layers the
host does not choose (``numbabn-blas``: im2col + BLAS where the register tiles
run).  ``--threads N`` sets every thread pool of the rounds (Numba, OpenBLAS,
OpenMP, PyTorch); with ``--threads 1 --clock thread`` each round times its
thread's CPU time, which other jobs on a busy machine disturb less than wall time.

``--profile`` times each layer's forward and backward, the loss and the
optimizer instead (median ms over the steps, each framework in its own process
as above), side by side.  PyTorch's layers are timed one by one, each on a
detached input (its in-place ReLUs made out-of-place for that), so its figures
leave out autograd's bookkeeping between layers.

``--compile`` measures the cold compile instead: a fresh process with an empty
``NUMBA_CACHE_DIR`` runs two training steps, timing each layer's forward and
backward, the loss and the optimizer; a layer's first step less its second is
its compile time (seconds, wall and the calling thread's CPU), summed for the
layer kit (every layer but batch norm, the loss, Adam) and for batch norm.

    PYTHONPATH=. python scripts/bench_train.py --compile
    PYTHONPATH=. python -m benchmarks.avx2 python scripts/bench_train.py --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np

from numbabn._cpu.runtime import prefer_passive_waiting
from numbabn.kit.losses import cross_entropy
from numbabn.mnist.models import mnist_cnn
from numbabn.kit.optim import Adam


def numbabn_step(model, opt):
    def step(x, y):
        loss, dlogits = cross_entropy(model.forward(x), y)
        model.backward(dlogits, input_grad=False)
        opt.step(model.grads)
        return loss
    return step


def torch_model_like(model):
    import torch
    from torch import nn
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(32),
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(64),
        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(9216, 128), nn.ReLU(inplace=True), nn.BatchNorm1d(128), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return net


def torch_step(net):
    import torch
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        return loss.item()
    return step


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_steps(step, batches, clock=time.perf_counter):
    t0 = clock()
    for x, y in batches:
        step(x, y)
    return clock() - t0


def make_batches(batch_size, steps):
    rng = np.random.default_rng(0)
    return [(rng.random((batch_size, 1, 28, 28), dtype=np.float32),
             rng.integers(0, 10, batch_size).astype(np.int64)) for _ in range(steps)]


def worker(name, batch_size, steps, clock=time.perf_counter):
    """One timed round of ``name`` in this process: three warm-up steps
    (compilation, first allocations), then ``steps`` steps; returns images per second."""
    batches = make_batches(batch_size, steps)
    model = mnist_cnn(np.random.default_rng(1))
    if name == "pytorch":
        import torch
        torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        step = torch_step(torch_model_like(model))
    else:
        prefer_passive_waiting()
        step = numbabn_step(model, Adam(model.params, lr=1e-3))
    _force_path(name)
    for x, y in batches[:3]:
        step(x, y)
    return steps * batch_size / time_steps(step, batches, clock)


def _force_path(name):
    """``numbabn-blas``: every convolution and linear layer on im2col + BLAS;
    ``numbabn-tiles``: on the register tiles even where they do not fit the
    host (AVX2: each 16-float vector split in two, 24 accumulators spilling)."""
    if name == "numbabn-blas":
        from numbabn import _config
        _config.CONV_DIRECT = False
        _config.LINEAR_DIRECT_MIN_MACS = None
    elif name == "numbabn-tiles":
        from numbabn.kit._kernels import tiles
        tiles.DIRECT_CONV_CPU = True


def profile_numbabn(model, opt, batches, clock=time.perf_counter):
    """Per-layer times of numbabn's steps: {name: [seconds per step]}."""
    times = {}

    def timed(name, f, *args, **kwargs):
        t0 = clock()
        out = f(*args, **kwargs)
        times.setdefault(name, []).append(clock() - t0)
        return out

    first = next(i for i, layer in enumerate(model.layers) if layer.params)
    for x, y in batches:
        h = x
        for i, layer in enumerate(model.layers):
            h = timed(f"{i} {type(layer).__name__} fwd", layer.forward, h)
        _, d = timed("loss", cross_entropy, h, y)
        for i in range(len(model.layers) - 1, first - 1, -1):
            layer = model.layers[i]
            kwargs = {"input_grad": False} if i == first else {}
            d = timed(f"{i} {type(layer).__name__} bwd", layer.backward, d, **kwargs)
        timed("optimizer", opt.step, model.grads)
    return times


def profile_pytorch(net, batches, clock=time.perf_counter):
    """Per-layer times of PyTorch's steps, each layer on a detached input."""
    import torch
    for m in net:
        if hasattr(m, "inplace"):
            m.inplace = False
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = {}

    def record(name, t0):
        times.setdefault(name, []).append(clock() - t0)

    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        h = torch.from_numpy(x)
        ins, outs = [], []
        for i, m in enumerate(net):
            h_in = h.detach().requires_grad_(i > 0)
            t0 = clock()
            h = m(h_in)
            record(f"{i} {type(m).__name__} fwd", t0)
            ins.append(h_in)
            outs.append(h)
        t0 = clock()
        logits = h.detach().requires_grad_()
        loss = loss_fn(logits, torch.from_numpy(y))
        loss.backward()
        record("loss", t0)
        d = logits.grad
        for i in range(len(net) - 1, -1, -1):
            if i == 0 or list(net[i].parameters()) or outs[i].grad_fn is not None:
                t0 = clock()
                outs[i].backward(d)
                record(f"{i} {type(net[i]).__name__} bwd", t0)
                d = ins[i].grad
        t0 = clock()
        opt.step()
        record("optimizer", t0)
    return times


def profile_worker(name, batch_size, steps, clock=time.perf_counter):
    """Median ms per layer of ``steps`` steps after three warm-up steps: {layer: ms}."""
    batches = make_batches(batch_size, steps + 3)
    model = mnist_cnn(np.random.default_rng(1))
    if name == "pytorch":
        import torch
        torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        times = profile_pytorch(torch_model_like(model), batches, clock)
    else:
        prefer_passive_waiting()
        _force_path(name)
        times = profile_numbabn(model, Adam(model.params, lr=1e-3), batches, clock)
    return {k: 1e3 * statistics.median(v[3:]) for k, v in times.items()}


def compile_worker(batch_size):
    """Seconds of each layer's first step beyond its second, wall and CPU (this
    process must start with an empty kernel cache): {"wall": {...}, "cpu": {...}}."""
    model = mnist_cnn(np.random.default_rng(1))
    prefer_passive_waiting()
    both = lambda: np.array([time.perf_counter(), time.thread_time()])  # noqa: E731
    times = profile_numbabn(model, Adam(model.params, lr=1e-3), make_batches(batch_size, 2), both)
    return {kind: {k: float(v[0][i] - v[1][i]) for k, v in times.items()}
            for i, kind in enumerate(("wall", "cpu"))}


def print_compile(args):
    """Cold compile seconds of the step's kernels, by layer, in a process with an
    empty ``NUMBA_CACHE_DIR`` (the trainer's settings)."""
    from numbabn.mnist.cli import QUIET_THREAD_POOLS
    with tempfile.TemporaryDirectory(prefix="numbabn-cold-") as cache:
        env = {**QUIET_THREAD_POOLS, **os.environ, "NUMBA_CACHE_DIR": cache}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "numbabn", "--compile",
               "--batch-size", str(args.batch_size)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        total = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"compile round failed:\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    wall, cpu = result["wall"], result["cpu"]
    print(f"cold compile of the cnn step (empty NUMBA_CACHE_DIR, LLVM target "
          f"{numba.config.CPU_NAME or 'host'}): seconds of each first step beyond the second")
    print(f"{'':24s}{'wall':>8s}{'cpu':>8s}")
    for key in wall:
        if wall[key] > 0.05:
            print(f"{key:24s}{wall[key]:8.2f}{cpu[key]:8.2f}")
    is_bn = lambda k: "BatchNorm" in k  # noqa: E731
    for label, keep in (("layer kit", lambda k: not is_bn(k)), ("batch norm", is_bn)):
        print(f"{label:24s}{sum(v for k, v in wall.items() if keep(k)):8.2f}"
              f"{sum(v for k, v in cpu.items() if keep(k)):8.2f}")
    print(f"{'process in all':24s}{total:8.2f}")


def _other_path():
    """The path of convolutions and linear layers that this host does not choose."""
    from numbabn.kit._kernels import tiles
    return "numbabn-blas" if tiles.DIRECT_CONV_CPU else "numbabn-tiles"


def print_profile(args):
    """Per-layer medians of each framework's rounds (alternating, one process each)."""
    names = ["numbabn"] + ([_other_path()] if args.both_paths else [])
    if not args.no_torch:
        names.insert(0, "pytorch")
    rounds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rounds[name].append(run_round(name, args, profile=True))
    results = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}
    order = sorted({k for r in results.values() for k in r},
                   key=lambda k: (int(k.split()[0]) if k[0].isdigit() else 99, k.endswith("bwd"), k))
    print(f"cnn training step, batch {args.batch_size}: ms per layer, median over {args.steps} steps "
          f"then over {args.rounds} rounds, {_threads(args)} threads, {args.clock} clock")
    print(f"{'':24s}" + "".join(f"{name:>14s}" for name in names))
    for key in order:
        print(f"{key:24s}" + "".join(f"{results[n].get(key, float('nan')):14.2f}" for n in names))
    print(f"{'sum':24s}" + "".join(f"{sum(results[n].values()):14.1f}" for n in names))


def check_same_model(batch_size):
    """Same weights, same batch, eval mode: both frameworks give the same loss."""
    import torch
    x0, y0 = make_batches(batch_size, 1)[0]
    model = mnist_cnn(np.random.default_rng(1))
    net = torch_model_like(model).eval()
    ours = cross_entropy(model.eval().forward(x0), y0)[0]
    with torch.no_grad():
        theirs = torch.nn.functional.cross_entropy(net(torch.from_numpy(x0)), torch.from_numpy(y0)).item()
    if abs(theirs - ours) > 1e-4 * max(1.0, theirs):
        raise SystemExit(f"eval-mode losses differ: numbabn {ours}, pytorch {theirs}")
    print(f"eval-mode loss before training: numbabn {ours:.6f}, pytorch {theirs:.6f}")


def run_round(name, args, profile=False):
    env = dict(os.environ)
    if args.threads:
        env.update({k: str(args.threads) for k in THREAD_VARIABLES})
    if name.startswith("numbabn"):
        from numbabn.mnist.cli import QUIET_THREAD_POOLS
        env = {**QUIET_THREAD_POOLS, **env}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--clock", args.clock,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    if profile:
        cmd.append("--profile")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} round failed:\n{done.stderr}")
    if profile:
        return json.loads(done.stdout.splitlines()[-1])
    return float(done.stdout.split()[-1])


# Every thread pool of a round: Numba's, OpenBLAS's, OpenMP's (PyTorch's follows Numba's).
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def _threads(args):
    return args.threads or numba.config.NUMBA_NUM_THREADS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="time numbabn only")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every pool in the rounds (Numba, OpenBLAS, OpenMP, PyTorch); "
                             "default: Numba's default")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="'thread': the calling thread's CPU time, which other jobs on a busy "
                             "machine disturb less than wall time (needs --threads 1)")
    parser.add_argument("--profile", action="store_true",
                        help="time each layer's forward and backward, the loss and the optimizer")
    parser.add_argument("--compile", action="store_true",
                        help="cold compile seconds of numbabn's step, by layer (empty kernel cache)")
    parser.add_argument("--both-paths", action="store_true",
                        help="also time numbabn on the path of convolutions and linear layers the "
                             "host does not choose: im2col + BLAS (numbabn-blas) where the register "
                             "tiles are chosen, the tiles (numbabn-tiles) where they are not")
    parser.add_argument("--worker", choices=["numbabn", "numbabn-blas", "numbabn-tiles", "pytorch"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1 and not args.worker:
        parser.error("--clock thread times the calling thread only: use it with --threads 1")
    clock = CLOCKS[args.clock]
    if args.worker:
        if args.compile:
            print(json.dumps(compile_worker(args.batch_size)))
        elif args.profile:
            print(json.dumps(profile_worker(args.worker, args.batch_size, args.steps, clock)))
        else:
            print(worker(args.worker, args.batch_size, args.steps, clock))
        return
    if args.profile:
        print_profile(args)
        return
    if args.compile:
        print_compile(args)
        return

    from numbabn.kit._kernels import tiles
    names = ["numbabn"] + ([_other_path()] if args.both_paths else [])
    if not args.no_torch:
        check_same_model(args.batch_size)
        names.insert(0, "pytorch")
    rates = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rates[name].append(run_round(name, args))
    print(f"cnn training step, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds "
          f"(one process each), {_threads(args)} threads, {args.clock} clock")
    from benchmarks.cases import machine
    info = machine()
    print(f"{info['cpu']} (LLVM target {info['llvm_cpu']}, NUMBA_CPU_FEATURES="
          f"{'host' if info['numba_cpu_features'] is None else 'set'}), register tiles: "
          f"{f'{tiles.LANES} lanes' if info['register_tiles'] else 'off'}")
    print(f"{'':13s} {'best img/s':>11s} {'median img/s':>13s}   rounds")
    for name, r in rates.items():
        print(f"{name:13s} {max(r):11.0f} {statistics.median(r):13.0f}   {' '.join(f'{v:.0f}' for v in r)}")
    if "pytorch" in rates:
        print(f"numbabn / pytorch (median): {statistics.median(rates['numbabn']) / statistics.median(rates['pytorch']):.2f}")


if __name__ == "__main__":
    main()
