"""Batch norm on PyTorch tensors through numbabn's kernels.

These functions are the bodies of the custom ops (:mod:`numbabn.torch._ops`)
and of the eager path (:mod:`numbabn.torch._functional`); they assume
arguments that :func:`numbabn_runs` accepted and check nothing else.

- CPU tensors are read and written through ``tensor.numpy()`` views, no copy.
  When the input, the output (and the gradients) share strides and the
  functional API already knows the input's layout, the backend's kernels are
  called directly (what :mod:`numbabn.functional`'s fast path does, plus
  writing into a tensor PyTorch allocated); anything else goes through the
  public functions with ``out=``.
- CUDA tensors go to the public functions through ``__cuda_array_interface__``.

Outputs have the strides ATen's CPU batch norm gives (see :func:`output_like`),
and Numba's thread count follows ``torch.get_num_threads()``.
"""

from __future__ import annotations

import math
import weakref

import numba
import numpy as np
import torch

import numbabn as _nb
from numbabn import _backend, _config
from numbabn import functional as _F

FLOAT_DTYPES = (torch.float32, torch.float64)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_CPU = _backend.CPU
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS
_GPU_OK = []  # cached answer of _gpu_available()


# --------------------------------------------------------------------------- what may run

def _gpu_available() -> bool:
    """numba.cuda imports, sees a GPU, and is not the simulator (which cannot
    read PyTorch's device memory)."""
    if not _GPU_OK:
        try:
            from numba import cuda

            ok = (not numba.config.ENABLE_CUDASIM) and cuda.is_available()
        except Exception:  # noqa: BLE001 - any failure means: use stock PyTorch
            ok = False
        _GPU_OK.append(ok)
    return _GPU_OK[0]


def numbabn_runs(x, weight, bias, running_mean, running_var, training, momentum, eps,
                 exact_types=True) -> bool:
    """Whether numbabn computes this call exactly as ``F.batch_norm`` would:
    float32/float64 strided tensors on the CPU (or on CUDA device 0 and the
    default stream, when numba.cuda can run there), a non-empty batch (with
    more than one value per feature in training), parameters and buffers of
    x's dtype, device and shape ``(C,)``, a positive finite eps and, when the
    running statistics are updated, a momentum in [0, 1] (None: the cumulative
    average).  ``exact_types``: plain tensors and Parameters only (no
    subclasses); graph tracing passes its fake tensors with False."""
    if x.dtype not in FLOAT_DTYPES or x.layout != torch.strided or x.dim() < 2:
        return False
    if exact_types and type(x) not in _TENSOR_TYPES:
        return False
    device = x.device
    if device.type != "cpu" and not _cuda_ok(device):
        return False
    n = x.numel()
    if n == 0:
        return False
    nfeat = x.shape[1]
    for t in (weight, bias, running_mean, running_var):
        if t is not None and (t.dtype != x.dtype or t.device != device or t.shape != (nfeat,)
                              or (exact_types and type(t) not in _TENSOR_TYPES)):
            return False
    if (running_mean is None) != (running_var is None):
        return False
    if not (isinstance(eps, (float, int)) and math.isfinite(eps) and eps > 0):
        return False
    if training:
        if n // nfeat < 2:  # stock raises "Expected more than 1 value per channel"
            return False
        if running_mean is not None and momentum is not None and not (
                isinstance(momentum, (float, int)) and 0.0 <= momentum <= 1.0):
            return False
    elif running_mean is None:
        return False
    return True


def _cuda_ok(device) -> bool:
    # numba launches on its default stream in its current context (device 0
    # unless changed): other devices or streams run stock.
    return device.type == "cuda" and _gpu_available() and device.index in (0, None) and \
        torch.cuda.current_stream(device).cuda_stream == 0


# --------------------------------------------------------------------------- strides

def _channels_last_like(sizes, strides, order) -> bool:
    """Port of c10's ``is_channels_last_strides_{2d,3d}_s{4,5}`` (what
    ``Tensor.suggest_memory_format()`` asks)."""
    if strides[1] == 0:
        return False
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d]
        if sizes[d] > 1:
            smallest *= sizes[d]
    return True


def _suggest_memory_format(t):
    """``Tensor.suggest_memory_format()``: channels-last for NHWC/NDHWC-like
    strides, contiguous otherwise."""
    if t.dim() == 4 and _channels_last_like(t.shape, t.stride(), (1, 3, 2, 0)):
        return torch.channels_last
    if t.dim() == 5 and _channels_last_like(t.shape, t.stride(), (1, 4, 3, 2, 0)):
        return torch.channels_last_3d
    return torch.contiguous_format


