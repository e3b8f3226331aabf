"""The parallel kernels' ``parallel=`` options survive compiles: Numba pops
each option of a dict as it reads it, so a shared dict would leave every later
kernel compiled with all options on (fusion included) and change the disk
cache's key in mid-process."""

import subprocess
import sys

import numba
import numpy as np
from numba import prange

from numbabn import _cache, _config


def _twice(x):
    for i in prange(x.shape[0]):
        x[i] *= 2.0
    for i in prange(x.shape[0]):
        x[i] += 1.0


def _options(kernel):
    return kernel.targetoptions["parallel"]


def test_a_compile_leaves_the_options_and_the_cache_key_as_they_were():
    key = _cache.compile_key()
    for options in (_config.CPU_JIT_PARALLEL, _config.CPU_JIT_STRICT_PARALLEL):
        kernel = numba.njit(**dict(options, cache=False))(_twice)
        x = np.ones(64)
        kernel(x)
        assert np.array_equal(x, np.full(64, 3.0))
        assert _options(kernel).fusion is False
    assert _config.CPU_JIT_PARALLEL["parallel"].fusion is False
    assert _cache.compile_key() == key


def test_a_plain_dict_would_be_emptied():
    # what the options object guards against (Numba 0.68)
    options = dict(fusion=False)
    kernel = numba.njit(parallel=options, cache=False)(_twice)
    kernel(np.ones(8))
    assert options == {}


def test_the_cache_key_is_the_same_in_every_process():
    code = "from numbabn import _cache; print(_cache.compile_key())"
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)}
    assert keys == {_cache.compile_key()}
