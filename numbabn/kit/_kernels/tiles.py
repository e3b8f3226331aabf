"""Numba kernels behind Conv2d, Linear, MaxPool2d, ReLU and Dropout.  Private:
inputs arrive checked.

All image arrays are channels-last, ``(N, H, W, C)``, so the innermost loop runs
over contiguous channels.  Every kernel is parallel, and each output value is
written by one thread only, summed in an order fixed by the shape, so results do
not depend on the number of threads.

Direct convolutions (float32, stride 1, channel counts that are multiples of
``LANES``) run on register tiles, :func:`_tile`: accumulators of ``R`` output
rows by ``NV`` vectors of output channels, each ``R x LANES NV`` tile summed
over its whole reduction in registers.  The vector width is the one Numba
compiles for (:func:`tile_lanes`): 16 floats and up to 26 of AVX-512's 32
registers, or 8 floats and 12 of AVX2's 16.  The reduction
of a forward tile reads its input rows straight from the image (the ``KW * C``
values of one kernel row are contiguous channels-last), so there is no im2col
buffer; the input gradient is the forward of the zero-padded output gradient
with the flipped kernel, and the weight gradient sums tiles of ``(i, j, c)``
rows over an image's output pixels.  Linear layers use the same tiles for their
gradients and dot-product tiles (:func:`_dot_tile`) for the forward.
"""

import functools
import sys
from types import FunctionType, SimpleNamespace

import llvmlite.binding as _llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.registry import CPUDispatcher as Dispatcher
from numba.extending import intrinsic

from ... import _cache, _numba_private
from ..._config import CPU_HELPER_STRICT, CPU_JIT_PARALLEL


@njit(**CPU_JIT_PARALLEL)
def linear_forward(x, weight, bias, has_bias, k_block, y, nblocks):
    """``y = x @ weight.T (+ bias)`` for ``x (N, K)``, ``weight (O, K)``, ``K`` a
    multiple of LANES: dot-product tiles of a few rows of ``x`` by a few of
    ``weight`` (:func:`_dot_rows`) over blocks of ``k_block`` columns (the tile's
    rows stay in L1), each block's sum added to ``y`` in block order.  ``nblocks``
    tasks share the rows of ``x`` (timing only: the bits do not depend on it)."""
    n, k = x.shape
    o = weight.shape[0]
    xf, wf, yf = x.reshape(-1), weight.reshape(-1), y.reshape(-1)
    nt = max(1, min(n, nblocks))
    max_a, max_b = _dot_rows()
    to = (o + max_b - 1) // max_b
    for task in prange(nt):
        n0, n1 = task * n // nt, (task + 1) * n // nt
        tn = (n1 - n0 + max_a - 1) // max_a
        for k0 in range(0, k, k_block):
            mode = 1 if k0 > 0 else (2 if has_bias else 0)
            for j in range(to):
                o0, o1 = j * o // to, (j + 1) * o // to
                for i in range(tn):
                    r0 = n0 + i * (n1 - n0) // tn
                    r1 = n0 + (i + 1) * (n1 - n0) // tn
                    _dot(xf, r0 * k + k0, k, wf, o0 * k + k0, k, min(k_block, k - k0),
                         yf, r0 * o + o0, o, mode, bias, o0, r1 - r0, o1 - o0)