def _dense_format(t):
    """The format ``t`` is contiguous in (contiguous first, as ATen's
    ``suggest_memory_format_contig``), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def output_like(x):
    """An empty output with the strides ATen's CPU batch norm gives its output: the
    format x is contiguous in, else x's suggested format (a permuted or sliced
    input gives a contiguous or channels-last output, as in PyTorch)."""
    if x.dim() < 4:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    fmt = _dense_format(x)
    return torch.empty_like(x, memory_format=fmt if fmt is not None else _suggest_memory_format(x))


def grad_input_like(x, dy):
    """An empty input gradient with ATen's strides (``batch_norm_backward_cpu``):
    x's dense format when x and dy are both dense with the same suggested
    format, else x's suggested format."""
    if x.dim() < 4:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    fmt = _dense_format(x)
    if fmt is None or _dense_format(dy) is None or \
            _suggest_memory_format(x) != _suggest_memory_format(dy):
        fmt = _suggest_memory_format(x)
    return torch.empty_like(x, memory_format=fmt)


# --------------------------------------------------------------------------- arrays

def arr(t):
    """What numbabn reads: a NumPy view of a CPU tensor, the CUDA tensor itself
    (``__cuda_array_interface__``) otherwise; None stays None."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    return t.numpy() if t.device.type == "cpu" else t


_VECTORS = {}  # id(tensor) -> (weak reference, data pointer, shape, NumPy view)


def vec(t):
    """:func:`arr` of a per-feature vector (a weight, bias or running
    statistic), remembered per tensor: a layer passes the same ones on every
    call, and ``detach().numpy()`` costs about 1.5 us.  The view is made again
    when the tensor's memory or shape changes (``param.data = ...``,
    ``module.to(...)``, ``resize_``)."""
    if t is None:
        return None
    key = id(t)
    hit = _VECTORS.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t.data_ptr() and hit[2] == t.shape:
        return hit[3]
    a = arr(t)
    if type(a) is np.ndarray:
        if len(_VECTORS) >= 4096:
            _VECTORS.clear()
        _VECTORS[key] = (weakref.ref(t, lambda _, key=key: _VECTORS.pop(key, None)),
                         t.data_ptr(), t.shape, a)
    return a


def tensor(a, like):
    """A numbabn result (NumPy array or numba device array) as a tensor, no copy."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)


def _fast_plan(xa, *others):
    """The functional API's remembered plan for a host ``xa`` (feature axis 1)
    when every other array has xa's strides, else None."""
    if type(xa) is not np.ndarray:
        return None
    plan = _F._plan_of(xa, 1)
    if plan is not None:
        strides = xa.strides
        for a in others:
            if a is not None and a.strides != strides:
                return None
    return plan


def follow_torch_threads(size):
    """Numba's thread count for this thread made ``torch.get_num_threads()`` (at
    most Numba's configured maximum), for inputs large enough to use threads
    (smaller ones run on the calling thread: see ``numbabn._cpu.runtime``)."""
    if size > _config.SERIAL_MAX_ELEMS:
        want = min(torch.get_num_threads(), _MAX_THREADS)
        if numba.get_num_threads() != want:
            numba.set_num_threads(want)


# --------------------------------------------------------------------------- forward

