"""One place for every tuning constant and compiler flag of the kernels.

Two kinds of value live here, in two sections:

* **Host-side tunables** (chunk sizes, thresholds, launch shapes).  Read by the
  host drivers on every call and passed to the kernels as arguments, never
  frozen into compiled code: a benchmark may set ``numbabn._config.NAME = value``
  at run time and the next call uses it.  Those marked "partition" change the
  fixed reduction partition, hence the rounding (results stay bitwise
  reproducible for a given value); the others change timing only.
* **Compile-time values** (fast-math flags, jit options, the GPU's shared and
  local array sizes).  They are compiled into the kernels, and Numba's on-disk
  cache does not see them, so :mod:`numbabn._cache` keys the cache on them
  (:func:`compile_time_values`): when one changes, numbabn's cached kernels are
  dropped and recompiled.  Change them before ``numbabn`` is imported.

Kernels import their flags and sizes from here and never write them inline.
"""

# =========================================================================== #
# Compile-time values (keyed into the on-disk cache by numbabn._cache)
# =========================================================================== #

# LLVM fast-math flags allowed in reduction kernels.  ``reassoc`` lets sums
# vectorise (several partial accumulators) and ``contract`` allows fused
# multiply-adds.  ``nnan`` and ``ninf`` are never allowed: they would let LLVM
# assume NaN/inf cannot occur, which breaks NaN propagation within a feature
# (and can leak it into other features).
FASTMATH = frozenset({"reassoc", "contract"})

# Flags for elementwise code and for fixed-order merges of partials:
# ``FASTMATH`` without ``reassoc``.  Elementwise loops vectorise without it, and
# it must stay off there: with it LLVM may rewrite ``(x - hi) * s + o`` and the
# float64 offset algebra, and may reorder the merge of chunk partials, which
# must happen in chunk order for bitwise reproducibility.
STRICT_FASTMATH = FASTMATH - {"reassoc"}

# Options shared by every CPU kernel.  ``error_model="numpy"`` drops the
# division-by-zero branches Python semantics would add to float divisions.
CPU_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=set(FASTMATH))
CPU_JIT_STRICT = dict(CPU_JIT, fastmath=set(STRICT_FASTMATH))
# A helper, a function only other kernels call, is compiled without the Python
# and C entry points Numba otherwise builds, optimises and emits for every
# function (up to a tenth of a first call's compile time, measured on the
# channels-last batch norm).  Called from Python, such a function would crash
# the process: tests/cpu/test_entry_points.py checks that nothing does.
NO_ENTRY_POINTS = dict(no_cpython_wrapper=True, no_cfunc_wrapper=True)
CPU_HELPER = dict(CPU_JIT, **NO_ENTRY_POINTS)
CPU_HELPER_STRICT = dict(CPU_JIT_STRICT, **NO_ENTRY_POINTS)
# Elementwise kernels that must give the bits of the NumPy expressions they
# replace (the optimizer's update): no fast-math flag at all, so no fused
# multiply-adds either.
CPU_JIT_IEEE_PARALLEL = dict(CPU_JIT, fastmath=False, parallel=True)
# One kernel may hold several parallel loops (statistics, merge, normalise);
# they run one after the other and must not be fused by Numba.  (numbabn._cache
# hands these options to Numba as its own options object: Numba empties a
# ``parallel=`` dict as it reads it.)
CPU_JIT_PARALLEL = dict(CPU_JIT, parallel=dict(fusion=False))
# Parallel kernels whose loops inline strict helpers (``inline="always"``: a
# call per short run costs about as much as its values).  Inlined code takes
# the caller's flags, so these callers are strict themselves; their sums stay
# in helpers compiled on their own, with ``FASTMATH``.
CPU_JIT_STRICT_PARALLEL = dict(CPU_JIT_PARALLEL, fastmath=set(STRICT_FASTMATH))

# numba.cuda's ``fastmath`` is all-or-nothing: it turns on nnan/ninf together
# with flush-to-zero and approximate division and square root.  All are unwanted
# (NaN propagation, magnitudes near 1e-30), so it stays off.  NVVM contracts
# multiply-adds into FMAs by default, which is the part of fast math we want.
GPU_JIT = dict(fastmath=False, cache=True)

