"""numbabn's parallel kernels link their loop wrappers as IR (never optimised
and emitted on their own: ``_numba_private.link_parallel_wrappers_only``);
any other code's parallel kernels compile as Numba compiles them."""

import types

import numba
import numpy as np
import pytest
from numba import prange
from numba.core import codegen

from numbabn import _cache, _numba_private

pytestmark = pytest.mark.skipif(not _cache.LINK_ONLY, reason="an untested Numba: Numba's own way")


def _two_loops(x, y):
    for i in prange(x.shape[0]):
        y[i] = x[i] * 2.0
    s = 0.0
    for i in prange(x.shape[0]):
        s += y[i]
    return s


def _kernel_in(module_name):
    """``_two_loops`` as a function of module ``module_name``, compiled in parallel."""
    f = types.FunctionType(_two_loops.__code__, {"__name__": module_name, "prange": prange},
                           "_two_loops")
    return numba.njit(parallel=True, cache=False)(f)


def _wrappers_emitted(kernel, monkeypatch):
    """Wrapper libraries finalised on their own while ``kernel`` first runs."""
    names = []
    finalize = codegen.CPUCodeLibrary._finalize_final_module

    def spy(self):
        names.append(self.name)
        return finalize(self)

    monkeypatch.setattr(codegen.CPUCodeLibrary, "_finalize_final_module", spy)
    x = np.arange(1000, dtype=np.float64)
    y = np.empty_like(x)
    assert kernel(x, y) == pytest.approx(2 * x.sum())
    np.testing.assert_array_equal(y, 2 * x)
    monkeypatch.undo()
    return [n for n in names if n.startswith(_numba_private._WRAPPER_NAMES)]


def test_a_numbabn_kernel_links_its_wrappers_without_emitting_them(monkeypatch):
    assert _wrappers_emitted(_kernel_in("numbabn._probe"), monkeypatch) == []


def test_other_kernels_compile_as_numba_does(monkeypatch):
    # two loops, each with a gufunc wrapper and a parallel wrapper
    assert len(_wrappers_emitted(_kernel_in("users_code"), monkeypatch)) == 4


def test_setting_up_twice_is_harmless():
    assert _numba_private.link_parallel_wrappers_only() is True
    assert _numba_private.link_parallel_wrappers_only() is True
