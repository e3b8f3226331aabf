"""numbabn.norms and the layer/group/instance/RMS norm layers against PyTorch:
forward, backward (autograd), running statistics, layer state; float32 and
float64; contiguous, strided and channels-last inputs; plus hypothesis fuzzing
against the float64 twins."""

import numpy as np
import pytest
from conftest import TOL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import naive
import numbabn
from numbabn import layers as L

torch = pytest.importorskip("torch")
F = torch.nn.functional
DTYPES = [np.float32, np.float64]
# PyTorch's float32 kernels round differently: compare at float32 precision.
TORCH_TOL = {np.float32: 2e-5, np.float64: 1e-10}


def channels_last(a):
    order = (0,) + tuple(range(2, a.ndim)) + (1,)
    back = tuple(sorted(range(a.ndim), key=order.__getitem__))
    return np.ascontiguousarray(a.transpose(order)).transpose(back)


def stepped(a):
    big = np.zeros((a.shape[0] * 2,) + a.shape[1:], a.dtype)
    big[::2] = a
    return big[::2]


LAYOUTS = {"c": np.ascontiguousarray, "channels_last": channels_last, "stepped": stepped}


def close(actual, ref, dtype, what=""):
    ref = np.asarray(ref, np.float64)
    tol = TORCH_TOL[dtype]
    scale = max(1.0, float(np.max(np.abs(ref))))
    np.testing.assert_allclose(np.asarray(actual, np.float64), ref, rtol=tol, atol=tol * scale,
                               err_msg=what)


def data(rng, shape, dtype, loc=2.0):
    x = (loc + rng.uniform(0.5, 2) * rng.standard_normal(shape)).astype(dtype)
    return x, rng.standard_normal(shape).astype(dtype)


def t(a, grad=False):
    return torch.tensor(np.ascontiguousarray(a), requires_grad=grad)


def torch_grads(fn, dy, *tensors):
    out = fn(*tensors)
    out.backward(t(dy))
    return out.detach().numpy(), [None if a.grad is None else a.grad.numpy() for a in tensors]


# --------------------------------------------------------------------------- #
# Functional
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape,nshape", [((5, 3, 7, 6), (3, 7, 6)), ((9, 13), (13,)),
                                          ((4, 3, 5, 6), (5, 6))])
def test_layer_norm_matches_torch(rng, dtype, layout, shape, nshape):
    x, dy = data(rng, shape, dtype)
    w = rng.uniform(0.5, 2, nshape).astype(dtype)
    b = rng.standard_normal(nshape).astype(dtype)
    xl, dyl = LAYOUTS[layout](x), LAYOUTS[layout](dy)
    y, mean, rstd = numbabn.layer_norm_train(xl, nshape, w, b, eps=1e-4)
    ty, (tdx, tdw, tdb) = torch_grads(lambda a, c, d: F.layer_norm(a, nshape, c, d, 1e-4), dy,
                                      t(x, True), t(w, True), t(b, True))
    _, tmean, trstd = torch.native_layer_norm(t(x), nshape, t(w), t(b), 1e-4)
    close(y, ty, dtype, "y")
    close(mean, tmean.numpy(), dtype, "mean")
    close(rstd, trstd.numpy(), dtype, "rstd")
    assert mean.shape == tuple(tmean.shape)
    dx, dw, db = numbabn.layer_norm_backward(dyl, xl, mean, rstd, nshape, w)
    close(dx, tdx, dtype, "dx")
    close(dw, tdw, dtype, "dweight")
    close(db, tdb, dtype, "dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape,groups", [((3, 6, 5, 7), 1), ((3, 6, 5, 7), 3), ((3, 6, 5, 7), 6),
                                          ((4, 10, 9), 5), ((2, 4, 3, 2, 5), 2)])
