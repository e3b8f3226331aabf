"""Half-precision inputs (float16, and ``ml_dtypes.bfloat16``) for every public function.

A function decorated with :func:`half_aware` takes ``x`` (and its companions
``dy``/``y``) in a half type: they are widened to float32 by the backend's
``half`` twin (:mod:`numbabn._cpu.half`, :mod:`numbabn._gpu.half`), the
float32 function runs (statistics and sums accumulate in float64 and the
elementwise passes in float32, as for a float32 input), and its outputs are
rounded back to nearest even: tensors like ``x`` in ``x``'s dtype, per-feature
gradients in the dtype of the parameter they belong to, saved statistics
(``mean``, ``invstd``, ``rstd``...) in float32, the convention of PyTorch and
cuDNN for mixed precision.

Per-feature arguments (weight, bias, mean, invstd, running statistics...) may
be float32 or ``x``'s half type; running statistics in a half type are updated
in place in that type.  Anything else is refused with a ``TypeError`` before
anything is converted or written.

A float32 or float64 call pays one dtype test (``dtype.itemsize == 2``) here
and goes on as before.  ``ml_dtypes`` is not imported by numbabn: a bfloat16
array is recognised by its dtype's name, and only someone holding one can pass
it.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

from . import _backend
from . import _validate as v

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
BFLOAT16_KIND, FLOAT16_KIND = v.BFLOAT16_KIND, v.FLOAT16_KIND
kind_of = v.half_kind


def widen(be, a, kind):
    """``a`` (a half array of backend ``be``) as a new float32 array of its memory order."""
    return be.half.widen_array(a, kind)


def narrow(be, r, dtype, kind, out=None):
    """``r`` (float32) rounded to the half ``dtype``, into ``out`` when given."""
    return be.half.narrow_array(r, dtype, kind, out)


# --------------------------------------------------------------------------- #
# The decorator
# --------------------------------------------------------------------------- #
def half_aware(x="x", tensors=(), params=(), stats=(), inplace=(), results=("x",), out="out",
               native=False):
    """Let ``fn`` take a half-precision ``x``.

    ``tensors``: other arguments shaped like ``x`` (``dy``, ``y``), in ``x``'s
    dtype.  ``params``: per-feature arguments, float32 or ``x``'s dtype.  ``stats``:
    per-feature statistics or sums, float32, float64 or ``x``'s dtype.
    ``inplace``: per-feature arguments written in place (running statistics),
    float32 or ``x``'s dtype.  ``results``: what each returned value is: ``"x"``
    (rounded to ``x``'s dtype, into ``out`` when given), ``"f32"`` (kept), or
    the name of a parameter (rounded to its dtype when it is a half type).  A
    function returning one value has ``results=("x",)`` and returns it bare.

    ``native``: on the CPU, ``fn`` takes the half ``x`` (and ``out``) itself,
    its kernels reading and writing the half values directly (half the bytes
    of float32); only half per-feature arguments are widened for it.
    """

    def decorate(fn):
        sig = inspect.signature(fn)
        names = list(sig.parameters)
        pos = names.index(x)
        has_out = out in names
        defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}
        spec = (names, defaults, sig)
        # (position, name, default, role) of what the native fast path checks
        roles = [(n, _TENSOR) for n in tensors] + [(n, _F32) for n in (*params, *inplace)] + \
            [(n, _F32_F64) for n in stats] + ([(out, _ABSENT)] if has_out else [])
        checked = tuple((names.index(n), n, defaults.get(n), role) for n, role in roles)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            a = args[pos] if len(args) > pos else kwargs.get(x)
            dtype = getattr(a, "dtype", None)
            if getattr(dtype, "itemsize", 0) != 2 or not isinstance(dtype, np.dtype):
                return fn(*args, **kwargs)
            kind = kind_of(dtype)
            if kind is None:  # another 2-byte type (int16, non-native float16): fn refuses it
                return fn(*args, **kwargs)
            if native and type(a) is np.ndarray:
                vectors = _half_vectors(checked, dtype, args, kwargs)
                if vectors == ():
                    return fn(*args, **kwargs)
                if vectors is not None:
                    return _call_vectors(fn, vectors, inplace, results, dtype, kind, args,
                                         kwargs)
            return _call(fn, spec, x, tensors, params, stats, inplace, results,
                         out if has_out else None, native, dtype, kind, args, kwargs)

        wrapper.__wrapped_half__ = fn
        return wrapper

    return decorate


# What the native short paths need of an argument (see _half_vectors).
_TENSOR, _F32, _F32_F64, _ABSENT = range(4)


def _half_vectors(checked, dtype, args, kwargs):
    """For a native CPU call: None when it must take :func:`_call` (an
    ``out``, an argument that is not a NumPy array, a dtype :func:`_call`
    refuses or anything else it handles), else the ``(position, name, value)``
    of each per-feature argument in x's half dtype, the only ones :func:`_call`
    would convert (``()``: none; the ``tensors`` are in x's dtype and the
    kernels read them as they are)."""
    nargs = len(args)
    half = []
    for i, name, default, role in checked:
        value = args[i] if i < nargs else kwargs.get(name, default)
        if value is None:
            continue
        if role == _ABSENT or type(value) is not np.ndarray:
            return None
        vdt = value.dtype
        if role == _TENSOR:
            if vdt != dtype:
                return None
        elif vdt == dtype:
            half.append((i, name, value))
        elif vdt != F32 and (role == _F32 or vdt != F64):
            return None
    return tuple(half)


def _call_vectors(fn, vectors, inplace, results, dtype, kind, args, kwargs):
    """:func:`_call` for a native CPU call whose only conversions are the
    half per-feature ``vectors`` (:func:`_half_vectors`): the same steps
    (widen them, call, round results named after a half parameter to its
    dtype, round the float32 copies of half running statistics back into
    them) without binding and checking every argument again."""
    be = _backend.CPU
    args = list(args)
    nargs = len(args)
    halves = {}
    wide = {}
    for i, name, value in vectors:
        halves[name] = value
        wide[name] = w = widen(be, value, kind)
        if i < nargs:
            args[i] = w
        else:
            kwargs = {**kwargs, name: w}
    result = fn(*args, **kwargs)
    if result is not None:
        single = len(results) == 1 and not isinstance(result, tuple)
        values = list((result,) if single else result)
        for k, what in enumerate(results[:len(values)]):
            if values[k] is not None and what in halves:
                values[k] = narrow(be, values[k], dtype, kind)
        result = values[0] if single else tuple(values)
    _write_back(be, inplace, halves, wide, dtype, kind)
    return result


_SAME = "{x}, the dtype of x"
_PARAM = "float32 or {x} (the dtype of x)"
_STAT = "float32, float64 or {x} (the dtype of x)"


def _check_dtype(value, name, allowed, accepted, xdtype):
    dtype = getattr(value, "dtype", None)
    if not isinstance(dtype, np.dtype):  # None, or not an array: fn says what it expects
        return
    if dtype not in allowed:
        raise TypeError(f"{name} must have dtype {accepted.format(x=xdtype)}; got {dtype}.")


def _bind(spec, args, kwargs):
    """The arguments by name, defaults filled in (``inspect.Signature.bind``
    without its cost; it still says what is wrong with a bad call)."""
    names, defaults, sig = spec
    if len(args) > len(names) or any(k not in defaults and k not in names for k in kwargs) \
            or any(k in kwargs for k in names[:len(args)]):
        sig.bind(*args, **kwargs)  # raises the TypeError Python would
    arguments = dict(defaults)
    arguments.update(zip(names, args))
    arguments.update(kwargs)
    missing = [n for n in names if n not in arguments]
    if missing:
        sig.bind(*args, **kwargs)
    return arguments


def _call(fn, spec, x, tensors, params, stats, inplace, results, out, native, dtype, kind, args,
          kwargs):
    arguments = _bind(spec, args, kwargs)
    # Every check before any conversion or write.
    for name in tensors:
        _check_dtype(arguments.get(name), name, (dtype,), _SAME, dtype)
    for name in (*params, *inplace):
        _check_dtype(arguments.get(name), name, (F32, dtype), _PARAM, dtype)
    for name in stats:
        _check_dtype(arguments.get(name), name, (F32, F64, dtype), _STAT, dtype)
    target = arguments.get(out) if out else None
    if target is not None:
        _check_dtype(target, out, (dtype,), _SAME, dtype)
        if tuple(getattr(target, "shape", ())) != tuple(arguments[x].shape):
            raise ValueError(f"{out} must have the shape of x {tuple(arguments[x].shape)}; "
                             f"got {v.describe(target)}.")
        if isinstance(target, np.ndarray) and not target.flags.writeable:
            raise ValueError(f"{out} must be writeable; got a read-only array.")
    names = list(dict.fromkeys([x, *tensors, *params, *stats, *inplace]))
    present = {n: arguments[n] for n in names if arguments.get(n) is not None}
    be, placed = _backend.select(present)
    placed = dict(zip(present, placed))
    if kind == BFLOAT16_KIND and be is not _backend.CPU:
        raise TypeError("bfloat16 device arrays are not supported: numba.cuda has no bfloat16 "
                        "array type; pass float16 or float32 device arrays.")

    direct = native and be is _backend.CPU
    converted = dict(arguments)
    for name, value in placed.items():
        if name in (x, *tensors):
            if not direct:
                converted[name] = widen(be, value, kind)
        elif value.dtype == dtype:
            converted[name] = widen(be, value, kind)
    if out and not direct:
        converted[out] = None
    result = fn(**converted)  # every signature here is plain keywords
    if result is None:
        _write_back(be, inplace, placed, converted, dtype, kind)
        return None
    single = len(results) == 1 and not isinstance(result, tuple)
    values = (result,) if single else tuple(result)
    final = []
    for what, value in zip(results, values):
        if value is None or what == "f32":
            final.append(value)
        elif what == "x":
            final.append(value if direct else narrow(be, value, dtype, kind, out=target))
        else:
            param = arguments.get(what)
            if param is not None and param.dtype == dtype:
                value = narrow(be, value, dtype, kind)
            final.append(value)
    final.extend(values[len(results):])
    _write_back(be, inplace, placed, converted, dtype, kind)
    return final[0] if single else tuple(final)


def _write_back(be, inplace, placed, converted, dtype, kind):
    """Round the float32 copies of half running statistics back into them."""
    for name in inplace:
        value = placed.get(name)
        if value is not None and value.dtype == dtype:
            narrow(be, converted[name], dtype, kind, out=value)
