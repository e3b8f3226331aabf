"""Every use of a private Numba or llvmlite name by numbabn, in one place.

Each helper checks that the installed Numba is one this code was tested with
and that the private attribute is there; otherwise it returns ``None`` and the
caller takes a public path.  This module holds the CPU side's names (the disk
cache's folders, the IR helpers of the layer kit's register tiles); the GPU
backend's numba-cuda internals are in :mod:`numbabn._numba_private.cuda`,
imported only with the GPU backend.
"""

from __future__ import annotations

import hashlib
import os

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


def cache_places(source: str) -> list:
    """The folders where Numba may keep the on-disk cache of kernels defined in
    ``source``: ``$NUMBA_CACHE_DIR/<folder>_<sha1 of its path>`` when set, else
    the source's ``__pycache__`` and the user-wide Numba cache (Numba's
    ``_CacheLocator`` classes).  On an untested Numba: the in-tree
    ``__pycache__`` only (``$NUMBA_CACHE_DIR`` still honoured)."""
    from numba.core import config as numba_config

    folder = os.path.dirname(os.path.abspath(source))
    # _CacheLocator.get_suitable_cache_subpath: the folder's name and a hash of its path.
    subpath = f"{os.path.basename(folder)}_{hashlib.sha1(folder.encode()).hexdigest()}"
    if numba_config.CACHE_DIR:
        return [os.path.join(numba_config.CACHE_DIR, subpath)]
    places = [os.path.join(folder, "__pycache__")]
    if SUPPORTED:
        try:
            from numba.misc.appdirs import AppDirs
        except ImportError:
            return places
        places.append(os.path.join(AppDirs(appname="numba", appauthor=False).user_cache_dir, subpath))
    return places


def thread_count_functions():
    """``(get, set)`` of the calling thread's Numba thread count without the
    pool-launch check that ``numba.get_num_threads``/``set_num_threads`` run on
    every call (``numba.np.ufunc.parallel._get_num_threads`` and
    ``_set_num_threads``, bound when the pool starts; this starts it).  About
    0.8 and 2.3 us a call against 6 and 8 us on the 2-core VM.  ``set`` does not
    check its argument: callers pass 1 or a count ``get`` returned.  The public
    functions on an untested Numba."""
    public = (numba.get_num_threads, numba.set_num_threads)
    if not SUPPORTED:
        return public
    try:
        from numba.np.ufunc import parallel
        parallel._launch_threads()
        return parallel._get_num_threads, parallel._set_num_threads
    except (ImportError, AttributeError):  # pragma: no cover - an untested Numba
        return public


def parallel_options(**options):
    """A ``parallel=`` value for ``njit`` that every compile reads whole:
    Numba's ``numba.core.cpu.ParallelOptions``, which it copies.  A dict is
    emptied by the first compile that reads it (``ParallelOptions`` pops each
    option), so every later kernel sharing it would compile with all options
    on.  On an untested Numba: the dict (that behaviour)."""
    if SUPPORTED:
        try:
            from numba.core.cpu import ParallelOptions
            return ParallelOptions(dict(options))
        except (ImportError, TypeError, ValueError, NameError):  # pragma: no cover
            pass
    return dict(options)


def plain_options(value):
    """The values of a :func:`parallel_options` object as a dict (for the cache
    key); any other value as it is."""
    get_values = getattr(value, "_get_values", None)
    return get_values() if SUPPORTED and callable(get_values) else value


def cgutils():
    """``numba.core.cgutils``, the IR-building helpers the layer kit's register
    tiles are written with (:mod:`numbabn.kit._kernels.tiles`), or ``None`` on an
    untested Numba: the tiles are then off and Conv2d and Linear use BLAS."""
    if not SUPPORTED:
        return None
    try:
        from numba.core import cgutils as module
    except ImportError:
        return None
    needed = ("get_or_insert_function", "alloca_once", "for_range", "for_range_slice")
    return module if all(hasattr(module, n) for n in needed) else None


try:  # raised by an intrinsic to ask Numba for literal arguments
    from numba.core.errors import RequireLiteralValue
except ImportError:  # pragma: no cover - an untested Numba (the tiles are off there)
    RequireLiteralValue = TypeError
