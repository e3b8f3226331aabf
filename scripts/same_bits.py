"""Digest of every kernel's output, to show that a change moved code without changing bits.

    python scripts/same_bits.py --save before.json      # on the old tree
    python scripts/same_bits.py --check before.json     # on the new tree (exit 1 on a difference)

Covers every public function of :mod:`numbabn` (float32 and float64, NCHW and
channels-last, the split primitives, the fused BN+ReLU, the family), the layer
kit (Conv2d on the direct-tile and the im2col path, Linear, pooling, ReLU,
Dropout, the losses and optimizers) and the MNIST trainer (a few steps of the
cnn and the mlp from a fixed seed).  Digests depend on the CPU's instruction
set, so compare runs on one machine (and one ``NUMBA_CPU_NAME``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

import numbabn as nb


def _digest(value) -> str:
    h = hashlib.sha256()
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if v is None:
            h.update(b"None")
            continue
        a = np.ascontiguousarray(np.asarray(v))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _family_cases(out):
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        tag = np.dtype(dtype).name
        # batch norm, NCHW and channels-last, with a large mean
        for layout, shape in (("nchw", (8, 16, 9, 7)), ("nhwc", (8, 9, 7, 16)), ("nc", (300, 24))):
            x = (rng.standard_normal(shape) * 0.5 + 3.0).astype(dtype)
            axis = 3 if layout == "nhwc" else 1
            C = shape[axis]
            w = rng.standard_normal(C).astype(dtype)
            b = rng.standard_normal(C).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            key = f"{tag}/{layout}"
            y, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
            out[f"batch_norm_train/{key}"] = _digest((y, mean, invstd))
            out[f"batch_norm_backward/{key}"] = _digest(nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis))
            out[f"batch_stats/{key}"] = _digest(nb.batch_stats(x, axis=axis))
            moments = nb.batch_moments(x, axis=axis)
            out[f"batch_moments/{key}"] = _digest(moments)
            counts = np.array([7, 11])
            out[f"merge_moments/{key}"] = _digest(nb.merge_moments(
                counts, np.stack([mean, mean + 1]).astype(np.float64), np.stack([invstd, invstd * 2]).astype(np.float64)))
            var = (rng.random(C) + 0.5).astype(dtype)
            out[f"normalize/{key}"] = _digest(nb.normalize(x, mean, var, w, b, axis=axis))
            out[f"batch_norm_elemt/{key}"] = _digest(nb.batch_norm_elemt(x, mean, invstd, w, b, axis=axis))
            red = nb.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
            out[f"batch_norm_backward_reduce/{key}"] = _digest(red)
            n = x.size // C
            out[f"batch_norm_backward_elemt/{key}"] = _digest(nb.batch_norm_backward_elemt(
                dy, x, mean, invstd, w, red[0], red[1], n, axis=axis))
            yr, mr, ir = nb.batch_norm_relu_train(x, w, b, axis=axis)
            out[f"batch_norm_relu_train/{key}"] = _digest((yr, mr, ir))
            out[f"batch_norm_relu_backward/{key}"] = _digest(nb.batch_norm_relu_backward(dy, yr, x, mr, ir, w, axis=axis))
            rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
            out[f"batch_norm/train/{key}"] = _digest((nb.batch_norm(x, rm, rv, w, b, training=True, axis=axis), rm, rv))
            out[f"batch_norm/eval/{key}"] = _digest(nb.batch_norm(x, rm, rv, w, b, axis=axis))
            rm2, rv2 = rm.copy(), rv.copy()
            nb.update_running_stats(rm2, rv2, mean, var, n)
            out[f"update_running_stats/{key}"] = _digest((rm2, rv2))
        # the family
        x = (rng.standard_normal((6, 8, 5, 12)) * 0.3 + 2.0).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        ws = rng.standard_normal((5, 12)).astype(dtype)
        bs = rng.standard_normal((5, 12)).astype(dtype)
        out[f"layer_norm/{tag}"] = _digest(nb.layer_norm(x, (5, 12), ws, bs))
        y, m, r = nb.layer_norm_train(x, (5, 12), ws, bs)
        out[f"layer_norm_train/{tag}"] = _digest((y, m, r))
        out[f"layer_norm_backward/{tag}"] = _digest(nb.layer_norm_backward(dy, x, m, r, (5, 12), ws))
        wc, bc = rng.standard_normal(8).astype(dtype), rng.standard_normal(8).astype(dtype)
        out[f"group_norm/{tag}"] = _digest(nb.group_norm(x, 4, wc, bc))
        y, m, r = nb.group_norm_train(x, 4, wc, bc)
        out[f"group_norm_train/{tag}"] = _digest((y, m, r))
        out[f"group_norm_backward/{tag}"] = _digest(nb.group_norm_backward(dy, x, m, r, 4, wc))
        out[f"instance_norm/{tag}"] = _digest(nb.instance_norm(x, None, None, wc, bc))
        y, m, r = nb.instance_norm_train(x, wc, bc)
        out[f"instance_norm_train/{tag}"] = _digest((y, m, r))
        out[f"instance_norm_backward/{tag}"] = _digest(nb.instance_norm_backward(dy, x, m, r, wc))
        out[f"rms_norm/{tag}"] = _digest(nb.rms_norm(x, (5, 12), ws))
        y, r = nb.rms_norm_train(x, (5, 12), ws)
        out[f"rms_norm_train/{tag}"] = _digest((y, r))
        out[f"rms_norm_backward/{tag}"] = _digest(nb.rms_norm_backward(dy, x, r, (5, 12), ws))
        xl = (rng.standard_normal((64, 768)) + 1.0).astype(dtype)
        wl = rng.standard_normal(768).astype(dtype)
        y, m, r = nb.layer_norm_train(xl, (768,), wl, wl)
        out[f"layer_norm_train/wide/{tag}"] = _digest((y, m, r))
        out[f"layer_norm_backward/wide/{tag}"] = _digest(nb.layer_norm_backward(xl, xl, m, r, (768,), wl))


def _kit():
    """The layer kit's modules, wherever this tree keeps them."""
    try:
        from numbabn import kit as layers  # the three-layer tree
        from numbabn.kit import losses, optim
    except ImportError:
        from numbabn import layers, losses, optim
    return layers, losses, optim


