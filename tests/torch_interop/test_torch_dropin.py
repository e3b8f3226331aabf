"""numbabn.torch: the PyTorch drop-in layers against stock PyTorch (skipped
cleanly when torch is not installed)."""

import copy
import inspect
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nbt = pytest.importorskip("numbabn.torch")

import numbabn  # noqa: E402

nn = torch.nn
REL32 = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

CLASSES = [  # numbabn class, stock class, an input shape
    (nbt.BatchNorm1d, nn.BatchNorm1d, (16, 5)),
    (nbt.BatchNorm1d, nn.BatchNorm1d, (6, 5, 7)),
    (nbt.BatchNorm2d, nn.BatchNorm2d, (6, 5, 7, 4)),
    (nbt.BatchNorm3d, nn.BatchNorm3d, (3, 5, 2, 4, 3)),
]
CONFIGS = [  # constructor keywords beyond num_features
    {},
    {"affine": False},
    {"bias": False},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"track_running_stats": False},
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# These tests check numbabn's kernels against stock PyTorch: every call takes
# numbabn's route (tests/conftest.py; the per-shape table sends some small test shapes
# to ATen, and tests/torch_interop/test_torch_dispatch.py checks the table).
pytestmark = pytest.mark.usefixtures("numbabn_route")


@pytest.fixture
def calls(monkeypatch):
    """Counts of the CPU backend's operations run through numbabn.torch (the
    layers call them directly, or through numbabn's public functions)."""
    from numbabn._cpu import feature_ops

    counts = {}
    for name in ("batch_norm_train", "batch_norm_backward", "normalize", "update_running_stats",
                 "batch_norm_backward_reduce"):
        fn = getattr(feature_ops, name)

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(feature_ops, name, wrapped)
    return counts


def assert_rel(actual, ref, rel=REL32, what="", atol=0.0):
    """max |actual - ref| <= rel * max |ref| + atol (NaN must match NaN)."""
    actual, ref = actual.detach().double(), ref.detach().double()
    assert actual.shape == ref.shape, what
    assert torch.equal(torch.isnan(actual), torch.isnan(ref)), f"{what}: NaN pattern"
    ok = ~torch.isnan(ref)
    if ok.any():
        err = (actual[ok] - ref[ok]).abs().max().item()
        scale = max(ref[ok].abs().max().item(), 1e-30)
        assert err <= rel * scale + atol, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


def assert_same_state(a, b, rel=REL32, what=""):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if sa[k].dtype == torch.long:
            assert torch.equal(sa[k], sb[k]), f"{what}{k}"
        else:
            assert_rel(sa[k], sb[k], rel, f"{what}{k}")


def randomize(bn):
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.uniform_(-1, 1)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return bn


def pair(nb_cls, stock_cls, c=5, dtype=torch.float32, **kw):
    stock = randomize(stock_cls(c, dtype=dtype, **kw))
    mine = nb_cls(c, dtype=dtype, **kw)
    mine.load_state_dict(stock.state_dict())
    return mine, stock


def step(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y, x.grad


# ---------------------------------------------------------------- import, API


def test_import_numbabn_does_not_import_torch():
    code = "import sys, numbabn; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_torch_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import numbabn.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert "pip install torch==2.13.0" in out


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_same_constructor_parameters_buffers_and_keys(name):
    mine_cls, stock_cls = getattr(nbt, name), getattr(nn, name)
    assert issubclass(mine_cls, stock_cls)
    assert inspect.signature(mine_cls.__init__) == inspect.signature(stock_cls.__init__)
    for kw in CONFIGS + [{"dtype": torch.float64}]:
        mine, stock = mine_cls(4, **kw), stock_cls(4, **kw)
        assert isinstance(mine, stock_cls) and isinstance(mine, nn.modules.batchnorm._BatchNorm)
        assert [(k, v.dtype, v.shape) for k, v in mine.state_dict().items()] == \
            [(k, v.dtype, v.shape) for k, v in stock.state_dict().items()]
        assert [n for n, _ in mine.named_parameters()] == [n for n, _ in stock.named_parameters()]
        assert [n for n, _ in mine.named_buffers()] == [n for n, _ in stock.named_buffers()]
        assert repr(mine) == repr(stock)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"bias": False}])
@pytest.mark.parametrize("cls,shape", [(nbt.BatchNorm1d, (7, 3)), (nbt.BatchNorm2d, (4, 3, 3, 2)),
                                       (nbt.BatchNorm3d, (2, 3, 2, 2, 2))])
