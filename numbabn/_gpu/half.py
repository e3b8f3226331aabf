"""Half-precision storage on the GPU (the twin of :mod:`numbabn._cpu.half`):
float16 device arrays to and from float32.

numba.cuda converts float16 natively (``cvt.f32.f16`` / ``cvt.rn.f16.f32``:
round to nearest even, inf and NaN kept), so the kernels are strided copies
that convert on the way (:func:`numbabn._gpu.feature_kernels.copy_strided`'s
indexing), from and to any strides.  numba.cuda has no bfloat16 array type, so
bfloat16 device arrays cannot reach here (:mod:`numbabn._half` says so).
"""

import numpy as np
from numba import cuda

from .. import _config as cfg
from .._config import GPU_JIT
from .layout import _flat
from .runtime import Kernel, dim3


@cuda.jit(**GPU_JIT)
def widen(src, src_start, src_strides, dst, dst_start, dst_strides, shape):
    """``dst[idx] = float32(src[idx])`` for every index of ``shape`` (flat views,
    element strides)."""
    total = 1
    for n in shape:
        total *= n
    i = cuda.grid(1)
    while i < total:
        rest = i
        s = src_start
        d = dst_start
        for ax in range(len(shape) - 1, -1, -1):
            q = rest // shape[ax]
            idx = rest - q * shape[ax]
            rest = q
            s += idx * src_strides[ax]
            d += idx * dst_strides[ax]
        dst[d] = np.float32(src[s])
        i += cuda.gridsize(1)


@cuda.jit(**GPU_JIT)
def narrow(src, src_start, src_strides, dst, dst_start, dst_strides, shape):
    """``dst[idx] = float16(src[idx])``, rounded to nearest even."""
    total = 1
    for n in shape:
        total *= n
    i = cuda.grid(1)
    while i < total:
        rest = i
        s = src_start
        d = dst_start
        for ax in range(len(shape) - 1, -1, -1):
            q = rest // shape[ax]
            idx = rest - q * shape[ax]
            rest = q
            s += idx * src_strides[ax]
            d += idx * dst_strides[ax]
        dst[d] = np.float16(src[s])
        i += cuda.gridsize(1)


_WIDEN = Kernel(widen)
_NARROW = Kernel(narrow)


def _launch(kernel, src, dst):
    flat_src, src_start, src_strides = _flat(src)
    flat_dst, dst_start, dst_strides = _flat(dst)
    shape = tuple(int(n) for n in src.shape)
    threads = cfg.GPU_THREADS
    blocks = max(1, min(-(-int(np.prod(shape)) // threads), cfg.GPU_COPY_MAX_BLOCKS))
    kernel.launch(dim3(blocks), dim3(threads), flat_src, src_start, src_strides, flat_dst,
                  dst_start, dst_strides, shape)


def widen_array(a, kind):
    """Float16 device array ``a`` (any strides) as a new C-contiguous float32 one."""
    out = cuda.device_array(tuple(a.shape), np.float32)
    if out.size:
        _launch(_WIDEN, a, out)
    return out


def narrow_array(r, dtype, kind, out=None):
    """Float32 device array ``r`` rounded to float16: into ``out`` when given."""
    target = cuda.device_array(tuple(r.shape), np.float16) if out is None else out
    if r.size:
        _launch(_NARROW, r, target)
    return target