# Compile-time size of the GPU's shared-memory reduction buffers (the kernels'
# disk cache is keyed on it and on GPU_UNROLL): GPU_THREADS must not exceed it.
# 3 float64 buffers of 256 values are 6 KiB per block.
GPU_MAX_THREADS = 256

# Loads issued back to back by one GPU thread before they are used (a local
# array's size), so that each thread keeps several memory requests in flight.
# Must divide GPU_ITEMS_PER_THREAD.
GPU_UNROLL = 4

COMPILE_TIME = ("FASTMATH", "STRICT_FASTMATH", "CPU_JIT", "CPU_JIT_STRICT", "CPU_HELPER",
                "CPU_HELPER_STRICT",
                "CPU_JIT_IEEE_PARALLEL", "CPU_JIT_PARALLEL", "CPU_JIT_STRICT_PARALLEL", "GPU_JIT",
                "GPU_MAX_THREADS", "GPU_UNROLL")


def compile_time_values() -> dict:
    """The compile-time values as they are now, by name (what keys the cache)."""
    return {name: globals()[name] for name in COMPILE_TIME}


# =========================================================================== #
# Host-side tunables (read per call)
# =========================================================================== #

# --- CPU ---------------------------------------------------------------------

# Inputs of at most this many elements run on the calling thread alone (see
# numbabn._cpu.runtime.kernel_guard): waking the thread pool costs more than the
# work.  The reduction partition does not depend on the thread count, so this
# changes timing only, never results.
SERIAL_MAX_ELEMS = 1 << 15

# Reduction partition (partition).  Each feature's values are cut into chunks
# of about ``CHUNK_ELEMS`` elements; the cut depends on the shape only (never on
# the number of threads), and chunk moments are merged in chunk order, so
# results are bitwise identical for any NUMBA_NUM_THREADS.  Also the grain of the
# elementwise passes and of the layers' column sums.
CHUNK_ELEMS = 32768

# Channel-contiguous data ``(rows, C)``: a chunk is ``CHUNK_ELEMS // width``
# rows of a block of ``width = min(C, NC_COLS)`` columns.  The chunk's float64
# sums (2 x 256 x 8 bytes) and four rows of x stay in L1: 256 columns ran the
# statistics of (4096, 512) and (256, 1024) float32 1.5-2x faster than 2048.
# Partial sums are merged per block of ``NC_MERGE_COLS`` columns, by a plain loop
# (a few values per chunk: a parallel loop cost more to compile than it saved).
NC_COLS = 256
NC_MERGE_COLS = 64

# Backward sums in the input's dtype over short blocks.  The three backward sums
# (``dy``, ``dy * xc``, ``xc``) are taken in vector lanes of the input's dtype
# over blocks of at most ``BWD_BLOCK`` contiguous values of a row (NCHW-like)
# or ``BWD_NC_ROWS`` rows of a column (channel-contiguous), and each block's
# sums are added to float64 accumulators in block order.  For float32 that runs
# 16 lanes instead of 8 with no widening; a block's float32 rounding is at most
# about ``block / lanes * 2**-24`` relative.  The blocks depend on the shape only.
BWD_BLOCK = 256
BWD_NC_ROWS = 64

# Forward statistics of NCHW-like rows of at most ``SHORT_RUN`` values (a 14x14
# plane: 196) take four rows per vector step (partition): each row's sum across
# the vector lanes costs more than its values on short rows.  One core, data in
# L1: 0.055 against 0.090 ns per value for rows of 196, no gain for 676.
SHORT_RUN = 512

