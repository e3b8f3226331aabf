"""The batch-norm layers' PyTorch parity (BatchNorm3d, ``bias=False``, empty
batches, messages), ghost batches and batch renormalization."""

import numpy as np
import pytest

import naive
from conftest import assert_close
from numbabn.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm1d, BatchRenorm2d


def _torch():
    return pytest.importorskip("torch")


def _steps(layer, tlayer, xs, dys):
    """Run the same training steps through both; compare outputs, grads, buffers."""
    torch = _torch()
    for x, dy in zip(xs, dys):
        y = layer.forward(x)
        dx = layer.backward(dy)
        tx = torch.tensor(x, requires_grad=True)
        ty = tlayer(tx)
        ty.backward(torch.tensor(dy))
        dtype = x.dtype
        assert_close(y, ty.detach().numpy(), dtype, what="y")
        assert_close(dx, tx.grad.numpy(), dtype, scale=max(1.0, np.abs(dx).max()), what="dx")
        for name, p in tlayer.named_parameters():
            assert_close(layer.grads[name], p.grad.numpy(), dtype, scale=x.size / x.shape[1],
                         what=f"grad {name}")
            p.grad = None
        for name, b in tlayer.named_buffers():
            assert_close(layer.buffers[name], b.numpy(), dtype, what=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"momentum": None}, {"affine": False}])
def test_batchnorm3d_and_bias_keyword_match_torch(rng, dtype, kwargs):
    torch = _torch()
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    layer = BatchNorm3d(3, dtype=dtype, **kwargs)
    tlayer = torch.nn.BatchNorm3d(3, dtype=tdtype, **kwargs)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2, 3)
        with torch.no_grad():
            tlayer.weight.copy_(torch.tensor(layer.weight))
    assert sorted(layer.state_dict()) == sorted(tlayer.state_dict())
    shape = (4, 3, 5, 3, 6)
    xs = [(2 + rng.standard_normal(shape)).astype(dtype) for _ in range(3)]
    dys = [rng.standard_normal(shape).astype(dtype) for _ in range(3)]
    _steps(layer, tlayer, xs, dys)
    layer.eval(), tlayer.eval()
    assert_close(layer.forward(xs[0]), tlayer(torch.tensor(xs[0])).detach().numpy(), dtype)


@pytest.mark.parametrize("cls,tname,shape", [(BatchNorm1d, "BatchNorm1d", (0, 5, 9)),
                                             (BatchNorm1d, "BatchNorm1d", (0, 5)),
                                             (BatchNorm2d, "BatchNorm2d", (0, 5, 3, 4))])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_as_pytorch(rng, cls, tname, shape, training):
    torch = _torch()
    layer, tlayer = cls(5), getattr(torch.nn, tname)(5)
    layer.running_mean[...] = tlayer.running_mean.numpy()[...] = rng.standard_normal(5)
    layer.train(training), tlayer.train(training)
    x = np.zeros(shape, np.float32)
    y = layer.forward(x)
    tx = torch.tensor(x, requires_grad=True)
    ty = tlayer(tx)
    assert y.shape == tuple(ty.shape) == shape
    ty.sum().backward()
    dx = layer.backward(np.zeros(shape, np.float32))
    assert dx.shape == shape
    np.testing.assert_array_equal(layer.grads["weight"], tlayer.weight.grad.numpy())
    np.testing.assert_array_equal(layer.grads["bias"], tlayer.bias.grad.numpy())
    for name, b in tlayer.named_buffers():
        np.testing.assert_array_equal(layer.buffers[name], b.numpy(), err_msg=name)


def test_messages_name_the_actual_problem():
    with pytest.raises(ValueError, match=r"with 5 at axis 1; got shape \(3, 4, 9\)"):
        BatchNorm1d(5).forward(np.zeros((3, 4, 9), np.float32))
    with pytest.raises(ValueError, match=r"empty axis 2 in shape \(3, 5, 0\)"):
        BatchNorm1d(5).forward(np.zeros((3, 5, 0), np.float32))
    with pytest.raises(ValueError, match=r"4-D input .* got a 3-D input"):
        BatchNorm2d(5).forward(np.zeros((3, 5, 2), np.float32))
    with pytest.raises(ValueError, match="device"):
        BatchNorm1d(5, device="cuda")


