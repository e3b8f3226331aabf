"""One place for every tuning constant and compiler flag used by the kernels.

Kernels import their flags and sizes from here and never write them inline, so a
reader can see (and a benchmark can change) the whole tuning surface at once.
"""

# LLVM fast-math flags allowed in kernels.  ``reassoc`` lets reductions vectorise
# and ``contract`` allows fused multiply-adds.  ``nnan`` and ``ninf`` are never
# allowed: they would let LLVM assume NaN/inf cannot occur, which breaks NaN
# propagation within a feature (and can leak it into other features).
FASTMATH = frozenset({"reassoc", "contract"})

# Options shared by every CPU kernel.
CPU_JIT = dict(nogil=True, cache=True, fastmath=set(FASTMATH))
CPU_JIT_PARALLEL = dict(CPU_JIT, parallel=True)

# Reduction partition.  Each feature's values are cut into chunks of about
# ``CHUNK_ELEMS`` elements; the cut depends on the shape only (never on the
# number of threads), and chunks are merged in a fixed order, so results are
# bitwise identical for any NUMBA_NUM_THREADS.  4096 float32 values are 16 KiB,
# so a chunk's second pass (two-pass variance inside the chunk) hits L1.
CHUNK_ELEMS = 4096

# For channel-contiguous data (feature axis last), a chunk spans at most this
# many features so that very wide inputs still split into many chunks.
CHANNEL_BLOCK = 512

# --------------------------------------------------------------------------- #
# GPU (numba.cuda).  Read by numbabn._gpu only; importing this module never
# imports numba.cuda.
# --------------------------------------------------------------------------- #

# numba.cuda's ``fastmath`` is all-or-nothing: it turns on nnan/ninf together
# with flush-to-zero and approximate division and square root.  All are unwanted
# (NaN propagation, magnitudes near 1e-30), so it stays off.  NVVM contracts
# multiply-adds into FMAs by default, which is the part of fast math we want.
GPU_JIT = dict(fastmath=False, cache=True)

# Threads per block for every kernel.  The reduction tree inside a block has this
# many leaves; it is part of the fixed partition, so changing it changes the
# rounding of statistics (results stay bitwise reproducible for a given value).
GPU_THREADS = 256

# Compile-time size of the shared-memory reduction buffers: GPU_THREADS must not
# exceed it.  3 float64 buffers of 256 values are 6 KiB per block.
GPU_MAX_THREADS = 256

# Values each thread visits per block.  A block reduces GPU_THREADS *
# GPU_ITEMS_PER_THREAD values of one feature (4096 by default), so a feature of
# n values is split over ceil(n / 4096) blocks: the grid fills the GPU even for
# C = 3, and the split depends on the shape only (deterministic merge order).
GPU_ITEMS_PER_THREAD = 16

# Loads issued back to back by one thread before they are used, so that each
# thread keeps several memory requests in flight.  Must divide
# GPU_ITEMS_PER_THREAD.
GPU_UNROLL = 4

# Channel-contiguous data: at most this many adjacent features per block, so a
# warp reads one contiguous 128-byte row segment of float32 features.
GPU_FEATURE_TILE = 32