# NCHW-like elementwise passes (eval, the training output, dx) over runs of
# fewer than ``PLANE_MAX_BYTES`` bytes (float32 planes up to 7x7, float64 up to
# 5x5) take blocks of features of about ``PLANE_BLOCK_VALUES`` values a sample,
# each feature's coefficients repeated over its run, and run along every
# sample's segment of the block (numbabn._cpu.feature_kernels.affine_planes,
# dx_planes): a per-run loop over a run shorter than one step of the vectorised
# loop (64-byte vectors, interleaved four times: 256 bytes) is mostly its
# remainder code.  Same bits.  From one step up the per-run loops were faster
# (2 threads, eval: float32 (128, 256, 8, 8) 187 against 272 us, float64 (32,
# 256, 8, 8) 77 against 145 us; float32 (32, 160, 7, 7) 41 against 36 us).
PLANE_MAX_BYTES = 256
PLANE_BLOCK_VALUES = 1024
# The batch-norm backward over runs of at most ``PLANE_BWD_MAX_INNER`` values
# (4x4 planes) takes its sums per position along whole samples too
# (feature_kernels.backward_planes), ``PLANE_SUM_SAMPLES`` samples per position
# in the input's dtype before each addition to float64 (the values per vector
# lane of a ``BWD_BLOCK`` block of the per-run sums): census, (32, C, 4, 4)
# backward 0.77x PyTorch against 0.50x per run; from 7x7 up no faster.
PLANE_BWD_MAX_INNER = 16
PLANE_SUM_SAMPLES = 16

# Group and instance norm of channels-last data whose groups hold at most
# ``CL_MAX_RUN`` adjacent channels run per sample along the channels
# (numbabn._cpu.row_kernels.forward_cl): their rows are runs of a few values.
CL_MAX_RUN = 64

# Channel-contiguous backward sums take four rows at a time (a quarter of the
# accumulator loads and stores), which is faster for column blocks and for data
# in cache: (4096, 512) float32 0.19 vs 0.27 ms.  When whole rows (C <= NC_COLS)
# and more than this many bytes of x and dy stream from memory, one row at a
# time keeps every load a sequential stream and runs at the read bandwidth:
# (73728, 64) float32 0.79 vs 1.07 ms, (100352, 64) 1.03 vs 1.43 ms.  The choice
# depends on the shape only, so results stay reproducible.
NC_STREAM_MIN_BYTES = 1 << 21

# Fusion (NCHW-like data).  One task per feature computes its statistics, then
# normalises it while it is still in cache, so ``x`` is read from memory once.
# Used when the bytes a task reads fit in ``FUSE_BYTES`` (L2 is 1 MiB per core
# on the benchmark machine, and its L3 catches L2 victims) and there are at
# least ``FUSE_MIN_TASKS`` features to share among threads; otherwise
# statistics and normalisation are two parallel passes over chunks.  Both paths
# sum the same chunks in the same order: identical bits.
FUSE_BYTES = 1 << 21
FUSE_MIN_TASKS = 8

# --- Layers ------------------------------------------------------------------

# Conv2d's largest im2col column buffer.  Each chunk costs a parallel
# im2col launch and three GEMM calls, and every launch synchronises threads
# (costly on a busy machine), so chunks are large: the cnn's second convolution
# at batch 128 (85 MB of columns) is one chunk; evaluation batches of 500 are
# three.  The layer keeps its buffer between calls.
IM2COL_CHUNK_BYTES = 128 << 20

# Conv2d's direct convolutions (numbabn.kit._kernels.tiles.conv_forward and its
# gradients): float32, stride 1, output channels (for the input gradient, input
# channels) a multiple of the tile width (16 floats with AVX-512F, 8 with AVX2
# and FMA: numbabn.kit._kernels.tiles.tile_lanes).  They sum register tiles of
# the output straight from the images, with no im2col buffer: the cnn's second
# convolution ran 3x faster than im2col + OpenBLAS (one core: forward 11 vs 34
# ms, weight gradient 12 vs 27, input gradient 13 vs 35 with col2im).  False
# keeps im2col + BLAS for every convolution (the rounding differs).
CONV_DIRECT = True

# Images per block of the direct weight gradient (partition): each block's
# float32 sums, then the blocks added in order in float64.
CONV_WGRAD_IMAGES = 8

