"""Batch norm on PyTorch tensors through numbabn's kernels.

These functions are the bodies of the custom ops (:mod:`numbabn.torch._ops`)
and of the eager path (:mod:`numbabn.torch._functional`); they assume
arguments that :func:`numbabn_runs` (or a :class:`Case`) accepted and check
nothing else.

- CPU tensors are read and written through ``tensor.numpy()`` views, no copy.
  What depends only on an input's shape, strides and dtype is decided once and
  kept in a :class:`Case` (:func:`cpu_case`): the checks on the input, its
  ``(outer, C, inner)`` view, whether the outputs share its strides, which
  allocator they come from, and its route (:mod:`numbabn.torch._dispatch`).
  When the input, the output (and the gradients) share strides, the backend's
  host drivers are called directly on the views; anything else goes through
  the public functions with ``out=``.
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
from numbabn import _backend, _config, _layout
from numbabn import functional as _F

from . import _dispatch

FLOAT_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
TAKEN_DTYPES = FLOAT_DTYPES + HALF_DTYPES
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_CPU = _backend.CPU
_FO = _CPU.feature_ops
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS
_GPU_OK = []  # cached answer of _gpu_available()
_STRIDED = torch.strided
_NATIVE_BACKWARD = torch.ops.aten.native_batch_norm_backward.default
_THRESHOLD_BACKWARD = torch.ops.aten.threshold_backward.default


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
    float32/float64/float16/bfloat16 strided tensors on the CPU (or float32,
    float64 and float16 on CUDA device 0 and the default stream, when numba.cuda
    can run there; bfloat16 needs ml_dtypes), a non-empty batch (with
    more than one value per feature in training), parameters and buffers of
    x's dtype (or float32 for a half x: mixed precision), device and shape ``(C,)``, a positive finite eps and, when the
    running statistics are updated, a momentum in [0, 1] (None: the cumulative
    average).  ``exact_types``: plain tensors and Parameters only (no
    subclasses); graph tracing passes its fake tensors with False."""
    if x.dtype not in TAKEN_DTYPES or x.layout != torch.strided or x.dim() < 2:
        return False
    if exact_types and type(x) not in _TENSOR_TYPES:
        return False
    device = x.device
    if device.type != "cpu" and (not _cuda_ok(device) or x.dtype == torch.bfloat16):
        return False
    half = x.dtype in HALF_DTYPES
    if x.dtype == torch.bfloat16 and not _ml_dtypes():
        return False
    n = x.numel()
    if n == 0:
        return False
    nfeat = x.shape[1]
    for t in (weight, bias, running_mean, running_var):
        if t is not None and (t.dtype != x.dtype and not (half and t.dtype == torch.float32)
                              or t.device != device or t.shape != (nfeat,)
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


def _ml_dtypes():
    """ml_dtypes' module (NumPy's bfloat16), or None when it is not installed."""
    if not _ML:
        try:
            import ml_dtypes
        except ImportError:
            ml_dtypes = None
        _ML.append(ml_dtypes)
    return _ML[0]


_ML = []


def stat_dtype(dtype):
    """The dtype of the saved ``mean`` and ``invstd`` for input ``dtype``:
    float32 for half inputs (numbabn's statistics are float32 there), else itself."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


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
    if t.device.type != "cpu":
        return t
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: ml_dtypes' over the same bits
        return t.view(torch.int16).numpy().view(_ml_dtypes().bfloat16)
    return t.numpy()


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
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)


def _fast_plan(xa, *others):
    """The functional API's remembered plan for a host ``xa`` (feature axis 1)
    when every other array has xa's strides, else None."""
    if type(xa) is not np.ndarray or xa.dtype.itemsize == 2:  # half: the public functions
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


# --------------------------------------------------------------------------- cases

class Case:
    """What every call on one CPU input needs and only its shape, strides and
    dtype decide, made by :func:`cpu_case` on the first call:

    - ``ok``: numbabn takes it (float32/float64, at least 2-D, not empty);
      ``trainable``: more than one value per feature (training needs it);
    - ``plan``: numbabn's ``(outer, C, inner)`` view of it
      (:class:`numbabn._layout.HostPlan`), when its outputs share its strides
      (``torch.empty_like`` gives ATen's output strides: a dense input);
      None otherwise (those calls take the public functions with ``out=``);
    - ``own_out``: outputs (and input gradients) of at least
      ``OWN_OUTPUT_BYTES`` come from numbabn's allocator
      (:func:`numbabn._layout.empty`, through the plan) as NumPy arrays that
      PyTorch wraps, when those have x's strides: NumPy advises huge pages for
      them (and numbabn pools the largest), which PyTorch's allocator does not;
      the kernels write 4 KiB pages much more slowly (NCHW (32, 64, 32, 32) eval:
      about 1.4x);
    - ``np_dtype``, ``vshape``: what a per-feature vector must be;
    - ``aten_train``, ``aten_backward``, ``aten_eval``: its route
      (:func:`numbabn.torch._dispatch.routes`).
    """

    __slots__ = ("ok", "trainable", "plan", "own_out", "np_dtype", "vshape", "count",
                 "aten_train", "aten_backward", "aten_eval")

    def __init__(self, x):
        self.ok = (x.dtype in TAKEN_DTYPES and x.dim() >= 2 and x.numel() > 0)
        self.plan = None
        self.own_out = False
        self.aten_train = self.aten_backward = self.aten_eval = False
        self.trainable = False
        self.count = 0
        if not self.ok:
            return
        xa = arr(x)
        layout = _layout.plan_layout(xa, 1)
        shape3 = layout.shape3
        self.np_dtype = xa.dtype
        self.vshape = (shape3[1],)
        self.count = shape3[0] * shape3[2]
        self.trainable = self.count >= 2
        stride = x.stride()
        # Half inputs take the public functions (numbabn._half): no plan.
        if x.dtype in FLOAT_DTYPES and output_like(x).stride() == stride and \
                torch.empty_like(x).stride() == stride:
            self.plan = _layout.host_plan(xa, layout)
        if self.plan is not None and xa.nbytes >= OWN_OUTPUT_BYTES:
            self.own_out = torch.from_numpy(self.plan.empty(xa.dtype)[1]).stride() == stride
        self.aten_train, self.aten_backward, self.aten_eval = _dispatch.routes(shape3, xa.dtype)


# From this size NumPy advises huge pages for an array (its HUGEPAGE_THRESHOLD)
OWN_OUTPUT_BYTES = 1 << 22


def _fresh(case, x):
    """A fresh output (or input gradient) for ``x`` of this case, as a tensor
    and as the kernels' 3-D view: from numbabn's allocator when the case says
    so, else PyTorch's."""
    plan = case.plan
    if case.own_out:
        y3, y = plan.empty(case.np_dtype)
        return torch.from_numpy(y), y3
    y = torch.empty_like(x)
    return y, plan.view(y.numpy())


_CASES = {}  # (shape, strides, dtype) -> Case
_MAX_CASES = 1024
_dispatch._listeners.append(_CASES.clear)  # dispatch.force() changes the routes


def cpu_case(x):
    """The :class:`Case` of a strided CPU tensor ``x``; None for others."""
    if x.layout is not _STRIDED or not x.is_cpu:
        return None
    key = (x.shape, x.stride(), x.dtype)
    case = _CASES.get(key)
    if case is None:
        case = Case(x)
        if len(_CASES) >= _MAX_CASES:
            _CASES.clear()
        _CASES[key] = case
    return case


def cpu_vectors(case, weight, bias, running_mean, running_var):
    """NumPy views of the per-feature vectors when each is None or a plain
    tensor of the input's dtype and shape ``(C,)`` on the CPU; else None."""
    out = []
    for t in (weight, bias, running_mean, running_var):
        if t is None:
            out.append(None)
            continue
        a = vec(t)
        if type(a) is not np.ndarray or a.dtype != case.np_dtype or a.shape != case.vshape \
                or type(t) not in _TENSOR_TYPES:
            return None
        out.append(a)
    return out


def _np(t):
    """A NumPy view of a CPU tensor (detached)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def route_of(x, op):
    """``"aten"`` or ``"numbabn"``: the route a CPU call of ``op`` (``"train"``,
    ``"backward"`` or ``"eval"``) on ``x`` takes (see
    :mod:`numbabn.torch._dispatch`)."""
    case = cpu_case(x)
    aten = case is not None and case.ok and getattr(case, "aten_" + op)
    return _dispatch.ATEN if aten else _dispatch.NUMBABN


# --------------------------------------------------------------------------- forward

def train_cpu(case, x, wa, ba, eps, relu):
    """:func:`forward_train` of a CPU ``x`` whose case has a plan, with the
    vectors' NumPy views: ``y`` (a tensor) and ``mean``, ``invstd``, ``var``
    (arrays)."""
    y, y3 = _fresh(case, x)
    xa = _np(x)
    follow_torch_threads(xa.size)
    with _CPU.guard(xa):
        mean, invstd, var = _FO.batch_norm_train(case.plan.view(xa), wa, ba, eps, y3, relu)
    return y, mean, invstd, var


def forward_train(x, weight, bias, eps, relu):
    """Normalise with x's batch statistics (then a ReLU with ``relu``).
    Returns ``y`` (a tensor) and numbabn's ``mean``, ``invstd`` (x's dtype) and
    biased ``var`` (float64), as arrays."""
    case = cpu_case(x)
    if case is not None and case.plan is not None:
        vectors = cpu_vectors(case, weight, bias, None, None)
        if vectors is not None:
            return train_cpu(case, x, vectors[0], vectors[1], eps, relu)
    y = output_like(x)
    xa, ya, wa, ba = arr(x), arr(y), vec(weight), vec(bias)
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
    if type(rm) is np.ndarray and count >= 2 and rm.dtype.itemsize > 2:
        _FO.update_running_stats(rm, rv, mean, var, count, momentum)
    else:
        _nb.update_running_stats(rm, rv, mean, var, count, momentum)
    # written through NumPy/CAI views: tell autograd, as add_/mul_ would
    torch._C._increment_version((running_mean, running_var))


def eval_cpu(case, x, wa, ba, rma, rva, eps, relu):
    """:func:`forward_eval` of a CPU ``x`` whose case has a plan, with the
    vectors' NumPy views."""
    y, y3 = _fresh(case, x)
    xa = _np(x)
    follow_torch_threads(xa.size)
    with _CPU.guard(xa):
        _FO.normalize(case.plan.view(xa), rma, rva, wa, ba, eps, y3)
    if relu:
        torch.relu_(y)
    return y


