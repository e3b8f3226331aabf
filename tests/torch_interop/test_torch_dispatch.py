"""numbabn.torch's per-shape dispatch (numbabn.torch._dispatch): the table's
rows, that the layers follow it (which kernels ran: numbabn's host drivers or
ATen's batch-norm ops), that both routes agree, and that a shape always takes
the same route (the same bits on every call)."""

import pytest

torch = pytest.importorskip("torch")
nbt = pytest.importorskip("numbabn.torch")

import numpy as np  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from numbabn.torch import _dispatch  # noqa: E402
from numbabn.torch._tensors import route_of  # noqa: E402

nn = torch.nn
CL = torch.channels_last
NCHW = torch.contiguous_format


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def ran(monkeypatch):
    """Which batch-norm kernels ran: numbabn's CPU host drivers (counted) and
    ATen's batch-norm ops (recorded below autograd by a dispatch mode)."""
    from numbabn._cpu import feature_ops

    seen = {"numbabn": [], "aten": []}
    for name in ("batch_norm_train", "batch_norm_backward", "normalize"):
        fn = getattr(feature_ops, name)

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            seen["numbabn"].append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(feature_ops, name, wrapped)

    class AtenOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if "batch_norm" in name:
                seen["aten"].append(name)
            return func(*args, **(kwargs or {}))

    seen["mode"] = AtenOps
    return seen


def aten_ran(names, what):
    return any(what in n for n in names)


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("shape3,dtype,expected", [
    ((4, 8, 16), np.float32, (True, True, True)),          # < 2**16 values: host cost
    ((2, 8, 2048), np.float64, (True, True, True)),
    ((16, 256, 16), np.float32, (False, True, False)),     # NCHW 4x4 planes: backward
    ((16, 64, 64), np.float32, (False, True, False)),      # NCHW 8x8: backward
    ((32, 64, 49), np.float32, (False, True, True)),       # 7x7: backward and eval
    ((64, 64, 16), np.float64, (False, False, True)),      # float64 4x4: eval only
    ((16, 64, 64), np.float64, (False, False, False)),     # float64 8x8: numbabn
    ((16, 32, 196), np.float32, (False, False, False)),    # 14x14: numbabn
    ((16, 64, 256), np.float32, (False, False, False)),    # 16x16: numbabn
    ((1024, 64, 1), np.float32, (False, True, False)),     # channels-last, 256 KiB
    ((2048, 64, 1), np.float32, (False, False, False)),    # 512 KiB
    ((49152, 64, 1), np.float32, (True, True, False)),     # 12 MiB
    ((131072, 64, 1), np.float32, (False, False, False)),  # 32 MiB
    ((24576, 64, 1), np.float64, (True, True, False)),     # 12 MiB of float64
])
def test_table_rows(shape3, dtype, expected):
    assert _dispatch.routes(shape3, dtype) == expected


def test_force_sends_every_call_one_way_and_checks_its_argument():
    x = torch.randn(4, 8, 4, 4)
    assert route_of(x, "train") == "aten"
    with _dispatch.force("numbabn"):
        assert [route_of(x, op) for op in ("train", "backward", "eval")] == ["numbabn"] * 3
    assert route_of(x, "train") == "aten"
    y = torch.randn(16, 32, 16, 16)
    with _dispatch.force("aten"):
        assert route_of(y, "eval") == "aten"
    assert route_of(y, "eval") == "numbabn"
    with pytest.raises(ValueError, match="route must be"):
        with _dispatch.force("fast"):
            pass


# ---------------------------------------------------------------- the layers follow it

CASES = [  # shape, memory format, dtype, what runs ATen's (train, backward, eval)
    ((32, 64, 7, 7), NCHW, torch.float32, (False, True, True)),
    ((16, 64, 8, 8), NCHW, torch.float32, (False, True, False)),
    ((64, 64, 4, 4), NCHW, torch.float64, (False, False, True)),
    ((16, 32, 16, 16), NCHW, torch.float32, (False, False, False)),
    ((16, 64, 8, 8), CL, torch.float32, (False, True, False)),
    ((2, 8, 4, 4), NCHW, torch.float32, (True, True, True)),
]


def layer_pair(c, dtype):
    stock = nn.BatchNorm2d(c, dtype=dtype)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
        stock.bias.uniform_(-1, 1)
        stock.running_mean.uniform_(-1, 1)
        stock.running_var.uniform_(0.5, 2)
    mine = nbt.BatchNorm2d(c, dtype=dtype)
    mine.load_state_dict(stock.state_dict())
    return mine, stock


