"""The shape census: every normalization input of standard networks, and the
implementations timed on them (numbabn, PyTorch's ATen kernels, ONNX Runtime).

The shapes come from the architectures' definitions, written out below (layer
by layer, as the common CIFAR/ImageNet code defines them), not from a list of
hand-picked sizes:

- ``resnet18-cifar`` (BasicBlock [2, 2, 2, 2], 3x3 stem, 32x32 input) at batch 32 and 128;
- ``mobilenetv2-cifar`` (the CIFAR variant: stride 1 stem and first 24-channel
  stage, 1280-channel head) at batch 32 and 128;
- ``resnet50`` (ImageNet, torchvision's v1.5 bottlenecks, 224x224) at batch 8 and 32;
- ``resnet50-gn`` the same with GroupNorm(32) in place of every BatchNorm, batch 8
  (GroupNorm's home: detection and segmentation at small batch);
- ``densenet121-cifar`` (growth 32, blocks [6, 12, 24, 16], compression 0.5) at batch 32;
- ``bert-base`` LayerNorm (batch 32 x sequence 128, 768), ``gpt2-medium``
  LayerNorm (batch 8 x sequence 1024, 1024), ``llama-style`` RMSNorm (batch 8 x
  sequence 512, 2048);
- ``style-transfer`` InstanceNorm (Johnson et al.'s network, batch 4, 256x256);
- ``mnist-cnn``: numbabn's own MNIST model (numbabn.mnist.models.mnist_cnn), batch 128.

A census case is one distinct (norm, shape, layout, dtype); ``uses`` counts the
layers (over all models) that see it.  Batch norm and group norm run on NCHW and
on channels-last (NHWC memory, PyTorch's ``channels_last``); float64 is
measured where users run it (the CIFAR ResNet-18 at batch 32 and BERT).
``census(dtypes=("bfloat16",))`` gives every shape in one dtype instead: the
half-precision census (bfloat16 needs ml_dtypes; parameters in the same dtype,
as ``model.to(torch.bfloat16)`` has them; ONNX Runtime is not timed there).

Operations: batch norm ``fwd_train`` (statistics and output), ``backward`` (dx,
dweight, dbias) and ``eval`` (running statistics); the family's ``forward``
(training and inference are one computation for them) and ``backward``.
ONNX Runtime (the ``bench`` extra) has ``BatchNormalization`` (eval, NCHW),
``LayerNormalization`` and ``GroupNormalization`` (forward, NCHW); it is timed
on those.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

import numbabn as nb
from benchmarks.cases import EPS, numpy_backward, numpy_fwd_train, numpy_normalize, torch

try:  # ONNX Runtime is an optional peer (the bench extra)
    import onnxruntime as ort
    from onnx import TensorProto, helper
except ImportError:  # pragma: no cover - depends on the environment
    ort = None

BATCH_OPS = ("fwd_train", "backward", "eval")
FAMILY_OPS = ("forward", "backward")
IMPLS = ("numbabn", "torch", "ort")


# --------------------------------------------------------------------------- #
# The architectures: each yields (norm, shape[, groups]) per normalization layer.
# --------------------------------------------------------------------------- #
def resnet18_cifar(n):
    yield "batch", (n, 64, 32, 32)  # stem
    res, cin = 32, 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            res //= s
            yield "batch", (n, planes, res, res)  # bn1
            yield "batch", (n, planes, res, res)  # bn2
            if s != 1 or cin != planes:
                yield "batch", (n, planes, res, res)  # shortcut
            cin = planes


MOBILENETV2_CIFAR = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenetv2_cifar(n):
    res, cin = 32, 32
    yield "batch", (n, 32, res, res)  # stem
    for expansion, cout, blocks, stride in MOBILENETV2_CIFAR:
        for b in range(blocks):
            s = stride if b == 0 else 1
            planes = expansion * cin
            yield "batch", (n, planes, res, res)  # expand 1x1
            res //= s
            yield "batch", (n, planes, res, res)  # depthwise 3x3
            yield "batch", (n, cout, res, res)  # project 1x1
            if s == 1 and cin != cout:
                yield "batch", (n, cout, res, res)  # shortcut
            cin = cout
    yield "batch", (n, 1280, res, res)  # head


def resnet50(n, norm="batch"):
    def layer(shape):
        return (norm, shape) if norm == "batch" else (norm, shape, 32)

    yield layer((n, 64, 112, 112))  # stem (before the max pool)
    res, cin = 56, 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            yield layer((n, planes, res, res))  # conv1 1x1 (v1.5: stride on the 3x3)
            out = res // s
            yield layer((n, planes, out, out))  # conv2 3x3
            yield layer((n, 4 * planes, out, out))  # conv3 1x1
            if b == 0:
                yield layer((n, 4 * planes, out, out))  # downsample
            res, cin = out, 4 * planes


def densenet121_cifar(n, growth=32):
    planes, res = 2 * growth, 32
    for i, blocks in enumerate((6, 12, 24, 16)):
        for _ in range(blocks):
            yield "batch", (n, planes, res, res)  # bn1 before the 1x1
            yield "batch", (n, 4 * growth, res, res)  # bn2 before the 3x3
            planes += growth
        if i < 3:
            yield "batch", (n, planes, res, res)  # transition
            planes //= 2
            res //= 2
    yield "batch", (n, planes, res, res)  # final


def mnist_cnn(n):
    # numbabn.mnist.models.mnist_cnn: conv 1->32 (3x3) on 28x28, BN; conv 32->64, BN, pool; fc 128, BN1d
    yield "batch", (n, 32, 26, 26)
    yield "batch", (n, 64, 24, 24)
    yield "batch", (n, 128)


def style_transfer(n):
    # Johnson et al.: 9x9 conv 32 at full size, two stride-2 convs, five residual blocks at 64x64
    yield "instance", (n, 32, 256, 256)
    yield "instance", (n, 64, 128, 128)
    for _ in range(11):
        yield "instance", (n, 128, 64, 64)
    yield "instance", (n, 64, 128, 128)
    yield "instance", (n, 32, 256, 256)


def transformer(rows, width, layers, norm="layer"):
    for _ in range(2 * layers + 1):
        yield norm, (rows, width)


MODELS = OrderedDict([
    ("resnet18-cifar b32", lambda: resnet18_cifar(32)),
    ("resnet18-cifar b128", lambda: resnet18_cifar(128)),
    ("mobilenetv2-cifar b32", lambda: mobilenetv2_cifar(32)),
    ("mobilenetv2-cifar b128", lambda: mobilenetv2_cifar(128)),
    ("resnet50 b8", lambda: resnet50(8)),
    ("resnet50 b32", lambda: resnet50(32)),
    ("resnet50-gn b8", lambda: resnet50(8, "group")),
    ("densenet121-cifar b32", lambda: densenet121_cifar(32)),
    ("mnist-cnn b128", lambda: mnist_cnn(128)),
    ("bert-base b32x128", lambda: transformer(32 * 128, 768, 12)),
    ("gpt2-medium b8x1024", lambda: transformer(8 * 1024, 1024, 24)),
    ("llama-style b8x512", lambda: transformer(8 * 512, 2048, 16, "rms")),
    ("style-transfer b4", lambda: style_transfer(4)),
])

# where users run float64 too
FLOAT64_MODELS = ("resnet18-cifar b32", "bert-base b32x128")


@dataclass(frozen=True)
class CensusCase:
    norm: str  # batch, layer, rms, group, instance
    shape: tuple  # logical: (N, C, *spatial) or (rows, features)
    layout: str  # NCHW, NHWC (channels-last memory) or rows
    dtype: str
    groups: int = 0
    uses: int = field(default=1, compare=False)
    models: tuple = field(default=(), compare=False)

    @property
    def label(self):
        g = f"/{self.groups}" if self.norm == "group" else ""
        return f"{self.norm} {self.shape}{g} {self.layout} {self.dtype}"

    @property
    def ops(self):
        return BATCH_OPS if self.norm == "batch" else FAMILY_OPS

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * np_dtype(self.dtype).itemsize


def np_dtype(name):
    """The NumPy dtype of a census dtype name (bfloat16 from ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


HALF = ("float16", "bfloat16")


def census(models=None, layouts=("NCHW", "NHWC"), dtypes=None):
    """The distinct cases of ``models`` (default: all), each with its use count;
    ``dtypes``: every case in these dtypes (default: float32, and float64 where
    users run it)."""
    found = OrderedDict()
    for name, layers in MODELS.items():
        if models is not None and name not in models:
            continue
        model_dtypes = dtypes or (
            ("float32", "float64") if name in FLOAT64_MODELS else ("float32",))
        for entry in layers():
            norm, shape = entry[0], entry[1]
            groups = entry[2] if len(entry) > 2 else 0
            for lay in (("rows",) if len(shape) == 2 else layouts):
                if norm == "instance" and lay == "NHWC":
                    continue  # style-transfer code runs NCHW
                for dt in model_dtypes:
                    key = (norm, shape, lay, dt, groups)
                    uses, where = found.get(key, (0, ()))
                    found[key] = uses + 1, where if name in where else where + (name,)
    return [CensusCase(*key, uses=u, models=w) for key, (u, w) in found.items()]


# --------------------------------------------------------------------------- #
# Inputs and references
# --------------------------------------------------------------------------- #
class CensusInputs:
    """Random inputs of one case in its memory layout, and float64 references."""

    def __init__(self, case: CensusCase, seed=0):
        rng = np.random.default_rng(seed)
        dt = np_dtype(case.dtype)
        self.case = case
        shape = case.shape
        nfeat = shape[1] if case.norm in ("batch", "group", "instance") else shape[-1]
        if case.norm == "batch" and len(shape) == 2:
            nfeat = shape[1]
        bshape = [1] * len(shape)
        bshape[1 if case.norm in ("batch", "group", "instance") else -1] = nfeat
        loc = rng.uniform(-3, 3, nfeat).reshape(bshape)
        scale = rng.uniform(0.5, 2, nfeat).reshape(bshape)
        x = (loc + scale * rng.standard_normal(shape, dtype=np.float32)).astype(dt)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dt)
        if case.layout == "NHWC":  # same logical (N, C, H, W), channels-last memory
            perm = (0,) + tuple(range(2, len(shape))) + (1,)
            inv = (0, len(shape) - 1) + tuple(range(1, len(shape) - 1))
            x = np.ascontiguousarray(x.transpose(perm)).transpose(inv)
            dy = np.ascontiguousarray(dy.transpose(perm)).transpose(inv)
        self.x, self.dy = x, dy
        self.weight = rng.uniform(0.5, 1.5, nfeat).astype(dt)
        self.bias = rng.uniform(-1, 1, nfeat).astype(dt)
        self.running_mean = rng.uniform(-1, 1, nfeat).astype(dt)
        self.running_var = rng.uniform(0.5, 2, nfeat).astype(dt)
        self.nfeat = nfeat
        if case.norm == "batch":
            # numbabn's batch-norm functions take the feature axis; channels-last is axis 1 of
            # the NCHW view with NHWC strides (any strides work), as numbabn.torch passes it
            _, self.mean, self.invstd = nb.batch_norm_train(x, self.weight, self.bias, EPS, 1)
        else:
            _, self.mean, self.rstd = self._numbabn_family_train()

    # the family through numbabn
    def _numbabn_family_train(self):
        c, x, w, b = self.case, self.x, self.weight, self.bias
        if c.norm == "layer":
            return nb.layer_norm_train(x, x.shape[-1], w, b, EPS)
        if c.norm == "rms":
            y, rstd = nb.rms_norm_train(x, x.shape[-1], w, EPS)
            return y, None, rstd
        if c.norm == "group":
            return nb.group_norm_train(x, c.groups, w, b, EPS)
        return nb.instance_norm_train(x, w, b, EPS)


