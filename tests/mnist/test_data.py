"""Tests for numbabn.mnist.data: IDX parsing, verification, and downloads from a local server.

The tests write tiny IDX files (a few 4x5 "images") with an MD5 table of their own,
and serve them from an HTTP server on 127.0.0.1 so the real download code runs.
Others read the copy of the real data set shipped in the package, and the one at
../shared/data/mnist when it is there.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from numbabn.mnist import data
from numbabn.mnist.data import MNIST_FILES, MNISTError, download_file, load_mnist, read_idx

SHARED_MNIST = Path(__file__).resolve().parents[2].parent / "shared/data/mnist"

# Examples overwrite one file in tmp_path, so sharing the fixture between them is fine.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]

_TYPE_CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array`` (big-endian elements, as the format says)."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = _TYPE_CODES[dtype.str.lstrip("|")]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def md5(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


def tiny_mnist(n_train=6, n_test=3, seed=0):
    """Arrays and their IDX bytes for a tiny MNIST-shaped data set, keyed by file name."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    return arrays, {name: idx_bytes(a) for name, a in arrays.items()}


def write_files(directory: Path, contents: dict[str, bytes], gz=True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in contents.items():
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)


def assert_loaded(result, arrays):
    names = list(MNIST_FILES)
    assert len(result) == 4
    for got, name in zip(result, names):
        assert got.dtype == np.uint8
        assert got.flags.writeable
        np.testing.assert_array_equal(got, arrays[name])


@pytest.fixture
def tiny():
    arrays, contents = tiny_mnist()
    return arrays, contents, {name: md5(raw) for name, raw in contents.items()}


# --- reading ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_tiny_files_gzipped_or_raw(tmp_path, tiny, gz):
    arrays, contents, md5s = tiny
    write_files(tmp_path, contents, gz=gz)
    assert_loaded(load_mnist(tmp_path, download=False, md5s=md5s), arrays)