def test_gradcheck_float64(calls, cls, shape, training, kw):
    bn = randomize(cls(3, dtype=torch.float64, **kw)).train(training)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    params = {n: p.detach().clone().requires_grad_() for n, p in bn.named_parameters()}
    names = list(params)

    def f(x, *ps):
        return torch.func.functional_call(bn, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()))
    assert calls.get("batch_norm_train" if training else "normalize", 0) > 0
    assert calls.get("batch_norm_backward" if training else "normalize", 0) > 0
    if not training and params:
        assert calls["batch_norm_backward_reduce"] > 0


def test_double_backward_is_refused():
    bn = nbt.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(bn(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


# ---------------------------------------------------------------- single layers


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("nb_cls,stock_cls,shape", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_matches_stock_train_then_eval(calls, nb_cls, stock_cls, shape, kw, dtype):
    rel = REL32 if dtype == torch.float32 else 1e-11
    mine, stock = pair(nb_cls, stock_cls, dtype=dtype, **kw)
    for i in range(4):
        training = i < 3
        mine.train(training), stock.train(training)
        x = torch.randn(shape, dtype=dtype) * 3 + 1
        g = torch.randn(shape, dtype=dtype)
        y1, dx1 = step(mine, x, g)
        y2, dx2 = step(stock, x, g)
        assert_rel(y1, y2, rel, f"y{i}")
        assert_rel(dx1, dx2, rel, f"dx{i}")
        for (n, p1), (_, p2) in zip(mine.named_parameters(), stock.named_parameters()):
            assert_rel(p1.grad, p2.grad, rel, f"{n}.grad{i}")
        assert_same_state(mine, stock, rel, f"step {i}: ")
    if mine.track_running_stats:
        assert calls["batch_norm_train"] == 3 and calls["batch_norm_backward"] == 3
        assert calls["update_running_stats"] == 3
        assert calls["normalize"] == 2  # eval: forward and dx
        assert calls.get("batch_norm_backward_reduce", 0) == (mine.weight is not None)
        assert int(mine.num_batches_tracked) == 3
    else:  # batch statistics in eval mode too
        assert calls == {"batch_norm_train": 4, "batch_norm_backward": 4}


def test_running_stats_update_under_no_grad_and_momentum_none(calls):
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d, momentum=None)
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(8, 5, 4, 4) * 2 - 1
            assert_rel(mine(x), stock(x))
    assert_same_state(mine, stock)
    assert int(mine.num_batches_tracked) == 5 and calls["update_running_stats"] == 5


def test_train_mode_without_tracking_uses_batch_stats_in_eval(calls):
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d, track_running_stats=False)
    mine.eval(), stock.eval()
    x = torch.randn(4, 5, 3, 3)
    assert_rel(mine(x), stock(x))
    assert calls == {"batch_norm_train": 1}


def test_grad_only_for_params_or_only_for_input():
    for training in (True, False):
        mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d)
        mine.train(training), stock.train(training)
        x, g = torch.randn(4, 5, 3, 3), torch.randn(4, 5, 3, 3)
        mine(x).backward(g), stock(x).backward(g)  # x needs no grad
        assert_rel(mine.weight.grad, stock.weight.grad)
        assert_rel(mine.bias.grad, stock.bias.grad)
        for m in (mine, stock):
            m.weight.requires_grad_(False), m.bias.requires_grad_(False)
        _, dx1 = step(mine, x, g)
        _, dx2 = step(stock, x, g)
        assert_rel(dx1, dx2)


def test_sum_backward_gives_broadcast_grad_output():
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d)
    x = torch.randn(4, 5, 3, 3)
    for training in (True, False):
        mine.train(training), stock.train(training)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        (mine(x1) * 2).sum().backward(), (stock(x2) * 2).sum().backward()  # expanded grads
        # training: dx is 0 (stock: rounding noise ~1e-8); eval: 2 * weight * invstd
        assert_rel(x1.grad, x2.grad, what=f"training={training}", atol=1e-6)


# ---------------------------------------------------------------- memory formats


def _strided_inputs(x):
    """Same values in several memory layouts (4-D)."""
    cl = x.contiguous(memory_format=torch.channels_last)
    perm = x.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0)
    wide = torch.cat([x, x], dim=3)
    return {"contiguous": x, "channels_last": cl, "channels_last_slice": cl[:, :, ::2],
            "permuted": perm, "sliced": wide[..., ::2], "transposed": x.transpose(2, 3),
            "expanded": x[:1].expand_as(x)}


