"""Cross-check against PyTorch (skipped when torch is not installed)."""

import numpy as np
import pytest

import numbabn as nb
from conftest import make_array, vector

torch = pytest.importorskip("torch")
F = torch.nn.functional

REL = {np.float32: 2e-5, np.float64: 1e-11}

# (shape, axis): dense, NCHW, NHWC (channels-last, axis=-1), 3-D, 5-D.
CASES = [((64, 17), 1), ((8, 6, 9, 11), 1), ((8, 9, 11, 6), -1), ((16, 5, 23), 1), ((2, 3, 4, 5, 6), 1)]


def _rel(a, ref):
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    return np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-300)


def _to_torch(a, axis):
    """Torch wants features on dim 1."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))


def _from_torch(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_training_forward_backward_and_running_stats(rng, dtype, shape, axis):
    x = make_array(rng, shape, dtype, "c", axis, loc=2.0)
    dy = make_array(rng, shape, dtype, "c", axis)
    c = shape[axis]
    w, b = vector(rng, c, dtype, 0.5, 1.5), vector(rng, c, dtype)
    rm, rv = vector(rng, c, dtype), vector(rng, c, dtype, 0.5, 2)

    tx = _to_torch(x, axis).requires_grad_()
    tw = torch.from_numpy(w.copy()).requires_grad_()
    tb = torch.from_numpy(b.copy()).requires_grad_()
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    ty = F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1, eps=1e-5)
    (ty * _to_torch(dy, axis)).sum().backward()

    y = nb.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5, axis=axis)
    tol = REL[dtype]
    assert _rel(y, _from_torch(ty, axis)) <= tol
    assert _rel(rm, trm.numpy()) <= tol
    assert _rel(rv, trv.numpy()) <= tol

    _, mean, invstd = nb.batch_norm_train(x, w, b, axis=axis)
    _, tmean, tinvstd = torch.ops.aten.native_batch_norm(
        _to_torch(x, axis), None, None, None, None, True, 0.1, 1e-5)
    assert _rel(mean, tmean.numpy()) <= tol
    assert _rel(invstd, tinvstd.numpy()) <= tol

    dx, dw, db = nb.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    assert _rel(dx, _from_torch(tx.grad, axis)) <= tol
    assert _rel(dw, tw.grad.numpy()) <= tol
    assert _rel(db, tb.grad.numpy()) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_eval_mode(rng, dtype, shape, axis):
    x = make_array(rng, shape, dtype, "c", axis)
    c = shape[axis]
    w, b = vector(rng, c, dtype), vector(rng, c, dtype)
    rm, rv = vector(rng, c, dtype), vector(rng, c, dtype, 0.5, 2)
    ty = F.batch_norm(_to_torch(x, axis), torch.from_numpy(rm), torch.from_numpy(rv),
                      torch.from_numpy(w), torch.from_numpy(b), training=False, eps=1e-5)
    y = nb.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    assert _rel(y, _from_torch(ty, axis)) <= REL[dtype]
