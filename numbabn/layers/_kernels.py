"""Numba kernels behind Conv2d, Linear, MaxPool2d, ReLU and Dropout.  Private:
inputs arrive checked.

All image arrays are channels-last, ``(N, H, W, C)``, so the innermost loop runs
over contiguous channels.  Every kernel is parallel, and each output value is
written by one thread only, summed in an order fixed by the shape, so results do
not depend on the number of threads.

Direct convolutions (float32, stride 1, channel counts that are multiples of
16) run on register tiles of 16-float vectors, :func:`_tile`: up to 24
accumulators of ``R`` output rows by ``NV`` vectors of output channels, each
``R x 16 NV`` tile summed over its whole reduction in registers.  The reduction
of a forward tile reads its input rows straight from the image (the ``KW * C``
values of one kernel row are contiguous channels-last), so there is no im2col
buffer; the input gradient is the forward of the zero-padded output gradient
with the flipped kernel, and the weight gradient sums tiles of ``(i, j, c)``
rows over an image's output pixels.  Linear layers use the same tiles for their
gradients and dot-product tiles (:func:`_dot_tile`) for the forward.
"""

import llvmlite.binding as _llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from .. import _cache
from .._config import CPU_JIT_PARALLEL, CPU_JIT_STRICT
from .._cpu.kernels import _accumulate


@njit(**CPU_JIT_PARALLEL)
def im2col(x, stride_h, stride_w, pad_h, pad_w, cols):
    """``cols[n, oh, ow, i, j, c] = x[n, oh*stride_h - pad_h + i, ow*stride_w - pad_w + j, c]``
    (zero outside ``x``)."""
    n_img, height, width, chans = x.shape
    _, out_h, out_w, k_h, k_w, _ = cols.shape
    for n in prange(n_img):
        for oh in range(out_h):
            for ow in range(out_w):
                for i in range(k_h):
                    h = oh * stride_h - pad_h + i
                    for j in range(k_w):
                        w = ow * stride_w - pad_w + j
                        if 0 <= h < height and 0 <= w < width:
                            for c in range(chans):
                                cols[n, oh, ow, i, j, c] = x[n, h, w, c]
                        else:
                            for c in range(chans):
                                cols[n, oh, ow, i, j, c] = 0.0


@njit(**CPU_JIT_PARALLEL)
def col2im(dcols, stride_h, stride_w, pad_h, pad_w, dx):
    """Adjoint of :func:`im2col`: ``dx`` (overwritten) sums every column entry
    that was copied from it."""
    n_img, height, width, chans = dx.shape
    _, out_h, out_w, k_h, k_w, _ = dcols.shape
    for n in prange(n_img):
        dx[n] = 0.0
        for oh in range(out_h):
            for ow in range(out_w):
                for i in range(k_h):
                    h = oh * stride_h - pad_h + i
                    if h < 0 or h >= height:
                        continue
                    for j in range(k_w):
                        w = ow * stride_w - pad_w + j
                        if 0 <= w < width:
                            for c in range(chans):
                                dx[n, h, w, c] += dcols[n, oh, ow, i, j, c]


@njit(**CPU_JIT_PARALLEL)
def max_pool(x, k_h, k_w, stride_h, stride_w, pad_h, pad_w, y, argmax):
    """Window maxima into ``y`` and their flat positions ``h * W + w`` into ``argmax``.

    The first maximum wins ties; a NaN in a window is propagated (as PyTorch).
    """
    n_img, height, width, chans = x.shape
    _, out_h, out_w, _ = y.shape
    for n in prange(n_img):
        for oh in range(out_h):
            for ow in range(out_w):
                for c in range(chans):
                    y[n, oh, ow, c] = -np.inf
                    argmax[n, oh, ow, c] = -1
                for i in range(k_h):
                    h = oh * stride_h - pad_h + i
                    if h < 0 or h >= height:
                        continue
                    for j in range(k_w):
                        w = ow * stride_w - pad_w + j
                        if w < 0 or w >= width:
                            continue
                        for c in range(chans):
                            v = x[n, h, w, c]
                            best = y[n, oh, ow, c]
                            if v > best or (v != v and best == best) or argmax[n, oh, ow, c] < 0:
                                y[n, oh, ow, c] = v
                                argmax[n, oh, ow, c] = h * width + w


