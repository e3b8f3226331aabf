"""Argument checks for the public API.

Every check runs before any computation or write, so a call that fails leaves its
inputs, parameters and running statistics untouched.  Messages say what was
expected, what was given, and how to fix it.  Kernels never check anything.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._backend import is_device_array
# Half types and the dtype of per-feature values are numbabn._core's; re-exported here.
from ._core import BFLOAT16_KIND, FLOAT16_KIND, compute_dtype, half_kind  # noqa: F401

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Half types are taken by the public functions through numbabn._half.
ACCEPTED_DTYPES = "float32, float64, float16 or bfloat16 (native byte order)"


def dtype_message(name, dtype, to="float32", accepted=ACCEPTED_DTYPES) -> str:
    """The one message for a dtype that is not accepted (integers, bool,
    complex, ml_dtypes' float8 types, non-native byte order): what is
    accepted, what was given, and the fix."""
    return (f"{name} must have dtype {accepted}; got {dtype}. "
            f"Convert it with {name}.astype(np.{to}).")


def _is_half(dtype):
    return half_kind(dtype) is not None


def check_float_dtype(a, name):
    """``a`` (an array) must be float32 or float64 (see :func:`dtype_message`)."""
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(dtype_message(name, a.dtype))


def describe(a) -> str:
    """A short description of a value for error messages."""
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return f"{type(a).__name__} of shape {tuple(a.shape)} and dtype {a.dtype}"
    return f"{type(a).__name__} {a!r}"[:120]


def is_array(a) -> bool:
    """A NumPy array, or a device array once numbabn._backend.select converted it."""
    return isinstance(a, np.ndarray) or is_device_array(a)


def is_writeable(a) -> bool:
    """Device arrays have no read-only flag; NumPy arrays may be read-only."""
    return a.flags.writeable if isinstance(a, np.ndarray) else True


# Predicates of the remembered calls' fast paths (numbabn.functional's batch norm,
# numbabn.norms' family): true only where the matching check would pass without
# changing the value; anything else takes the general path and its checks.
_INF = float("inf")


def is_plain(a, dtype, shape) -> bool:
    """A host ``np.ndarray`` (no subclass) of exactly ``dtype`` (the same dtype
    object) and ``shape``."""
    return type(a) is np.ndarray and a.dtype is dtype and a.shape == shape


def is_plain_eps(eps) -> bool:
    """A Python float :func:`check_eps` returns unchanged."""
    return type(eps) is float and 0.0 < eps < _INF


def check_input(x, name="x", allow_empty_batch=False, half=False):
    """``x`` must be a float32/float64 ndarray with ndim >= 2 and no empty axis
    (with ``allow_empty_batch``, only the feature axis must be non-empty: the
    caller checks that)."""
    if not is_array(x):
        raise TypeError(
            f"{name} must be a numpy.ndarray of float32 or float64; got {describe(x)}. "
            f"Wrap it with np.asarray({name}, dtype=np.float32)."
        )
    if not (half and _is_half(x.dtype)):
        check_float_dtype(x, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and features, e.g. (N, C)); "
            f"got shape {tuple(x.shape)}. Use {name}.reshape(-1, 1) for a single feature."
        )
    if x.size == 0 and not allow_empty_batch:
        raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}.")


def check_axis(axis, ndim) -> int:
    """Return the feature axis as a non-negative int."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int; got {describe(axis)}.")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for an input with {ndim} dimensions "
            f"(expected {-ndim} <= axis < {ndim})."
        )
    return int(axis) % ndim


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float; got {describe(eps)}.")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number; got {eps!r}.")
    return float(eps)


def check_momentum(momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1]; got {describe(momentum)}.")
    if not 0.0 <= momentum <= 1.0:  # also refuses NaN
        raise ValueError(f"momentum must be in [0, 1]; got {momentum!r}.")
    return float(momentum)


def check_bool(value, name) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {describe(value)}.")
    return bool(value)


def check_stat_vector(v, name):
    """A 1-D float32/float64 ndarray that fixes the feature count and dtype."""
    if not is_array(v) or v.ndim != 1 or v.size == 0:
        raise TypeError(
            f"{name} must be a non-empty 1-D numpy.ndarray of float32 or float64; "
            f"got {describe(v)}."
        )
    check_float_dtype(v, name)


def check_vector(v, name, nfeat, dtype, writeable=False):
    """A per-feature vector: 1-D ndarray of length ``nfeat`` and the input's dtype."""
    if not is_array(v):
        raise TypeError(
            f"{name} must be a numpy.ndarray of shape ({nfeat},) and dtype {dtype}; "
            f"got {describe(v)}."
        )
    if v.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype} to match the input; got {v.dtype}. "
            f"Convert it with {name}.astype(np.{dtype})."
        )
    if v.shape != (nfeat,):
        raise ValueError(
            f"{name} must have shape ({nfeat},), one value per feature; got shape {tuple(v.shape)}."
        )
    if writeable and not is_writeable(v):
        raise ValueError(f"{name} is read-only but must be updated in place; pass a writeable array.")


def check_stat(v, name, nfeat, dtype):
    """A per-feature statistic or sum: 1-D, length ``nfeat``, dtype ``dtype`` or
    float64 (the split primitives' partials are float64)."""
    if not is_array(v):
        raise TypeError(
            f"{name} must be a numpy.ndarray of shape ({nfeat},) and dtype {dtype} or float64; "
            f"got {describe(v)}."
        )
    if v.dtype not in (np.dtype(dtype), np.dtype(np.float64)):
        raise TypeError(
            f"{name} must have dtype {dtype} (the input's) or float64; got {v.dtype}. "
            f"Convert it with {name}.astype(np.float64)."
        )
    if v.shape != (nfeat,):
        raise ValueError(
            f"{name} must have shape ({nfeat},), one value per feature; got shape {tuple(v.shape)}."
        )


def check_same_as(a, name, x, x_name="x"):
    """``a`` must be an array of exactly the shape and dtype of ``x``."""
    if not is_array(a):
        raise TypeError(
            f"{name} must be a numpy.ndarray like {x_name} (shape {tuple(x.shape)}, "
            f"dtype {x.dtype}); got {describe(a)}."
        )
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have dtype {x.dtype} like {x_name}; got {a.dtype}.")
    if a.shape != x.shape:
        raise ValueError(
            f"{name} must have the shape of {x_name}, {tuple(x.shape)}; got {tuple(a.shape)}."
        )


def check_out(out, x):
    check_same_as(out, "out", x)
    if not is_writeable(out):
        raise ValueError("out is read-only; pass a writeable array or out=None.")


def check_training_count(count, shape, axis):
    """Training needs at least two values per feature (as PyTorch)."""
    if count < 2:
        raise ValueError(
            f"Expected more than 1 value per feature when training; got input of shape "
            f"{tuple(shape)} with feature axis {axis}, which has {count} value per feature."
        )


def check_count(count, minimum=2) -> int:
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an int (values per feature in the batch); got {describe(count)}.")
    if minimum == 1 and count < 1:
        raise ValueError(f"count must be at least 1 (values per feature in the whole batch); got {count}.")
    if count < minimum:
        raise ValueError(
            f"count must be at least 2 for the unbiased variance count / (count - 1); got {count}."
        )
    return int(count)


def check_running_pair(running_mean, running_var):
    if (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var") if running_var is None else (
            "running_var", "running_mean")
        raise ValueError(f"{given} was given without {missing}; pass both or neither.")