def forward_eval(x, weight, bias, running_mean, running_var, eps, relu):
    """Normalise with the running statistics (then a ReLU with ``relu``); returns y."""
    case = cpu_case(x)
    if case is not None and case.plan is not None:
        vectors = cpu_vectors(case, weight, bias, running_mean, running_var)
        if vectors is not None:
            return eval_cpu(case, x, *vectors, eps, relu)
    y = output_like(x)
    xa, ya = arr(x), arr(y)
    wa, ba, rm, rv = vec(weight), vec(bias), vec(running_mean), vec(running_var)
    if xa.__class__ is np.ndarray:
        follow_torch_threads(xa.size)
    _nb.normalize(xa, rm, rv, wa, ba, eps, out=ya)
    if relu:
        torch.relu_(y)
    return y


# --------------------------------------------------------------------------- backward

def backward_train_aten(dy, x, mean, invstd, weight, y, need):
    """Gradients of :func:`forward_train` by ATen's ``native_batch_norm_backward``
    with numbabn's saved ``mean`` and ``invstd`` (arrays or tensors) (the route
    of :mod:`numbabn.torch._dispatch`).  ``need``: which of ``(dx, dweight,
    dbias)``; returns tensors (None where not needed)."""
    if y is not None:
        dy = _THRESHOLD_BACKWARD(dy, y, 0)
    if not isinstance(mean, torch.Tensor):
        mean, invstd = torch.from_numpy(mean), torch.from_numpy(invstd)
    need_x, need_w, need_b = need
    need_w = need_w and weight is not None
    dx, dweight, dbias = _NATIVE_BACKWARD(dy, x, weight, None, None, mean, invstd, True, 0.0,
                                          [need_x, need_w, need_b])
    return dx if need_x else None, dweight if need_w else None, dbias if need_b else None


