"""Half-precision storage on the CPU (the twin of :mod:`numbabn._gpu.half`):
float16 and bfloat16 values to and from float32, vectorised.

Numba has no CPU arithmetic on either type, so the kernels see their bits, as
``uint16``, and write the float32 bits as ``uint32``:

* **bfloat16** is the upper half of a float32: widening is a shift, narrowing
  rounds to nearest even on the 16 bits dropped (a NaN stays a NaN, quieted);
* **float16** goes through LLVM's ``half`` type (``fpext``/``fptrunc``: the
  IEEE conversion, round to nearest even, subnormals, inf and NaN), which x86
  compiles to ``vcvtph2ps``/``vcvtps2ph`` (F16C, on every AVX2 CPU).  A host
  without F16C takes :func:`_f16_to_f32_bits`/:func:`_f32_to_f16_bits`, the same
  rules in integer code (LLVM would call a runtime function Numba does not
  link there).

Both directions are exact functions of each value, so the results do not depend
on the chunking or the thread count.  The kernels take flat 1-D arrays; the
host (:mod:`numbabn._half`) gives them flat views of dense arrays.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .. import _cache, _core
from .._config import CPU_HELPER_STRICT, CPU_JIT_STRICT
from .runtime import is_small, serial_kernels

_JIT = dict(CPU_JIT_STRICT)
_JIT_PARALLEL = dict(CPU_JIT_STRICT, parallel=dict(fusion=False))
# Values per parallel task: long enough that a task streams, short enough
# that both cores get work on a 64x64x56x56 tensor (12.8 M values).
CHUNK = 1 << 16

BFLOAT16, FLOAT16 = _core.BFLOAT16_KIND, _core.FLOAT16_KIND


def _host_has_f16c():
    try:
        from llvmlite import binding
        features = binding.get_host_cpu_features()
        return bool(features.get("f16c", False))
    except Exception:  # noqa: BLE001 -- unknown: take the integer code
        return False


HAS_F16C = _host_has_f16c()


@intrinsic
def _f16_fpext(typingctx, bits):
    """The float32 value of float16 bits (LLVM ``fpext half -> float``)."""
    if bits not in (types.uint16, types.int16):
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


def _fptrunc(result):
    @intrinsic
    def fptrunc(typingctx, value):
        if value != types.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return result(types.float32), codegen
    return fptrunc


# The float16 bits of a float32 value (LLVM ``fptrunc float -> half``, round
# to nearest even), as uint16 (the flat conversions) or int16 (the kernels'
# float16 arrays, see value_of).
_f16_fptrunc = _fptrunc(types.uint16)
_f16_fptrunc_i16 = _fptrunc(types.int16)


@intrinsic
def _bits_of(typingctx, value):
    """The uint32 bits of a float32 value."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _float_of(typingctx, bits):
    """The float32 value of uint32 bits."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(**CPU_HELPER_STRICT)
def _f16_to_f32_bits(h):
    """float16 bits -> float32 bits by the IEEE rules, in integer code."""
    sign = np.uint32(h & 0x8000) << np.uint32(16)
    exp = np.uint32((h >> 10) & 0x1F)
    man = np.uint32(h & 0x3FF)
    if exp == 0x1F:  # inf, NaN (payload kept)
        return sign | np.uint32(0x7F800000) | (man << np.uint32(13))
    if exp != 0:
        return sign | ((exp + np.uint32(112)) << np.uint32(23)) | (man << np.uint32(13))
    if man == 0:
        return sign
    e = np.uint32(113)  # subnormal: normalise the mantissa
    while (man & np.uint32(0x400)) == 0:
        man <<= np.uint32(1)
        e -= np.uint32(1)
    return sign | (e << np.uint32(23)) | ((man & np.uint32(0x3FF)) << np.uint32(13))


@njit(**CPU_HELPER_STRICT)
def _f32_to_f16_bits(u):
    """float32 bits -> float16 bits, round to nearest even, in integer code."""
    sign = np.uint32((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # NaN: keep it a (quiet) NaN
        return np.uint16(sign | np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF)))
    if a >= np.uint32(0x477FF000):  # rounds to inf (65520 and above), inf
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below float16's smallest normal: a subnormal or 0
        if a < np.uint32(0x33000000):  # below half the smallest subnormal: 0
            return np.uint16(sign)
        e = a >> np.uint32(23)
        man = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        shift = np.uint32(126) - e  # 14..24
        kept = man >> shift
        rest = man - (kept << shift)
        half = np.uint32(1) << (shift - np.uint32(1))
        if rest > half or (rest == half and (kept & np.uint32(1)) != 0):
            kept += np.uint32(1)
        return np.uint16(sign | kept)
    r = a - np.uint32(0x38000000)  # rebias 127 -> 15
    r = (r + np.uint32(0xFFF) + ((r >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    return np.uint16(sign | r)


@njit(**CPU_HELPER_STRICT)
def _bf16_of_bits(u):
    """float32 bits -> bfloat16 bits, round to nearest even; a NaN stays a NaN."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                     >> np.uint32(16))


