"""numbabn.torch's custom ops (torch.ops.numbabn.*) and the tools that see them:
TorchScript, FX, torch.compile, torch.export, fusion, restore_batchnorm, and
Numba's threads following PyTorch's.  References are stock PyTorch modules."""

import copy
import io

import numba
import pytest

torch = pytest.importorskip("torch")
nbt = pytest.importorskip("numbabn.torch")

nn = torch.nn
F = nn.functional


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# These tests check numbabn's kernels against stock PyTorch: every call takes
# numbabn's route (tests/conftest.py; the per-shape table sends some small test shapes
# to ATen, and tests/torch_interop/test_torch_dispatch.py checks the table).
pytestmark = pytest.mark.usefixtures("numbabn_route")


def close(a, ref, rel, what=""):
    a, ref = a.detach().double(), ref.detach().double()
    assert a.shape == ref.shape, what
    err = (a - ref).abs().max().item() if a.numel() else 0.0
    assert err <= rel * max(ref.abs().max().item(), 1e-30), f"{what}: {err:.3g}"


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
        nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 3)).to(dtype)


def same_state(mine, stock, rel, what=""):
    for (k, a), (_, b) in zip(mine.state_dict().items(), stock.state_dict().items()):
        if b.dtype == torch.long:
            assert torch.equal(a, b), f"{what}{k}"
        else:
            close(a, b, rel, f"{what}{k}")


def vectors(c, dtype):
    return (torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype),
            torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5)


# ---------------------------------------------------------------- the ops


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_training_op_and_its_gradients_match_stock_in_float64(relu, fmt):
    x = (torch.randn(5, 4, 3, 6, dtype=torch.float64) * 2 + 1).contiguous(memory_format=fmt)
    w, b, rm, rv = vectors(4, torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (x, w, b)]
    y, mean, invstd, var = torch.ops.numbabn.batch_norm_train(*ins, 1e-5, relu)
    y.backward(dy)
    ref_ins = [t.clone().requires_grad_() for t in (x, w, b)]
    rrm, rrv = rm.clone(), rv.clone()
    ref = F.batch_norm(ref_ins[0], rrm, rrv, ref_ins[1], ref_ins[2], True, 0.3, 1e-5)
    ref = torch.relu(ref) if relu else ref
    ref.backward(dy)
    assert y.stride() == ref.stride()
    close(y, ref, 1e-12, "y")
    for a, r, name in zip(ins, ref_ins, "x w b".split()):
        close(a.grad, r.grad, 1e-11, f"d{name}")
    dims = [0, 2, 3]
    close(mean, x.mean(dims), 1e-12, "mean")
    close(var, x.var(dims, correction=0), 1e-12, "var")
    close(invstd, (x.var(dims, correction=0) + 1e-5).rsqrt(), 1e-12, "invstd")
    torch.ops.numbabn.update_running_stats(rm, rv, None, mean, var, x.numel() // 4, 0.3)
    close(rm, rrm, 1e-14, "running_mean"), close(rv, rrv, 1e-14, "running_var")


@pytest.mark.parametrize("relu", [False, True])
def test_eval_op_and_its_gradients_match_stock(relu):
    x = torch.randn(6, 4, 5, dtype=torch.float64) * 2 + 1
    w, b, rm, rv = vectors(4, torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (x, w, b)]
    y = torch.ops.numbabn.batch_norm_eval(*ins, rm, rv, 1e-3, relu)
    y.backward(dy)
    ref_ins = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.batch_norm(ref_ins[0], rm, rv, ref_ins[1], ref_ins[2], False, 0.1, 1e-3)
    (torch.relu(ref) if relu else ref).backward(dy)
    close(y, torch.relu(ref) if relu else ref, 1e-12, "y")
    for a, r, name in zip(ins, ref_ins, "x w b".split()):
        close(a.grad, r.grad, 1e-11, f"d{name}")


def test_ops_pass_opcheck():
    x = torch.randn(4, 3, 2, 2)
    w, b, rm, rv = vectors(3, torch.float32)
    w.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(torch.ops.numbabn.batch_norm_train.default, (x, w, b, 1e-5, True))
    torch.library.opcheck(torch.ops.numbabn.batch_norm_eval.default, (x, w, b, rm, rv, 1e-5, False))


def test_ops_run_stock_kernels_for_half_precision():
    x = torch.randn(4, 3, 2, 2).half()
    w, b, rm, rv = (t.half() for t in vectors(3, torch.float32))
    y, *_ = torch.ops.numbabn.batch_norm_train(x, w, b, 1e-5, False)
    close(y, F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), 1e-3)
    close(torch.ops.numbabn.batch_norm_eval(x, w, b, rm, rv, 1e-5, False),
          F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), 1e-3)