def _kit_cases(out):
    layers, losses, optim = _kit()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 16, 14, 14)).astype(np.float32)
    for co in (32, 24):  # 32: direct tiles where the host allows them; 24: im2col + BLAS
        conv = layers.Conv2d(16, co, 3, padding=1, rng=3)
        conv.train()
        y = conv.forward(x)
        dx = conv.backward(np.ones_like(y) * 0.5 + y)
        out[f"conv2d/{co}"] = _digest((y, dx, *conv.grads))
    lin = layers.Linear(64, 32, rng=4)
    xl = rng.standard_normal((40, 64)).astype(np.float32)
    y = lin.forward(xl)
    out["linear"] = _digest((y, lin.backward(y), *lin.grads))
    pool = layers.MaxPool2d(2)
    y = pool.forward(x)
    out["maxpool"] = _digest((y, pool.backward(y)))
    relu = layers.ReLU()
    y = relu.forward(x - 0.1)
    out["relu"] = _digest((y, relu.backward(x)))
    drop = layers.Dropout(0.3, rng=5)
    drop.train()
    y = drop.forward(x)
    out["dropout"] = _digest((y, drop.backward(x)))
    logits = rng.standard_normal((32, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    out["cross_entropy"] = _digest(losses.cross_entropy(logits, labels))
    for name, make in (("sgd", lambda p: optim.SGD(p, lr=0.1, momentum=0.9)), ("adam", lambda p: optim.Adam(p, lr=0.01))):
        params = {k: rng.standard_normal(s).astype(np.float32) for k, s in (("a", (50,)), ("b", (20, 30)))}
        grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
        opt = make(params)
        for _ in range(3):
            opt.step(grads)
        out[f"optim/{name}"] = _digest([params[k] for k in sorted(params)])


def _trainer_cases(out):
    try:
        from numbabn.mnist import data, train as T
    except ImportError:
        from numbabn import data, train as T
    images = data.load_mnist()
    for model in ("cnn", "mlp"):
        cfg = T.TrainConfig(model=model, limit_train=512, seed=7)
        trainer = T.Trainer(cfg, images, out_dir="/tmp/same_bits_run", progress=False, log=lambda *a: None)
        record = trainer.train_epoch(0, 1)
        state = trainer.model.state_dict()
        out[f"trainer/{model}"] = _digest([record["train_loss"]] + [state[k] for k in sorted(state)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="JSON")
    group.add_argument("--check", metavar="JSON")
    args = parser.parse_args(argv)
    out = {}
    _family_cases(out)
    _kit_cases(out)
    _trainer_cases(out)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
        print(f"{len(out)} digests written to {args.save}")
        return 0
    with open(args.check) as f:
        ref = json.load(f)
    diff = sorted(k for k in ref.keys() | out.keys() if ref.get(k) != out.get(k))
    for k in diff:
        print(f"DIFFERENT {k}: {ref.get(k)} -> {out.get(k)}")
    print(f"{len(out) - len(diff)} of {len(ref.keys() | out.keys())} digests equal")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