@njit(**CPU_HELPER_STRICT)
def _widen_range(src, dst, kind, f16c):
    # 0-based loops over slices: a loop from a non-zero start keeps Numba's
    # negative-index wraparound and does not vectorise
    if kind == BFLOAT16:
        for i in range(src.shape[0]):
            dst[i] = np.uint32(src[i]) << np.uint32(16)
    elif f16c:
        for i in range(src.shape[0]):
            dst[i] = _bits_of(_f16_fpext(src[i]))
    else:
        for i in range(src.shape[0]):
            dst[i] = _f16_to_f32_bits(src[i])


@njit(**CPU_HELPER_STRICT)
def _narrow_range(src, dst, kind, f16c):
    if kind == BFLOAT16:
        for i in range(src.shape[0]):
            dst[i] = _bf16_of_bits(_bits_of(src[i]))
    elif f16c:
        for i in range(src.shape[0]):
            dst[i] = _f16_fptrunc(src[i])
    else:
        for i in range(src.shape[0]):
            dst[i] = _f32_to_f16_bits(_bits_of(src[i]))


@njit(**_JIT_PARALLEL)
def widen(src, dst, kind, f16c, chunk):
    """``dst`` (uint32, the float32 bits) from ``src`` (uint16 half bits)."""
    n = src.shape[0]
    for t_ in prange((n + chunk - 1) // chunk):
        t = np.int64(t_)
        i0, i1 = t * chunk, min(n, (t + 1) * chunk)
        _widen_range(src[i0:i1], dst[i0:i1], kind, f16c)


@njit(**_JIT_PARALLEL)
def narrow(src, dst, kind, f16c, chunk):
    """``dst`` (uint16 half bits) from ``src`` (float32), rounded to nearest even."""
    n = src.shape[0]
    for t_ in prange((n + chunk - 1) // chunk):
        t = np.int64(t_)
        i0, i1 = t * chunk, min(n, (t + 1) * chunk)
        _narrow_range(src[i0:i1], dst[i0:i1], kind, f16c)


# =========================================================================== #
# Half values inside the batch-norm kernels.  A half array reaches a kernel as
# a view of its bits with a dtype that says which type they hold: bfloat16 as
# uint16, float16 as int16 (:func:`bits_view`).  A kernel reads an element
# with ``value_of(a[i])`` (its float32 value; a float32 or float64 element as
# it is) and writes with ``a[i] = stored(v, a)`` (``v`` rounded to ``a``'s
# half type, nearest even; for a float array ``v`` itself), so one kernel
# source serves every dtype and float32/float64 code is unchanged.
# =========================================================================== #
def bits_view(a):
    """``a`` (float16 or bfloat16, any strides) as the kernels take it:
    bfloat16 bits as uint16, float16 bits as int16; other arrays as they are."""
    if a.dtype.itemsize != 2:
        return a
    return a.view(np.int16 if a.dtype == np.float16 else np.uint16)


def value_of(v):
    """The float value of an array element (see :func:`bits_view`)."""


def stored(v, a):
    """Float ``v`` as an element of array ``a`` (see :func:`bits_view`)."""


@overload(value_of, jit_options=_JIT, inline="always")
def _value_of_impl(v):
    if isinstance(v, types.Float):
        return lambda v: v
    if v == types.uint16:  # bfloat16: the upper half of a float32
        return lambda v: _float_of(np.uint32(np.uint32(v) << np.uint32(16)))
    if v == types.int16:  # float16
        if HAS_F16C:
            return lambda v: _f16_fpext(v)
        return lambda v: _float_of(_f16_to_f32_bits(np.uint16(v)))
    return None


@overload(stored, jit_options=_JIT, inline="always")
def _stored_impl(v, a):
    dtype = a.dtype
    if isinstance(dtype, types.Float):
        return lambda v, a: v
    if dtype == types.uint16:
        return lambda v, a: _bf16_of_bits(_bits_of(np.float32(v)))
    if dtype == types.int16:
        if HAS_F16C:
            return lambda v, a: _f16_fptrunc_i16(np.float32(v))
        return lambda v, a: np.int16(_f32_to_f16_bits(_bits_of(np.float32(v))))
    return None


# The kernels for inputs of at most SERIAL_MAX_ELEMS values (runtime.is_small).
serial = serial_kernels(globals())

_cache.check({**globals(), **vars(serial)})  # before any kernel loads from the disk cache


def to_float32(src_bits, dst, kind):
    """Flat ``dst`` (float32) = the values of flat ``src_bits`` (uint16 bits of ``kind``)."""
    run = serial.widen if is_small(src_bits) else widen
    run(src_bits, dst.view(np.uint32), np.int64(kind), HAS_F16C, np.int64(CHUNK))


def from_float32(src, dst_bits, kind):
    """Flat ``dst_bits`` (uint16 bits of ``kind``) = flat ``src`` (float32), rounded."""
    run = serial.narrow if is_small(src) else narrow
    run(src, dst_bits, np.int64(kind), HAS_F16C, np.int64(CHUNK))


# --------------------------------------------------------------------------- #
# Host arrays: flat views of dense memory in any axis order
# --------------------------------------------------------------------------- #
def _order(a):
    """The axes of ``a`` from the largest stride to the smallest."""
    return sorted(range(a.ndim), key=lambda i: -abs(a.strides[i]))


def _dense_in(a, perm):
    t = a.transpose(perm)
    return t if t.flags.c_contiguous else None


def _empty_in(shape, dtype, perm):
    """An empty array of ``shape`` whose memory runs in axis order ``perm``."""
    t = np.empty(tuple(shape[i] for i in perm), dtype)
    return t.transpose(np.argsort(perm))


def widen_array(a, kind):
    """Half array ``a`` (any strides) as a new float32 array in ``a``'s memory order."""
    if a.ndim == 1 and a.flags.c_contiguous:  # a per-feature vector: no reordering
        out = np.empty(a.shape, np.float32)
        if kind == BFLOAT16:  # the bits of to_float32's, without a kernel call
            np.left_shift(a.view(np.uint16), np.uint32(16), out=out.view(np.uint32))
        else:
            to_float32(a.view(np.uint16), out, kind)
        return out
    perm = _order(a)
    t = _dense_in(a, perm)
    if t is None:  # not dense (a slice, negative strides): a dense copy first
        perm = list(range(a.ndim))
        t = np.ascontiguousarray(a)
    out = _empty_in(a.shape, np.float32, perm)
    to_float32(t.reshape(-1).view(np.uint16), out.transpose(perm).reshape(-1), kind)
    return out


def narrow_array(r, dtype, kind, out=None):
    """``r`` (float32) rounded to ``dtype``: into ``out`` when given, else into
    a new array in ``r``'s memory order."""
    if r.ndim == 1 and r.flags.c_contiguous and (out is None or out.flags.c_contiguous):
        target = np.empty(r.shape, dtype) if out is None else out
        from_float32(r, target.view(np.uint16), kind)
        return target
    perm = _order(r)
    src = _dense_in(r, perm)
    if src is None:
        perm = list(range(r.ndim))
        src = np.ascontiguousarray(r)
    target = out if out is not None else _empty_in(r.shape, dtype, perm)
    t = _dense_in(target, perm)
    if t is not None:
        from_float32(src.reshape(-1), t.reshape(-1).view(np.uint16), kind)
        return target
    tmp = _empty_in(r.shape, dtype, perm)
    from_float32(src.reshape(-1), tmp.transpose(perm).reshape(-1).view(np.uint16), kind)
    target[...] = tmp
    return target