def test_eager_layer_gives_the_ops_bits():
    bn = nbt.BatchNorm2d(4, dtype=torch.float64)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y_op, *_ = torch.ops.numbabn.batch_norm_train(x, bn.weight, bn.bias, bn.eps, False)
    assert torch.equal(bn(x), y_op)


def test_double_backward_through_the_op_is_refused():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y, *_ = torch.ops.numbabn.batch_norm_train(x, None, None, 1e-5, False)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        g.sum().backward()


# ---------------------------------------------------------------- tools


@pytest.mark.parametrize("training", [True, False])
def test_torchscript_scripts_and_runs_stock_batch_norm(training):
    stock = net().train(training)
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    scripted = torch.jit.script(mine)
    assert type(mine[1]) is nbt.BatchNorm2d  # scripting leaves the eager model as it was
    x = torch.randn(6, 3, 5, 5)
    for _ in range(2):
        close(scripted(x), stock(x), 1e-6)
    same_state(mine, stock, 1e-6)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    close(torch.jit.load(buf)(x), scripted(x), 1e-6)


def test_fx_symbolic_trace_records_the_ops():
    stock = net()
    gm = torch.fx.symbolic_trace(nbt.replace_batchnorm(copy.deepcopy(stock)))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.numbabn.batch_norm_train) == 2
    assert targets.count(torch.ops.numbabn.update_running_stats) == 2
    x = torch.randn(6, 3, 5, 5)
    for _ in range(2):
        close(gm(x), stock(x), 1e-5)
    same_state(gm, stock, 1e-5)  # num_batches_tracked counted by the recorded op
    # the mode is recorded in the graph (FX records one path): trace the eval model
    stock.eval()
    gm_eval = torch.fx.symbolic_trace(nbt.replace_batchnorm(copy.deepcopy(stock)))
    assert "numbabn.batch_norm_eval" in gm_eval.code
    close(gm_eval(x), stock(x), 1e-5)
    # a graph recorded without dtypes runs anything: half precision too
    half = copy.deepcopy(stock).half()
    close(gm_eval.half()(x.half()), half(x.half()), 1e-2)


def _compile_check(backend):
    stock = net()
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    compiled = torch.compile(mine, backend=backend, fullgraph=True)
    for training in (True, False):
        mine.train(training), stock.train(training)
        for _ in range(2):
            x = torch.randn(6, 3, 5, 5)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = compiled(x1), stock(x2)
            close(y1, y2, 1e-5, "y")
            y1.pow(2).sum().backward(), y2.pow(2).sum().backward()
            close(x1.grad, x2.grad, 1e-4, "dx")
    for (n, p1), (_, p2) in zip(mine.named_parameters(), stock.named_parameters()):
        close(p1.grad, p2.grad, 1e-4, n)
    same_state(mine, stock, 1e-5)