@njit(**CPU_JIT_PARALLEL)
def linear_input_grad(dy, weight, chain, dx):
    """``dx = dy @ weight`` for ``dy (N, O)``, ``weight (O, K)``, ``K`` a multiple of
    LANES: register tiles of rows of ``dy`` by vectors of ``K``, summed over ``O`` in
    order.  Each block of columns of ``weight`` is first copied into a contiguous
    panel: its rows lie ``K`` floats apart, a multiple of 4 KiB for the cnn's 9216,
    so read in place they would all fall in one set of the L1 cache."""
    n, o = dy.shape
    k = weight.shape[1]
    nv = _vectors(k)
    vw = LANES * nv
    ntile = (n + _max_rows(nv) - 1) // _max_rows(nv)
    row_off = _strided(_max_rows(nv), o)
    dyf, dxf = dy.reshape(-1), dx.reshape(-1)
    for kb in prange(k // vw):
        panel = np.ascontiguousarray(weight[:, kb * vw:(kb + 1) * vw]).reshape(-1)
        for t in range(ntile):
            r0 = t * n // ntile
            _tile_nv(nv, (t + 1) * n // ntile - r0, dyf, r0 * o, row_off, 1, 0, o, 1,
                     panel, 0, 0, vw, dxf, r0 * k + kb * vw, k, 0, panel, 0, chain)


@njit(**CPU_JIT_PARALLEL)
def linear_weight_grad(dy, x, chain, dweight):
    """``dweight = dy.T @ x`` for ``dy (N, O)``, ``x (N, K)``, ``K`` a multiple of LANES:
    register tiles of columns of ``dy`` by vectors of ``K``, summed over ``N`` in
    order; ``dy.T`` and panels of ``x`` copied contiguous first (as
    :func:`linear_input_grad`)."""
    n, o = dy.shape
    k = x.shape[1]
    nv = _vectors(k)
    vw = LANES * nv
    ntile = (o + _max_rows(nv) - 1) // _max_rows(nv)
    row_off = _strided(_max_rows(nv), n)
    dyf = np.ascontiguousarray(dy.T).reshape(-1)
    dwf = dweight.reshape(-1)
    for kb in prange(k // vw):
        panel = np.ascontiguousarray(x[:, kb * vw:(kb + 1) * vw]).reshape(-1)
        for t in range(ntile):
            r0 = t * o // ntile
            _tile_nv(nv, (t + 1) * o // ntile - r0, dyf, r0 * n, row_off, 1, 0, n, 1,
                     panel, 0, 0, vw, dwf, r0 * k + kb * vw, k, 0, panel, 0, chain)


# =========================================================================== #
# Register tiles: the vector width Numba compiles for
# =========================================================================== #

# LLVM CPU names whose default features include AVX-512F, and those with AVX2 and
# FMA (used only when the feature string Numba compiles with does not name the
# feature either way).
AVX512_CPU_NAMES = frozenset({
    "knl", "knm", "skylake-avx512", "skx", "cascadelake", "cooperlake", "cannonlake",
    "icelake-client", "icelake-server", "tigerlake", "rocketlake", "sapphirerapids",
    "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids", "znver4",
    "znver5", "x86-64-v4",
})
AVX2_CPU_NAMES = AVX512_CPU_NAMES | frozenset({
    "haswell", "broadwell", "skylake", "alderlake", "raptorlake", "meteorlake", "arrowlake",
    "arrowlake-s", "lunarlake", "pantherlake", "gracemont", "sierraforest", "grandridge",
    "clearwaterforest", "znver1", "znver2", "znver3", "bdver4", "x86-64-v3",
})


def enabled_features(features: str) -> frozenset:
    """The features an LLVM feature string turns on: ``"+avx2,-avx512f,+fma"``
    gives ``{"avx2", "fma"}`` (a ``-`` entry is a feature the CPU lacks)."""
    return frozenset(t.strip()[1:] for t in features.split(",") if t.strip().startswith("+"))


def tile_lanes(cpu_name: str, features: str) -> int:
    """Floats per vector of the register tiles for code compiled for ``cpu_name``
    with the LLVM feature string ``features``: 16 with AVX-512F (32 registers
    of 16 floats), 8 with AVX2 and FMA (16 registers of 8 floats), 0 without
    (no fused multiply-add in hardware: Conv2d and Linear keep im2col and BLAS).
    A feature the string names, ``+`` or ``-``, decides; one it does not name
    comes from the CPU name."""
    named = {t.strip().lstrip("+-") for t in features.split(",")}
    enabled = enabled_features(features)

    def has(feature, names):
        return feature in enabled if feature in named else cpu_name in names

    if has("avx512f", AVX512_CPU_NAMES):
        return 16
    if has("avx2", AVX2_CPU_NAMES) and has("fma", AVX2_CPU_NAMES):
        return 8
    return 0


def _compile_target():
    """The CPU name and feature string Numba's CPU target compiles for: its
    ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` settings, else the host's."""
    name = numba.config.CPU_NAME or _llvm.get_host_cpu_name()
    features = numba.config.CPU_FEATURES
    if features is None:
        features = _llvm.get_host_cpu_features().flatten()
    return name, features


_cg = _numba_private.cgutils()  # None on an untested Numba: the tiles are then off

_TARGET_LANES = tile_lanes(*_compile_target())

LANES = _TARGET_LANES or 8
"""Floats per vector of the register tiles, from the features Numba compiles
for (:func:`tile_lanes`).  Compiled into the kernels; :func:`with_lanes` builds
them for the other width."""

DIRECT_CONV_CPU = _TARGET_LANES > 0 and _cg is not None
"""Whether Conv2d and Linear may use the register tiles here: the code Numba
emits has AVX-512F or AVX2 with FMA, and the Numba is one whose IR helpers the
tiles were checked with (see :mod:`numbabn._numba_private`)."""

_I64 = ir.IntType(64)


def _literals(*args):
    if not all(isinstance(a, types.IntegerLiteral) for a in args):
        raise _numba_private.RequireLiteralValue("register tiles: shapes and lanes must be literal integers")
    return [a.literal_value for a in args]


@intrinsic
def _tile(typingctx, a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
          c, c_base, c_row, mode, init, init_base, chain, rows, rmax, nv, lanes):
    """One register tile: for ``r < rows`` and ``v < nv``, with ``L = lanes`` and
    ``c_rv = c[c_base + r*c_row + L v : +L]``::

        c_rv = (0 | c_rv | init[init_base + L v : +L])        # mode 0 | 1 | 2
        for each group of g = max(1, chain // seg_len) segments s (in order):
            acc = 0
            for s in group, k < seg_len:
                acc = fma(a[a_base + row_off[r] + s*a_seg + k*a_k], b[b_base + s*b_seg + k*b_k + L v : +L], acc)
            c_rv = c_rv + acc

    ``a``, ``b``, ``c``, ``init``: 1-D float32 arrays; ``row_off``: int64, ``rows``
    entries used.  ``rmax``, ``nv`` and ``lanes`` are literals: one loop of
    ``rmax x nv`` accumulators of ``lanes`` floats is compiled, and a tile of
    ``rows < rmax`` rows repeats its last row (the same sums, stored to the same
    place), so no other row count costs compile time.  Each group's sum is one
    chain of fused multiply-adds in ``(s, k)`` order, added to the running total
    in group order: float32 chains of about ``chain`` products (whole segments),
    not ``nseg * seg_len``, as a GEMM blocked along its reduction (the input
    gradient's 576 products are 3 chains, the weight gradient's 4608 per block of
    images are 48).  The sums do not depend on ``lanes``.
    """
    n_rows, n_nv, n_lanes = _literals(rmax, nv, lanes)
    u = types.unliteral
    sig = types.void(a, u(a_base), row_off, u(nseg), u(a_seg), u(seg_len), u(a_k), b, u(b_base),
                     u(b_seg), u(b_k), c, u(c_base), u(c_row), u(mode), init, u(init_base),
                     u(chain), u(rows), rmax, nv, lanes)
    vec = ir.VectorType(ir.FloatType(), n_lanes)

    def codegen(context, builder, sig, args):
        (a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
         c, c_base, c_row, mode, init, init_base, _, rows, _, _, _) = args
        i64 = [context.cast(builder, v, t, types.int64) for v, t in
               ((a_base, sig.args[1]), (nseg, sig.args[3]), (a_seg, sig.args[4]),
                (seg_len, sig.args[5]), (a_k, sig.args[6]), (b_base, sig.args[8]),
                (b_seg, sig.args[9]), (b_k, sig.args[10]), (c_base, sig.args[12]),
                (c_row, sig.args[13]), (mode, sig.args[14]), (init_base, sig.args[16]),
                (rows, sig.args[18]))]
        (a_base, nseg, a_seg, seg_len, a_k, b_base, b_seg, b_k, c_base, c_row, mode,
         init_base, rows) = i64
        const = lambda v: ir.Constant(_I64, v)  # noqa: E731
        # Segments summed per chain: at least one, about TILE_CHAIN products.
        chain = context.cast(builder, args[17], sig.args[17], types.int64)
        group = builder.sdiv(chain, builder.select(builder.icmp_signed(">", seg_len, const(0)),
                                                   seg_len, const(1)))
        group = builder.select(builder.icmp_signed(">", group, const(1)), group, const(1))
        A = context.make_array(sig.args[0])(context, builder, a).data
        RO = context.make_array(sig.args[2])(context, builder, row_off).data
        B = context.make_array(sig.args[7])(context, builder, b).data
        C = context.make_array(sig.args[11])(context, builder, c).data
        INIT = context.make_array(sig.args[15])(context, builder, init).data
        fma = _cg.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{n_lanes}f32")
        vptr = vec.as_pointer()

        def vload(base, offset):
            return builder.load(builder.bitcast(builder.gep(base, [offset]), vptr), align=4)

        def vstore(value, base, offset):
            builder.store(value, builder.bitcast(builder.gep(base, [offset]), vptr), align=4)

        accs = [[_cg.alloca_once(builder, vec) for _ in range(n_nv)] for _ in range(n_rows)]
        # Rows past `rows` repeat the last one.
        last = builder.sub(rows, const(1))
        row = [builder.select(builder.icmp_signed(">", rows, const(r)), const(r), last)
               for r in range(n_rows)]
        row_base = [builder.add(a_base, builder.load(builder.gep(RO, [row[r]]))) for r in range(n_rows)]
        c_off = [[builder.add(c_base, builder.add(builder.mul(c_row, row[r]), const(n_lanes * v)))
                  for v in range(n_nv)] for r in range(n_rows)]
        # c holds the running total: its start value, then + each group's sum.
        with builder.if_else(builder.icmp_signed("==", mode, const(2))) as (from_init, other):
            with from_init:
                for v in range(n_nv):
                    start = vload(INIT, builder.add(init_base, const(n_lanes * v)))
                    for r in range(n_rows):
                        vstore(start, C, c_off[r][v])
            with other:
                with builder.if_then(builder.icmp_signed("==", mode, const(0))):
                    for r in range(n_rows):
                        for v in range(n_nv):
                            vstore(ir.Constant(vec, None), C, c_off[r][v])
        ngroup = builder.sdiv(builder.add(nseg, builder.sub(group, const(1))), group)
        with _cg.for_range(builder, ngroup) as grp:
            for r in range(n_rows):
                for v in range(n_nv):
                    builder.store(ir.Constant(vec, None), accs[r][v])
            s0 = builder.mul(grp.index, group)
            s1 = builder.select(builder.icmp_signed("<", builder.add(s0, group), nseg),
                                builder.add(s0, group), nseg)
            with _cg.for_range_slice(builder, s0, s1, const(1)) as (seg, _):
                a_s = builder.mul(seg, a_seg)
                b_s = builder.add(b_base, builder.mul(seg, b_seg))
                with _cg.for_range(builder, seg_len) as kk:
                    a_off = builder.add(a_s, builder.mul(kk.index, a_k))
                    b_off = builder.add(b_s, builder.mul(kk.index, b_k))
                    bv = [vload(B, builder.add(b_off, const(n_lanes * v))) for v in range(n_nv)]
                    for r in range(n_rows):
                        x = builder.load(builder.gep(A, [builder.add(row_base[r], a_off)]))
                        xv = builder.insert_element(ir.Constant(vec, ir.Undefined), x,
                                                    ir.Constant(ir.IntType(32), 0))
                        xv = builder.shuffle_vector(
                            xv, ir.Constant(vec, ir.Undefined),
                            ir.Constant(ir.VectorType(ir.IntType(32), n_lanes), None))
                        for v in range(n_nv):
                            acc = builder.load(accs[r][v])
                            builder.store(builder.call(fma, [xv, bv[v], acc]), accs[r][v])
            # Every total before any store: a repeated row stores its row's value again.
            totals = [[builder.fadd(vload(C, c_off[r][v]), builder.load(accs[r][v]))
                       for v in range(n_nv)] for r in range(n_rows)]
            for r in range(n_rows):
                for v in range(n_nv):
                    vstore(totals[r][v], C, c_off[r][v])
        return context.get_dummy_value()

    return sig, codegen


def _hsum(builder, v, lanes):
    """The ``lanes`` lanes of ``v`` added as a fixed tree (halves, quarters, ...)."""
    width = lanes
    while width > 1:
        width //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                      list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                      list(range(width, 2 * width))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@intrinsic
def _dot_tile(typingctx, a, a_base, a_row, b, b_base, b_row, length, c, c_base, c_row,
              mode, init, init_base, rows_a, rows_b, max_a, max_b, lanes):
    """Dot products of ``rows_a`` rows of ``a`` with ``rows_b`` rows of ``b``::

        c[c_base + i*c_row + j] = (0 | c[...] | init[init_base + j])      # mode 0 | 1 | 2
                                  + sum_k a[a_base + i*a_row + k] * b[b_base + j*b_row + k]

    over ``k < length`` (a multiple of ``lanes``): each product in lane ``k % lanes``
    of a vector accumulator (fused multiply-adds in ``k`` order), the lanes then
    added as a fixed tree.  ``max_a``, ``max_b``, ``lanes``: literals; one loop of
    ``max_a x max_b`` accumulators is compiled, and a smaller tile repeats its
    last row of ``a`` or ``b`` (the same sums, stored to the same place).
    """
    n_a, n_b, n_lanes = _literals(max_a, max_b, lanes)
    u = types.unliteral
    sig = types.void(a, u(a_base), u(a_row), b, u(b_base), u(b_row), u(length), c, u(c_base),
                     u(c_row), u(mode), init, u(init_base), u(rows_a), u(rows_b), max_a, max_b, lanes)
    vec = ir.VectorType(ir.FloatType(), n_lanes)

    def codegen(context, builder, sig, args):
        ints = [context.cast(builder, args[i], sig.args[i], types.int64)
                for i in (1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14)]
        a_base, a_row, b_base, b_row, length, c_base, c_row, mode, init_base, rows_a, rows_b = ints
        A = context.make_array(sig.args[0])(context, builder, args[0]).data
        B = context.make_array(sig.args[3])(context, builder, args[3]).data
        C = context.make_array(sig.args[7])(context, builder, args[7]).data
        INIT = context.make_array(sig.args[11])(context, builder, args[11]).data
        fma = _cg.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{n_lanes}f32")
        vptr = vec.as_pointer()
        const = lambda v: ir.Constant(_I64, v)  # noqa: E731

        def clamp(count, n):  # rows past `count` repeat the last one
            last = builder.sub(count, const(1))
            return [builder.select(builder.icmp_signed(">", count, const(i)), const(i), last)
                    for i in range(n)]

        ia, jb = clamp(rows_a, n_a), clamp(rows_b, n_b)
        accs = [[_cg.alloca_once(builder, vec) for _ in range(n_b)] for _ in range(n_a)]
        a_rows = [builder.add(a_base, builder.mul(a_row, i)) for i in ia]
        b_rows = [builder.add(b_base, builder.mul(b_row, j)) for j in jb]
        for i in range(n_a):
            for j in range(n_b):
                builder.store(ir.Constant(vec, None), accs[i][j])
        with _cg.for_range_slice(builder, const(0), length, const(n_lanes)) as (k, _):
            av = [builder.load(builder.bitcast(builder.gep(A, [builder.add(r, k)]), vptr), align=4)
                  for r in a_rows]
            bv = [builder.load(builder.bitcast(builder.gep(B, [builder.add(r, k)]), vptr), align=4)
                  for r in b_rows]
            for i in range(n_a):
                for j in range(n_b):
                    builder.store(builder.call(fma, [av[i], bv[j], builder.load(accs[i][j])]),
                                  accs[i][j])
        # Every result before any store: a repeated row stores its row's value again.
        results = []
        for i in range(n_a):
            for j in range(n_b):
                total = _hsum(builder, builder.load(accs[i][j]), n_lanes)
                where = builder.gep(C, [builder.add(c_base, builder.add(builder.mul(c_row, ia[i]), jb[j]))])
                old = builder.load(where)
                bias = builder.load(builder.gep(INIT, [builder.add(init_base, jb[j])]))
                start = builder.select(builder.icmp_signed("==", mode, const(1)), old,
                                       builder.select(builder.icmp_signed("==", mode, const(2)),
                                                      bias, ir.Constant(ir.FloatType(), 0.0)))
                results.append((builder.fadd(start, total), where))
        for value, where in results:
            builder.store(value, where)
        return context.get_dummy_value()

    return sig, codegen


# Tile shapes, rows x vectors.  Only the shapes of LANES are compiled in: the
# branches on the constant LANES below are pruned by Numba.
#   16 lanes (AVX-512, 32 registers): 6 x 4 (24 accumulators), 13 x 2 (26), 8 x 1
#     (a tile of 1-vector rows is bound by its loads, one per product: 8 rows run
#     as fast as 16, with half the code);
#   8 lanes (AVX2, 16 registers): 6 x 2 (12 accumulators, the 2 vectors of b and
#     a broadcast value of a: 15 registers, the shape of BLIS's Haswell SGEMM
#     micro-kernel), 8 x 1;
#   dot-product tiles (Linear's forward), rows of a x rows of b: 4 x 6; 4 x 3
#     (12 accumulators, 3 vectors of b and one of a at a time).


@njit(**CPU_HELPER_STRICT)
def _vectors(channels):
    """Vectors per tile row for ``channels`` output channels (a multiple of LANES)."""
    if LANES == 16 and channels % 64 == 0:
        return 4
    if channels % (2 * LANES) == 0:
        return 2
    return 1


@njit(**CPU_HELPER_STRICT)
def _max_rows(nv):
    """Rows per tile of ``nv`` vectors a row."""
    if nv == 1:
        return 8
    if LANES == 16:
        return 6 if nv == 4 else 13
    return 6


@njit(**CPU_HELPER_STRICT)
def _tile_nv(nv, rows, a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
             c, c_base, c_row, mode, init, init_base, chain):
    if LANES == 16 and nv == 4:
        _tile(a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
              c, c_base, c_row, mode, init, init_base, chain, rows, 6, 4, LANES)
    elif LANES == 16 and nv == 2:
        _tile(a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
              c, c_base, c_row, mode, init, init_base, chain, rows, 13, 2, LANES)
    elif LANES == 8 and nv == 2:
        _tile(a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
              c, c_base, c_row, mode, init, init_base, chain, rows, 6, 2, LANES)
    else:
        _tile(a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
              c, c_base, c_row, mode, init, init_base, chain, rows, 8, 1, LANES)


@njit(**CPU_HELPER_STRICT)
def _dot_rows():
    """Rows of ``a`` and of ``b`` per dot-product tile."""
    return (4, 6) if LANES == 16 else (4, 3)


@njit(**CPU_HELPER_STRICT)
def _dot(a, a_base, a_row, b, b_base, b_row, length, c, c_base, c_row, mode, init, init_base,
         rows_a, rows_b):
    if LANES == 16:
        _dot_tile(a, a_base, a_row, b, b_base, b_row, length, c, c_base, c_row, mode, init,
                  init_base, rows_a, rows_b, 4, 6, LANES)
    else:
        _dot_tile(a, a_base, a_row, b, b_base, b_row, length, c, c_base, c_row, mode, init,
                  init_base, rows_a, rows_b, 4, 3, LANES)


@njit(**CPU_HELPER_STRICT)
def _strided(n, step):
    """``[0, step, 2 step, ...]`` (n values, int64)."""
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = i * step
    return out


@njit(**CPU_HELPER_STRICT)
def _pad_into(image, pad_h, pad_w, scratch):
    """Copy ``image (H, W, C)`` into the interior of ``scratch`` (whose border is zero)."""
    height, width, chans = image.shape
    for h in range(height):
        for w in range(width):
            for c in range(chans):
                scratch[pad_h + h, pad_w + w, c] = image[h, w, c]


@njit(**CPU_HELPER_STRICT)
def _pixel_offsets(p0, rows, width, pitch, step, out):
    """``out[r] = (h * pitch + w) * step`` for the pixels ``p0 + r = h * width + w``
    (``r < rows``): where a tile's pixels, taken in raster order across rows of
    ``width``, start in an image of rows of ``pitch`` pixels of ``step`` values."""
    for r in range(rows):
        h, w = divmod(p0 + r, width)
        out[r] = (h * pitch + w) * step


@njit(**CPU_JIT_PARALLEL)
def conv_forward(x, weight, bias, has_bias, pad_h, pad_w, chain, y, nblocks):
    """Stride-1 correlation ``y[n, oh, ow, :] = bias + sum_{i, j, c} xpad[n, oh+i, ow+j, c]
    * weight[i, j, c, :]`` (``xpad``: ``x`` zero-padded by ``pad_h, pad_w``).

    ``x (N, H, W, C)``, ``weight (KH, KW, C, CO)``, ``y (N, OH, OW, CO)``: float32,
    C-contiguous; ``CO`` a multiple of LANES.  An image's output pixels, in raster
    order across its rows, are cut into tiles of :func:`_max_rows` pixels (the last
    one shorter), so no row width leaves tiles part empty; each value is summed over
    ``(i, j, c)`` in that order, starting from the bias.  The images are shared
    among ``nblocks`` tasks (one per thread; timing only, the bits do not change).
    """
    n_img, height, width, chans = x.shape
    k_h, k_w, _, c_out = weight.shape
    _, out_h, out_w, _ = y.shape
    padded = pad_h > 0 or pad_w > 0
    p_h, p_w = height + 2 * pad_h, width + 2 * pad_w
    nv = _vectors(c_out)
    vw = LANES * nv
    rmax = _max_rows(nv)
    npix = out_h * out_w
    wf = weight.reshape(-1)
    yf = y.reshape(-1)
    mode = 2 if has_bias else 0
    nblk = max(1, min(n_img, nblocks))
    for blk in prange(nblk):
        scratch = np.zeros((p_h, p_w, chans) if padded else (0, 0, 0), np.float32)
        row_off = np.empty(rmax, np.int64)
        for n in range(blk * n_img // nblk, (blk + 1) * n_img // nblk):
            if padded:
                _pad_into(x[n], pad_h, pad_w, scratch)
                src = scratch.reshape(-1)
                base = 0
            else:
                src = x.reshape(-1)
                base = n * height * width * chans
            for p0 in range(0, npix, rmax):
                rows = min(rmax, npix - p0)
                _pixel_offsets(p0, rows, out_w, p_w, chans, row_off)
                for cb in range(0, c_out, vw):
                    _tile_nv(nv, rows, src, base, row_off,
                             k_h, p_w * chans, k_w * chans, 1, wf, cb, k_w * chans * c_out, c_out,
                             yf, (n * npix + p0) * c_out + cb, c_out, mode, bias, cb, chain)


@njit(**CPU_JIT_PARALLEL)
def conv_input_grad(dy, weight_flip, pad_h, pad_w, chain, dx, nblocks):
    """Input gradient of :func:`conv_forward`: the stride-1 correlation of ``dy``
    zero-padded by ``KH - 1 - pad_h, KW - 1 - pad_w`` with ``weight_flip (KH, KW, CO, C)``,
    ``weight_flip[i, j, o, c] = weight[KH-1-i, KW-1-j, c, o]``; ``dx (N, H, W, C)``
    is overwritten, ``C`` a multiple of LANES; ``nblocks`` as :func:`conv_forward`.
    Kernel rows that fall on the padding rows above and below ``dy`` are skipped
    (their products are zeros), not the padding columns: the rows of ``dx`` whose
    kernel rows all meet ``dy`` are tiled as one run of pixels in raster order (as
    :func:`conv_forward`), the others (the top and bottom ``KH - 1 - pad_h``) row
    by row."""
    n_img, out_h, out_w, c_out = dy.shape
    k_h, k_w, _, chans = weight_flip.shape
    _, height, width, _ = dx.shape
    q_h, q_w = k_h - 1 - pad_h, k_w - 1 - pad_w
    p_w = out_w + 2 * q_w
    nv = _vectors(chans)
    vw = LANES * nv
    rmax = _max_rows(nv)
    # Rows h in [band0, band1) meet dy with every kernel row.
    band0 = min(height, q_h)
    band1 = max(band0, min(height, out_h + q_h - k_h + 1))
    wf = weight_flip.reshape(-1)
    dxf = dx.reshape(-1)
    nblk = max(1, min(n_img, nblocks))
    for blk in prange(nblk):
        scratch = np.zeros((out_h + 2 * q_h, p_w, c_out), np.float32)
        src = scratch.reshape(-1)
        row_off = np.empty(rmax, np.int64)
        for n in range(blk * n_img // nblk, (blk + 1) * n_img // nblk):
            _pad_into(dy[n], q_h, q_w, scratch)
            h = 0
            while h < height:
                h_end = band1 if band0 <= h < band1 else h + 1
                # Kernel rows i that meet dy, not its zero padding: padded row h + i
                # is dy's row h + i - q_h.
                i0 = max(0, q_h - h)
                i1 = min(k_h, out_h + q_h - h)
                for p0 in range(h * width, h_end * width, rmax):
                    rows = min(rmax, h_end * width - p0)
                    _pixel_offsets(p0, rows, width, p_w, c_out, row_off)
                    for cb in range(0, chans, vw):
                        _tile_nv(nv, rows, src, i0 * p_w * c_out, row_off,
                                 max(0, i1 - i0), p_w * c_out, k_w * c_out, 1,
                                 wf, i0 * k_w * c_out * chans + cb, k_w * c_out * chans, chans,
                                 dxf, (n * height * width + p0) * chans + cb, chans,
                                 0, wf, 0, chain)
                h = h_end


@njit(**CPU_JIT_PARALLEL)
def conv_weight_grad(x, dy, pad_h, pad_w, block_images, chain, dweight):
    """Weight gradient of :func:`conv_forward`: ``dweight[i, j, c, :] = sum_{n, oh, ow}
    xpad[n, oh+i, ow+j, c] * dy[n, oh, ow, :]`` (overwritten), ``CO`` a multiple of LANES.

    Images are summed in blocks of ``block_images`` (float32 partial sums, each
    over the block's images in order, pixels in row-major order), and the block
    sums are added in block order in float64: the partition depends on the
    shape only, so the bits do not depend on the thread count.
    """
    n_img, height, width, chans = x.shape
    _, out_h, out_w, c_out = dy.shape
    k_h, k_w, _, _ = dweight.shape
    padded = pad_h > 0 or pad_w > 0
    p_h, p_w = height + 2 * pad_h, width + 2 * pad_w
    nv = _vectors(c_out)
    vw = LANES * nv
    rmax = _max_rows(nv)
    nrows = k_h * k_w * chans
    row_off = np.empty(nrows, np.int64)
    for i in range(k_h):
        for j in range(k_w):
            for c in range(chans):
                row_off[(i * k_w + j) * chans + c] = (i * p_w + j) * chans + c
    nblk = (n_img + block_images - 1) // block_images
    partial = np.empty((nblk, nrows, c_out), np.float32)
    pf = partial.reshape(-1)
    dyf = dy.reshape(-1)
    for blk in prange(nblk):
        scratch = np.zeros((p_h, p_w, chans) if padded else (0, 0, 0), np.float32)
        n0 = blk * block_images
        for n in range(n0, min(n_img, n0 + block_images)):
            if padded:
                _pad_into(x[n], pad_h, pad_w, scratch)
                src = scratch.reshape(-1)
                base = 0
            else:
                src = x.reshape(-1)
                base = n * height * width * chans
            for r0 in range(0, nrows, rmax):
                for cb in range(0, c_out, vw):
                    _tile_nv(nv, min(rmax, nrows - r0), src, base, row_off[r0:], out_h, p_w * chans,
                             out_w, chans, dyf, n * out_h * out_w * c_out + cb, out_w * c_out, c_out,
                             pf, (blk * nrows + r0) * c_out + cb, c_out, 1 if n > n0 else 0, pf, 0, chain)
    dwf = dweight.reshape(nrows, c_out)
    for r in prange(nrows):
        _sum_blocks(partial, r, dwf[r])


@njit(**CPU_HELPER_STRICT)
def _sum_blocks(partial, r, out):
    """``out[:] = sum over blocks b, in order, of partial[b, r, :]`` in float64."""
    for o in range(out.shape[0]):
        total = 0.0
        for blk in range(partial.shape[0]):
            total += partial[blk, r, o]
        out[o] = total


@functools.cache
def with_lanes(lanes: int):
    """The kernels of this module for vectors of ``lanes`` floats (8 or 16): the
    module itself for ``LANES``, else a namespace of its kernels compiled for the
    other width (cached on disk under their own names, ``conv_forward_lanes8``).
    For tests and benchmarks of the other instruction set's tiles: AVX2's run on
    an AVX-512 host; AVX-512's on an AVX2 host split each vector in two.  The
    convolutions and the linear gradients give the same bits at either width;
    the linear forward's dot products add their lanes in another tree."""
    if lanes not in (8, 16):
        raise ValueError(f"with_lanes: lanes must be 8 (AVX2) or 16 (AVX-512), got {lanes!r}")
    if lanes == LANES:
        return sys.modules[__name__]
    namespace = dict(globals(), LANES=lanes, DIRECT_CONV_CPU=_cg is not None)
    for name, obj in globals().items():
        if isinstance(obj, Dispatcher):
            f = obj.py_func
            copy = FunctionType(f.__code__, namespace, f.__name__, f.__defaults__, f.__closure__)
            copy.__qualname__ = f"{f.__qualname__}_lanes{lanes}"  # its own cache index
            options = {k: v for k, v in obj.targetoptions.items() if k != "nopython"}
            namespace[name] = njit(cache=True, **options)(copy)
    return SimpleNamespace(**namespace)


_cache.check(globals())  # before any kernel above loads from the disk cache