def backward_train_cpu(case, dy, x, mean, invstd, weight, wa, y, need):
    """Gradients of :func:`train_cpu` (``mean``, ``invstd`` as it returned
    them; ``y`` its output when it applied a ReLU; ``wa`` the weight's
    view), by the case's route.  Returns tensors (None where not needed)."""
    if case.aten_backward:
        return backward_train_aten(dy, x, mean, invstd, weight, y, need)
    stride = x.stride()
    if dy.stride() != stride or dy.dtype != x.dtype or type(dy) not in _TENSOR_TYPES \
            or not dy.is_cpu:
        dx, dweight, dbias = backward_train(dy, x, mean, invstd, weight, y, need[0])
    else:
        dx, dx3 = _fresh(case, x)
        xa, plan = _np(x), case.plan
        follow_torch_threads(xa.size)
        with _CPU.guard(xa):
            dweight, dbias = _FO.batch_norm_backward(
                plan.view(_np(dy)), plan.view(xa), mean, invstd, wa, dx3,
                None if y is None else plan.view(_np(y)))
    return (dx if need[0] else None,
            torch.from_numpy(dweight) if need[1] and dweight is not None else None,
            torch.from_numpy(dbias) if need[2] and dbias is not None else None)


def backward_train(dy, x, mean, invstd, weight, y, need_dx):
    """Gradients of :func:`forward_train` (``y``: its output, when it applied a
    ReLU; its mask applies to ``dy``) by numbabn's kernels.  ``mean``,
    ``invstd``: as it returned them.  Returns ``dx`` (None unless ``need_dx``)
    and ``dweight``, ``dbias`` (arrays, None without ``weight``).  The kernels
    write ``dx`` in the pass that finishes ``dweight`` and ``dbias``, so it is
    computed either way."""
    dx = grad_input_like(x, dy)
    dya, xa, wa = arr(dy), arr(x), vec(weight)
    ya, dxa = arr(y), arr(dx)
    plan = _fast_plan(xa, dya, ya, dxa)
    if plan is not None:
        follow_torch_threads(xa.size)
        with _CPU.guard(xa):
            dweight, dbias = _FO.batch_norm_backward(
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
        pdtype = x.dtype if weight is None else weight.dtype
        if need_w:
            dweight = (tensor(sum_dy_xmu, x) * invstd).to(pdtype)
        if need_b:
            dbias = tensor(sum_dy, x).to(pdtype)
    if need_x:
        dx = grad_input_like(x, dy)
        zeros = torch.zeros_like(running_mean)
        _nb.normalize(arr(dy), arr(zeros), arr(running_var), arr(weight), None, eps, out=arr(dx))
    return dx, dweight, dbias