def test_compile_fullgraph_aot_eager():
    _compile_check("aot_eager")


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often numbabn's CPU forward kernels ran (training and eval)."""
    from numbabn._cpu import feature_ops
    counts = {"train": 0, "eval": 0}
    for name, key in (("batch_norm_train", "train"), ("normalize", "eval")):
        fn = getattr(feature_ops, name)

        def counted(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(feature_ops, name, counted)
    return counts


def test_half_models_compile_and_autocast_on_numbabn(kernel_calls):
    """A bfloat16 model compiles in one graph and runs numbabn's kernels; under
    ``torch.autocast("cpu", torch.bfloat16)`` the convolution hands a bfloat16
    input to float32 batch-norm parameters (mixed precision), as in stock."""
    pytest.importorskip("ml_dtypes")
    stock = net().to(torch.bfloat16)
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    compiled = torch.compile(mine, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 3, 5, 5, dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = compiled(x1), stock(x2)
    assert y1.dtype == torch.bfloat16 and kernel_calls["train"] == 2
    close(y1, y2, 0.1, "y")  # 8-bit outputs of two different roundings through 5 layers
    y1.float().pow(2).sum().backward(), y2.float().pow(2).sum().backward()
    close(x1.grad, x2.grad, 0.1, "dx")
    stock32 = net()
    mine32 = nbt.replace_batchnorm(copy.deepcopy(stock32))
    x = torch.randn(6, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = mine32(x), stock32(x)
    assert kernel_calls["train"] == 4 and y1.dtype == y2.dtype
    close(y1, y2, 0.05, "autocast y")
    same_state(mine32, stock32, 1e-2)


@pytest.mark.slow  # inductor generates and builds C++
def test_compile_fullgraph_inductor():
    _compile_check("inductor")


def test_export_records_the_ops():
    stock = net()
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    x = torch.randn(6, 3, 5, 5)
    ep = torch.export.export(mine, (x,))
    code = ep.graph_module.code
    assert "numbabn.batch_norm_train" in code and "numbabn.update_running_stats" in code
    exported = ep.module()
    for _ in range(2):
        close(exported(x), stock(x), 1e-5)
    ep_eval = torch.export.export(mine.eval(), (x,))
    assert "numbabn.batch_norm_eval" in ep_eval.graph_module.code
    close(ep_eval.module()(x), stock.eval()(x), 1e-5)


# ---------------------------------------------------------------- swaps, fusion, threads


def test_restore_batchnorm_undoes_replace_batchnorm():
    stock = net()
    model = copy.deepcopy(stock)
    ids = [id(t) for t in (*model.parameters(), *model.buffers())]
    nbt.replace_batchnorm(model)
    assert nbt.restore_batchnorm(model) is model
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]
    assert [id(t) for t in (*model.parameters(), *model.buffers())] == ids
    bn = nbt.BatchNorm3d(2)
    assert type(nbt.restore_batchnorm(bn)) is nn.BatchNorm3d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nbt.restore_batchnorm([bn])


def test_fuse_modules_and_fuse_conv_bn_eval_take_numbabn_layers():
    from torch.ao.quantization import fuse_modules, fuse_modules_qat

    stock = net()
    x = torch.randn(6, 3, 5, 5)
    stock(x)  # running statistics away from their initial values
    stock.eval()
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    fused = fuse_modules(mine, [["0", "1", "2"], ["5", "6"]])
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[6], nn.Identity)
    close(fused(x), stock(x), 1e-5)
    assert type(mine[1]) is nbt.BatchNorm2d  # inplace=False: the model is untouched
    conv = nn.utils.fuse_conv_bn_eval(copy.deepcopy(stock[0]), nbt.replace_batchnorm(
        copy.deepcopy(stock[1])))
    close(conv(x), stock[1](stock[0](x)), 1e-5)
    qat = fuse_modules_qat(copy.deepcopy(mine).train(), [["0", "1", "2"]])
    assert type(qat[0]).__name__ == "ConvBnReLU2d"


def test_threads_follow_torch_get_num_threads():
    bn = nbt.BatchNorm2d(8)
    x = torch.randn(16, 8, 32, 32)  # large enough to use threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        bn(x)
        assert numba.get_num_threads() == 1
        torch.set_num_threads(max(before, 1))
        bn(x)
        assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)
