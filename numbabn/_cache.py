"""Keep Numba's on-disk cache of numbabn's kernels in step with ``_config``.

Numba keys a cached kernel on its signature, its bytecode and its source file's
time stamp, not on the constants and flags it was compiled with, so changing a
compile-time value of :mod:`numbabn._config` (a fast-math flag, a GPU array
size) would keep loading kernels compiled with the old one.  Each kernel module
calls :func:`check` on its namespace when imported: the cache folders of its
kernels hold a key file with a hash of :func:`numbabn._config.compile_time_values`
(and the Numba version); when the key differs, or is missing beside cached
kernels, the folder's cached kernels (``*.nbi``, ``*.nbc``) are deleted before
any is loaded, so they are compiled afresh with the current values.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import numba

from . import _config, _numba_private

KEY_FILE = "numbabn-compile-key"
_checked = set()


def compile_key() -> str:
    values = _config.compile_time_values()
    text = repr(sorted((name, _canonical(v)) for name, v in values.items()))
    text += f"|link_only={LINK_ONLY}"
    return hashlib.sha256(f"{numba.__version__}|{text}".encode()).hexdigest()[:20]


def _canonical(value):
    value = _numba_private.plain_options(value)  # Numba's ParallelOptions: its values
    if isinstance(value, dict):
        return sorted((k, _canonical(v)) for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _parallel_options_read_whole():
    """Put Numba's own options object (``_numba_private.parallel_options``) in
    place of each ``parallel=`` dict of :mod:`numbabn._config`'s jit options.
    Numba pops each option of a dict as it reads it, so the first compile would
    empty the dict those options share: every later kernel would compile with
    all parallel options on (loop fusion included), and :func:`compile_key`
    would change in mid-process.  Runs when this module is imported, which
    every kernel module does before it declares a kernel."""
    for name in _config.COMPILE_TIME:
        value = getattr(_config, name)
        if isinstance(value, dict) and isinstance(value.get("parallel"), dict):
            value["parallel"] = _numba_private.parallel_options(**value["parallel"])


_parallel_options_read_whole()

# Every parallel kernel's loop wrappers are linked into it and never optimised
# and emitted on their own (``_numba_private.link_parallel_wrappers_only``):
# 0.5-1.9 s less on the first calls that compile parallel kernels (about half
# of the layer kit's max pool's compile time).  Set up here, before any kernel
# compiles, and part of the key: the kernels' machine code is not the same.
LINK_ONLY = _numba_private.link_parallel_wrappers_only()


def _folder(dispatcher) -> Path | None:
    """The cache folder of a cached dispatcher; ``None`` for one that does not cache."""
    if _numba_private.SUPPORTED:
        path = _numba_private.cache_dir(dispatcher)
        return None if path is None else Path(path)
    try:  # public fallback: Numba's in-tree cache folder, next to the source
        return Path(inspect.getfile(dispatcher.py_func)).parent / "__pycache__"
    except (TypeError, AttributeError):
        return None


def check(namespace: dict) -> None:
    """Sync the cache folders of every cached Numba dispatcher in ``namespace``."""
    key = compile_key()
    folders = set()
    for obj in namespace.values():
        if hasattr(obj, "py_func"):  # a Numba dispatcher
            folder = _folder(obj)
            if folder is not None:
                folders.add(folder)
    for folder in folders:
        if (folder, key) not in _checked:
            sync_folder(folder, key)
            _checked.add((folder, key))


def sync_folder(folder: Path, key: str) -> bool:
    """Drop ``folder``'s cached kernels unless its key file says ``key``; return
    whether anything was dropped.  Never raises: a cache is only a cache."""
    key_file = folder / KEY_FILE
    try:
        if key_file.read_text() == key:
            return False
    except OSError:
        pass
    dropped = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if f.suffix in (".nbi", ".nbc"):
                f.unlink(missing_ok=True)
                dropped = True
        tmp = folder / f"{KEY_FILE}.{os.getpid()}"
        tmp.write_text(key)
        os.replace(tmp, key_file)
    except OSError:
        pass
    return dropped
