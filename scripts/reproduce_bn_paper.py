"""Reproduce Figure 1 of Ioffe & Szegedy (2015), "Batch Normalization", on MNIST.

A network of three fully connected hidden layers of 100 sigmoid units (the
``mlp`` model) is trained with and without batch norm before each nonlinearity,
with plain SGD on mini-batches of 60.  The figure shows (a) test accuracy
against training steps for both, and (b, c) the 15th, 50th and 85th percentiles
of the input to one sigmoid of the last hidden layer over training, without and
with batch norm.  The paper trains 50,000 steps; a few thousand show the effect.

    PYTHONPATH=. python scripts/reproduce_bn_paper.py --data-dir ../shared/data/mnist --steps 5000

Writes ``figure1.png`` and ``figure1.json`` to ``--out`` (default ``runs/bn_paper``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np

from numbabn.kit import Sigmoid
from numbabn.kit.losses import cross_entropy
from numbabn.kit.optim import SGD
from numbabn.mnist.models import bn_paper_mlp
from numbabn.mnist.train import epoch_batches, evaluate, prepare_images
PERCENTILES = (15, 50, 85)


def sigmoid_input(model, x, unit):
    """The input of sigmoid ``unit`` of the last hidden layer, for each image of ``x``."""
    last = max(i for i, layer in enumerate(model.layers) if isinstance(layer, Sigmoid))
    h = x
    for layer in model.layers[:last]:
        h = layer.forward(h)
    return h[:, unit]


def train_variant(batch_norm, data, args):
    train_x, train_y, test_x, test_y = data
    rng = np.random.default_rng(args.seed)
    model = bn_paper_mlp(rng, batch_norm=batch_norm, init_std=args.init_std)
    opt = SGD(model.params, lr=args.lr)
    probe = test_x[: args.probe_images]
    record = {"steps": [], "test_accuracy": [], "percentiles": []}

    def measure(step):
        record["steps"].append(step)
        record["test_accuracy"].append(evaluate(model, test_x, test_y)[1])
        model.eval()
        record["percentiles"].append(np.percentile(sigmoid_input(model, probe, args.unit), PERCENTILES).tolist())
        model.train()

    step, epoch = 0, 0
    measure(0)
    while step < args.steps:
        for idx in epoch_batches(len(train_y), args.batch_size, args.seed, epoch):
            _, dlogits = cross_entropy(model.forward(train_x[idx]), train_y[idx])
            model.backward(dlogits)
            opt.step(model.grads)
            step += 1
            if step % args.eval_every == 0:
                measure(step)
            if step == args.steps:
                break
        epoch += 1
    return record


def plot(results, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name, style in (("without BN", "--"), ("with BN", "-")):
        r = results[name]
        ax.plot(r["steps"], r["test_accuracy"], style, label=name)
    ax.set(title="(a) test accuracy", xlabel="training steps", ylabel="accuracy",
           ylim=(0.7, 1.0))   # the paper's range; the first evaluations lie below it
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    spans = [np.array(r["percentiles"]) for r in results.values()]
    ylim = (min(s.min() for s in spans), max(s.max() for s in spans))
    pad = 0.05 * (ylim[1] - ylim[0])
    for ax, (name, letter) in zip(axes[1:], (("without BN", "b"), ("with BN", "c"))):
        r = results[name]
        pct = np.array(r["percentiles"])
        for j, q in enumerate(PERCENTILES):
            ax.plot(r["steps"], pct[:, j], color="C0" if q == 50 else "C1", lw=2 if q == 50 else 1,
                    label=f"{q}th percentile")
        ax.set(title=f"({letter}) sigmoid input, {name}", xlabel="training steps",
               ylim=(ylim[0] - pad, ylim[1] + pad))
        ax.grid(alpha=0.3)
    axes[2].legend(loc="lower right", fontsize=8)
    axes[1].set_ylabel(f"input to sigmoid {args.unit} of the last hidden layer")
    fig.suptitle(f"MNIST, 3x100 sigmoid MLP, SGD lr {args.lr}, batch {args.batch_size} "
                 f"(Ioffe & Szegedy 2015, Fig. 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000, help="training steps per variant (paper: 50000)")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--init-std", type=float, default=1.0,
                        help="std of the Gaussian initial weights ('small random Gaussian values')")
    parser.add_argument("--unit", type=int, default=0, help="which last-hidden-layer sigmoid to follow")
    parser.add_argument("--probe-images", type=int, default=1000,
                        help="test images over which the sigmoid-input percentiles are taken")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default=os.path.join("runs", "bn_paper"))
    parser.add_argument("--threads", type=int, default=1,
                        help="numba threads (default 1: the arrays are small, so launching "
                             "threads costs more than it saves)")
    args = parser.parse_args(argv)

    from numbabn.mnist.data import load_mnist

    numba.set_num_threads(args.threads)
    train_x, train_y, test_x, test_y = load_mnist(data_dir=args.data_dir)
    data = (prepare_images(train_x), train_y.astype(np.int64), prepare_images(test_x), test_y.astype(np.int64))
    results = {}
    for name, bn in (("without BN", False), ("with BN", True)):
        start = time.perf_counter()
        results[name] = train_variant(bn, data, args)
        results[name]["seconds"] = time.perf_counter() - start
        acc = results[name]["test_accuracy"]
        print(f"{name}: test accuracy {acc[-1]:.4f} after {args.steps} steps "
              f"({results[name]['seconds']:.0f} s)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "figure1.json"), "w") as f:
        json.dump({"config": vars(args), "percentiles": PERCENTILES, "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "figure1.png"), args)
    print(f"wrote {args.out}/figure1.png and figure1.json")


if __name__ == "__main__":
    main()
