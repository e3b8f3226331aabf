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
