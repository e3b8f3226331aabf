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


def _within(tested) -> bool:
    """Whether the installed Numba's release lies in ``tested`` ([first, last])."""
    version = _version()
    return version is not None and tested[0] <= version <= tested[1]


SUPPORTED = _within(TESTED)


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


# --------------------------------------------------------------------------- #
# Parallel kernels: the outlined loop's wrappers are linked, never emitted.
# --------------------------------------------------------------------------- #
# Numba releases on which the patch below was measured and tested.
LINK_ONLY_TESTED = ((0, 68), (0, 68))

# Names Numba 0.68 gives the two libraries that wrap a ``prange`` loop's
# outlined body: ``numba.np.ufunc.wrappers._GufuncWrapper`` (``str(self)``) and
# ``numba.np.ufunc.parallel`` ("parallelgufuncwrapper").
_WRAPPER_NAMES = ("<numba.np.ufunc.wrappers._GufuncWrapper ", "parallelgufuncwrapper")


def _compiling_listener(listener_base):
    """A ``numba:compile`` listener that keeps the modules of the functions
    Numba is compiling, innermost last (per thread)."""
    import threading

    class Compiling(listener_base):
        def __init__(self):
            self._local = threading.local()

        def _stack(self):
            stack = getattr(self._local, "stack", None)
            if stack is None:
                stack = self._local.stack = []
            return stack

        def on_start(self, event):
            func = getattr(event.data.get("dispatcher"), "py_func", None)
            self._stack().append(getattr(func, "__module__", None) or "")

        def on_end(self, event):
            stack = self._stack()
            if stack:
                stack.pop()

        def numbabn_kernel(self):
            stack = self._stack()
            return bool(stack) and stack[-1].startswith("numbabn.")

    return Compiling()


def link_parallel_wrappers_only() -> bool:
    """Make Numba link, and never optimise and emit on their own, the two
    libraries that wrap each ``prange`` loop of a numbabn kernel; return
    whether it is on.

    Numba compiles a parallel kernel as four libraries: the loop's outlined
    body, a gufunc wrapper linking it, a parallel wrapper linking that, and the
    kernel linking the last.  Linking a library first finalises it: LLVM
    optimises the whole of it again and emits its machine code, which nothing
    calls (the kernel calls its own linked copy).  So the body's code was
    optimised and emitted at four levels, growing at each (the layer kit's
    max pool: 929 instructions in the body's own module, 3,516 in the
    kernel's).  With this on, the two wrappers' libraries are linked as IR and
    the kernel's module is optimised and emitted once with all of it: the
    max pool's first call compiles in about half the time.

    Patches ``numba.core.codegen.CPUCodeLibrary.add_linking_library`` and
    ``_get_module_for_linking`` for those two libraries only, and only while a
    function of numbabn compiles (Numba's public ``numba:compile`` events say
    which); everything else, the user's own kernels included, compiles as
    Numba does.  A wrapper library finalised some other way (a pointer asked
    for) still is, as Numba does it.  Off, with Numba's behaviour, on a Numba
    outside ``LINK_ONLY_TESTED`` or without those names."""
    if not _within(LINK_ONLY_TESTED):
        return False
    try:
        import llvmlite.binding as ll
        from numba.core import codegen, event

        cls = codegen.CPUCodeLibrary
        add_linking_library = cls.add_linking_library
        module_for_linking = cls._get_module_for_linking
        external = ll.Linkage.external
        listener_base = event.Listener
    except (ImportError, AttributeError):  # pragma: no cover - an untested Numba
        return False
    if getattr(cls, "_numbabn_patched", False):
        return True
    compiling = _compiling_listener(listener_base)

    def link_only(library):
        return (compiling.numbabn_kernel() and not library._finalized
                and library.name.startswith(_WRAPPER_NAMES))

    def add_linking_library_(self, library):
        if library.__dict__.get("_numbabn_link_only") or link_only(library):
            library._numbabn_link_only = True  # linked as IR: not finalised here
            # What finalize() would have gathered from its own links, gathered
            # now (they are all added before it is linked): self's finalize()
            # reads it before it asks for the module.
            for linked in library._linking_libraries:
                library._reload_init.update(linked._reload_init)
            self._linking_libraries.append(library)
            self._reload_init.update(library._reload_init)
            return
        add_linking_library(self, library)

    def module_for_linking_(self):
        if not self.__dict__.get("_numbabn_link_only") or self._finalized:
            return module_for_linking(self)
        if self._shared_module is None:
            # What finalize() links in, on a copy (the library stays as it
            # was, should it be finalised later), then what
            # _get_module_for_linking() does: exports made linkonce_odr.
            mod = self._final_module.clone()
            seen = set()
            for library in self._linking_libraries:
                if library not in seen:
                    seen.add(library)
                    mod.link_in(library._get_module_for_linking(), preserve=True)
            for fn in mod.functions:
                if not fn.is_declaration and fn.linkage == external:
                    fn.linkage = "linkonce_odr"
            self._shared_module = mod
        return self._shared_module

    cls.add_linking_library = add_linking_library_
    cls._get_module_for_linking = module_for_linking_
    cls._numbabn_patched = True
    event.register("numba:compile", compiling)
    return True