def train_step(bn, x, g):
    x = x.clone().requires_grad_()
    bn.train()
    y = bn(x)
    y.backward(g)
    return y, x.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("shape,fmt,dtype,aten", CASES)
def test_layer_follows_the_table(ran, shape, fmt, dtype, aten):
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).contiguous(memory_format=fmt)
    g = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    assert tuple(route_of(x, op) == "aten" for op in ("train", "backward", "eval")) == aten
    bn, _ = layer_pair(shape[1], dtype)
    with ran["mode"]():
        y = bn.train()(x.clone().requires_grad_())
    assert ("batch_norm_train" in ran["numbabn"]) == (not aten[0])
    assert aten_ran(ran["aten"], "batch_norm") == aten[0]
    ran["numbabn"].clear(), ran["aten"].clear()
    with ran["mode"]():
        y.backward(g)
    assert ("batch_norm_backward" in ran["numbabn"]) == (not aten[1])
    assert aten_ran(ran["aten"], "batch_norm_backward") == aten[1]
    ran["numbabn"].clear(), ran["aten"].clear()
    with ran["mode"](), torch.no_grad():
        bn.eval()(x)
    assert ("normalize" in ran["numbabn"]) == (not aten[2])
    assert aten_ran(ran["aten"], "batch_norm") == aten[2]


def test_ops_follow_the_table(ran):
    """The custom ops (what torch.compile and export record) take the same routes."""
    x = torch.randn(32, 64, 7, 7)  # NCHW 7x7 float32: numbabn forward, ATen backward and eval
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    rm, rv = torch.randn(64), torch.rand(64) + 0.5
    y = torch.ops.numbabn.batch_norm_eval(x, w, b, rm, rv, 1e-5, False)
    assert "normalize" not in ran["numbabn"]
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5))
    y, mean, invstd, _ = torch.ops.numbabn.batch_norm_train(x, w, b, 1e-5, False)
    assert ran["numbabn"] == ["batch_norm_train"]
    torch.ops.numbabn.batch_norm_backward(torch.randn_like(x), x, mean, invstd, w, None,
                                          [True, True, True])
    assert "batch_norm_backward" not in ran["numbabn"]


# ---------------------------------------------------------------- both routes agree


@pytest.mark.parametrize("shape,fmt,dtype,aten", CASES)
def test_routes_agree_and_repeat_bitwise(shape, fmt, dtype, aten):
    rel = 2e-5 if dtype == torch.float32 else 1e-12
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).contiguous(memory_format=fmt)
    g = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    results = {}
    for route in ("numbabn", "aten", None):
        with _dispatch.force(route):
            runs = []
            for _ in range(2):
                torch.manual_seed(1)
                bn, _stock = layer_pair(shape[1], dtype)
                out = train_step(bn, x, g)
                with torch.no_grad():
                    out += (bn.running_mean.clone(), bn.running_var.clone(), bn.eval()(x))
                runs.append(out)
            for a, b in zip(*runs):  # a route gives the same bits on every call
                assert torch.equal(a, b)
            results[route] = runs[0]
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var", "eval y")
    for name, a, b, t in zip(names, results["numbabn"], results["aten"], results[None]):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= rel * scale, name
        assert (t - b).abs().max().item() <= rel * scale, name
        assert t.stride() == b.stride(), name


def test_channels_last_training_of_l3_size_runs_aten(ran):
    """The one row decided by bytes of x around the L3's size: 12 MiB of
    channels-last float32 trains on ATen's kernels (running statistics too)."""
    shape = (48, 64, 32, 32)  # 3 * 2**20 values
    x = torch.randn(shape).contiguous(memory_format=CL)
    torch.manual_seed(1)
    bn, stock = layer_pair(64, torch.float32)
    with ran["mode"]():
        y = bn.train()(x)
    assert ran["numbabn"] == [] and aten_ran(ran["aten"], "batch_norm")
    torch.testing.assert_close(y, stock.train()(x))
    torch.testing.assert_close(bn.running_var, stock.running_var)
    with _dispatch.force("numbabn"):
        torch.manual_seed(1)
        bn2, _ = layer_pair(64, torch.float32)
        y2 = bn2.train()(x)
    torch.testing.assert_close(y2, y, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(bn2.running_mean, bn.running_mean)