def _family_groups(case):
    return {"group": case.groups, "instance": case.shape[1]}.get(case.norm)


def family_reference(op, inp):
    """float64 forward (y) or backward (dx, dweight[, dbias]) of a family case."""
    c = inp.case
    x = inp.x.astype(np.float64)
    dy = inp.dy.astype(np.float64)
    w = inp.weight.astype(np.float64)
    b = inp.bias.astype(np.float64)
    if c.norm in ("layer", "rms"):
        xr = x.reshape(-1, x.shape[-1])
        dyr = dy.reshape(xr.shape)
        mean = xr.mean(axis=1, keepdims=True) if c.norm == "layer" else 0.0
        xc = xr - mean
        var = (xc * xc).mean(axis=1, keepdims=True)
        rstd = 1.0 / np.sqrt(var + EPS)
        xhat = xc * rstd
        if op == "forward":
            return ((xhat * w + (b if c.norm == "layer" else 0.0)).reshape(x.shape),)
        g = dyr * w
        n = xr.shape[1]
        if c.norm == "layer":
            dx = rstd * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
            return dx.reshape(x.shape), (dyr * xhat).sum(0), dyr.sum(0)
        dx = rstd * (g - xhat * (g * xhat).sum(axis=1, keepdims=True) / n)
        return dx.reshape(x.shape), (dyr * xhat).sum(0)
    groups = _family_groups(c)
    nsh = x.shape
    xg = x.reshape(nsh[0], groups, -1)
    mean = xg.mean(axis=2, keepdims=True)
    var = xg.var(axis=2, keepdims=True)
    rstd = 1.0 / np.sqrt(var + EPS)
    xhat = ((xg - mean) * rstd).reshape(nsh)
    bsh = (1, nsh[1]) + (1,) * (len(nsh) - 2)
    if op == "forward":
        return (xhat * w.reshape(bsh) + b.reshape(bsh),)
    g = (dy * w.reshape(bsh)).reshape(nsh[0], groups, -1)
    xh = xhat.reshape(g.shape)
    dx = rstd * (g - g.mean(axis=2, keepdims=True) - xh * (g * xh).mean(axis=2, keepdims=True))
    red = (0,) + tuple(range(2, len(nsh)))
    return dx.reshape(nsh), (dy * xhat).sum(red), dy.sum(red)