@njit(**CPU_JIT_PARALLEL)
def max_pool_backward(dy, argmax, dx):
    """Route each ``dy`` entry to its window's maximum; ``dx`` is overwritten."""
    n_img, height, width, chans = dx.shape
    _, out_h, out_w, _ = dy.shape
    for n in prange(n_img):
        dx[n] = 0.0
        for oh in range(out_h):
            for ow in range(out_w):
                for c in range(chans):
                    f = argmax[n, oh, ow, c]
                    dx[n, f // width, f % width, c] += dy[n, oh, ow, c]


@njit(**CPU_JIT_PARALLEL)
def linear_forward(x, weight, bias, has_bias, k_block, y, nblocks):
    """``y = x @ weight.T (+ bias)`` for ``x (N, K)``, ``weight (O, K)``, ``K`` a
    multiple of 16: dot-product tiles of up to 4 rows of ``x`` by 6 of ``weight``
    over blocks of ``k_block`` columns (the tile's rows stay in L1), each block's
    sum added to ``y`` in block order.  ``nblocks`` tasks share the rows of ``x``
    (timing only: the bits do not depend on it)."""
    n, k = x.shape
    o = weight.shape[0]
    xf, wf, yf = x.reshape(-1), weight.reshape(-1), y.reshape(-1)
    nt = max(1, min(n, nblocks))
    to = (o + 5) // 6
    for task in prange(nt):
        n0, n1 = task * n // nt, (task + 1) * n // nt
        tn = (n1 - n0 + 3) // 4
        for k0 in range(0, k, k_block):
            mode = 1 if k0 > 0 else (2 if has_bias else 0)
            for j in range(to):
                o0, o1 = j * o // to, (j + 1) * o // to
                for i in range(tn):
                    r0 = n0 + i * (n1 - n0) // tn
                    r1 = n0 + (i + 1) * (n1 - n0) // tn
                    _dot_tile(xf, r0 * k + k0, k, wf, o0 * k + k0, k, min(k_block, k - k0),
                              yf, r0 * o + o0, o, mode, bias, o0, r1 - r0, o1 - o0, 4, 6)


@njit(**CPU_JIT_PARALLEL)
def linear_input_grad(dy, weight, chain, dx):
    """``dx = dy @ weight`` for ``dy (N, O)``, ``weight (O, K)``, ``K`` a multiple of
    16: register tiles of rows of ``dy`` by vectors of ``K``, summed over ``O`` in order."""
    n, o = dy.shape
    k = weight.shape[1]
    nv = _vectors(k)
    vw = LANES * nv
    ntile = (n + _max_rows(nv) - 1) // _max_rows(nv)
    row_off = _strided(_max_rows(nv), o)
    dyf, wf, dxf = dy.reshape(-1), weight.reshape(-1), dx.reshape(-1)
    for kb in prange(k // vw):
        for t in range(ntile):
            r0 = t * n // ntile
            _tile_nv(nv, (t + 1) * n // ntile - r0, dyf, r0 * o, row_off, 1, 0, o, 1,
                     wf, kb * vw, 0, k, dxf, r0 * k + kb * vw, k, 0, wf, 0, chain)


@njit(**CPU_JIT_PARALLEL)
def linear_weight_grad(dy, x, chain, dweight):
    """``dweight = dy.T @ x`` for ``dy (N, O)``, ``x (N, K)``, ``K`` a multiple of 16:
    register tiles of columns of ``dy`` by vectors of ``K``, summed over ``N`` in order."""
    n, o = dy.shape
    k = x.shape[1]
    nv = _vectors(k)
    vw = LANES * nv
    ntile = (o + _max_rows(nv) - 1) // _max_rows(nv)
    row_off = _strided(_max_rows(nv), 1)
    dyf, xf, dwf = dy.reshape(-1), x.reshape(-1), dweight.reshape(-1)
    for kb in prange(k // vw):
        for t in range(ntile):
            r0 = t * o // ntile
            _tile_nv(nv, (t + 1) * o // ntile - r0, dyf, r0, row_off, 1, 0, n, o,
                     xf, kb * vw, 0, k, dwf, r0 * k + kb * vw, k, 0, xf, 0, chain)


@njit(**CPU_JIT_PARALLEL)
def max_pool_backward_tiled(dy, argmax, k_h, k_w, dx):
    """:func:`max_pool_backward` for windows that tile the input (stride equal to
    the kernel size, no padding): each ``dx`` value is written once, ``dy`` at its
    window's maximum and 0 elsewhere (and 0 in the rows and columns past the
    last window), instead of zeroing ``dx`` and adding into it."""
    n_img, height, width, chans = dx.shape
    _, out_h, out_w, _ = dy.shape
    zero = dx.dtype.type(0.0)
    for n in prange(n_img):
        for h in range(height):
            oh = h // k_h
            for w in range(width):
                ow = w // k_w
                if oh >= out_h or ow >= out_w:
                    for c in range(chans):
                        dx[n, h, w, c] = zero
                    continue
                f = h * width + w
                for c in range(chans):  # + 0: -0.0 gives 0.0, as zero + dy does
                    dx[n, h, w, c] = dy[n, oh, ow, c] + zero if argmax[n, oh, ow, c] == f else zero


@njit(**CPU_JIT_STRICT)
def _add_rows(a, r0, r1, acc):
    for r in range(r0, r1):
        _accumulate(acc, a[r], acc.shape[0])


@njit(**CPU_JIT_PARALLEL)
def column_sums(a, rows, out):
    """Float64 column sums of the C-contiguous ``(n, C)`` array ``a`` into ``out``.

    Blocks of ``rows`` whole rows are summed in parallel, each column in row
    order, and the block sums added in block order: the partition depends on the
    shape only, so the bits do not depend on the thread count.
    """
    n, ncol = a.shape
    nblocks = (n + rows - 1) // rows
    partial = np.zeros((nblocks, ncol))
    for b in prange(nblocks):
        _add_rows(a, b * rows, min((b + 1) * rows, n), partial[b])
    out[:] = 0.0
    for b in range(nblocks):
        _accumulate(out, partial[b], ncol)


@njit(**CPU_JIT_PARALLEL)
def relu_backward(dy, y, dx):
    """``dx = dy where y > 0, else 0`` over flat arrays (PyTorch's
    ``threshold_backward``: a NaN or inf in ``dy`` where ``y <= 0`` gives 0)."""
    zero = dy.dtype.type(0.0)
    for i in prange(dy.shape[0]):
        dx[i] = dy[i] if y[i] > 0 else zero


# =========================================================================== #
# Direct convolution on register tiles
# =========================================================================== #

LANES = 16
"""Floats per vector of the register tiles (one AVX-512 register)."""

DIRECT_CONV_CPU = ("avx512f" in _llvm.get_host_cpu_features().flatten()
                   and numba.config.CPU_NAME in (None, "host"))
"""Whether Numba compiles for a host with AVX-512: 24 accumulators of 16 floats
take 24 of its 32 vector registers.  Elsewhere (AVX2 has 16 registers of 8
floats) the tiles would spill, and Conv2d keeps im2col and BLAS."""

_VEC = ir.VectorType(ir.FloatType(), LANES)
_I64 = ir.IntType(64)


@intrinsic
def _tile(typingctx, a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
          c, c_base, c_row, mode, init, init_base, chain, rows, rmax, nv):
    """One register tile: for ``r < rows`` and ``v < nv``, with
    ``c_rv = c[c_base + r*c_row + 16v : +16]``::

        c_rv = (0 | c_rv | init[init_base + 16v : +16])        # mode 0 | 1 | 2
        for each group of g = max(1, chain // seg_len) segments s (in order):
            acc = 0
            for s in group, k < seg_len:
                acc = fma(a[a_base + row_off[r] + s*a_seg + k*a_k], b[b_base + s*b_seg + k*b_k + 16v : +16], acc)
            c_rv = c_rv + acc

    ``a``, ``b``, ``c``, ``init``: 1-D float32 arrays; ``row_off``: int64, ``rows``
    entries used.  ``rmax`` and ``nv`` are literals; ``rows`` (1 to ``rmax``)
    selects one of ``rmax`` loops compiled with their accumulators in registers.
    Each group's sum is one chain of fused multiply-adds in ``(s, k)`` order,
    added to the running total in group order: float32 chains of about ``chain``
    products (whole segments), not ``nseg * seg_len``, as a GEMM blocked along
    its reduction (the input gradient's 576 products are 3 chains, the weight
    gradient's 4608 per block of images are 48).
    """
    if not (isinstance(rmax, types.IntegerLiteral) and isinstance(nv, types.IntegerLiteral)):
        raise errors.RequireLiteralValue("_tile: rmax and nv must be literal integers")
    n_rmax, n_nv = rmax.literal_value, nv.literal_value
    u = types.unliteral
    sig = types.void(a, u(a_base), row_off, u(nseg), u(a_seg), u(seg_len), u(a_k), b, u(b_base),
                     u(b_seg), u(b_k), c, u(c_base), u(c_row), u(mode), init, u(init_base),
                     u(chain), u(rows), rmax, nv)

    def codegen(context, builder, sig, args):
        (a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
         c, c_base, c_row, mode, init, init_base, _, rows, _, _) = args
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
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC] * 3), f"llvm.fma.v{LANES}f32")
        vptr = _VEC.as_pointer()

        def vload(base, offset):
            return builder.load(builder.bitcast(builder.gep(base, [offset]), vptr), align=4)

        def vstore(value, base, offset):
            builder.store(value, builder.bitcast(builder.gep(base, [offset]), vptr), align=4)

        accs = [[cgutils.alloca_once(builder, _VEC) for _ in range(n_nv)] for _ in range(n_rmax)]
        end = builder.append_basic_block("tile.end")
        switch = builder.switch(rows, end)
        for nr in range(1, n_rmax + 1):
            block = builder.append_basic_block(f"tile.rows{nr}")
            switch.add_case(ir.Constant(_I64, nr), block)
            builder.position_at_end(block)
            row_base = [builder.add(a_base, builder.load(builder.gep(RO, [const(r)])))
                        for r in range(nr)]
            c_off = [[builder.add(c_base, builder.add(builder.mul(c_row, const(r)), const(LANES * v)))
                      for v in range(n_nv)] for r in range(nr)]
            # c holds the running total: its start value, then + each segment's sum.
            with builder.if_else(builder.icmp_signed("==", mode, const(2))) as (from_init, other):
                with from_init:
                    for v in range(n_nv):
                        start = vload(INIT, builder.add(init_base, const(LANES * v)))
                        for r in range(nr):
                            vstore(start, C, c_off[r][v])
                with other:
                    with builder.if_then(builder.icmp_signed("==", mode, const(0))):
                        for r in range(nr):
                            for v in range(n_nv):
                                vstore(ir.Constant(_VEC, None), C, c_off[r][v])
            ngroup = builder.sdiv(builder.add(nseg, builder.sub(group, const(1))), group)
            with cgutils.for_range(builder, ngroup) as grp:
                for r in range(nr):
                    for v in range(n_nv):
                        builder.store(ir.Constant(_VEC, None), accs[r][v])
                s0 = builder.mul(grp.index, group)
                s1 = builder.select(builder.icmp_signed("<", builder.add(s0, group), nseg),
                                    builder.add(s0, group), nseg)
                with cgutils.for_range_slice(builder, s0, s1, const(1)) as (seg, _):
                    a_s = builder.mul(seg, a_seg)
                    b_s = builder.add(b_base, builder.mul(seg, b_seg))
                    with cgutils.for_range(builder, seg_len) as kk:
                        a_off = builder.add(a_s, builder.mul(kk.index, a_k))
                        b_off = builder.add(b_s, builder.mul(kk.index, b_k))
                        bv = [vload(B, builder.add(b_off, const(LANES * v))) for v in range(n_nv)]
                        for r in range(nr):
                            x = builder.load(builder.gep(A, [builder.add(row_base[r], a_off)]))
                            xv = builder.insert_element(ir.Constant(_VEC, ir.Undefined), x,
                                                        ir.Constant(ir.IntType(32), 0))
                            xv = builder.shuffle_vector(
                                xv, ir.Constant(_VEC, ir.Undefined),
                                ir.Constant(ir.VectorType(ir.IntType(32), LANES), None))
                            for v in range(n_nv):
                                acc = builder.load(accs[r][v])
                                builder.store(builder.call(fma, [xv, bv[v], acc]), accs[r][v])
                for r in range(nr):
                    for v in range(n_nv):
                        total = builder.fadd(vload(C, c_off[r][v]), builder.load(accs[r][v]))
                        vstore(total, C, c_off[r][v])
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