# Products per float32 chain of the register tiles (partition): a tile sums
# whole segments of its reduction (a kernel row, an output row of pixels) in
# registers until about this many, then adds them to its output, as a GEMM
# blocked along its reduction.  Unchained, the cnn's second convolution summed
# 576 products per input-gradient value and 4608 per weight-gradient value in
# one chain, 2-6x OpenBLAS's error against float64; chained, at most its error.
TILE_CHAIN = 128

# Linear layers (float32, in_features a multiple of the tile width) whose
# GEMMs take at least this many multiply-adds run on the same register tiles
# (numbabn.kit._kernels.tiles.linear_*): the cnn's Linear(9216, 128) at batch 128,
# one core, forward 1.6 vs 2.6 ms, input gradient 1.3 vs 2.6, weight gradient 1.5
# vs 2.6 (OpenBLAS).  Smaller layers, where waking the threads costs more than
# the work, and None keep BLAS (the rounding differs).
LINEAR_DIRECT_MIN_MACS = 1 << 22

# Columns per block of the direct Linear forward (partition): a tile's rows of
# x and of the weight stay in L1 for a block, and each block's dot products
# are added to the output in block order.  A multiple of 16.
LINEAR_K_BLOCK = 1024

# --- Outputs (read by numbabn._layout) --------------------------------------

# Fresh outputs of at least this many bytes are 2 MiB-aligned mappings advised
# for huge pages whole, kept in a pool for reuse (see numbabn._layout, "Fresh
# outputs"): glibc maps and unmaps every allocation from 32 MiB on, so each
# fresh output there is page-faulted in again.  Timing only, never results.
LARGE_OUTPUT_BYTES = 32 << 20

# At most this many pooled mappings, and this many bytes of them, stay
# resident between calls (a mapping still referred to by an output is unmapped
# with its last view once dropped from the pool).
POOL_BUFFERS = 2
POOL_BYTES = 256 << 20

# --- GPU (numba.cuda; read by numbabn._gpu only) -----------------------------

# Threads per block for every kernel.  The reduction tree inside a block has this
# many leaves; it is part of the fixed partition, so changing it changes the
# rounding of statistics (results stay bitwise reproducible for a given value).
GPU_THREADS = 256

# Values each thread visits per block.  A block reduces GPU_THREADS *
# GPU_ITEMS_PER_THREAD values of one feature (4096 by default), so a feature of
# n values is split over ceil(n / 4096) blocks: the grid fills the GPU even for
# C = 3, and the split depends on the shape only (deterministic merge order).
GPU_ITEMS_PER_THREAD = 16

# Channel-contiguous data: at most this many adjacent features per block, so a
# warp reads one contiguous 128-byte row segment of float32 features.
GPU_FEATURE_TILE = 32

# The per-feature tables a call returns rows of (mean, invstd, var; dweight,
# dbias) are cut from slabs of this many bytes instead of being allocated one by
# one (a device allocation, and the free that follows, cost tens of
# microseconds).  Nothing is reused: a slab is freed once no result cut from it
# is referenced, so a result kept alive keeps at most one slab allocated.
# Tables larger than a quarter of a slab are allocated on their own.
GPU_RESULT_SLAB_BYTES = 1 << 20

# Host-side caches of numbabn._gpu.runtime: compiled overloads kept per kernel
# (argument signatures) and shaped views kept of the scratch buffer, before
# starting afresh (a training loop sees a handful); the scratch buffer grows in
# steps of this many float64 values.
GPU_MAX_SIGNATURES = 512
GPU_MAX_SCRATCH_VIEWS = 64
GPU_SCRATCH_GRAIN = 512

# Most blocks of the strided device-to-device copy (a grid-stride loop covers
# the rest).
GPU_COPY_MAX_BLOCKS = 65535

# Test hook of the GPU reductions' "last block done" merge: True maps block b to
# place nblocks - 1 - b of the reduction partition, so that under the CUDA
# simulator (which runs blocks in index order) the block holding chunk 0
# finishes last.  Results must be bitwise the same either way.
GPU_REVERSE_BLOCKS = False
