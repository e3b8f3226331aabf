"""Accuracy of numbabn and PyTorch against a float64 computation on the same values.

Prints two tables:

1. agreement with PyTorch on ordinary random data (the core issue's acceptance
   check: float32 relative error <= 2e-5, float64 <= 1e-11) for outputs, running
   statistics, dx, dweight and dbias across dense, NCHW, NHWC and 3-D inputs;
2. hard numerics (large mean and tiny spread, huge and tiny magnitudes): the
   relative error of y and dx for numbabn and for PyTorch, both measured against
   float64 on the same float32 values.

Usage: ``python scripts/accuracy_report.py``  (PyTorch required).
"""

import numpy as np

import numbabn as nb

try:
    import torch
except ImportError:  # pragma: no cover
    raise SystemExit("PyTorch is required: pip install torch==2.13.0")

F = torch.nn.functional
CASES = [("dense (N,C)", (256, 64), 1), ("NCHW", (16, 8, 14, 14), 1),
         ("NHWC axis=-1", (16, 14, 14, 8), -1), ("3-D (N,C,L)", (32, 12, 50), 1)]


def rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def torch_train(x, dy, w, b, rm, rv, axis):
    """PyTorch training step with features on dim 1; results moved back to ``axis``."""
    tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1))).requires_grad_()
    tw = torch.from_numpy(w.copy()).requires_grad_()
    tb = torch.from_numpy(b.copy()).requires_grad_()
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    ty = F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1, eps=1e-5)
    (ty * torch.from_numpy(np.ascontiguousarray(np.moveaxis(dy, axis, 1)))).sum().backward()
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, axis)  # noqa: E731
    return dict(y=back(ty), running_mean=trm.numpy(), running_var=trv.numpy(),
                dx=back(tx.grad), dweight=tw.grad.numpy(), dbias=tb.grad.numpy())


def numbabn_train(x, dy, w, b, rm, rv, axis):
    rm, rv = rm.copy(), rv.copy()
    y = nb.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5, axis=axis)
    _, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    return dict(y=y, running_mean=rm, running_var=rv, dx=dx, dweight=dw, dbias=db)


def agreement_table(rng):
    print("Agreement with PyTorch (max |a - b| / max |b|), random data")
    keys = ["y", "running_mean", "running_var", "dx", "dweight", "dbias"]
    print(f"{'case':<14}{'dtype':<9}" + "".join(f"{k:>14}" for k in keys))
    for dtype in (np.float32, np.float64):
        for name, shape, axis in CASES:
            c = shape[axis]
            x = (1 + 2 * rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w, b = rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)
            rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
            ours = numbabn_train(x, dy, w, b, rm, rv, axis)
            theirs = torch_train(x, dy, w, b, rm, rv, axis)
            row = "".join(f"{rel(ours[k], theirs[k]):>14.2e}" for k in keys)
            print(f"{name:<14}{np.dtype(dtype).name:<9}{row}")


def naive_train_backward(x, dy, axis):
    """float64 reference on the same values (features moved to the last axis)."""
    xs = np.moveaxis(x.astype(np.float64), axis, -1)
    g = np.moveaxis(dy.astype(np.float64), axis, -1)
    red = tuple(range(xs.ndim - 1))
    mean, var = xs.mean(axis=red), xs.var(axis=red)
    invstd = 1 / np.sqrt(var + 1e-5)
    xhat = (xs - mean) * invstd
    dx = invstd * (g - g.mean(axis=red) - xhat * (g * xhat).mean(axis=red))
    return np.moveaxis(xhat, -1, axis), np.moveaxis(dx, -1, axis)


def hard_numerics_table(rng):
    print("\nHard numerics, float32: relative error against float64 on the same values")
    print(f"{'data':<28}{'numbabn y':>12}{'torch y':>12}{'numbabn dx':>12}{'torch dx':>12}")
    shape = (64, 8, 16, 16)
    for label, make in [
        ("1e4 + 1e-2 * randn", lambda: 1e4 + 1e-2 * rng.standard_normal(shape)),
        ("1e6 + randn", lambda: 1e6 + rng.standard_normal(shape)),
        ("1e30 * randn", lambda: 1e30 * rng.standard_normal(shape)),
        ("1e-30 * randn", lambda: 1e-30 * rng.standard_normal(shape)),
    ]:
        x = make().astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        ry, rdx = naive_train_backward(x, dy, 1)
        y, mean, invstd = nb.batch_norm_train(x)
        dx, _, _ = nb.batch_norm_backward(dy, x, mean, invstd)
        tx = torch.from_numpy(x).requires_grad_()
        ty = F.batch_norm(tx, None, None, training=True, eps=1e-5)
        (ty * torch.from_numpy(dy)).sum().backward()
        print(f"{label:<28}{rel(y, ry):>12.2e}{rel(ty.detach().numpy(), ry):>12.2e}"
              f"{rel(dx, rdx):>12.2e}{rel(tx.grad.numpy(), rdx):>12.2e}")


def main():
    torch.set_num_threads(2)
    rng = np.random.default_rng(2026)
    agreement_table(rng)
    hard_numerics_table(rng)


if __name__ == "__main__":
    main()
