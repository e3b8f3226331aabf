"""The MNIST data set: find, download, verify and read its four IDX files.

numbabn ships the four files (``numbabn/mnist/dataset``, ``SHIPPED_DATA_DIR``),
so nothing needs downloading.  ``load_mnist`` reads them from one directory,
found in this order (``find_mnist``): ``data_dir`` when given, else
``$NUMBABN_DATA`` when set, else ``~/.cache/numbabn/mnist`` when it holds all
four files, else the shipped copy.  Each file is gzipped
(``train-images-idx3-ubyte.gz``) or raw (``train-images-idx3-ubyte``).  Files
missing from a directory given explicitly (or from the cache, when the shipped
copy is gone too) are downloaded from the first of ``MIRRORS`` that serves a
good copy; a download goes to a temporary file in the same directory and is
renamed into place only once it has passed the same checks as a file already
there, so the cache never keeps a partial or corrupt file.

Every file is checked before its data is used: the IDX magic number (element type
and number of dimensions), that the payload length matches the dimensions in the
header exactly, and the MD5 of the decompressed contents.  Any failure raises
``MNISTError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .._extras import MissingExtraError, require

__all__ = [
    "MNISTError",
    "MNIST_FILES",
    "MIRRORS",
    "DEFAULT_DATA_DIR",
    "DATA_DIR_ENV",
    "SHIPPED_DATA_DIR",
    "load_mnist",
    "find_mnist",
    "read_idx",
    "resolve_data_dir",
    "find_file",
    "download_file",
]

log = logging.getLogger(__name__)

#: MD5 of the decompressed contents of each file, by name without ``.gz``.
#: The hash is of the IDX bytes, not of the gzip stream, since gzip streams of
#: the same data differ between compressors.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: Base URLs serving ``<name>.gz`` for every name in ``MNIST_FILES``, tried in order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

DATA_DIR_ENV = "NUMBABN_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/numbabn/mnist")
#: The copy of MNIST installed with numbabn (package data, also in the wheel).
SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "dataset"

#: Seconds to wait for a mirror to connect or to send the next block.
TIMEOUT = 30.0
_CHUNK_BYTES = 1 << 16

# IDX element type codes; multi-byte types are big-endian on disk.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class MNISTError(ValueError):
    """An MNIST file is missing, malformed, corrupt, or could not be downloaded."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory named by the user, else the download cache.

    This is where downloads go; ``load_mnist`` reads from ``find_mnist``, which
    prefers the copy shipped with numbabn to an incomplete cache.

    Parameters
    ----------
    data_dir : str or path-like, optional
        Used as given when not None (``~`` is expanded).  Otherwise the
        environment variable ``NUMBABN_DATA`` when set and non-empty, otherwise
        ``~/.cache/numbabn/mnist``.

    Returns
    -------
    pathlib.Path
        The directory; it is not created here.

    Examples
    --------
    >>> resolve_data_dir("/data/mnist")
    PosixPath('/data/mnist')
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def find_mnist(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Return the directory ``load_mnist`` reads, and where it came from.

    The first of: ``data_dir`` when not None (``"argument"``); ``$NUMBABN_DATA``
    when set and non-empty (``"$NUMBABN_DATA"``); ``~/.cache/numbabn/mnist`` when
    it holds all four files (``"cache"``); the copy shipped with numbabn when it
    holds all four (``"shipped"``); else the cache directory again (``"cache"``),
    for ``load_mnist`` to download into.  A directory given explicitly is used
    even when files are missing from it, so ``load_mnist`` downloads into it or
    says what is missing.  Nothing is read or created here.

    Examples
    --------
    >>> find_mnist("/data/mnist")
    (PosixPath('/data/mnist'), 'argument')
    """
    if data_dir is not None:
        return Path(data_dir).expanduser(), "argument"
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    cache = DEFAULT_DATA_DIR.expanduser()
    for directory, origin in ((cache, "cache"), (SHIPPED_DATA_DIR, "shipped")):
        if all(find_file(directory, name) is not None for name in MNIST_FILES):
            return directory, origin
    return cache, "cache"


def find_file(data_dir: str | os.PathLike, name: str) -> Path | None:
    """Return ``data_dir/name.gz`` or ``data_dir/name``, whichever exists first, else None."""
    for candidate in (Path(data_dir) / f"{name}.gz", Path(data_dir) / name):
        if candidate.is_file():
            return candidate
    return None


_REPLACE_HINT = "Delete the file to download it again, or replace it with a good copy."
_SHIPPED_HINT = (
    "This is the copy installed with numbabn, which is damaged: reinstall numbabn, or point "
    f"--data-dir or ${DATA_DIR_ENV} at a directory with good copies of the four files."
)


def read_idx(
    path: str | os.PathLike,
    *,
    md5: str | None = None,
    ndim: int | None = None,
    dtype=None,
) -> np.ndarray:
    """Read one IDX file, gzipped or raw, into a new NumPy array.

    Parameters
    ----------
    path : str or path-like
        The file.  It is decompressed when it starts with the gzip magic bytes,
        whatever its name.
    md5 : str, optional
        Expected MD5 (hex) of the decompressed contents; not checked when None.
    ndim : int, optional
        Required number of dimensions (3 for MNIST images, 1 for labels).
    dtype : dtype-like, optional
        Required element type (``np.uint8`` for MNIST).

    Returns
    -------
    numpy.ndarray
        A writeable, C-contiguous array in native byte order with the shape
        given in the file's header.

    Raises
    ------
    MNISTError
        When the file cannot be read or decompressed, its magic number is not an
        IDX header (of the required type and dimensions), its payload is shorter
        or longer than the header says, or its MD5 differs from ``md5``.

    Examples
    --------
    >>> labels = read_idx("t10k-labels-idx1-ubyte.gz", ndim=1, dtype=np.uint8)  # doctest: +SKIP
    >>> labels.shape                                                           # doctest: +SKIP
    (10000,)
    """
    return _read_idx(path, md5=md5, ndim=ndim, dtype=dtype, hint=_REPLACE_HINT)


def _read_idx(path, *, md5, ndim, dtype, hint: str) -> np.ndarray:
    """``read_idx`` with ``hint`` (what to do about a bad file) in its errors."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MNISTError(f"{path}: cannot read the file ({e}).") from e
    data = _decompress(raw, source=path, hint=hint)
    return _parse_idx(data, source=path, md5=md5, ndim=ndim, dtype=dtype, hint=hint)


def _decompress(raw: bytes, *, source, hint: str) -> bytes:
    """``raw`` decompressed when it is a gzip stream (whatever the file's name), else as is."""
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise MNISTError(
            f"{source}: the gzip stream is truncated or corrupt ({type(e).__name__}: {e}). {hint}"
        ) from e


def _parse_idx(data: bytes, *, source, md5, ndim, dtype, hint: str) -> np.ndarray:
    """Check the IDX bytes ``data`` (see ``read_idx``) and return them as an array."""
    if len(data) < 4:
        raise MNISTError(f"{source}: {len(data)} bytes is too short for an IDX header. {hint}")
    zero, type_code, file_ndim = struct.unpack(">HBB", data[:4])
    magic = int.from_bytes(data[:4], "big")
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise MNISTError(f"{source}: magic number 0x{magic:08X} is not an IDX header. {hint}")
    file_dtype = _IDX_DTYPES[type_code]
    want_code = type_code if dtype is None else _type_code(np.dtype(dtype))
    want_ndim = file_ndim if ndim is None else ndim
    if (want_code, want_ndim) != (type_code, file_ndim):
        raise MNISTError(
            f"{source}: magic number 0x{magic:08X} means {file_dtype.name} data with "
            f"{file_ndim} dimensions; expected 0x{want_code << 8 | want_ndim:08X} "
            f"({_IDX_DTYPES[want_code].name} data with {want_ndim} dimensions). "
            f"Check that the file has the right name and is not corrupt."
        )

    header_len = 4 + 4 * file_ndim
    if len(data) < header_len:
        raise MNISTError(
            f"{source}: the header of a {file_ndim}-dimensional IDX file takes {header_len} "
            f"bytes but there are only {len(data)}. {hint}"
        )
    shape = struct.unpack(f">{file_ndim}I", data[4:header_len])
    expected = header_len + math.prod(shape) * file_dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing bytes"
        raise MNISTError(
            f"{source}: {problem}: the header says shape {shape} of {file_dtype.name}, "
            f"{expected} bytes in all, but there are {len(data)} bytes. {hint}"
        )

    if md5 is not None:
        actual = hashlib.md5(data).hexdigest()
        if actual != md5.lower():
            raise MNISTError(
                f"{source}: MD5 of the decompressed contents is {actual}, expected {md5}; "
                f"the data is corrupt or not the published file. {hint}"
            )

    flat = np.frombuffer(data, dtype=file_dtype, offset=header_len)
    return flat.astype(file_dtype.newbyteorder("=")).reshape(shape)


def _type_code(dtype: np.dtype) -> int:
    for code, idx_dtype in _IDX_DTYPES.items():
        if idx_dtype.newbyteorder("=") == dtype.newbyteorder("="):
            return code
    raise ValueError(f"IDX files cannot hold {dtype}; they hold {sorted(_IDX_DTYPES.values())}.")


def download_file(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    *,
    timeout: float = TIMEOUT,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically, keeping it only when it verifies.

    The body is streamed to a temporary file beside ``dest``, checked, and then
    renamed onto ``dest`` with ``os.replace``; on any failure the temporary file
    is removed and ``dest`` is left as it was.

    Parameters
    ----------
    url : str
        What to fetch (any scheme urllib opens).
    dest : str or path-like
        Where to keep it.  Its directory must exist and be writable.
    md5 : str, optional
        When given, the download must be an IDX file (gzipped or raw) whose
        decompressed contents have this MD5, checked as in ``read_idx``.
    timeout : float, optional
        Seconds to wait for the connection and for each block of the body.
    progress : bool, optional
        Show a tqdm progress bar on stderr (without one, and a warning, when
        tqdm is not installed).

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    MNISTError
        When the transfer fails (network error, HTTP error status, timeout, fewer
        bytes than announced) or the file does not verify.
    """
    dest = Path(dest)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise MNISTError(f"Cannot write {dest.name} into {dest.parent}: {e}") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, timeout=timeout, progress=progress, desc=dest.name)
        if md5 is not None:
            hint = "The download was discarded."
            data = _decompress(tmp.read_bytes(), source=url, hint=hint)
            _parse_idx(data, source=url, md5=md5, ndim=None, dtype=None, hint=hint)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, out, *, timeout: float, progress: bool, desc: str) -> None:
    """Copy the body at ``url`` into the open file ``out``, checking its length."""
    received, total = 0, None
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "numbabn"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with _progress_bar(total, desc, progress) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except http.client.IncompleteRead as e:
        raise MNISTError(
            f"{url}: transfer cut short: received {received + len(e.partial)} bytes "
            f"and the connection closed ({e})."
        ) from e
    except urllib.error.HTTPError as e:
        raise MNISTError(f"{url}: download failed: {e}") from e
    except urllib.error.URLError as e:  # no connection: the reason is the useful part
        raise MNISTError(f"{url}: download failed: {e.reason}") from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        # Timeouts while reading are OSErrors; ValueError is a malformed URL.
        raise MNISTError(f"{url}: download failed: {type(e).__name__}: {e}") from e
    if total is not None and received != total:  # http.client may end a short body quietly
        raise MNISTError(f"{url}: transfer cut short: received {received} of {total} bytes.")


class _NoBar:
    """Stands in for a tqdm bar when there is none."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass


def _progress_bar(total, desc, progress):
    """A tqdm byte counter on stderr, or a silent stand-in (progress off, or no tqdm)."""
    if not progress:
        return _NoBar()
    try:
        tqdm = require("tqdm", "The download progress bar").tqdm
    except MissingExtraError as e:
        log.warning("%s Downloading without a progress bar.", e)
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=False)


def _missing_message(data_dir: Path, missing: Sequence[str], reason: str) -> str:
    files = ", ".join(f"{name}.gz" for name in missing)
    return (
        f"MNIST files missing from {data_dir}: {files}. {reason}\n"
        f"Put the four files (gzipped or raw) in {data_dir}, or point the environment "
        f"variable {DATA_DIR_ENV} or the --data-dir flag at a directory that has them. "
        f"They are published at {MIRRORS[0]} (and {', '.join(MIRRORS[1:])})."
    )


def _fetch(
    name: str,
    data_dir: Path,
    md5: str,
    mirrors: Sequence[str],
    *,
    timeout: float,
    progress: bool,
) -> tuple[Path | None, list[str]]:
    """Try each mirror for ``name.gz``; return the kept path (None if none) and the failures."""
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        try:
            path = download_file(url, data_dir / f"{name}.gz", md5,
                                 timeout=timeout, progress=progress)
            return path, failures
        except MNISTError as e:
            log.warning("%s", e)
            failures.append(str(e))
    return None, failures


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    md5s: Mapping[str, str] = MNIST_FILES,
    progress: bool = True,
    timeout: float = TIMEOUT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST, verifying every file (and downloading missing ones first).

    Parameters
    ----------
    data_dir : str or path-like, optional
        Directory of the four IDX files.  When None, ``find_mnist`` picks
        ``$NUMBABN_DATA``, else ``~/.cache/numbabn/mnist`` when complete, else
        the copy shipped with numbabn (so no download is needed).
    download : bool, optional
        Download files missing from the directory into it (created if needed).
        When False, missing files raise ``MNISTError`` saying where to put them.
    mirrors : sequence of str, optional
        Base URLs to try in order; defaults to ``MIRRORS``.
    md5s : mapping of str to str, optional
        MD5 of the decompressed contents of each file, keyed by the names in
        ``MNIST_FILES``; defaults to the published data set's.
    progress : bool, optional
        Show a tqdm progress bar on stderr while downloading.
    timeout : float, optional
        Seconds to wait for a mirror to connect or send the next block.

    Returns
    -------
    train_images : numpy.ndarray
        uint8 array of shape (60000, 28, 28), pixel values 0..255.
    train_labels : numpy.ndarray
        uint8 array of shape (60000,), digits 0..9.
    test_images : numpy.ndarray
        uint8 array of shape (10000, 28, 28).
    test_labels : numpy.ndarray
        uint8 array of shape (10000,).

    Raises
    ------
    MNISTError
        When a file is missing and cannot be downloaded, or a file (found,
        shipped or downloaded) fails a check.

    Examples
    --------
    >>> x_train, y_train, x_test, y_test = load_mnist()  # doctest: +SKIP
    >>> x_train.shape, y_train.dtype                     # doctest: +SKIP
    ((60000, 28, 28), dtype('uint8'))
    """
    data_dir, origin = find_mnist(data_dir)
    log.info("MNIST from %s (%s)", data_dir, origin)
    hint = _SHIPPED_HINT if origin == "shipped" else _REPLACE_HINT
    mirrors = MIRRORS if mirrors is None else tuple(mirrors)
    paths = {name: find_file(data_dir, name) for name in MNIST_FILES}
    missing = [name for name, path in paths.items() if path is None]

    if missing and not download:
        reason = "Downloading is off (download=False)."
        raise MNISTError(_missing_message(data_dir, missing, reason))
    if missing:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MNISTError(_missing_message(data_dir, missing, f"Cannot create it: {e}.")) from e
        failures = []
        for name in missing:
            paths[name], errors = _fetch(name, data_dir, md5s[name], mirrors,
                                         timeout=timeout, progress=progress)
            if paths[name] is None:
                failures += errors
        still_missing = [name for name in missing if paths[name] is None]
        if still_missing:
            failures = failures or ["no mirrors given"]
            reason = "No mirror served a good copy:\n  " + "\n  ".join(failures)
            raise MNISTError(_missing_message(data_dir, still_missing, reason))

    arrays = []
    for split in ("train", "t10k"):
        images_name, labels_name = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        images = _read_idx(paths[images_name], md5=md5s[images_name], ndim=3, dtype=np.uint8,
                           hint=hint)
        labels = _read_idx(paths[labels_name], md5=md5s[labels_name], ndim=1, dtype=np.uint8,
                           hint=hint)
        if len(labels) != len(images):
            raise MNISTError(
                f"{paths[labels_name]} holds {len(labels)} labels but {paths[images_name]} "
                f"holds {len(images)} images; the two files must come from the same split."
            )
        if labels.size and labels.max() > 9:
            raise MNISTError(
                f"{paths[labels_name]}: labels must be digits 0..9; found {labels.max()}."
            )
        arrays += [images, labels]
    return tuple(arrays)