def test_group_norm_matches_torch(rng, dtype, layout, shape, groups):
    x, dy = data(rng, shape, dtype)
    c = shape[1]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    xl, dyl = LAYOUTS[layout](x), LAYOUTS[layout](dy)
    y, mean, rstd = numbabn.group_norm_train(xl, groups, w, b)
    ty, (tdx, tdw, tdb) = torch_grads(lambda a, e, d: F.group_norm(a, groups, e, d), dy,
                                      t(x, True), t(w, True), t(b, True))
    n = shape[0]
    _, tmean, trstd = torch.native_group_norm(t(x), t(w), t(b), n, c, x.size // (n * c),
                                              groups, 1e-5)
    close(y, ty, dtype, "y")
    close(mean, tmean.numpy(), dtype, "mean")
    close(rstd, trstd.numpy(), dtype, "rstd")
    dx, dw, db = numbabn.group_norm_backward(dyl, xl, mean, rstd, groups, w)
    close(dx, tdx, dtype, "dx")
    close(dw, tdw, dtype, "dweight")
    close(db, tdb, dtype, "dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(4, 3, 11), (3, 5, 6, 7)])
def test_instance_norm_and_running_stats_match_torch(rng, dtype, layout, shape):
    x, dy = data(rng, shape, dtype)
    c = shape[1]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2, c).astype(dtype)
    trm, trv = t(rm), t(rv)
    xl, dyl = LAYOUTS[layout](x), LAYOUTS[layout](dy)
    y = numbabn.instance_norm(xl, rm, rv, w, b, momentum=0.2)
    ty, (tdx, tdw, tdb) = torch_grads(
        lambda a, e, d: F.instance_norm(a, trm, trv, e, d, True, 0.2), dy,
        t(x, True), t(w, True), t(b, True))
    close(y, ty, dtype, "y")
    close(rm, trm.numpy(), dtype, "running_mean")
    close(rv, trv.numpy(), dtype, "running_var")
    _, mean, rstd = numbabn.instance_norm_train(xl, w, b)
    dx, dw, db = numbabn.instance_norm_backward(dyl, xl, mean, rstd, w)
    close(dx, tdx, dtype, "dx")
    close(dw, tdw, dtype, "dweight")
    close(db, tdb, dtype, "dbias")
    y_eval = numbabn.instance_norm(xl, rm, rv, w, b, use_input_stats=False)
    close(y_eval, F.instance_norm(t(x), trm, trv, t(w), t(b), False).numpy(), dtype, "eval")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("shape,nshape", [((9, 13), (13,)), ((4, 3, 5, 6), (5, 6))])
def test_rms_norm_matches_torch(rng, dtype, layout, eps, shape, nshape):
    x, dy = data(rng, shape, dtype, loc=0.3)
    w = rng.uniform(0.5, 2, nshape).astype(dtype)
    xl, dyl = LAYOUTS[layout](x), LAYOUTS[layout](dy)
    y, rstd = numbabn.rms_norm_train(xl, nshape, w, eps)
    ty, (tdx, tdw) = torch_grads(lambda a, e: F.rms_norm(a, nshape, e, eps), dy, t(x, True),
                                 t(w, True))
    close(y, ty, dtype, "y")
    dx, dw = numbabn.rms_norm_backward(dyl, xl, rstd, nshape, w)
    close(dx, tdx, dtype, "dx")
    close(dw, tdw, dtype, "dweight")


def test_float32_large_mean_tiny_spread_beats_torch(rng):
    """Rows of mean 1e4 and spread 1e-2: numbabn's float32 stays within 1e-6 of
    float64 maths; PyTorch's float32 loses digits (measured: 3e-2 for layer
    norm, 1e-1 for group norm, relative to the output's scale)."""
    x = (1e4 + 1e-2 * rng.standard_normal((64, 1000))).astype(np.float32)
    ref = naive.layer_norm(x, (1000,))[0]
    ours = np.max(np.abs(numbabn.layer_norm(x, 1000) - ref)) / np.max(np.abs(ref))
    theirs = np.max(np.abs(F.layer_norm(t(x), (1000,)).numpy() - ref)) / np.max(np.abs(ref))
    assert ours <= 1e-6 < theirs
    xg = (1e4 + 1e-2 * rng.standard_normal((8, 8, 30, 30))).astype(np.float32)
    ref = naive.group_norm(xg, 4)[0]
    ours = np.max(np.abs(numbabn.group_norm(xg, 4) - ref)) / np.max(np.abs(ref))
    theirs = np.max(np.abs(F.group_norm(t(xg), 4).numpy() - ref)) / np.max(np.abs(ref))
    assert ours <= 1e-6 < theirs