@pytest.mark.parametrize("layout", list(_strided_inputs(torch.zeros(2, 2, 2, 2))))
@pytest.mark.parametrize("training", [True, False])
def test_memory_format_and_strides_as_stock(calls, layout, training):
    x = _strided_inputs(torch.randn(6, 5, 8, 7))[layout]
    g = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d)
    mine.train(training), stock.train(training)
    if layout == "expanded" and training:
        x = x + 0.01 * torch.randn(x.shape[1:])  # 1 distinct sample: add spread, keep strides
        x = x.expand(6, *x.shape[1:])
    y1, dx1 = step(mine, x, g)
    y2, dx2 = step(stock, x, g)
    assert y1.stride() == y2.stride(), (x.stride(), y1.stride(), y2.stride())
    assert_rel(y1, y2, what="y")
    assert_rel(dx1, dx2, what="dx")
    assert_same_state(mine, stock)
    assert calls.get("batch_norm_train", 0) + calls.get("normalize", 0) >= 1


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_large_outputs_from_numbabns_allocator_as_stock(calls, fmt):
    """From 4 MiB, outputs and input gradients are NumPy arrays from numbabn's
    allocator wrapped as tensors (huge-page advice): same strides and values as
    stock, and usable as any tensor (in-place ops, autograd)."""
    from numbabn.torch._tensors import OWN_OUTPUT_BYTES, cpu_case

    x = torch.randn(16, 64, 32, 32).contiguous(memory_format=fmt)
    assert x.numel() * 4 >= OWN_OUTPUT_BYTES and cpu_case(x).own_out
    g = torch.randn(x.shape).contiguous(memory_format=fmt)
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d, c=64)
    y1, dx1 = step(mine, x, g)
    y2, dx2 = step(stock, x, g)
    assert (y1.stride(), dx1.stride()) == (y2.stride(), dx2.stride())
    assert_rel(y1, y2, what="y")
    assert_rel(dx1, dx2, what="dx")
    assert_same_state(mine, stock)
    with torch.no_grad():
        e1, e2 = mine.eval()(x), stock.eval()(x)
    assert e1.stride() == e2.stride()
    assert_rel(e1.relu_(), e2.relu_(), what="eval")
    assert calls["batch_norm_train"] == 1 and calls["batch_norm_backward"] == 1
    assert calls["normalize"] == 1


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_3d(calls, training):
    x = torch.randn(3, 5, 4, 3, 6).contiguous(memory_format=torch.channels_last_3d)
    mine, stock = pair(nbt.BatchNorm3d, nn.BatchNorm3d)
    mine.train(training), stock.train(training)
    g = torch.randn(x.shape)
    y1, dx1 = step(mine, x, g)
    y2, dx2 = step(stock, x, g)
    assert y1.is_contiguous(memory_format=torch.channels_last_3d)
    assert y1.stride() == y2.stride()
    assert_rel(y1, y2), assert_rel(dx1, dx2), assert_same_state(mine, stock)


def _random_strided(gen, shape_max=3):
    """A 4-D or 5-D tensor with random sizes (1 included), permutation and steps."""
    ndim = int(gen.integers(4, 6))
    shape = [int(s) for s in gen.integers(1, shape_max + 1, ndim)]
    perm = [int(p) for p in gen.permutation(ndim)]
    steps = [int(s) for s in gen.integers(1, 3, ndim)]
    base = torch.randn([shape[p] * steps[i] for i, p in enumerate(perm)])
    base = base[tuple(slice(None, None, st) for st in steps)]
    return base.permute(*np.argsort(perm).tolist())


def _like(t, values):
    out = torch.empty_strided(t.shape, t.stride())
    return out.copy_(values)


@pytest.mark.slow  # 150 random layouts, each a cold compile
def test_output_and_grad_strides_as_stock_on_random_layouts():
    """Output and input-gradient strides as ATen's (size-1 dimensions included),
    for random layouts of x and of the incoming gradient."""
    gen = np.random.default_rng(1)
    checked = 0
    while checked < 150:
        x = _random_strided(gen)
        if x.numel() // x.shape[1] < 2:
            continue
        checked += 1
        g = _random_strided(gen) if gen.random() < 0.5 else None
        mine_cls, stock_cls = (nbt.BatchNorm2d, nn.BatchNorm2d) if x.dim() == 4 else \
            (nbt.BatchNorm3d, nn.BatchNorm3d)
        for training in (True, False):
            strides = []
            for m in (mine_cls(x.shape[1]).train(training), stock_cls(x.shape[1]).train(training)):
                xi = _like(x, x).requires_grad_()
                seen = []
                xi.register_hook(seen.append)  # the raw gradient, before accumulation
                y = m(xi)
                gi = torch.randn(x.shape) if g is None or g.shape != x.shape else _like(g, torch.randn(x.shape))
                y.backward(gi)
                strides.append((y.stride(), seen[0].stride()))
            assert strides[0] == strides[1], (training, x.shape, x.stride(), strides)


