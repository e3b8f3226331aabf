"""Argument and input checks for the layer API, run once at each layer's boundary.

Every check raises before anything is computed or written, so a failing call
leaves the layer unchanged.  Messages say what was expected, what was given and,
where there is one, how to fix it.
"""

from __future__ import annotations

import numbers

import numpy as np

from .._extras import require
from .._half import kind_of
from .._validate import FLOAT_DTYPES, describe, dtype_message


def flag(value, name) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {describe(value)}.")
    return bool(value)


def positive_int(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {describe(value)}.")
    return int(value)


def nonnegative_int(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {describe(value)}.")
    return int(value)


def pair(value, name, check=positive_int) -> tuple:
    """An int or a pair of ints (PyTorch's ``kernel_size=3`` or ``(3, 3)``)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}.")
        return check(value[0], name), check(value[1], name)
    v = check(value, name)
    return v, v


def probability(value, name) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1); got {describe(value)}.")
    return float(value)


# What the layer kit's own layers (Linear, Conv2d, activations) take.
FLOAT_ONLY = "float32 or float64 (native byte order)"
WITH_HALF = "float32, float64, float16 or bfloat16 (native byte order)"


def is_layer_dtype(dt, half=True) -> bool:
    """float32, float64, or (with ``half``) float16 or ml_dtypes.bfloat16."""
    return dt in FLOAT_DTYPES or half and kind_of(dt) is not None


def float_dtype(dtype, half=False) -> np.dtype:
    """A layer's ``dtype=``: float32, float64, float16 or bfloat16 as NumPy spells
    it (``np.float32``, ``"float64"``, ``ml_dtypes.bfloat16``, ``"bfloat16"``, a
    ``np.dtype``) or as PyTorch does (``torch.bfloat16``); ``None`` is float32,
    PyTorch's default dtype.  The half types only with ``half`` (the
    normalization layers); anything else (integers, complex, float8, non-native
    byte order) raises ``TypeError``.  Half layers keep their parameters and
    running statistics in that type (``module.to(torch.bfloat16)``)."""
    if dtype is None:
        return FLOAT_DTYPES[0]
    if type(dtype).__module__ == "torch":  # torch.float32 -> "float32", without importing torch
        dtype = str(dtype).rpartition(".")[2]
    if isinstance(dtype, str) and dtype == "bfloat16":
        dtype = require("ml_dtypes", "A bfloat16 layer", extra="half").bfloat16
    try:
        dt = np.dtype(dtype)
    except TypeError:  # not a dtype at all
        dt = None
    if dt is None or not is_layer_dtype(dt, half):  # (np.dtype(None) is float64)
        raise TypeError(f"dtype must be {WITH_HALF if half else FLOAT_ONLY}, as NumPy "
                        f"(np.float32) or PyTorch (torch.float32) spells it, "
                        f"or None (float32); got {repr(dtype) if dt is None else dt}.")
    return dt


def device(value, layer):
    """A layer's ``device=``: numbabn layers run on the CPU, so None, ``"cpu"`` or
    ``torch.device("cpu")``; anything else raises ``ValueError`` (a dtype passed
    in the device's position raises ``TypeError`` saying so)."""
    if value is None or (isinstance(value, str) or type(value).__module__ == "torch") and (
            str(value) == "cpu" or str(value).startswith("cpu:")):
        return value
    if isinstance(value, (np.dtype, type)) or type(value).__name__ == "dtype":
        raise TypeError(
            f"{layer}: device must be None or 'cpu'; got the dtype {value!r}. The arguments "
            f"are PyTorch's (..., device=None, dtype=None): pass dtype= by keyword.")
    raise ValueError(f"numbabn layers run on the CPU: device must be None or 'cpu'; "
                     f"got {value!r}.")


def rng(value):
    """A ``numpy.random.Generator`` from a Generator, an int seed or None."""
    if isinstance(value, np.random.Generator):
        return value
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        return np.random.default_rng(value)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None; got {describe(value)}.")


def layer_input(x, layer, dtype, shape, allow_empty_batch=False, allow_empty=False, half=False):
    """Check a forward input against a shape pattern.

    Each entry of ``shape`` is an int (that exact size) or ``None`` (any size);
    no axis may be empty, except the batch axis (0) with ``allow_empty_batch``,
    and any axis with ``allow_empty``.  The message names what does not match.
    """
    expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{layer} expects a numpy.ndarray of shape {expected} and dtype {dtype}; "
            f"got {describe(x)}. Wrap it with np.asarray(x, dtype=np.{dtype})."
        )
    if not is_layer_dtype(x.dtype, half):
        accepted = WITH_HALF if half else FLOAT_ONLY
        raise TypeError(f"{layer}: {dtype_message('x', x.dtype, dtype, accepted)}")
    if x.dtype != dtype:
        raise TypeError(
            f"{layer} expects dtype {dtype} (the dtype of its parameters); got {x.dtype}. "
            f"Convert the input with x.astype(np.{dtype}) or build the layer with dtype=np.{x.dtype}."
        )
    got = tuple(x.shape)
    if x.ndim != len(shape):
        raise ValueError(f"{layer} expects a {len(shape)}-D input of shape {expected}; "
                         f"got a {x.ndim}-D input of shape {got}.")
    for axis, (want, n) in enumerate(zip(shape, got)):
        if want is not None and want != n:
            raise ValueError(f"{layer} expects an input of shape {expected}, with {want} at "
                             f"axis {axis}; got shape {got}.")
    empty = [axis for axis, n in enumerate(got)
             if n == 0 and not allow_empty and not (axis == 0 and allow_empty_batch)]
    if empty:
        what = "an empty batch (axis 0)" if empty == [0] else f"an empty axis {empty[-1]}"
        raise ValueError(f"{layer} expects an input of shape {expected} with no empty axis; "
                         f"got {what} in shape {got}.")


def float_input(x, layer, ndim=None):
    """A non-empty float32/float64 ndarray, with ``ndim`` dimensions when given."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{layer} expects a float32 or float64 numpy.ndarray; got {describe(x)}.")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: {dtype_message('x', x.dtype, accepted=FLOAT_ONLY)}")
    if (ndim is not None and x.ndim != ndim) or x.size == 0:
        want = f"{ndim} dimensions" if ndim is not None else "at least one value"
        raise ValueError(f"{layer} expects a non-empty input with {want}; got shape {tuple(x.shape)}.")


def grad_output(dy, layer, y_shape, dtype):
    """``dy`` must match the shape and dtype of the last forward output."""
    if y_shape is None:
        raise RuntimeError(f"{layer}.backward was called before forward; call forward first.")
    if not isinstance(dy, np.ndarray):
        raise TypeError(
            f"{layer}.backward expects dy as a numpy.ndarray of shape {y_shape} and dtype {dtype}; "
            f"got {describe(dy)}."
        )
    if dy.dtype != dtype or dy.shape != tuple(y_shape):
        raise ValueError(
            f"{layer}.backward expects dy of shape {tuple(y_shape)} and dtype {dtype}, like the "
            f"last forward output; got shape {tuple(dy.shape)} and dtype {dy.dtype}."
        )


def state_entries(state, targets, owner):
    """Check a state dict against the live arrays; return the entries as ndarrays."""
    if not hasattr(state, "keys"):
        raise TypeError(f"{owner}.load_state_dict expects a mapping of names to arrays; got {describe(state)}.")
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise KeyError(
            f"{owner}.load_state_dict: state keys do not match the layer. "
            f"Missing: {missing or 'none'}; unexpected: {unexpected or 'none'}."
        )
    values = {}
    for key, target in targets.items():
        value = np.asarray(state[key])
        if value.shape != target.shape:
            raise ValueError(
                f"{owner}.load_state_dict: '{key}' must have shape {target.shape}; "
                f"got {value.shape}."
            )
        if not np.can_cast(value.dtype, target.dtype, casting="same_kind"):
            raise TypeError(
                f"{owner}.load_state_dict: '{key}' must be castable to {target.dtype}; "
                f"got dtype {value.dtype}."
            )
        values[key] = value
    return values