def _hsum(builder, v):
    """The 16 lanes of ``v`` added as a fixed tree (halves, quarters, ...)."""
    width = LANES
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
              mode, init, init_base, rows_a, rows_b, max_a, max_b):
    """Dot products of ``rows_a`` rows of ``a`` with ``rows_b`` rows of ``b``::

        c[c_base + i*c_row + j] = (0 | c[...] | init[init_base + j])      # mode 0 | 1 | 2
                                  + sum_k a[a_base + i*a_row + k] * b[b_base + j*b_row + k]

    over ``k < length`` (a multiple of 16): each product in lane ``k % 16`` of a
    vector accumulator (fused multiply-adds in ``k`` order), the lanes then added
    as a fixed tree.  ``max_a``, ``max_b``: literals (``rows_a * rows_b``
    accumulators at most ``max_a * max_b``).
    """
    if not (isinstance(max_a, types.IntegerLiteral) and isinstance(max_b, types.IntegerLiteral)):
        raise errors.RequireLiteralValue("_dot_tile: max_a and max_b must be literal integers")
    n_a, n_b = max_a.literal_value, max_b.literal_value
    u = types.unliteral
    sig = types.void(a, u(a_base), u(a_row), b, u(b_base), u(b_row), u(length), c, u(c_base),
                     u(c_row), u(mode), init, u(init_base), u(rows_a), u(rows_b), max_a, max_b)

    def codegen(context, builder, sig, args):
        ints = [context.cast(builder, args[i], sig.args[i], types.int64)
                for i in (1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14)]
        a_base, a_row, b_base, b_row, length, c_base, c_row, mode, init_base, rows_a, rows_b = ints
        A = context.make_array(sig.args[0])(context, builder, args[0]).data
        B = context.make_array(sig.args[3])(context, builder, args[3]).data
        C = context.make_array(sig.args[7])(context, builder, args[7]).data
        INIT = context.make_array(sig.args[11])(context, builder, args[11]).data
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC] * 3), f"llvm.fma.v{LANES}f32")
        vptr = _VEC.as_pointer()
        const = lambda v: ir.Constant(_I64, v)  # noqa: E731
        accs = [[cgutils.alloca_once(builder, _VEC) for _ in range(n_b)] for _ in range(n_a)]
        end = builder.append_basic_block("dot.end")
        switch = builder.switch(builder.add(builder.mul(rows_a, const(n_b + 1)), rows_b), end)
        for na in range(1, n_a + 1):
            for nb in range(1, n_b + 1):
                block = builder.append_basic_block(f"dot.{na}x{nb}")
                switch.add_case(const(na * (n_b + 1) + nb), block)
                builder.position_at_end(block)
                a_rows = [builder.add(a_base, builder.mul(a_row, const(i))) for i in range(na)]
                b_rows = [builder.add(b_base, builder.mul(b_row, const(j))) for j in range(nb)]
                for i in range(na):
                    for j in range(nb):
                        builder.store(ir.Constant(_VEC, None), accs[i][j])
                with cgutils.for_range_slice(builder, const(0), length, const(LANES)) as (k, _):
                    av = [builder.load(builder.bitcast(builder.gep(A, [builder.add(r, k)]), vptr), align=4)
                          for r in a_rows]
                    bv = [builder.load(builder.bitcast(builder.gep(B, [builder.add(r, k)]), vptr), align=4)
                          for r in b_rows]
                    for i in range(na):
                        for j in range(nb):
                            builder.store(builder.call(fma, [av[i], bv[j], builder.load(accs[i][j])]),
                                          accs[i][j])
                for i in range(na):
                    for j in range(nb):
                        total = _hsum(builder, builder.load(accs[i][j]))
                        where = builder.gep(C, [builder.add(c_base, builder.add(builder.mul(c_row, const(i)),
                                                                               const(j)))])
                        old = builder.load(where)
                        bias = builder.load(builder.gep(INIT, [builder.add(init_base, const(j))]))
                        start = builder.select(builder.icmp_signed("==", mode, const(1)), old,
                                               builder.select(builder.icmp_signed("==", mode, const(2)),
                                                              bias, ir.Constant(ir.FloatType(), 0.0)))
                        builder.store(builder.fadd(start, total), where)
                builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