def test_load_mixed_gzipped_and_raw(tmp_path, tiny):
    arrays, contents, md5s = tiny
    names = list(contents)
    write_files(tmp_path, {n: contents[n] for n in names[:2]}, gz=True)
    write_files(tmp_path, {n: contents[n] for n in names[2:]}, gz=False)
    assert_loaded(load_mnist(tmp_path, download=False, md5s=md5s), arrays)


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(["u1", "i1", ">i2", "<i2", ">i4", "<f4", ">f8"]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4),
    ),
    gz=st.booleans(),
)
def test_read_idx_round_trip(tmp_path, array, gz):
    raw = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    got = read_idx(path, md5=md5(raw), ndim=array.ndim, dtype=array.dtype)
    assert got.shape == array.shape
    assert got.dtype == array.dtype.newbyteorder("=")
    assert got.dtype.isnative and got.flags.writeable and got.flags.c_contiguous
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize(
    "header, message",
    [
        (b"\x01\x00\x08\x01", "magic number 0x01000801 is not an IDX header"),
        (b"\x00\x00\x07\x01", "magic number 0x00000701 is not an IDX header"),
        (b"\x00\x00\x08\x03", "expected 0x00000801"),  # an images header where labels belong
        (b"\x00\x00\x0c\x01", "expected 0x00000801"),  # int32 labels
    ],
)
def test_bad_magic_names_file_and_magic(tmp_path, tiny, header, message):
    _, contents, md5s = tiny
    contents["train-labels-idx1-ubyte"] = header + contents["train-labels-idx1-ubyte"][4:]
    md5s = {name: md5(raw) for name, raw in contents.items()}
    write_files(tmp_path, contents)
    with pytest.raises(MNISTError, match=message) as info:
        load_mnist(tmp_path, download=False, md5s=md5s)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw[:-1], "truncated: the header says shape (6, 4, 5)"),
        (lambda raw: raw + b"\x00", "trailing bytes"),
        (lambda raw: raw[:4] + struct.pack(">I", 7) + raw[8:], "truncated"),  # count 7, data for 6
        (lambda raw: raw[:10], "header of a 3-dimensional IDX file takes 16 bytes"),
        (lambda raw: raw[:3], "too short for an IDX header"),
    ],
)
def test_wrong_length_or_count(tmp_path, tiny, edit, message):
    _, contents, _ = tiny
    contents["train-images-idx3-ubyte"] = edit(contents["train-images-idx3-ubyte"])
    md5s = {name: md5(raw) for name, raw in contents.items()}
    write_files(tmp_path, contents)
    with pytest.raises(MNISTError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_mnist(tmp_path, download=False, md5s=md5s)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_label_count_must_match_image_count(tmp_path):
    arrays, contents = tiny_mnist()
    contents["t10k-labels-idx1-ubyte"] = idx_bytes(arrays["t10k-labels-idx1-ubyte"][:-1])
    md5s = {name: md5(raw) for name, raw in contents.items()}
    write_files(tmp_path, contents)
    with pytest.raises(MNISTError, match="holds 2 labels but .*t10k-images-idx3-ubyte.gz holds 3"):
        load_mnist(tmp_path, download=False, md5s=md5s)


def test_labels_must_be_digits(tmp_path, tiny):
    _, contents, _ = tiny
    contents["train-labels-idx1-ubyte"] = idx_bytes(np.array([1, 2, 10, 3, 4, 5], np.uint8))
    md5s = {name: md5(raw) for name, raw in contents.items()}
    write_files(tmp_path, contents)
    with pytest.raises(MNISTError, match="labels must be digits 0..9; found 10"):
        load_mnist(tmp_path, download=False, md5s=md5s)


def test_md5_mismatch_is_an_error_and_keeps_the_users_file(tmp_path, tiny):
    _, contents, md5s = tiny
    raw = bytearray(contents["t10k-images-idx3-ubyte"])
    raw[-1] ^= 0xFF  # same length, one pixel changed
    contents["t10k-images-idx3-ubyte"] = bytes(raw)
    write_files(tmp_path, contents)
    expected = md5s["t10k-images-idx3-ubyte"]
    with pytest.raises(MNISTError, match=f"t10k-images-idx3-ubyte.gz: MD5 .* expected {expected}"):
        load_mnist(tmp_path, download=False, md5s=md5s)
    assert (tmp_path / "t10k-images-idx3-ubyte.gz").exists()


def test_truncated_gzip(tmp_path, tiny):
    _, contents, md5s = tiny
    write_files(tmp_path, contents)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    message = "train-images-idx3-ubyte.gz: the gzip stream is truncated or corrupt"
    with pytest.raises(MNISTError, match=message):
        load_mnist(tmp_path, download=False, md5s=md5s)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(at=st.integers(0, 10_000), mode=st.sampled_from(["cut", "flip"]))
def test_damaged_gzip_never_escapes_as_another_error(tmp_path, at, mode):
    """Cut or flip a byte anywhere: the same data comes back, or an MNISTError names the file."""
    array = np.arange(120, dtype=np.uint8).reshape(6, 4, 5)
    raw = idx_bytes(array)
    stream = bytearray(gzip.compress(raw))
    if mode == "cut":
        stream = stream[: at % len(stream)]
    else:
        stream[at % len(stream)] ^= 0x5A
    path = tmp_path / "x.gz"
    path.write_bytes(bytes(stream))
    try:
        got = read_idx(path, md5=md5(raw), ndim=3, dtype=np.uint8)
    except MNISTError as e:
        assert str(path) in str(e)
    else:  # a flip in a field gzip ignores (mtime, OS byte)
        np.testing.assert_array_equal(got, array)


def test_read_idx_unreadable_path(tmp_path):
    with pytest.raises(MNISTError, match="cannot read the file"):
        read_idx(tmp_path / "nope")


# --- where files are looked for --------------------------------------------------------------


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NUMBABN_DATA", raising=False)
    assert data.resolve_data_dir() == tmp_path / ".cache/numbabn/mnist"
    monkeypatch.setenv("NUMBABN_DATA", "")
    assert data.resolve_data_dir() == tmp_path / ".cache/numbabn/mnist"
    monkeypatch.setenv("NUMBABN_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir("~/given") == tmp_path / "given"


def test_env_var_is_used_by_load_mnist(monkeypatch, tmp_path, tiny):
    arrays, contents, md5s = tiny
    write_files(tmp_path / "env", contents)
    monkeypatch.setenv("NUMBABN_DATA", str(tmp_path / "env"))
    assert_loaded(load_mnist(download=False, md5s=md5s), arrays)


def test_missing_files_without_download_say_where_to_put_them(tmp_path, tiny):
    _, contents, md5s = tiny
    write_files(tmp_path, {"train-images-idx3-ubyte": contents["train-images-idx3-ubyte"]})
    with pytest.raises(MNISTError) as info:
        load_mnist(tmp_path, download=False, md5s=md5s)
    message = str(info.value)
    for name in list(MNIST_FILES)[1:]:
        assert f"{name}.gz" in message
    assert "train-images" not in message
    for hint in [str(tmp_path), "NUMBABN_DATA", "--data-dir", "download=False"]:
        assert hint in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-images-idx3-ubyte.gz"]


# --- downloads from a local server --------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (behaviour, body)``; 404 for anything else."""

    def do_GET(self):
        self.server.requests.append(self.path)
        behaviour, body = self.server.routes.get(self.path, (404, b""))
        if isinstance(behaviour, int):
            self.send_error(behaviour)
        elif behaviour == "hang":
            time.sleep(3.0)
        elif behaviour == "chunked-cut":  # one whole chunk, then half of the next
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = len(body) // 2
            self.wfile.write(b"%x\r\n%s\r\n%x\r\n%s" % (half, body[:half], half, body[half:-1]))
            self.close_connection = True
        else:
            self.send_response(200)
            if behaviour != "no-length":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if behaviour == "ok" else body[: len(body) // 2])
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1; ``server.base`` is its URL, ``server.routes`` what it serves."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes, httpd.requests = {}, []
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def serve(server, mirror, contents, behaviour="ok", only=None):
    for name, raw in contents.items():
        if only is None or name in only:
            server.routes[f"/{mirror}/{name}.gz"] = (behaviour, gzip.compress(raw))


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def files_in(directory: Path) -> list[str]:
    """Every entry, hidden temporary files included."""
    return sorted(p.name for p in directory.iterdir())


ALL_GZ = sorted(f"{name}.gz" for name in MNIST_FILES)


def test_download_into_empty_cache_then_reuse(tmp_path, server, tiny, capsys):
    arrays, contents, md5s = tiny
    serve(server, "m1", contents)
    cache = tmp_path / "cache/mnist"
    result = load_mnist(cache, mirrors=[f"{server.base}/m1/"], md5s=md5s, progress=True)
    assert_loaded(result, arrays)
    assert files_in(cache) == ALL_GZ
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err  # the progress bar
    assert len(server.requests) == 4

    server.routes.clear()  # a second load is offline
    assert_loaded(load_mnist(cache, mirrors=[f"{server.base}/m1/"], md5s=md5s), arrays)
    assert len(server.requests) == 4


def test_download_without_progress_writes_nothing_to_stderr(tmp_path, server, tiny, capsys):
    _, contents, md5s = tiny
    serve(server, "m1", contents)
    load_mnist(tmp_path, mirrors=[f"{server.base}/m1"], md5s=md5s, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_only_missing_files_are_downloaded(tmp_path, server, tiny):
    arrays, contents, md5s = tiny
    name = "train-images-idx3-ubyte"
    write_files(tmp_path, {name: contents[name]}, gz=False)
    serve(server, "m1", contents)
    result = load_mnist(tmp_path, mirrors=[f"{server.base}/m1/"], md5s=md5s, progress=False)
    assert_loaded(result, arrays)
    assert "/m1/train-images-idx3-ubyte.gz" not in server.requests
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "behaviour, message",
    [
        ("corrupt", "MD5 of the decompressed contents"),
        ("truncate", r"transfer cut short: received \d+ of \d+ bytes"),  # < Content-Length
        ("no-length", "gzip stream is truncated or corrupt"),  # closes early, no length sent
        ("chunked-cut", r"transfer cut short: received \d+ bytes and the connection closed"),
    ],
)
def test_bad_download_is_not_kept(tmp_path, server, tiny, behaviour, message):
    _, contents, md5s = tiny
    serve(server, "m1", contents)
    name = "train-labels-idx1-ubyte"
    if behaviour == "corrupt":
        bad = bytearray(contents[name])
        bad[-1] = (bad[-1] + 1) % 10
        serve(server, "m1", {name: bytes(bad)})
    else:
        serve(server, "m1", {name: contents[name]}, behaviour=behaviour)
    with pytest.raises(MNISTError, match=message) as info:
        load_mnist(tmp_path, mirrors=[f"{server.base}/m1/"], md5s=md5s, progress=False)
    assert f"/m1/{name}.gz" in str(info.value)
    assert "NUMBABN_DATA" in str(info.value)
    assert files_in(tmp_path) == sorted(set(ALL_GZ) - {f"{name}.gz"})


def test_falls_through_failing_mirrors(tmp_path, server, tiny, caplog):
    arrays, contents, md5s = tiny
    serve(server, "m1", contents, behaviour=500)
    serve(server, "m2", contents, behaviour="truncate", only=["t10k-images-idx3-ubyte"])
    serve(server, "m3", contents)  # m2 answers 404 for the others
    mirrors = [closed_port_url(), f"{server.base}/m1/", f"{server.base}/m2/", f"{server.base}/m3/"]
    result = load_mnist(tmp_path, mirrors=mirrors, md5s=md5s, progress=False)
    assert_loaded(result, arrays)
    assert files_in(tmp_path) == ALL_GZ
    assert sum(r.startswith("/m3/") for r in server.requests) == 4
    assert "/m1/train-images-idx3-ubyte.gz: download failed: HTTP Error 500" in caplog.text


def test_slow_mirror_times_out(tmp_path, server, tiny):
    arrays, contents, md5s = tiny
    serve(server, "slow", contents, behaviour="hang", only=["train-labels-idx1-ubyte"])
    serve(server, "m2", contents)
    mirrors = [f"{server.base}/slow/", f"{server.base}/m2/"]
    start = time.perf_counter()
    result = load_mnist(tmp_path, mirrors=mirrors, md5s=md5s, progress=False, timeout=0.2)
    assert_loaded(result, arrays)
    assert time.perf_counter() - start < 2.5  # the server hangs for 3 s
    assert "/m2/train-labels-idx1-ubyte.gz" in server.requests


def test_all_mirrors_failing_names_each_failure(tmp_path, server, tiny):
    _, contents, md5s = tiny
    serve(server, "m1", contents, behaviour=500)
    mirrors = [f"{server.base}/m1/", f"{server.base}/m2/", closed_port_url(), "nonsense"]
    with pytest.raises(MNISTError) as info:
        load_mnist(tmp_path, mirrors=mirrors, md5s=md5s, progress=False)
    message = str(info.value)
    for name in MNIST_FILES:
        assert f"/m1/{name}.gz: download failed: HTTP Error 500" in message
        assert f"/m2/{name}.gz: download failed: HTTP Error 404" in message
        assert f"/{name}.gz: download failed: [Errno 111] Connection refused" in message
        assert f"nonsense/{name}.gz: download failed: ValueError: unknown url type" in message
    for hint in [str(tmp_path), "NUMBABN_DATA", "--data-dir"]:
        assert hint in message
    assert files_in(tmp_path) == []


def test_download_file_leaves_existing_dest_alone_on_failure(tmp_path, server, tiny):
    _, contents, md5s = tiny
    name = "t10k-labels-idx1-ubyte"
    serve(server, "m1", contents, behaviour="truncate")
    dest = tmp_path / f"{name}.gz"
    dest.write_bytes(b"old")
    with pytest.raises(MNISTError, match="cut short"):
        download_file(f"{server.base}/m1/{name}.gz", dest, md5s[name], progress=False)
    assert dest.read_bytes() == b"old"
    assert files_in(tmp_path) == [dest.name]

    serve(server, "m1", contents)
    assert download_file(f"{server.base}/m1/{name}.gz", dest, md5s[name], progress=False) == dest
    assert gzip.decompress(dest.read_bytes()) == contents[name]
    assert files_in(tmp_path) == [dest.name]


def test_unwritable_cache_is_a_clear_error(tmp_path, tiny):
    _, _, md5s = tiny
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(MNISTError, match="Cannot create it"):
        load_mnist(blocker / "mnist", mirrors=[], md5s=md5s)


# --- the real data set ------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST not found at {SHARED_MNIST}")
def test_real_mnist_from_shared():
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_mnist(SHARED_MNIST, download=False)
    seconds = time.perf_counter() - start
    assert x_train.shape == (60000, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    for a in (x_train, y_train, x_test, y_test):
        assert a.dtype == np.uint8
    for y in (y_train, y_test):
        assert set(np.unique(y)) == set(range(10))
    assert x_train.max() == 255 and x_train.min() == 0
    assert seconds < 5.0, f"loading took {seconds:.2f} s"


# --- where MNIST is found: explicit > $NUMBABN_DATA > cache > shipped copy -------------------


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Four directories, each holding its own tiny data set (another seed), as the explicit
    directory, $NUMBABN_DATA, the cache (under a fake HOME) and the shipped copy."""
    dirs = {
        "argument": tmp_path / "given",
        "$NUMBABN_DATA": tmp_path / "env",
        "cache": tmp_path / "home/.cache/numbabn/mnist",
        "shipped": tmp_path / "site-packages/numbabn/mnist/dataset",
    }
    sets = {}
    for seed, (origin, directory) in enumerate(dirs.items()):
        arrays, contents = tiny_mnist(seed=seed)
        write_files(directory, contents)
        sets[origin] = arrays, {name: md5(raw) for name, raw in contents.items()}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NUMBABN_DATA", str(dirs["$NUMBABN_DATA"]))
    monkeypatch.setattr(data, "SHIPPED_DATA_DIR", dirs["shipped"])
    return dirs, sets


def test_search_order_explicit_env_cache_shipped(places, monkeypatch):
    dirs, sets = places

    def loads(origin, data_dir=None):
        arrays, md5s = sets[origin]
        assert data.find_mnist(data_dir) == (dirs[origin], origin)
        assert_loaded(load_mnist(data_dir, download=False, md5s=md5s), arrays)

    loads("argument", dirs["argument"])
    loads("$NUMBABN_DATA")
    monkeypatch.setenv("NUMBABN_DATA", "")  # empty counts as unset
    loads("cache")
    (dirs["cache"] / "t10k-labels-idx1-ubyte.gz").unlink()  # an incomplete cache is passed over
    loads("shipped")
    monkeypatch.delenv("NUMBABN_DATA")
    loads("shipped")


def test_explicit_dirs_are_used_even_when_incomplete(places, monkeypatch):
    dirs, sets = places
    (dirs["$NUMBABN_DATA"] / "t10k-labels-idx1-ubyte.gz").unlink()
    _, md5s = sets["$NUMBABN_DATA"]
    with pytest.raises(MNISTError, match=r"missing from .*env: t10k-labels-idx1-ubyte\.gz"):
        load_mnist(download=False, md5s=md5s)
    empty = dirs["argument"].parent / "empty"
    with pytest.raises(MNISTError, match="missing from"):
        load_mnist(empty, download=False, md5s=md5s)


def test_without_a_shipped_copy_the_cache_is_the_download_target(places, monkeypatch, tmp_path):
    dirs, sets = places
    monkeypatch.delenv("NUMBABN_DATA")
    monkeypatch.setattr(data, "SHIPPED_DATA_DIR", tmp_path / "stripped")
    (dirs["cache"] / "t10k-labels-idx1-ubyte.gz").unlink()
    assert data.find_mnist() == (dirs["cache"], "cache")
    with pytest.raises(MNISTError, match=r"t10k-labels-idx1-ubyte\.gz.*download=False"):
        load_mnist(download=False, md5s=sets["cache"][1])


def test_corrupted_shipped_copy_is_refused(places, monkeypatch):
    dirs, sets = places
    monkeypatch.delenv("NUMBABN_DATA")
    monkeypatch.setenv("HOME", str(dirs["argument"].parent / "nohome"))
    _, md5s = sets["shipped"]
    # A well-formed IDX file with one pixel changed: only the MD5 can tell.
    path = dirs["shipped"] / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[-1] ^= 0x01
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(MNISTError) as info:
        load_mnist(md5s=md5s, mirrors=[])
    message = str(info.value)
    assert str(path) in message and "MD5 of the decompressed contents" in message
    assert "installed with numbabn" in message and "reinstall numbabn" in message
    assert gzip.decompress(path.read_bytes()) == bytes(raw)  # refused, not replaced


def test_shipped_mnist_is_complete_and_verified(monkeypatch, tmp_path):
    # The real copy in the package: found with nothing configured, and it passes the MD5s.
    monkeypatch.delenv("NUMBABN_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.SHIPPED_DATA_DIR.parent == Path(data.__file__).resolve().parent
    assert data.find_mnist() == (data.SHIPPED_DATA_DIR, "shipped")
    assert sorted(p.name for p in data.SHIPPED_DATA_DIR.glob("*.gz")) == ALL_GZ
    x_train, y_train, x_test, y_test = load_mnist(download=False)
    assert x_train.shape == (60000, 28, 28) and y_test.shape == (10000,)
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or cached


def test_download_without_tqdm_warns_and_still_works(tmp_path, server, tiny, monkeypatch, caplog, capsys):
    arrays, contents, md5s = tiny
    serve(server, "m1", contents)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    result = load_mnist(tmp_path, mirrors=[f"{server.base}/m1/"], md5s=md5s, progress=True)
    assert_loaded(result, arrays)
    assert "pip install 'numbabn[train]'" in caplog.text
    assert capsys.readouterr().err == ""
