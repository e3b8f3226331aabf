"""Time whole networks with stock BatchNorm2d and with numbabn.torch's.

ResNet-18 and MobileNetV2 for CIFAR (32x32 inputs, 10 classes), written out
below as the common CIFAR code defines them (ResNet-18: 3x3 stem, BasicBlock
[2, 2, 2, 2], 4x4 average pool; MobileNetV2: stride-1 stem and first 24-channel
stage, 1280-channel head), float32 (or ``--dtype bfloat16``: the whole model
``.to(torch.bfloat16)``) on the CPU, NCHW and channels-last,
``torch.set_num_threads(THREADS)`` (numbabn's layers follow it).

For each (model, batch, memory format): the stock model, a deep copy passed
through ``numbabn.torch.replace_batchnorm`` (the layers dispatch by the table of
``numbabn.torch._dispatch``) and, with ``--forced``, the same copy with every
call forced onto numbabn's kernels.  Before timing, the copy's training loss and
eval logits on one batch from the same weights are checked against stock
(1e-4 relative; 5e-2 in bfloat16, whose two roundings through the network differ).  Timed: a training step (forward, cross-entropy, backward, SGD
with momentum 0.9) and an eval pass (``no_grad``, eval mode), the models in
turns (order alternating between rounds, 10 ms idle before each block so the
other framework's OpenMP pool stops spinning); medians over rounds, and the
speed-up over stock.

    PYTHONPATH=. python scripts/bench_torch_models.py [--models resnet18 mobilenetv2]
        [--batch 32 128] [--memory-format nchw channels_last] [--rounds 5] [--steps 2]
        [--threads 2] [--forced] [--dtype float32 bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import numba
import torch
import torch.nn.functional as F
from torch import nn

import numbabn.torch as nbt
from numbabn.torch import _dispatch

CLASSES = 10


# --------------------------------------------------------------------------- the models

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for s in (stride, 1):
                layers.append(BasicBlock(cin, planes, s))
                cin = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.avg_pool2d(self.layers(out), 4)
        return self.linear(out.flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expansion, stride):
        super().__init__()
        self.stride = stride
        planes = expansion * cin
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


# (expansion, out channels, blocks, stride): the CIFAR variant (stride 1 in the
# stem and the first 24-channel stage), as benchmarks/census.py lists it
MOBILENETV2_CIFAR = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers, cin = [], 32
        for expansion, cout, blocks, stride in MOBILENETV2_CIFAR:
            for s in [stride] + [1] * (blocks - 1):
                layers.append(InvertedResidual(cin, cout, expansion, s))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.layers(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))


MODELS = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


# --------------------------------------------------------------------------- timing

def make_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, t):
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()

    return step


def make_eval(model):
    def run(x, _t):
        model.eval()
        with torch.no_grad():
            model(x)

    return run


def interleave(fns, routes, rounds, reps):
    """Median ms per call of each fn (rounds alternating the order)."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            with _dispatch.force(routes.get(name)) if routes.get(name) else \
                    contextlib.nullcontext():
                time.sleep(0.01)  # the other framework's OpenMP pool goes quiet
                t0 = time.perf_counter()
                for _ in range(reps):
                    fns[name]()
                times[name].append((time.perf_counter() - t0) / reps * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def validate(stock, mine, x, t, tol=1e-4):
    """Training loss and eval logits of the replaced copy against stock."""
    a, b = copy.deepcopy(stock).train(), copy.deepcopy(mine).train()
    with torch.no_grad():
        loss_a, loss_b = F.cross_entropy(a(x), t).item(), F.cross_entropy(b(x), t).item()
        ea, eb = a.eval()(x), b.eval()(x)
    rel = ((ea - eb).abs().max() / ea.abs().max()).item()
    assert abs(loss_a - loss_b) <= tol * abs(loss_a), f"training loss {loss_a} vs {loss_b}"
    assert rel <= tol, f"eval logits differ by {rel:.2e} (relative)"
    return abs(loss_a - loss_b) / abs(loss_a), rel


def bench(model_name, batch, fmt_name, rounds, steps, forced, dtype=torch.float32):
    torch.manual_seed(0)
    fmt = FORMATS[fmt_name]
    stock = MODELS[model_name]().to(dtype=dtype, memory_format=fmt)
    mine = nbt.replace_batchnorm(copy.deepcopy(stock))
    x = torch.randn(batch, 3, 32, 32).to(dtype).contiguous(memory_format=fmt)
    t = torch.randint(0, CLASSES, (batch,))
    loss_rel, eval_rel = validate(stock, mine, x, t, 1e-4 if dtype == torch.float32 else 5e-2)
    models = {"stock": stock, "numbabn": mine}
    routes = {}
    if forced:
        models["forced"] = copy.deepcopy(mine)
        routes["forced"] = _dispatch.NUMBABN
    row = {}
    for what, make in (("train step", make_step), ("eval pass", make_eval)):
        fns = {}
        for name, model in models.items():
            fn = make(model)
            fns[name] = (lambda fn=fn: fn(x, t))
            with _dispatch.force(routes.get(name)):
                for _ in range(2):  # warm-up: kernels compiled, allocator warm
                    fns[name]()
        row[what] = interleave(fns, routes, rounds, steps)
    head = f"{model_name:12s} b{batch:<4d} {fmt_name:13s} {str(dtype)[6:]:8s}"
    for what, med in row.items():
        cells = "  ".join(f"{name} {ms:8.1f} ms" + ("" if name == "stock" else
                                                  f" ({med['stock'] / ms:.3f}x)")
                          for name, ms in med.items())
        print(f"{head} {what:10s} {cells}", flush=True)
    print(f"{head} check: training loss {loss_rel:.1e}, eval logits {eval_rel:.1e} "
          f"(relative to stock)", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--batch", nargs="+", type=int, default=[32])
    ap.add_argument("--memory-format", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="calls per timed block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"])
    ap.add_argument("--forced", action="store_true",
                    help="also time the copy with every call on numbabn's kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads; numbabn's layers "
          f"follow it), numba {numba.__version__}; {args.rounds} rounds x {args.steps} calls, "
          f"medians; x: stock's time over the model's")
    for model_name in args.models:
        for batch in args.batch:
            for fmt_name in args.memory_format:
                for dt in args.dtype:
                    bench(model_name, batch, fmt_name, args.rounds, args.steps, args.forced,
                          getattr(torch, dt))


if __name__ == "__main__":
    main()