@njit(**CPU_JIT_STRICT)
def _vectors(channels):
    """Vectors per tile row for ``channels`` output channels (a multiple of 16)."""
    if channels % (4 * LANES) == 0:
        return 4
    if channels % (2 * LANES) == 0:
        return 2
    return 1


@njit(**CPU_JIT_STRICT)
def _max_rows(nv):
    """Rows per tile: 24 accumulators for 4 vectors a row, 26 for 2, 8 for 1 (a
    tile of 1-vector rows is bound by its loads, one per product: 8 rows run as
    fast as 16, with half the code)."""
    return 6 if nv == 4 else (13 if nv == 2 else 8)


@njit(**CPU_JIT_STRICT)
def _tile_nv(nv, rows, a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
             c, c_base, c_row, mode, init, init_base, chain):
    if nv == 4:
        _tile(a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
              c, c_base, c_row, mode, init, init_base, chain, rows, 6, 4)
    elif nv == 2:
        _tile(a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
              c, c_base, c_row, mode, init, init_base, chain, rows, 13, 2)
    else:
        _tile(a, a_base, row_off, nseg, a_seg, seg_len, a_k, b, b_base, b_seg, b_k,
              c, c_base, c_row, mode, init, init_base, chain, rows, 8, 1)


@njit(**CPU_JIT_STRICT)
def _strided(n, step):
    """``[0, step, 2 step, ...]`` (n values, int64)."""
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = i * step
    return out


