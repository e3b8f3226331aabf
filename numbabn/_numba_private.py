"""Every use of a private Numba name by numbabn's CPU side, in one place.

Each helper checks that the installed Numba is one this code was tested with
and that the private attribute is there; otherwise it returns ``None`` and the
caller takes a public path.  (The GPU backend's uses of numba-cuda internals
live in :mod:`numbabn._gpu._private`.)
"""

from __future__ import annotations

import numba

# Numba releases whose private names below were checked: [first, last].
TESTED = ((0, 60), (0, 68))


def _version():
    try:
        return tuple(int(p) for p in numba.__version__.split(".")[:2])
    except ValueError:
        return None


SUPPORTED = _version() is not None and TESTED[0] <= _version() <= TESTED[1]


def cache_dir(dispatcher) -> str | None:
    """The folder of ``dispatcher``'s on-disk cache (``Dispatcher._cache._cache_path``),
    or ``None`` when it is unknown (caching off, or an untested Numba)."""
    if not SUPPORTED:
        return None
    path = getattr(getattr(dispatcher, "_cache", None), "_cache_path", None)
    return path if isinstance(path, str) else None