def reference(op, inp):
    c = inp.case
    if c.norm != "batch":
        return family_reference(op, inp)
    x64 = inp.x.astype(np.float64)
    w, b = inp.weight.astype(np.float64), inp.bias.astype(np.float64)
    if op == "fwd_train":
        return numpy_fwd_train(x64, w, b, 1)
    if op == "eval":
        return (numpy_normalize(x64, inp.running_mean.astype(np.float64),
                                inp.running_var.astype(np.float64), w, b, 1),)
    return numpy_backward(inp.dy.astype(np.float64), x64, w, 1)


# --------------------------------------------------------------------------- #
# Implementations
# --------------------------------------------------------------------------- #
def _numbabn(op, inp):
    c, x, dy, w, b = inp.case, inp.x, inp.dy, inp.weight, inp.bias
    if c.norm == "batch":
        if op == "fwd_train":
            return lambda: nb.batch_norm_train(x, w, b, EPS, 1)
        if op == "eval":
            rm, rv = inp.running_mean, inp.running_var
            return lambda: (nb.batch_norm(x, rm, rv, w, b, training=False, eps=EPS, axis=1),)
        mean, invstd = inp.mean, inp.invstd
        return lambda: nb.batch_norm_backward(dy, x, mean, invstd, w, 1)
    if op == "forward":
        return lambda: (inp._numbabn_family_train()[0],)
    if c.norm == "layer":
        return lambda: nb.layer_norm_backward(dy, x, inp.mean, inp.rstd, x.shape[-1], w)
    if c.norm == "rms":
        return lambda: nb.rms_norm_backward(dy, x, inp.rstd, x.shape[-1], w)
    if c.norm == "group":
        return lambda: nb.group_norm_backward(dy, x, inp.mean, inp.rstd, c.groups, w)
    return lambda: nb.instance_norm_backward(dy, x, inp.mean, inp.rstd, w)