# ---------------------------------------------------------------- fallbacks to stock PyTorch


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_as_stock(calls, training):
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d)
    mine.train(training), stock.train(training)
    x = torch.randn(0, 5, 3, 3)
    y1, dx1 = step(mine, x, torch.randn(x.shape))
    y2, dx2 = step(stock, x, torch.randn(x.shape))
    assert y1.shape == y2.shape == x.shape and dx1.shape == x.shape
    assert_same_state(mine, stock)
    assert calls == {}


HALF_ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _half_ulps(a, ref, dtype):
    """max |a - ref| in half ulps of max |ref| (ref float64)."""
    top = ref.abs().max().item()
    return (a.double() - ref).abs().max().item() / (HALF_ULP[dtype] * 2.0 ** math.floor(math.log2(top)))


@pytest.mark.parametrize("params", ["half", "float32"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_numbabn(calls, dtype, fmt, params):
    """Half models (``module.to(torch.bfloat16)``, or half inputs with float32
    parameters: mixed precision) run numbabn's kernels: y within 2 half ulps
    and dx within 4 of batch norm in float64 on the same values, saved
    statistics float32, gradients in the parameters' dtype, PyTorch's strides."""
    if dtype == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    pdtype = dtype if params == "half" else torch.float32
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d)
    mine.to(pdtype), stock.to(pdtype)
    x = (torch.randn(8, 5, 6, 6) + 3).to(dtype).to(memory_format=fmt)
    g = torch.randn(x.shape).to(dtype).to(memory_format=fmt)
    ref = copy.deepcopy(stock).double()
    y, dx = step(mine, x, g)
    assert calls.get("batch_norm_train") == 1 and y.dtype == dtype
    assert y.stride() == stock(x).stride()
    xd = x.double().requires_grad_()
    ref.train()
    yd = ref(xd)
    yd.backward(g.double())
    assert _half_ulps(y, yd.detach(), dtype) <= 2
    assert _half_ulps(dx, xd.grad, dtype) <= 4
    assert mine.weight.grad.dtype == pdtype and mine.running_mean.dtype == pdtype
    assert_rel(mine.weight.grad.double(), ref.weight.grad, 2 * HALF_ULP[dtype])
    assert_rel(mine.running_mean.double(), ref.running_mean, 2 * HALF_ULP[dtype])
    mine.eval()
    ref.eval()
    assert _half_ulps(mine(x), ref(x.double()).detach(), dtype) <= 2


def test_errors_are_pytorchs():
    def message(module, x):
        with pytest.raises(Exception) as info:
            module(x)
        return type(info.value), str(info.value)

    cases = [
        (nbt.BatchNorm2d, nn.BatchNorm2d, torch.randn(4, 5, 3)),       # wrong ndim
        (nbt.BatchNorm1d, nn.BatchNorm1d, torch.randn(1, 5)),          # 1 value per channel
        (nbt.BatchNorm2d, nn.BatchNorm2d, torch.randn(1, 5, 1, 1)),
        (nbt.BatchNorm2d, nn.BatchNorm2d, torch.randn(4, 6, 3, 3)),    # wrong channel count
        (nbt.BatchNorm2d, nn.BatchNorm2d, torch.randn(4, 5, 3, 3, dtype=torch.float64)),
    ]
    for mine_cls, stock_cls, x in cases:
        mine, stock = pair(mine_cls, stock_cls)
        assert message(mine, x) == message(stock, x)
        assert_same_state(mine, stock, rel=0)


def test_eps_zero_and_large_momentum_run_stock(calls):
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d, momentum=1.5)
    x = torch.randn(4, 5, 3, 3)
    assert_rel(mine(x), stock(x))
    assert_same_state(mine, stock)
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d, eps=0.0)
    mine.eval(), stock.eval()
    assert_rel(mine(x), stock(x))
    mine.train(), stock.train()
    for m in (mine, stock):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            m(x)
    assert_same_state(mine, stock)
    assert calls == {}