def forward_train(x, weight, bias, eps, relu):
    """Normalise with x's batch statistics (then a ReLU with ``relu``).
    Returns ``y`` (a tensor) and numbabn's ``mean``, ``invstd`` (x's dtype) and
    biased ``var`` (float64), as arrays."""
    y = output_like(x)
    xa, ya, wa, ba = arr(x), arr(y), vec(weight), vec(bias)
    plan = _fast_plan(xa, ya)
    if plan is not None:
        follow_torch_threads(xa.size)
        with _CPU.guard(xa):
            mean, invstd, var = _CPU.feature_ops.batch_norm_train(
                plan.view(xa), wa, ba, eps, plan.view(ya), relu)
    else:
        if xa.__class__ is np.ndarray:
            follow_torch_threads(xa.size)
        _, mean, invstd, var = _F._batch_norm_train(xa, wa, ba, eps, 1, ya, relu)
    return y, mean, invstd, var


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's running-statistics update (unbiased variance), in place; a
    momentum of 0 keeps the old values.  ``mean``, ``var``: arrays or tensors."""
    if momentum <= 0:
        return
    rm, rv = vec(running_mean), vec(running_var)
    mean = arr(mean) if isinstance(mean, torch.Tensor) else mean
    var = arr(var) if isinstance(var, torch.Tensor) else var
    if type(rm) is np.ndarray and count >= 2:
        _CPU.feature_ops.update_running_stats(rm, rv, mean, var, count, momentum)
    else:
        _nb.update_running_stats(rm, rv, mean, var, count, momentum)
    # written through NumPy/CAI views: tell autograd, as add_/mul_ would
    torch.autograd.graph.increment_version(running_mean)
    torch.autograd.graph.increment_version(running_var)


def forward_eval(x, weight, bias, running_mean, running_var, eps, relu):
    """Normalise with the running statistics (then a ReLU with ``relu``); returns y."""
    y = output_like(x)
    xa, ya = arr(x), arr(y)
    wa, ba, rm, rv = vec(weight), vec(bias), vec(running_mean), vec(running_var)
    plan = _fast_plan(xa, ya)
    if plan is not None:
        follow_torch_threads(xa.size)
        with _CPU.guard(xa):
            _CPU.feature_ops.normalize(plan.view(xa), rm, rv, wa, ba, eps, plan.view(ya))
    else:
        if xa.__class__ is np.ndarray:
            follow_torch_threads(xa.size)
        _nb.normalize(xa, rm, rv, wa, ba, eps, out=ya)
    if relu:
        torch.relu_(y)
    return y


# --------------------------------------------------------------------------- backward

def backward_train(dy, x, mean, invstd, weight, y, need_dx):
    """Gradients of :func:`forward_train` (``y``: its output, when it applied a
    ReLU; its mask applies to ``dy``).  ``mean``, ``invstd``: as it returned
    them.  Returns ``dx`` (None unless ``need_dx``) and ``dweight``, ``dbias``
    (arrays, None without ``weight``).  The kernels write ``dx`` in the pass
    that finishes ``dweight`` and ``dbias``, so it is computed either way."""
    dx = grad_input_like(x, dy)
    dya, xa, wa = arr(dy), arr(x), vec(weight)
    ya, dxa = arr(y), arr(dx)
    plan = _fast_plan(xa, dya, ya, dxa)
    if plan is not None:
        follow_torch_threads(xa.size)
        with _CPU.guard(xa):
            dweight, dbias = _CPU.feature_ops.batch_norm_backward(
                plan.view(dya), plan.view(xa), mean, invstd, wa, plan.view(dxa),
                None if ya is None else plan.view(ya))
        return dx if need_dx else None, dweight, dbias
    if xa.__class__ is np.ndarray:
        follow_torch_threads(xa.size)
    if ya is None:
        dxa, dweight, dbias = _nb.batch_norm_backward(dya, xa, mean, invstd, wa, out=dxa)
    else:
        dxa, dweight, dbias = _nb.batch_norm_relu_backward(dya, ya, xa, mean, invstd, wa, out=dxa)
    return dx if need_dx else None, dweight, dbias


def backward_eval(dy, x, weight, running_mean, running_var, eps, y, need):
    """Gradients of :func:`forward_eval`: those of the affine map
    ``(x - running_mean) * invstd * weight + bias`` (running statistics are
    constants), ``dy`` masked by ``y > 0`` after a ReLU.  ``need``: which of
    ``(dx, dweight, dbias)`` to compute; returns them as tensors (or None)."""
    if y is not None:
        dy = torch.ops.aten.threshold_backward(dy, y, 0)
    need_x, need_w, need_b = need
    dx = dweight = dbias = None
    if need_w or need_b:
        # float64 sum(dy) and sum(dy * (x - running_mean)) in one read; not
        # batch_norm_backward's sums, which are about the *batch* mean (it
        # recovers it from x whatever mean it is given).
        invstd = torch.rsqrt(running_var.detach().double() + eps)
        sum_dy, sum_dy_xmu = _nb.batch_norm_backward_reduce(
            arr(dy), arr(x), arr(running_mean), arr(invstd))
        if need_w:
            dweight = (tensor(sum_dy_xmu, x) * invstd).to(x.dtype)
        if need_b:
            dbias = tensor(sum_dy, x).to(x.dtype)
    if need_x:
        dx = grad_input_like(x, dy)
        zeros = torch.zeros_like(running_mean)
        _nb.normalize(arr(dy), arr(zeros), arr(running_var), arr(weight), None, eps, out=arr(dx))
    return dx, dweight, dbias
