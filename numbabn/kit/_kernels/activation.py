"""ReLU forward and backward, and Dropout's backward scaling.  Private:
inputs arrive checked; elementwise, so any thread count gives the same bits."""

from numba import njit, prange

from ... import _cache
from ..._config import CPU_JIT_PARALLEL


@njit(**CPU_JIT_PARALLEL)
def relu_backward(dy, y, dx):
    """``dx = dy where y > 0, else 0`` over flat arrays (PyTorch's
    ``threshold_backward``: a NaN or inf in ``dy`` where ``y <= 0`` gives 0)."""
    zero = dy.dtype.type(0.0)
    for i in prange(dy.shape[0]):
        dx[i] = dy[i] if y[i] > 0 else zero


# =========================================================================== #


@njit(**CPU_JIT_PARALLEL)
def relu_forward(x, y):
    """``y = max(x, 0)`` over flat arrays with ``np.maximum(x, 0)``'s bits (NaN
    kept, ``-0.0`` gives ``0.0``); ``y`` may be ``x``."""
    zero = x.dtype.type(0.0)
    for i in prange(x.shape[0]):
        v = x[i]
        y[i] = v if (v > zero or v != v) else zero


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