@njit(**CPU_JIT_STRICT)
def _pad_into(image, pad_h, pad_w, scratch):
    """Copy ``image (H, W, C)`` into the interior of ``scratch`` (whose border is zero)."""
    height, width, chans = image.shape
    for h in range(height):
        for w in range(width):
            for c in range(chans):
                scratch[pad_h + h, pad_w + w, c] = image[h, w, c]


@njit(**CPU_JIT_PARALLEL)
def conv_forward(x, weight, bias, has_bias, pad_h, pad_w, chain, y, nblocks):
    """Stride-1 correlation ``y[n, oh, ow, :] = bias + sum_{i, j, c} xpad[n, oh+i, ow+j, c]
    * weight[i, j, c, :]`` (``xpad``: ``x`` zero-padded by ``pad_h, pad_w``).

    ``x (N, H, W, C)``, ``weight (KH, KW, C, CO)``, ``y (N, OH, OW, CO)``: float32,
    C-contiguous; ``CO`` a multiple of 16.  Each output row of pixels is cut into
    balanced tiles of at most :func:`_max_rows` pixels; each value is summed over
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
    ntile = (out_w + _max_rows(nv) - 1) // _max_rows(nv)
    wf = weight.reshape(-1)
    yf = y.reshape(-1)
    row_off = _strided(_max_rows(nv), chans)
    mode = 2 if has_bias else 0
    nblk = max(1, min(n_img, nblocks))
    for blk in prange(nblk):
        scratch = np.zeros((p_h, p_w, chans) if padded else (0, 0, 0), np.float32)
        for n in range(blk * n_img // nblk, (blk + 1) * n_img // nblk):
            if padded:
                _pad_into(x[n], pad_h, pad_w, scratch)
                src = scratch.reshape(-1)
                base = 0
            else:
                src = x.reshape(-1)
                base = n * height * width * chans
            for oh in range(out_h):
                for t in range(ntile):
                    ow0 = t * out_w // ntile
                    rows = (t + 1) * out_w // ntile - ow0
                    for cb in range(0, c_out, vw):
                        _tile_nv(nv, rows, src, base + (oh * p_w + ow0) * chans, row_off,
                                 k_h, p_w * chans, k_w * chans, 1, wf, cb, k_w * chans * c_out, c_out,
                                 yf, ((n * out_h + oh) * out_w + ow0) * c_out + cb, c_out,
                                 mode, bias, cb, chain)


@njit(**CPU_JIT_PARALLEL)
def conv_input_grad(dy, weight_flip, pad_h, pad_w, chain, dx, nblocks):
    """Input gradient of :func:`conv_forward`: the stride-1 correlation of ``dy``
    zero-padded by ``KH - 1 - pad_h, KW - 1 - pad_w`` with ``weight_flip (KH, KW, CO, C)``,
    ``weight_flip[i, j, o, c] = weight[KH-1-i, KW-1-j, c, o]``; ``dx (N, H, W, C)``
    is overwritten, ``C`` a multiple of 16; ``nblocks`` as :func:`conv_forward`.
    Kernel rows that fall on the padding rows above and below ``dy`` are skipped
    (their products are zeros), not the padding columns."""
    n_img, out_h, out_w, c_out = dy.shape
    k_h, k_w, _, chans = weight_flip.shape
    _, height, width, _ = dx.shape
    q_h, q_w = k_h - 1 - pad_h, k_w - 1 - pad_w
    p_w = out_w + 2 * q_w
    nv = _vectors(chans)
    vw = LANES * nv
    ntile = (width + _max_rows(nv) - 1) // _max_rows(nv)
    wf = weight_flip.reshape(-1)
    dxf = dx.reshape(-1)
    row_off = _strided(_max_rows(nv), c_out)
    nblk = max(1, min(n_img, nblocks))
    for blk in prange(nblk):
        scratch = np.zeros((out_h + 2 * q_h, p_w, c_out), np.float32)
        src = scratch.reshape(-1)
        for n in range(blk * n_img // nblk, (blk + 1) * n_img // nblk):
            _pad_into(dy[n], q_h, q_w, scratch)
            for h in range(height):
                # Kernel rows i that meet dy, not its zero padding: padded row h + i
                # is dy's row h + i - q_h.
                i0 = max(0, q_h - h)
                i1 = min(k_h, out_h + q_h - h)
                for t in range(ntile):
                    w0 = t * width // ntile
                    rows = (t + 1) * width // ntile - w0
                    for cb in range(0, chans, vw):
                        _tile_nv(nv, rows, src, ((h + i0) * p_w + w0) * c_out, row_off,
                                 max(0, i1 - i0), p_w * c_out, k_w * c_out, 1,
                                 wf, i0 * k_w * c_out * chans + cb, k_w * c_out * chans, chans,
                                 dxf, ((n * height + h) * width + w0) * chans + cb, chans,
                                 0, wf, 0, chain)


@njit(**CPU_JIT_PARALLEL)
def conv_weight_grad(x, dy, pad_h, pad_w, block_images, chain, dweight):
    """Weight gradient of :func:`conv_forward`: ``dweight[i, j, c, :] = sum_{n, oh, ow}
    xpad[n, oh+i, ow+j, c] * dy[n, oh, ow, :]`` (overwritten), ``CO`` a multiple of 16.

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
    nrows = k_h * k_w * chans
    ntile = (nrows + _max_rows(nv) - 1) // _max_rows(nv)
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
            for t in range(ntile):
                r0 = t * nrows // ntile
                rows = (t + 1) * nrows // ntile - r0
                for cb in range(0, c_out, vw):
                    _tile_nv(nv, rows, src, base, row_off[r0:], out_h, p_w * chans, out_w, chans,
                             dyf, n * out_h * out_w * c_out + cb, out_w * c_out, c_out,
                             pf, (blk * nrows + r0) * c_out + cb, c_out,
                             1 if n > n0 else 0, pf, 0, chain)
    dwf = dweight.reshape(nrows, c_out)
    for r in prange(nrows):
        _sum_blocks(partial, r, dwf[r])