def _tensor(a):
    """A tensor over ``a``'s memory, strides kept (bfloat16 through its bits)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _array(t):
    """An array over a result tensor's memory (bfloat16 as ml_dtypes', no copy)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.numpy()


def _torch(op, inp):
    """ATen's kernels on the same memory (a channels-last case is a channels_last tensor)."""
    c = inp.case
    tx, tdy = _tensor(inp.x), _tensor(inp.dy)  # keeps the strides
    tw, tb = _tensor(inp.weight), _tensor(inp.bias)
    aten = torch.ops.aten
    if c.norm == "batch":
        if op == "fwd_train":
            def run():
                y, mean, invstd = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, EPS)
                return _array(y), _array(mean), _array(invstd)
        elif op == "eval":
            trm, trv = _tensor(inp.running_mean), _tensor(inp.running_var)

            def run():
                return (_array(aten.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, EPS)[0]),)
        else:
            tmean, tinvstd = _tensor(inp.mean), _tensor(inp.invstd)
            if c.dtype in HALF:  # ATen's half backward takes its own saved statistics' dtype
                _, tmean, tinvstd = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, EPS)

            def run():
                dx, dw, db = aten.native_batch_norm_backward(
                    tdy, tx, tw, None, None, tmean, tinvstd, True, EPS, [True, True, True])
                return _array(dx), _array(dw), _array(db)
        return run
    if c.norm in ("layer", "rms"):
        shape = [tx.shape[-1]]
        if c.norm == "layer":
            y, tmean, trstd = aten.native_layer_norm(tx, shape, tw, tb, EPS)
            if op == "forward":
                return lambda: (_array(aten.native_layer_norm(tx, shape, tw, tb, EPS)[0]),)

            def run():
                dx, dw, db = aten.native_layer_norm_backward(tdy, tx, shape, tmean, trstd, tw, tb,
                                                             [True, True, True])
                return _array(dx), _array(dw), _array(db)
            return run
        F = torch.nn.functional
        if op == "forward":
            return lambda: (_array(F.rms_norm(tx, shape, tw, EPS)),)
        # PyTorch's CPU rms_norm is a composite of ATen ops: its backward is the
        # autograd graph's, timed alone (the graph kept from one forward)
        gx, gw = tx.clone().requires_grad_(), tw.clone().requires_grad_()
        gy = F.rms_norm(gx, shape, gw, EPS)

        def run():
            dx, dw = torch.autograd.grad(gy, (gx, gw), tdy, retain_graph=True)
            return _array(dx), _array(dw)
        return run
    groups = _family_groups(c)
    n, ch = tx.shape[0], tx.shape[1]
    hw = int(np.prod(tx.shape[2:]))
    if op == "forward":
        return lambda: (_array(aten.native_group_norm(tx, tw, tb, n, ch, hw, groups, EPS)[0]),)
    _, tmean, trstd = aten.native_group_norm(tx, tw, tb, n, ch, hw, groups, EPS)

    def run():
        dx, dw, db = aten.native_group_norm_backward(tdy, tx, tmean, trstd, tw, n, ch, hw, groups,
                                                     [True, True, True])
        return _array(dx), _array(dw), _array(db)
    return run