# --------------------------------------------------------------------------- #
# Layers
# --------------------------------------------------------------------------- #
def _copy_params(ours, theirs):
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(ours.params[name]))


def _check_layer(ours, theirs, x, dy, dtype):
    _copy_params(ours, theirs)
    y = ours.forward(x)
    tx = t(x, True)
    ty = theirs(tx)
    ty.backward(t(dy))
    close(y, ty.detach().numpy(), dtype, "y")
    dx = ours.backward(dy)
    close(dx, tx.grad.numpy(), dtype, "dx")
    for name, p in theirs.named_parameters():
        close(ours.grads[name], p.grad.numpy(), dtype, f"grad {name}")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        close(ours.state_dict()[name], value.numpy(), dtype, name)


def _randomise(layer, rng):
    for p in layer.params.values():
        p[...] = rng.uniform(0.5, 2, p.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_layer_norm_layer(rng, dtype, affine, bias):
    x, dy = data(rng, (4, 6, 5, 3), dtype)
    ours = L.LayerNorm((5, 3), eps=1e-4, elementwise_affine=affine, bias=bias, dtype=dtype)
    _randomise(ours, rng)
    theirs = torch.nn.LayerNorm((5, 3), eps=1e-4, elementwise_affine=affine, bias=bias,
                                dtype=torch.float64 if dtype == np.float64 else torch.float32)
    _check_layer(ours, theirs, x, dy, dtype)
    assert ours.backward(dy, input_grad=False) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_layer(rng, dtype, affine):
    x, dy = data(rng, (4, 6, 5, 3), dtype)
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    ours = L.GroupNorm(3, 6, affine=affine, dtype=dtype)
    _randomise(ours, rng)
    _check_layer(ours, torch.nn.GroupNorm(3, 6, affine=affine, dtype=torch_dtype),
                 channels_last(x), dy, dtype)
    ours = L.GroupNorm(2, 6, dtype=dtype, bias=False)
    _check_layer(ours, torch.nn.GroupNorm(2, 6, dtype=torch_dtype, bias=False), x, dy, dtype)
    with pytest.raises(ValueError, match="divisible"):
        L.GroupNorm(4, 6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_layer(rng, dtype, eps):
    x, dy = data(rng, (7, 11), dtype, loc=0.5)
    ours = L.RMSNorm(11, eps=eps, dtype=dtype)
    _randomise(ours, rng)
    theirs = torch.nn.RMSNorm(11, eps=eps,
                              dtype=torch.float64 if dtype == np.float64 else torch.float32)
    _check_layer(ours, theirs, x, dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,shape", [("InstanceNorm1d", (4, 3, 9)),
                                       ("InstanceNorm1d", (3, 9)),
                                       ("InstanceNorm2d", (4, 3, 5, 6)),
                                       ("InstanceNorm2d", (3, 5, 6))])
@pytest.mark.parametrize("affine,track", [(False, False), (True, False), (True, True),
                                          (False, True)])
def test_instance_norm_layers(rng, dtype, cls, shape, affine, track):
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    ours = getattr(L, cls)(3, momentum=0.3, affine=affine, track_running_stats=track,
                           dtype=dtype)
    _randomise(ours, rng)
    theirs = getattr(torch.nn, cls)(3, momentum=0.3, affine=affine, track_running_stats=track,
                                    dtype=torch_dtype)
    for _ in range(2):  # training steps: running statistics move
        x, dy = data(rng, shape, dtype)
        theirs.zero_grad()
        _check_layer(ours, theirs, x, dy, dtype)
    ours.eval()
    theirs.eval()
    x, dy = data(rng, shape, dtype)
    theirs.zero_grad()
    _check_layer(ours, theirs, x, dy, dtype)


def test_layer_input_checks():
    with pytest.raises(ValueError, match="LayerNorm expects"):
        L.LayerNorm(4).forward(np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match="dtype float32"):
        L.GroupNorm(1, 4).forward(np.zeros((3, 4), np.float64))
    with pytest.raises(ValueError, match="InstanceNorm2d expects"):
        L.InstanceNorm2d(4).forward(np.zeros((3, 4, 5), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        L.RMSNorm(4).backward(np.zeros((3, 4), np.float32))


# --------------------------------------------------------------------------- #
# Fuzzing against the float64 twins
# --------------------------------------------------------------------------- #
@st.composite
def group_inputs(draw):
    n = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 4))
    c = groups * draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    shape = (n, c) + spatial
    if np.prod(shape) // (n * groups) < 2:
        shape = shape + (2,)
    layout = draw(st.sampled_from(list(LAYOUTS)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    loc = draw(st.sampled_from([0.0, 3.0, -1e3]))
    return shape, groups, layout, dtype, seed, loc


def _fuzz_close(actual, ref, dtype, what):
    atol, rtol = TOL[np.dtype(dtype)]
    ref = np.asarray(ref, np.float64)
    scale = max(1.0, float(np.max(np.abs(ref))))
    np.testing.assert_allclose(np.asarray(actual, np.float64), ref, rtol=rtol * 10,
                               atol=atol * 10 * scale, err_msg=what)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group_inputs())
def test_fuzz_group_and_layer_norm_against_naive(args):
    shape, groups, layout, dtype, seed, loc = args
    rng = np.random.default_rng(seed)
    x = (loc + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, shape[1]).astype(dtype)
    b = rng.standard_normal(shape[1]).astype(dtype)
    make = LAYOUTS[layout] if x.ndim > 2 or layout != "channels_last" else np.ascontiguousarray
    xl, dyl = make(x), make(dy)
    y, mean, rstd = numbabn.group_norm_train(xl, groups, w, b)
    ry, rmean, rrstd = naive.group_norm(x, groups, w, b)
    _fuzz_close(y, ry, dtype, "group y")
    dx, dw, db = numbabn.group_norm_backward(dyl, xl, mean, rstd, groups, w)
    for got, ref, what in zip((dx, dw, db), naive.group_norm_backward(dy, x, groups, w),
                              ("dx", "dweight", "dbias")):
        _fuzz_close(got, ref, dtype, "group " + what)
    nshape = x.shape[1:]
    y, mean, rstd = numbabn.layer_norm_train(xl, nshape)
    _fuzz_close(y, naive.layer_norm(x, nshape)[0], dtype, "layer y")
    dx, dw, db = numbabn.layer_norm_backward(dyl, xl, mean, rstd, nshape)
    for got, ref, what in zip((dx, dw, db), naive.layer_norm_backward(dy, x, nshape),
                              ("dx", "dweight", "dbias")):
        _fuzz_close(got, ref, dtype, "layer " + what)
    y, rstd = numbabn.rms_norm_train(xl, nshape[-1:], eps=1e-5)
    _fuzz_close(y, naive.rms_norm(x, nshape[-1:], eps=1e-5)[0], dtype, "rms y")
    dx, dw = numbabn.rms_norm_backward(dyl, xl, rstd, nshape[-1:])
    for got, ref, what in zip((dx, dw), naive.rms_norm_backward(dy, x, nshape[-1:], eps=1e-5),
                              ("dx", "dweight")):
        _fuzz_close(got, ref, dtype, "rms " + what)