@njit(**CPU_JIT_STRICT)
def _sum_blocks(partial, r, out):
    """``out[:] = sum over blocks b, in order, of partial[b, r, :]`` in float64."""
    for o in range(out.shape[0]):
        total = 0.0
        for blk in range(partial.shape[0]):
            total += partial[blk, r, o]
        out[o] = total


@njit(**CPU_JIT_PARALLEL)
def relu_forward(x, y):
    """``y = max(x, 0)`` over flat arrays with ``np.maximum(x, 0)``'s bits (NaN
    kept, ``-0.0`` gives ``0.0``); ``y`` may be ``x``."""
    zero = x.dtype.type(0.0)
    for i in prange(x.shape[0]):
        v = x[i]
        y[i] = v if (v > zero or v != v) else zero


# --------------------------------------------------------------------------- #
# Dropout masks: NumPy's PCG64 stream, drawn in parallel
# --------------------------------------------------------------------------- #

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


@njit(**CPU_JIT_STRICT)
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


@njit(**CPU_JIT_STRICT)
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
    for task in prange(nt):  # the masks, in C order
        j0, j1 = task * q // nt, (task + 1) * q // nt
        hi, lo = _pcg_advance(s_hi, s_lo, inc_hi, inc_lo, j0)
        for j in range(j0, j1):
            hi, lo = _muladd128(hi, lo, _PCG_MULT_HI, _PCG_MULT_LO, inc_hi, inc_lo)
            out = _pcg_output(hi, lo)
            i = offset + 2 * j
            kf[i] = scale if ((out & low) >> eight) >= threshold else zero
            if i + 1 < n:
                kf[i + 1] = scale if (out >> np.uint64(40)) >= threshold else zero
    for ab in prange(n0 * n1):  # y = x * mask
        a, b = ab // n1, ab % n1
        for c in range(n2):
            for d in range(n3):
                y[a, b, c, d] = x[a, b, c, d] * keep_scale[a, b, c, d]
    if q == 0:
        return s_hi, s_lo, False, np.uint64(first_u32)
    e_hi, e_lo = _pcg_advance(s_hi, s_lo, inc_hi, inc_lo, q)
    return e_hi, e_lo, m % 2 == 1, _pcg_output(e_hi, e_lo) >> np.uint64(32)


@njit(**CPU_JIT_PARALLEL)
def scale_into(dy, keep_scale, dx):
    """``dx = dy * keep_scale`` over 4-D arrays of one shape and any strides
    (Dropout's backward into its input's layout; pass views that make ``dx``
    C-contiguous to write it in order), parallel over the first two axes."""
    n0, n1, n2, n3 = dx.shape
    for ab in prange(n0 * n1):
        a, b = ab // n1, ab % n1
        for c in range(n2):
            for d in range(n3):
                dx[a, b, c, d] = dy[a, b, c, d] * keep_scale[a, b, c, d]


_cache.check(globals())  # before any kernel above loads from the disk cache