def _ort_model(case, inp):
    """An ONNX graph of the one operator, or None where ONNX Runtime has no such op."""
    dt = TensorProto.FLOAT if case.dtype == "float32" else TensorProto.DOUBLE
    shape = list(case.shape)
    x = helper.make_tensor_value_info("x", dt, shape)
    y = helper.make_tensor_value_info("y", dt, shape)

    def const(name, a):
        return helper.make_tensor(name, dt, [a.size], a.ravel().tolist())

    inits = [const("w", inp.weight), const("b", inp.bias)]
    if case.norm == "batch":
        inits += [const("rm", inp.running_mean), const("rv", inp.running_var)]
        node = helper.make_node("BatchNormalization", ["x", "w", "b", "rm", "rv"], ["y"], epsilon=EPS)
        opset = 15
    elif case.norm == "layer":
        node = helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=EPS)
        opset = 17
    elif case.norm in ("group", "instance"):
        if case.norm == "instance":
            node = helper.make_node("InstanceNormalization", ["x", "w", "b"], ["y"], epsilon=EPS)
            opset = 17
        else:
            node = helper.make_node("GroupNormalization", ["x", "w", "b"], ["y"],
                                    num_groups=case.groups, epsilon=EPS, stash_type=1)
            opset = 21
    else:
        return None
    graph = helper.make_graph([node], "norm", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model.SerializeToString()


def _ort(op, inp, threads):
    c = inp.case
    if ort is None or c.layout == "NHWC" or op not in ("eval", "forward") or c.dtype in HALF:
        return None
    if c.norm == "batch" and op != "eval":
        return None
    model = _ort_model(c, inp)
    if model is None:
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - ORT has no kernel for this op/dtype (e.g. float64 GroupNorm)
        return None
    x = np.ascontiguousarray(inp.x)
    return lambda: (sess.run(None, {"x": x})[0],)


def implementations(op, inp, threads=None):
    """``{name: fn}`` of the implementations available for ``op`` on this case."""
    import numba

    threads = threads or numba.get_num_threads()
    fns = {"numbabn": _numbabn(op, inp)}
    if torch is not None:
        fns["torch"] = _torch(op, inp)
    f = _ort(op, inp, threads)
    if f is not None:
        fns["ort"] = f
    return fns


TOL = {"float32": 1e-4, "float64": 1e-9, "float16": 4 * 2.0 ** -10, "bfloat16": 4 * 2.0 ** -7}


def validate(op, name, result, ref, dtype):
    """Raise AssertionError unless every output of ``result`` matches the float64 ``ref``."""
    tol = TOL[dtype] if name != "ort" else max(TOL[dtype], 1e-4)  # ORT computes in the input dtype
    for i, (a, r) in enumerate(zip(result, ref)):
        if i and dtype in HALF and name != "numbabn":
            break  # ATen's half parameter gradients are summed in half (bfloat16 LayerNorm's
            # dweight: 6.6% off at (4096, 768)); only the peers' y and dx are checked
        a = np.asarray(a, np.float64)
        r = np.asarray(r, np.float64).reshape(a.shape)
        scale = np.max(np.abs(r)) if r.size else 1.0
        err = np.max(np.abs(a - r)) / max(scale, 1.0)
        if not err <= tol:
            raise AssertionError(f"{op}/{name} output {i}: error {err:.3g} > {tol:g} (relative to max |ref|)")
