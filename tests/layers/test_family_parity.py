"""The normalization family's layers (LayerNorm, GroupNorm, InstanceNorm1d/2d/3d,
RMSNorm) against PyTorch 2.13's: the constructors' signatures, every combination
of their arguments over training and eval steps, empty batches and empty axes."""

import inspect
import itertools

import numpy as np
import pytest

from conftest import assert_close
from numbabn import layers as L

torch = pytest.importorskip("torch")

FAMILY = ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
          "RMSNorm"]
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


@pytest.mark.parametrize("name", FAMILY)
def test_constructor_signature_is_pytorchs(name):
    """Same parameter names, order, kinds and defaults; ``dtype`` defaults to
    float32 (PyTorch's None: its default dtype, float32)."""
    ours = inspect.signature(getattr(L, name).__init__).parameters
    theirs = inspect.signature(getattr(torch.nn, name).__init__).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()]
    for key, p in theirs.items():
        if key != "dtype":
            assert ours[key].default == p.default, key
    assert np.dtype(ours["dtype"].default) == np.float32 and theirs["dtype"].default is None
    assert getattr(L, name)(*_sizes(name), dtype=None).dtype == np.float32


def _sizes(name):
    return {"LayerNorm": ((4, 3),), "RMSNorm": ((4, 3),), "GroupNorm": (2, 4)}.get(name, (4,))


def _shape(name, batch=3):
    spatial = {"InstanceNorm1d": (5,), "InstanceNorm2d": (3, 4), "InstanceNorm3d": (2, 3, 2)}
    if name in spatial:
        return (batch, 4) + spatial[name]
    return (batch, 4, 3) if name != "GroupNorm" else (batch, 4, 3, 2)


