"""Dropout masks: NumPy's PCG64 stream, drawn in parallel (each task jumps
ahead in the stream to its first value), so a layer's masks are exactly
``rng.random(x.shape, float32) >= p`` of its generator."""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ... import _cache
from ..._config import CPU_HELPER_STRICT, CPU_JIT_PARALLEL


_I64 = ir.IntType(64)
_I128 = ir.IntType(128)
_U64 = types.uint64


def _join128(builder, hi, lo):
    return builder.or_(builder.shl(builder.zext(hi, _I128), ir.Constant(_I128, 64)),
                       builder.zext(lo, _I128))


def _split128(context, builder, value):
    hi = builder.trunc(builder.lshr(value, ir.Constant(_I128, 64)), _I64)
    lo = builder.trunc(value, _I64)
    return context.make_tuple(builder, types.UniTuple(_U64, 2), [hi, lo])


@intrinsic
def _muladd128(typingctx, a_hi, a_lo, b_hi, b_lo, c_hi, c_lo):
    """``(a * b + c) mod 2**128`` of 128-bit integers given as ``(hi, lo)`` uint64
    halves (LLVM's i128: one 64x64 -> 128 multiply and two 64-bit ones)."""
    sig = types.UniTuple(_U64, 2)(_U64, _U64, _U64, _U64, _U64, _U64)

    def codegen(context, builder, sig, args):
        a, b, c = (_join128(builder, args[i], args[i + 1]) for i in (0, 2, 4))
        return _split128(context, builder, builder.add(builder.mul(a, b), c))

    return sig, codegen


_PCG_MULT_HI = np.uint64(0x2360ED051FC65DA4)
_PCG_MULT_LO = np.uint64(0x4385DF649FCCF645)


@njit(**CPU_HELPER_STRICT)
def _pcg_advance(s_hi, s_lo, inc_hi, inc_lo, delta):
    """PCG64's state after ``delta`` more steps (``state = state * MULT + inc``),
    in O(log delta) multiplies (pcg_advance_lcg_128)."""
    acc_m_hi, acc_m_lo = np.uint64(0), np.uint64(1)
    acc_p_hi, acc_p_lo = np.uint64(0), np.uint64(0)
    cur_m_hi, cur_m_lo = _PCG_MULT_HI, _PCG_MULT_LO
    cur_p_hi, cur_p_lo = inc_hi, inc_lo
    zero, one = np.uint64(0), np.uint64(1)
    d = np.uint64(delta)
    while d > zero:
        if d & one:
            acc_m_hi, acc_m_lo = _muladd128(acc_m_hi, acc_m_lo, cur_m_hi, cur_m_lo, zero, zero)
            acc_p_hi, acc_p_lo = _muladd128(acc_p_hi, acc_p_lo, cur_m_hi, cur_m_lo, cur_p_hi, cur_p_lo)
        # cur_p = (cur_m + 1) * cur_p, cur_m = cur_m * cur_m
        m1_hi, m1_lo = _muladd128(cur_m_hi, cur_m_lo, zero, one, zero, one)
        cur_p_hi, cur_p_lo = _muladd128(m1_hi, m1_lo, cur_p_hi, cur_p_lo, zero, zero)
        cur_m_hi, cur_m_lo = _muladd128(cur_m_hi, cur_m_lo, cur_m_hi, cur_m_lo, zero, zero)
        d >>= one
    return _muladd128(acc_m_hi, acc_m_lo, s_hi, s_lo, acc_p_hi, acc_p_lo)


@njit(**CPU_HELPER_STRICT)
def _pcg_output(s_hi, s_lo):
    """PCG64's XSL-RR output of a state."""
    x = s_hi ^ s_lo
    r = s_hi >> np.uint64(58)
    return (x >> r) | (x << ((np.uint64(64) - r) & np.uint64(63)))


@njit(**CPU_JIT_PARALLEL)
def dropout_forward(x, s_hi, s_lo, inc_hi, inc_lo, buffered, first_u32, threshold, scale,
                    y, keep_scale, ntasks):
    """Dropout of the 4-D array ``x`` (any strides) with the masks NumPy draws:
    ``rng.random(x.shape, dtype=float32) >= p`` of a PCG64 generator in the
    state ``(s, inc, buffered, first_u32)``, i.e. value ``i`` (C order of the
    shape) kept when ``next_uint32() >> 8 >= threshold`` (``ceil(p * 2**24)``).

    ``keep_scale`` (C-contiguous) gets ``scale`` or 0, then ``y = x * keep_scale``
    (any strides).  The 64-bit outputs are shared among ``ntasks`` tasks, each
    jumping ahead to its first one, so the values are NumPy's whatever the
    thread count.  Returns ``(hi, lo,
    has_uint32, uinteger)`` of the generator's state after the draw, as NumPy
    leaves it (``uinteger``: the last output's high half, else ``first_u32``).
    """
    n0, n1, n2, n3 = x.shape
    n = n0 * n1 * n2 * n3
    kf = keep_scale.reshape(-1)
    zero = x.dtype.type(0.0)
    offset = 1 if (buffered and n > 0) else 0
    if offset:
        kf[0] = scale if (np.uint64(first_u32) >> np.uint64(8)) >= threshold else zero
    m = n - offset
    q = (m + 1) // 2  # 64-bit outputs: value offset + 2j is output j's low half, + 1 its high
    nt = max(1, min(ntasks, q))
    low = np.uint64(0xFFFFFFFF)
    eight = np.uint64(8)
    # The mask value from a table indexed by the comparison, not `scale if ... else 0`:
    # LLVM compiles a float select to a branch where there are no AVX-512 mask
    # registers, and a random mask mispredicts it (AVX2 code: 5.6 against 3.1 ms
    # for 1.2M values, one core).
    pick = np.empty(2, x.dtype)
    pick[0], pick[1] = zero, scale
    for task in prange(nt):  # the masks, in C order
        j0, j1 = task * q // nt, (task + 1) * q // nt
        hi, lo = _pcg_advance(s_hi, s_lo, inc_hi, inc_lo, j0)
        for j in range(j0, j1):
            hi, lo = _muladd128(hi, lo, _PCG_MULT_HI, _PCG_MULT_LO, inc_hi, inc_lo)
            out = _pcg_output(hi, lo)
            i = offset + 2 * j
            kf[i] = pick[np.intp(((out & low) >> eight) >= threshold)]
            if i + 1 < n:
                kf[i + 1] = pick[np.intp((out >> np.uint64(40)) >= threshold)]
    for ab in prange(n0 * n1):  # y = x * mask
        a, b = ab // n1, ab % n1
        for c in range(n2):
            for d in range(n3):
                y[a, b, c, d] = x[a, b, c, d] * keep_scale[a, b, c, d]
    if q == 0:
        return s_hi, s_lo, False, np.uint64(first_u32)
    e_hi, e_lo = _pcg_advance(s_hi, s_lo, inc_hi, inc_lo, q)
    return e_hi, e_lo, m % 2 == 1, _pcg_output(e_hi, e_lo) >> np.uint64(32)


_cache.check(globals())  # before any kernel above loads from the disk cache
