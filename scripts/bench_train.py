"""Time training steps of the ``cnn`` model: numbabn against PyTorch on the CPU.

Both frameworks train the same model (same weights, same batches, Adam lr 1e-3,
the same two Dropout layers).  Before timing, the two models' eval-mode losses
on one batch are checked to agree in this process (the same weights give the
same logits; dropout masks differ, so training losses cannot be compared).
Each timed round then runs in a fresh process of its own, as a user runs one
framework at a time: in one process, the thread pool of whichever framework ran
last keeps spinning into the other's steps (here numbabn lost 10% that way).
numbabn's round runs with the trainer's settings (``numbabn.train.cli``: quiet
thread pools), PyTorch's with its defaults and numba's thread count.  Rounds
alternate between the two so that load from other processes on the machine hits
both alike; the best and the median round are reported, in images per second.

    PYTHONPATH=. python scripts/bench_train.py --steps 20 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numba
import numpy as np

from numbabn._cpu.threads import prefer_passive_waiting
from numbabn.losses import cross_entropy
from numbabn.models import mnist_cnn
from numbabn.optim import Adam


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


def time_steps(step, batches):
    t0 = time.perf_counter()
    for x, y in batches:
        step(x, y)
    return time.perf_counter() - t0


def make_batches(batch_size, steps):
    rng = np.random.default_rng(0)
    return [(rng.random((batch_size, 1, 28, 28), dtype=np.float32),
             rng.integers(0, 10, batch_size).astype(np.int64)) for _ in range(steps)]


def worker(name, batch_size, steps):
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
    for x, y in batches[:3]:
        step(x, y)
    return steps * batch_size / time_steps(step, batches)


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


def run_round(name, args):
    env = dict(os.environ)
    if name == "numbabn":
        from numbabn.train import QUIET_THREAD_POOLS
        env = {**QUIET_THREAD_POOLS, **env}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} round failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="time numbabn only")
    parser.add_argument("--worker", choices=["numbabn", "pytorch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(worker(args.worker, args.batch_size, args.steps))
        return

    names = ["numbabn"]
    if not args.no_torch:
        check_same_model(args.batch_size)
        names.insert(0, "pytorch")
    rates = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rates[name].append(run_round(name, args))
    threads = numba.config.NUMBA_NUM_THREADS
    print(f"cnn training step, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds "
          f"(one process each), {threads} threads")
    print(f"{'':10s} {'best img/s':>11s} {'median img/s':>13s}")
    for name, r in rates.items():
        print(f"{name:10s} {max(r):11.0f} {statistics.median(r):13.0f}")
    if "pytorch" in rates:
        print(f"numbabn / pytorch (median): {statistics.median(rates['numbabn']) / statistics.median(rates['pytorch']):.2f}")


if __name__ == "__main__":
    main()