def _kwargs_combinations(name):
    """Every combination of the constructor's options (device and dtype cycled)."""
    if name in ("LayerNorm",):
        grid = dict(elementwise_affine=[True, False], bias=[True, False], eps=[1e-5, 1e-3])
    elif name == "RMSNorm":
        grid = dict(elementwise_affine=[True, False], eps=[None, 1e-4])
    elif name == "GroupNorm":
        grid = dict(affine=[True, False], bias=[True, False], eps=[1e-5, 1e-3])
    else:
        grid = dict(affine=[True, False], bias=[True, False], track_running_stats=[True, False],
                    momentum=[0.1, None])
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    for i, kw in enumerate(combos):
        kw["dtype"] = [np.float32, np.float64][i % 2]
        kw["device"] = [None, "cpu"][(i // 2) % 2]
    return combos


CASES = [pytest.param(name, kw, id=f"{name}-" + "-".join(
             f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items()))
         for name in FAMILY for kw in _kwargs_combinations(name)]


def _pair(name, kw, rng):
    """Our layer and PyTorch's with the same arguments and random parameters."""
    ours = getattr(L, name)(*_sizes(name), **kw)
    theirs = getattr(torch.nn, name)(*_sizes(name), **dict(kw, dtype=TORCH_DTYPE[kw["dtype"]]))
    for key, p in ours.params.items():
        p[...] = rng.uniform(0.5, 2, p.shape)
        with torch.no_grad():
            getattr(theirs, key).copy_(torch.from_numpy(p))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert sorted(ours.params) == sorted(n for n, _ in theirs.named_parameters())
    return ours, theirs


def _step(ours, theirs, x, dy):
    """One forward and backward through both; outputs, gradients and buffers agree."""
    dtype = x.dtype
    tx = torch.tensor(x, requires_grad=True)
    theirs.zero_grad()
    ty = theirs(tx)
    ty.backward(torch.tensor(dy))
    y, dx = ours.forward(x), ours.backward(dy)
    assert y.shape == dx.shape == x.shape and y.dtype == dx.dtype == dtype
    assert_close(y, ty.detach().numpy(), dtype, scale=4, what="y")
    assert_close(dx, tx.grad.numpy(), dtype, scale=max(4.0, np.abs(dx).max()), what="dx")
    for key, p in theirs.named_parameters():
        assert_close(ours.grads[key], p.grad.numpy(), dtype, scale=x.size, what=f"grad {key}")
    for key, b in theirs.named_buffers():
        np.testing.assert_allclose(ours.buffers[key], b.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=key)


@pytest.mark.parametrize("name,kw", CASES)
def test_every_constructor_combination_matches_pytorch(rng, name, kw):
    ours, theirs = _pair(name, kw, rng)
    dtype = kw["dtype"]
    shape = _shape(name)
    for training, batch in [(True, 3), (True, 2), (False, 3)]:
        ours.train(training), theirs.train(training)
        shape = _shape(name, batch)
        x = (rng.uniform(-2, 2) + rng.standard_normal(shape)).astype(dtype)
        _step(ours, theirs, x, rng.standard_normal(shape).astype(dtype))
    if name.startswith("InstanceNorm"):  # unbatched (C, *spatial): one sample
        x = rng.standard_normal(shape[1:]).astype(dtype)
        _step(ours, theirs, x, rng.standard_normal(x.shape).astype(dtype))


def _empty_cases():
    for name in FAMILY:
        for kw in _kwargs_combinations(name):
            if kw.get("eps") in (1e-3, 1e-4) or kw.get("momentum", 0.1) is None:
                continue  # options that cannot matter without values
            yield pytest.param(name, dict(kw, dtype=np.float32), id=f"{name}-" + "-".join(
                f"{k}={v}" for k, v in kw.items() if k not in ("dtype", "device")))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kw", list(_empty_cases()))
def test_empty_batch_as_pytorch(rng, name, kw, training):
    """An empty output and dx, zero parameter gradients (overwriting the last
    step's), running statistics untouched.  PyTorch 2.13 agrees, except where
    it fails: instance norm with affine parameters raises IndexError, and with
    running statistics in training writes NaN into them."""
    ours, theirs = _pair(name, kw, rng)
    full = _shape(name)  # a step with values first: nonzero grads, moved running statistics
    _step(ours, theirs, rng.standard_normal(full).astype(np.float32),
          rng.standard_normal(full).astype(np.float32))
    ours.train(training), theirs.train(training)
    before = ours.state_dict()
    x = np.empty(_shape(name, 0), np.float32)
    y = ours.forward(x)
    dx = ours.backward(np.empty_like(y))
    assert y.shape == dx.shape == x.shape
    for key, g in ours.grads.items():
        np.testing.assert_array_equal(g, 0, err_msg=key)
    for key, value in ours.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    instance = name.startswith("InstanceNorm")
    if instance and kw["affine"]:
        with pytest.raises(IndexError):
            theirs(torch.tensor(x))
        return
    tx = torch.tensor(x, requires_grad=True)
    theirs.zero_grad()
    ty = theirs(tx)
    ty.sum().backward()
    assert tuple(ty.shape) == tuple(tx.grad.shape) == x.shape
    for key, p in theirs.named_parameters():
        np.testing.assert_array_equal(ours.grads[key], p.grad.numpy(), err_msg=key)
    if not (instance and training and kw["track_running_stats"]):  # (PyTorch's NaN)
        for key, b in theirs.named_buffers():
            np.testing.assert_allclose(ours.buffers[key], b.numpy(), rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("name,args,shape", [
    ("LayerNorm", ((0,),), (3, 0)),
    ("LayerNorm", ((2, 0),), (3, 2, 0)),
    ("RMSNorm", (0,), (3, 0)),
    ("GroupNorm", (1, 0), (2, 0, 4)),
    ("GroupNorm", (2, 4), (2, 4, 0)),
    ("InstanceNorm1d", (3,), (2, 3, 0)),
    ("InstanceNorm2d", (0,), (2, 0, 3, 3)),
])
def test_empty_axes_as_pytorch(name, args, shape):
    """Sizes of 0 in the constructor and empty non-batch axes, as PyTorch: an
    empty output, gradients of zeros."""
    ours = getattr(L, name)(*args)
    theirs = getattr(torch.nn, name)(*args)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    x = np.empty(shape, np.float32)
    y = ours.forward(x)
    dx = ours.backward(np.empty_like(y))
    tx = torch.tensor(x, requires_grad=True)
    theirs(tx).sum().backward()
    assert y.shape == dx.shape == tuple(tx.grad.shape) == shape
    for key, p in theirs.named_parameters():
        assert ours.grads[key].shape == tuple(p.shape)
        np.testing.assert_array_equal(ours.grads[key], 0, err_msg=key)


def test_instance_norm_one_spatial_value_is_refused_as_pytorch():
    for shape in [(2, 3, 1), (0, 3, 1)]:
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            torch.nn.InstanceNorm1d(3)(torch.zeros(shape))
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            L.InstanceNorm1d(3).forward(np.zeros(shape, np.float32))


def test_device_and_dtype_arguments():
    ln = L.LayerNorm(3, device=torch.device("cpu"), dtype=torch.float64)
    assert ln.dtype == np.float64 and ln.weight.dtype == np.float64
    assert L.GroupNorm(1, 3, 1e-5, True, "cpu", "float64").weight.dtype == np.float64
    assert L.InstanceNorm3d(3, affine=True, dtype=np.float64).weight.dtype == np.float64
    for name in FAMILY:
        cls = getattr(L, name)
        with pytest.raises(ValueError, match="device must be None or 'cpu'; got 'cuda'"):
            cls(*_sizes(name), device="cuda")
        with pytest.raises(TypeError, match=r"float32, float64, float16 or bfloat16 .*got int32"):
            cls(*_sizes(name), dtype=torch.int32)
        assert cls(*_sizes(name), dtype=torch.float16).dtype == np.float16
    # numbabn's old order put dtype where PyTorch has device: a clear error, not a silent mix-up
    with pytest.raises(TypeError, match="pass dtype= by keyword"):
        L.LayerNorm(3, 1e-5, True, True, np.float64)
    with pytest.raises(TypeError, match="pass dtype= by keyword"):
        L.RMSNorm(3, None, True, np.float64)


def test_bias_false_leaves_out_the_bias_as_pytorch():
    for name in ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm"]:
        affine = {"LayerNorm": "elementwise_affine"}.get(name, "affine")
        ours = getattr(L, name)(*_sizes(name), bias=False, **{affine: True})
        theirs = getattr(torch.nn, name)(*_sizes(name), bias=False, **{affine: True})
        assert ours.bias is None and theirs.bias is None
        assert sorted(ours.params) == sorted(ours.grads) == ["weight"]
        assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
        assert "bias=False" in repr(ours)