def test_compile_runs_numbabn_and_vmap_runs_stock(calls):
    mine, stock = pair(nbt.BatchNorm2d, nn.BatchNorm2d)
    x = torch.randn(4, 5, 3, 3)
    assert_rel(torch.compile(mine, backend="eager")(x), stock(x))
    assert_same_state(mine, stock)
    assert calls == {"batch_norm_train": 1, "update_running_stats": 1}
    calls.clear()
    mine.track_running_stats = stock.track_running_stats = False
    xs = torch.randn(3, 4, 5, 3, 3)
    assert_rel(torch.func.vmap(mine)(xs), torch.func.vmap(stock)(xs))
    assert calls == {}


# ---------------------------------------------------------------- models


def conv_bn_relu(channels=(3, 8, 8), classes=4, seed=0):
    torch.manual_seed(seed)
    layers = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 8, bias=False),
               nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, classes)]
    return nn.Sequential(*layers)


def batches(n, shape=(16, 3, 12, 12), classes=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * 2 + 0.5,
             torch.randint(0, classes, (shape[0],), generator=gen)) for _ in range(n)]


def train_step(model, opt, x, t):
    opt.zero_grad()
    out = model(x)
    loss = nn.functional.cross_entropy(out, t)
    loss.backward()
    opt.step()
    return out.detach(), loss.detach()


class Trio:
    """The numbabn model, the stock model and a float64 stock twin, trained on the
    same batches.  Every tensor of the numbabn model must be within 1e-5
    (relative to the tensor's largest value) of the stock model, plus the stock
    model's own float32 error (its distance from the float64 twin): PyTorch's
    float32 channels-last kernels sum the bias gradient in float32 and err by up
    to ~4e-5 there, where numbabn sums in float64 (and is within ~5e-6)."""

    def __init__(self, stock, mine, fmt=torch.contiguous_format, opt=None):
        self.models = [mine, stock, copy.deepcopy(stock).double()]
        self.fmt = fmt
        for m in self.models:
            m.to(memory_format=fmt)
        opt = opt or (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
        self.opts = [opt(m.parameters()) for m in self.models]

    def inputs(self, x):
        x = x.contiguous(memory_format=self.fmt)
        return x, x, x.double()

    def train(self, x, t, what):
        res = [train_step(m, o, xi, t) for m, o, xi in zip(self.models, self.opts, self.inputs(x))]
        self.check([r[0] for r in res], f"{what} out")
        self.check([r[1] for r in res], f"{what} loss")
        mine, stock, ref = self.models
        gmax = max(p.grad.abs().max().item() for p in ref.parameters())
        for (n, p1), (_, p2), (_, p3) in zip(*(m.named_parameters() for m in self.models)):
            self.check([p1, p2, p3], f"{what} {n}")
            self.check([p1.grad, p2.grad, p3.grad], f"{what} {n}.grad", atol=1e-6 * gmax)
        for (n, b1), (_, b2), (_, b3) in zip(*(m.named_buffers() for m in self.models)):
            if b1.dtype == torch.long:
                assert torch.equal(b1, b2) and torch.equal(b1, b3), f"{what} {n}"
            else:
                self.check([b1, b2, b3], f"{what} {n}")

    def eval(self, x, what):
        for m in self.models:
            m.eval()
        with torch.no_grad():
            self.check([m(xi) for m, xi in zip(self.models, self.inputs(x))], what)

    @staticmethod
    def check(tensors, what, rel=REL32, atol=0.0):
        mine, stock, ref = (t.detach().double() for t in tensors)
        scale = ref.abs().max().item()
        own = (stock - ref).abs().max().item()
        err_stock = (mine - stock).abs().max().item()
        assert err_stock <= rel * scale + own + atol, \
            f"{what}: {err_stock:.3g} from stock (scale {scale:.3g}, stock's own error {own:.3g})"


@pytest.mark.parametrize("channels_last", [False, True])
def test_sgd_training_then_eval_matches_stock(calls, channels_last):
    stock = conv_bn_relu()
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    trio = Trio(stock, mine, torch.channels_last if channels_last else torch.contiguous_format)
    for i, (x, t) in enumerate(batches(6)):
        trio.train(x, t, f"step {i}")
    assert calls["batch_norm_train"] == 6 * 3 and calls["batch_norm_backward"] == 6 * 3
    for i, (x, _) in enumerate(batches(2, seed=2)):
        trio.eval(x, f"eval {i}")
    assert calls["normalize"] == 2 * 3
    assert int(mine[1].num_batches_tracked) == 6


def test_replace_batchnorm_mid_training_and_optimizer_keeps_working(calls):
    stock = conv_bn_relu()
    mine = copy.deepcopy(stock)
    trio = Trio(stock, mine)  # the optimizers are created here, before the swap
    data = batches(6)
    for i, (x, t) in enumerate(data[:3]):
        trio.train(x, t, f"stock step {i}")
    params_before = [id(p) for p in mine.parameters()]
    buffers_before = [id(b) for b in mine.buffers()]
    assert nbt.replace_batchnorm(mine) is mine
    assert type(mine[1]) is nbt.BatchNorm2d and type(mine[9]) is nbt.BatchNorm1d
    assert [id(p) for p in mine.parameters()] == params_before
    assert [id(b) for b in mine.buffers()] == buffers_before
    assert calls == {}
    for i, (x, t) in enumerate(data[3:]):
        trio.train(x, t, f"numbabn step {i}")
    assert calls["batch_norm_train"] == 3 * 3
    assert int(mine[1].num_batches_tracked) == 6
    assert all(len(trio.opts[0].state[p]) > 0 for p in mine.parameters())


def test_replace_batchnorm_which_modules():
    lazy = nn.LazyBatchNorm2d()
    sync = nn.SyncBatchNorm(4)

    class MyBN(nn.BatchNorm2d):
        pass

    sub = MyBN(4)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm2d(4).eval(), nn.BatchNorm3d(4), lazy,
                          sync, sub, nn.Sequential(nn.BatchNorm2d(2)))
    model.add_module("shared", model[1])
    nbt.replace_batchnorm(model)
    assert [type(m) for m in model[:3]] == [nbt.BatchNorm1d, nbt.BatchNorm2d, nbt.BatchNorm3d]
    assert type(model[6][0]) is nbt.BatchNorm2d and model.shared is model[1]
    assert not model[1].training and model[0].training
    assert type(model[3]) is nn.LazyBatchNorm2d and type(model[4]) is nn.SyncBatchNorm
    assert type(model[5]) is MyBN
    # a lazy layer, once initialised, becomes a stock BatchNorm2d: a second call swaps it
    lazy(torch.randn(2, 3, 2, 2))
    assert type(nbt.replace_batchnorm(model)[3]) is nbt.BatchNorm2d
    bn = nn.BatchNorm2d(3)
    assert nbt.replace_batchnorm(bn) is bn and type(bn) is nbt.BatchNorm2d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nbt.replace_batchnorm([bn])


