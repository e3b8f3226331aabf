"""Time training steps of the ``cnn`` model: numbabn against PyTorch on the CPU.

Both frameworks train the same model (same weights, same batches, Adam lr 1e-3,
the same two Dropout layers) in one process, with PyTorch limited to numba's
thread count and numba's workers waiting passively, as in the trainer.  Before
timing, the two models' eval-mode losses on one batch are checked to agree (the
same weights give the same logits; dropout masks differ, so training losses
cannot be compared).  Rounds alternate between the two so that
load from other processes on the machine hits both alike; the best and the
median round are reported, in images per second.

    PYTHONPATH=. python scripts/bench_train.py --steps 20 --rounds 3
"""

from __future__ import annotations

import os

# As the trainer (numbabn.train.cli): NumPy's OpenBLAS workers sleep right after
# a GEMM instead of spinning against Numba's.  Read once, when NumPy loads
# OpenBLAS, so it is set before the imports; PyTorch's BLAS (MKL) ignores it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

from numbabn._cpu.threads import prefer_passive_waiting  # noqa: E402
from numbabn.losses import cross_entropy  # noqa: E402
from numbabn.models import mnist_cnn  # noqa: E402
from numbabn.optim import Adam  # noqa: E402


def numbabn_step(model, opt):
    def step(x, y):
        loss, dlogits = cross_entropy(model.forward(x), y)
        model.backward(dlogits)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="time numbabn only")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    batches = [(rng.random((args.batch_size, 1, 28, 28), dtype=np.float32),
                rng.integers(0, 10, args.batch_size).astype(np.int64)) for _ in range(args.steps)]
    model = mnist_cnn(np.random.default_rng(1))
    runners = {}
    if not args.no_torch:
        import torch
        torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        net = torch_model_like(model)
        runners["pytorch"] = torch_step(net)
    # As the trainer does: numba's idle workers sleep rather than spin against the
    # BLAS threads.  PyTorch's OpenMP runtime was loaded (and read its settings)
    # at `import torch` above, so this leaves PyTorch as it is.
    prefer_passive_waiting()
    runners["numbabn"] = numbabn_step(model, Adam(model.params, lr=1e-3))

    # Validate before timing: same weights, same batch, eval mode -> the same loss.
    x0, y0 = batches[0]
    losses = {"numbabn": cross_entropy(model.eval().forward(x0), y0)[0]}
    model.train()
    if not args.no_torch:
        net.eval()
        with torch.no_grad():
            losses["pytorch"] = torch.nn.functional.cross_entropy(
                net(torch.from_numpy(x0)), torch.from_numpy(y0)).item()
        net.train()
        if abs(losses["pytorch"] - losses["numbabn"]) > 1e-4 * max(1.0, losses["pytorch"]):
            raise SystemExit(f"eval-mode losses differ: {losses}")
    print("eval-mode loss before training: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    for step in runners.values():  # one warm-up step each (compilation, allocations)
        step(*batches[0])

    rates = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, step in runners.items():
            rates[name].append(args.steps * args.batch_size / time_steps(step, batches))
    threads = numba.config.NUMBA_NUM_THREADS
    print(f"cnn training step, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, "
          f"{threads} threads")
    print(f"{'':10s} {'best img/s':>11s} {'median img/s':>13s}")
    for name, r in rates.items():
        print(f"{name:10s} {max(r):11.0f} {statistics.median(r):13.0f}")
    if "pytorch" in rates:
        print(f"numbabn / pytorch (median): {statistics.median(rates['numbabn']) / statistics.median(rates['pytorch']):.2f}")


if __name__ == "__main__":
    main()