# --------------------------------------------------------------------------- #
# Ghost batch norm
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", [(BatchNorm1d, (24, 4)), (BatchNorm2d, (12, 3, 5, 5))])
def test_ghost_batches_are_normalised_separately(rng, dtype, cls, shape):
    v = shape[0] // 3
    ghost = cls(shape[1], virtual_batch_size=v, dtype=dtype)
    ghost.weight[...] = rng.uniform(0.5, 2, shape[1])
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, dx = ghost.forward(x), ghost.backward(dy)
    means, variances, dw, db = [], [], 0, 0
    for g in range(3):
        sl = slice(g * v, (g + 1) * v)
        ry, _, _ = naive.batch_norm_train(x[sl], ghost.weight, ghost.bias)
        rdx, rdw, rdb = naive.batch_norm_backward(dy[sl], x[sl], ghost.weight)
        assert_close(y[sl], ry, dtype, what=f"y of ghost {g}")
        assert_close(dx[sl], rdx, dtype, scale=max(1.0, np.abs(rdx).max()), what=f"dx of ghost {g}")
        m, var = naive.batch_stats(x[sl])
        count = x[sl].size // shape[1]
        means.append(m)
        variances.append(var * count / (count - 1))
        dw, db = dw + rdw, db + rdb
    assert_close(ghost.grads["weight"], dw, dtype, scale=x.size / shape[1])
    assert_close(ghost.grads["bias"], db, dtype, scale=x.size / shape[1])
    # running statistics: updated once per step with the mean of the ghosts' statistics
    assert_close(ghost.running_mean, 0.1 * np.mean(means, axis=0), dtype)
    assert_close(ghost.running_var, 0.9 + 0.1 * np.mean(variances, axis=0), dtype)
    assert int(ghost.num_batches_tracked) == 1
    ghost.eval()  # eval: the running statistics, whatever the batch size
    ry = naive.normalize(x, ghost.running_mean, ghost.running_var, ghost.weight, ghost.bias)
    assert_close(ghost.forward(x), ry, dtype)


def test_ghost_batch_size_must_divide_the_batch(rng):
    bn = BatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="must divide"):
        bn.forward(rng.standard_normal((10, 3)).astype(np.float32))
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.running_mean, 0)


# --------------------------------------------------------------------------- #
# Batch renormalization
# --------------------------------------------------------------------------- #
def test_naive_renorm_backward_matches_finite_differences(rng):
    x = rng.standard_normal((7, 3))
    dy = rng.standard_normal((7, 3))
    w = rng.uniform(0.5, 2, 3)
    rm, rv = rng.standard_normal(3), rng.uniform(0.1, 4, 3)
    _, r, d = naive.batch_renorm_train(x, rm, rv, w, None, rmax=1.5, dmax=0.5)

    def loss():  # r and d held constant
        mu, var = naive.batch_stats(x)
        return np.sum(dy * (((x - mu) / np.sqrt(var + 1e-5)) * r + d) * w)

    gx, gw = naive.finite_difference(loss, [x, w])
    dx, dw, _ = naive.batch_renorm_backward(dy, x, r, d, w)
    np.testing.assert_allclose(dx, gx, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, gw, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", [(BatchRenorm1d, (6, 4)), (BatchRenorm2d, (4, 3, 5, 5))])
def test_batch_renorm_matches_the_papers_equations(rng, dtype, cls, shape):
    c = shape[1]
    layer = cls(c, dtype=dtype, renorm_clipping={"rmax": 1.5, "dmax": 0.5})
    layer.weight[...] = rng.uniform(0.5, 2, c)
    layer.bias[...] = rng.uniform(-1, 1, c)
    for step in range(3):
        # running statistics far from the batch's, so both clips are active
        x = (3 + 2 * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        rm, rv = layer.running_mean.copy(), layer.running_var.copy()
        ry, r, d = naive.batch_renorm_train(x, rm, rv, layer.weight, layer.bias, rmax=1.5,
                                            dmax=0.5)
        if step == 0:
            assert np.any(r == 1.5) and np.any(np.abs(d) == 0.5)
        rdx, rdw, rdb = naive.batch_renorm_backward(dy, x, r, d, layer.weight)
        y = layer.forward(x)
        dx = layer.backward(dy)
        assert_close(y, ry, dtype, scale=3.0, what="y")
        assert_close(dx, rdx, dtype, scale=max(1.0, np.abs(rdx).max()), what="dx")
        assert_close(layer.grads["weight"], rdw, dtype, scale=x.size / c, what="dweight")
        assert_close(layer.grads["bias"], rdb, dtype, scale=x.size / c, what="dbias")
        _, ref_rm, ref_rv = naive.batch_norm(x, rm, rv, training=True)
        assert_close(layer.running_mean, ref_rm, dtype, what="running_mean")
        assert_close(layer.running_var, ref_rv, dtype, what="running_var")
    layer.eval()  # inference is batch norm's
    bn = BatchNorm2d(c, dtype=dtype) if cls is BatchRenorm2d else BatchNorm1d(c, dtype=dtype)
    bn.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(layer.forward(x), bn.eval().forward(x))


def test_batch_renorm_without_corrections_is_batch_norm(rng):
    x = (1 + rng.standard_normal((16, 5))).astype(np.float32)
    dy = rng.standard_normal((16, 5)).astype(np.float32)
    renorm = BatchRenorm1d(5, renorm_clipping={"rmax": 1.0, "dmax": 0.0})
    bn = BatchNorm1d(5)
    assert_close(renorm.forward(x), bn.forward(x), np.float32)
    assert_close(renorm.backward(dy), bn.backward(dy), np.float32, scale=4.0)
    for k in ("weight", "bias"):
        assert_close(renorm.grads[k], bn.grads[k], np.float32, scale=16.0)


@pytest.mark.parametrize("clip,exc", [({"rmax": 0.5}, ValueError), ({"dmax": -1}, ValueError),
                                      ({"rmax": "3"}, TypeError), ({"r": 3}, ValueError)])
def test_renorm_clipping_is_checked(clip, exc):
    with pytest.raises(exc, match="renorm_clipping"):
        BatchRenorm1d(3, renorm_clipping=clip)