def test_state_dict_round_trips():
    stock = conv_bn_relu()
    opt = torch.optim.SGD(stock.parameters(), lr=0.1)
    for x, t in batches(2):
        train_step(stock, opt, x, t)
    mine = nbt.replace_batchnorm(conv_bn_relu(seed=5))
    mine.load_state_dict(stock.state_dict())
    assert_same_state(mine, stock, rel=0)
    back = conv_bn_relu(seed=7)
    back.load_state_dict(mine.state_dict())
    assert_same_state(back, stock, rel=0)
    assert all(type(m) is not nbt.BatchNorm2d for m in back.modules())
    mine.eval(), stock.eval()
    x = batches(1, seed=3)[0][0]
    assert_rel(mine(x), stock(x))
    # torch.save / torch.load of the numbabn model itself
    import io
    buf = io.BytesIO()
    torch.save(mine.state_dict(), buf)
    buf.seek(0)
    fresh = nbt.replace_batchnorm(conv_bn_relu(seed=9))
    fresh.load_state_dict(torch.load(buf))
    assert_same_state(fresh, stock, rel=0)


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") != "0",
                    reason="needs a CUDA GPU and NUMBA_ENABLE_CUDASIM=0")
def test_cuda_matches_stock(calls):
    stock = conv_bn_relu().cuda()
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    opt1 = torch.optim.SGD(mine.parameters(), lr=0.05)
    opt2 = torch.optim.SGD(stock.parameters(), lr=0.05)
    for x, t in batches(3):
        out1, _ = train_step(mine, opt1, x.cuda(), t.cuda())
        out2, _ = train_step(stock, opt2, x.cuda(), t.cuda())
        assert_rel(out1.cpu(), out2.cpu())
    assert calls["batch_norm_train"] == 3 * 3
