"""The kernels' inline rule (``runtime.inline_in_serial_code``): a helper is
inlined only into a caller compiled without ``parallel`` and with the same
fast-math flags, so inlining never changes an operation's flags; and no helper
that branches on an argument being None has the rule (Numba prunes such
branches by a function's own argument types, not an inlined local's)."""

import ast
import inspect
from types import SimpleNamespace

import numba
import pytest

from numbabn._cpu import feature_kernels, row_kernels, runtime

MODULES = (feature_kernels, row_kernels)


def _ir(dispatcher_or_func):
    func = getattr(dispatcher_or_func, "py_func", dispatcher_or_func)
    return SimpleNamespace(func_id=SimpleNamespace(func=func))


def _decide(caller, callee):
    return runtime.inline_in_serial_code(None, _ir(caller), _ir(callee))


def _helpers_with_rule(module, own=True):
    return [obj for obj in vars(module).values()
            if hasattr(obj, "py_func")
            and (obj.py_func.__module__ == module.__name__ or not own)
            and obj.targetoptions.get("inline") is runtime.inline_in_serial_code]


def test_strict_helpers_inline_into_strict_serial_callers():
    assert _decide(row_kernels._one_run_block, row_kernels._one_run_sums)
    strict = _helpers_with_rule(row_kernels)
    assert len(strict) > 10
    for caller in strict:
        for callee in strict:
            assert _decide(caller, callee)


@pytest.mark.parametrize("caller", ["backward_one_run", "forward_runs", "backward_runs"])
def test_never_into_a_parallel_kernel(caller):
    assert not _decide(getattr(row_kernels, caller), row_kernels._store_backward)


def test_never_across_fast_math_flags():
    # _block_sums_each reassociates (FASTMATH); _sums_each_blocked is strict
    fast, strict = row_kernels._block_sums_each, row_kernels._sums_each_blocked
    assert fast.targetoptions["fastmath"] != strict.targetoptions["fastmath"]
    assert not _decide(strict, fast)
    assert not _decide(fast, strict)


def test_serial_twins_follow_their_kernels_flags():
    # the twin of a FASTMATH parallel kernel calls strict helpers as functions,
    # the twin of a strict parallel kernel inlines them, as a strict serial caller
    assert not _decide(row_kernels.serial.backward_one_run, row_kernels._one_run_block)
    assert _decide(row_kernels.serial.backward_runs, row_kernels._store_backward)


def test_unknown_functions_are_not_inlined():
    def stranger():
        pass
    assert not _decide(stranger, row_kernels._store_backward)
    assert not _decide(row_kernels._one_run_block, stranger)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_no_helper_with_the_rule_branches_on_none(module):
    helpers = _helpers_with_rule(module, own=False)  # the statistics core's too
    assert helpers
    for h in helpers:
        tree = ast.parse(inspect.getsource(h.py_func))
        nones = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value is None]
        assert not nones, f"{h.py_func.__name__} tests for None and must not be inlined"


def _plain(x):
    return x


def _parallel_caller(x):
    return _plain(x)


def _serial_caller(x):
    return _plain(x)


# Numba empties a ``parallel`` options dict as it reads it: {} is enabled too
_plain_jit = numba.njit(fastmath={"contract"})(_plain)
_emptied = numba.njit(parallel={}, fastmath={"contract"})(_parallel_caller)
_serial = numba.njit(fastmath={"contract"})(_serial_caller)


def test_an_emptied_parallel_option_still_means_parallel():
    assert not runtime.inline_in_serial_code(None, _ir(_emptied), _ir(_plain_jit))
    assert runtime.inline_in_serial_code(None, _ir(_serial), _ir(_plain_jit))


def test_the_statistics_core_inlines_into_strict_serial_callers_only():
    core = feature_kernels.affine_coefs
    assert core.py_func.__module__ == "numbabn._core"
    assert _decide(row_kernels._one_run_block, core)
    assert not _decide(row_kernels.backward_one_run, core)
    assert not _decide(row_kernels._block_sums_each, core)
