"""Training checkpoints: one ``.npz`` file, written atomically, verified on load.

A checkpoint holds named arrays and a JSON ``meta`` record (format version,
model name and configuration, epoch, RNG state, ...).  A SHA-256 checksum over
every array (name, dtype, shape, bytes) and the meta record is stored in the
meta record; :func:`load_checkpoint` recomputes it, so a truncated, corrupted or
edited file is refused with a :class:`CheckpointError` instead of being loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT_VERSION = 1
_META_KEY = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupted, or for another model."""


def _checksum(arrays, meta):
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path, arrays, meta):
    """Write ``arrays`` and ``meta`` to ``path`` atomically.

    The file is written to a temporary name in the same directory, flushed to
    disk, then moved over ``path`` with :func:`os.replace`; an interruption at
    any point leaves the previous checkpoint intact.

    Parameters
    ----------
    path : str or os.PathLike
    arrays : dict of str to ndarray
        Keys must not contain ``/`` and must differ from ``"__meta__"``.
    meta : dict
        JSON-serialisable; ``format_version`` and ``checksum`` are added.
    """
    meta = dict(meta, format_version=FORMAT_VERSION)
    meta["checksum"] = _checksum(arrays, meta)
    payload = {key: np.asarray(a) for key, a in arrays.items()}
    payload[_META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, expect=None):
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or os.PathLike
    expect : dict, optional
        Meta entries that must match (say ``{"model": "cnn", "config": {...}}``);
        a mismatch raises :class:`CheckpointError` naming the differences.

    Returns
    -------
    arrays : dict of str to ndarray
    meta : dict

    Raises
    ------
    CheckpointError
        If the file is missing, truncated, corrupted, from another format
        version, or does not match ``expect``.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
        meta = json.loads(arrays.pop(_META_KEY).tobytes())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is not a readable numbabn checkpoint (truncated or corrupted?): {e}. "
            f"Delete it to start over."
        ) from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')!r}; "
                              f"this numbabn reads format {FORMAT_VERSION}.")
    stored = meta.pop("checksum", None)
    if stored != _checksum(arrays, meta):
        raise CheckpointError(f"{path} failed its checksum: the file is corrupted. Delete it to start over.")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise CheckpointError(f"{path} does not match this run ({_differences(key, meta.get(key), want)}); "
                                  f"use the same settings, or another --out directory.")
    return arrays, meta


def _differences(name, got, want):
    if isinstance(got, dict) and isinstance(want, dict):
        keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        return "; ".join(f"{name}.{k}: checkpoint {got.get(k)!r}, this run {want.get(k)!r}" for k in keys)
    return f"{name}: checkpoint {got!r}, this run {want!r}"
