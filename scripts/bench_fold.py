"""Inference with batch norm folded away: the trained cnn on the 10k MNIST test images.

    PYTHONPATH=. python scripts/bench_fold.py --checkpoint runs/mnist-cnn/checkpoint.npz

Loads a checkpoint written by ``numbabn-mnist``, checks that the folded model's
logits equal the original eval-mode model's (max relative difference) and that
both classify the test images alike, then times both over the 10k test images
(batches of 500, rounds interleaved) and prints the medians and the speed-up.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from numbabn.mnist.checkpoint import load_checkpoint
from numbabn.mnist.data import load_mnist
from numbabn.kit import fold_batchnorm
from numbabn.mnist.models import mnist_cnn
from numbabn.mnist.train import EVAL_BATCH, prepare_images
def logits(model, images):
    return np.concatenate([model.forward(images[i:i + EVAL_BATCH])
                           for i in range(0, len(images), EVAL_BATCH)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a numbabn-mnist checkpoint (cnn model)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    arrays, _ = load_checkpoint(args.checkpoint)
    model = mnist_cnn(np.random.default_rng(0))
    model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
    model.eval()
    _, _, x_test, y_test = load_mnist(download=False)
    images = prepare_images(x_test)

    folded = fold_batchnorm(model)
    print("\n".join(folded.fold_report))
    ref, got = logits(model, images), logits(folded, images)
    rel = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    acc_ref = np.mean(ref.argmax(1) == y_test)
    acc_fold = np.mean(got.argmax(1) == y_test)
    print(f"logits max relative difference {rel:.2e}; accuracy {acc_ref:.4%} unfolded, "
          f"{acc_fold:.4%} folded; {np.sum(ref.argmax(1) != got.argmax(1))} predictions differ")

    times = {"unfolded": [], "folded": []}
    for _ in range(args.rounds):
        for name, m in (("unfolded", model), ("folded", folded)):
            start = time.perf_counter()
            logits(m, images)
            times[name].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:9s} median {med[k] * 1e3:7.1f} ms for 10k images "
              f"(range {min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}), {len(images) / med[k]:.0f} img/s")
    print(f"speed-up {med['unfolded'] / med['folded']:.3f}x")


if __name__ == "__main__":
    main()
