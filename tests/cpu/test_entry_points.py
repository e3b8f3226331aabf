"""Helpers (the kernel modules' dispatchers named with a leading underscore)
are compiled without Numba's Python and C entry points, and nothing calls them
from Python: calling such a function from Python would crash the process
rather than raise.  Every other dispatcher keeps its entry points."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import numbabn

KERNEL_MODULES = ["numbabn._cpu.feature_kernels", "numbabn._cpu.row_kernels", "numbabn._cpu.half",
                  "numbabn.kit.optim", "numbabn.kit._kernels.activation",
                  "numbabn.kit._kernels.dropout", "numbabn.kit._kernels.im2col",
                  "numbabn.kit._kernels.pooling", "numbabn.kit._kernels.tiles"]
PACKAGE = Path(numbabn.__file__).parent


def _dispatchers(module):
    mod = importlib.import_module(module)
    serial = vars(mod.serial) if hasattr(mod, "serial") else {}
    out = {}
    for space in (vars(mod), serial):
        for name, obj in space.items():
            if hasattr(obj, "targetoptions") and hasattr(obj, "py_func"):
                if obj.py_func.__module__ == module:
                    out[obj.py_func.__qualname__] = obj
    return out


def _has_entry_points(kernel):
    return not (kernel.targetoptions.get("no_cpython_wrapper")
                or kernel.targetoptions.get("no_cfunc_wrapper"))


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_helpers_have_no_entry_points_and_kernels_have_them(module):
    kernels = _dispatchers(module)
    assert kernels
    for name, kernel in kernels.items():
        assert _has_entry_points(kernel) is not name.startswith("_"), name


def test_the_statistics_core_compiles_as_helpers():
    from numbabn import _core
    from numbabn._cpu import feature_kernels as fk

    core = [obj for obj in vars(fk).values()
            if getattr(getattr(obj, "py_func", None), "__module__", None) == _core.__name__]
    assert len(core) >= 8
    assert not any(_has_entry_points(kernel) for kernel in core)


def _helper_names():
    return {name for module in KERNEL_MODULES for name, kernel in _dispatchers(module).items()
            if not _has_entry_points(kernel)}


def test_no_python_code_calls_a_helper():
    helpers = _helper_names()
    assert "_chunk_sums_nc" in helpers and "_pcg_output" in helpers
    kernel_files = {Path(inspect.getfile(importlib.import_module(m))) for m in KERNEL_MODULES}
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            # an attribute access to a helper from anywhere (``k._helper(...)``)
            if isinstance(node, ast.Attribute) and node.attr in helpers:
                found.append(f"{path.name}: .{node.attr}")
        if path in kernel_files:  # a plain Python function of a kernel module calling one
            for fn in tree.body:
                if isinstance(fn, ast.FunctionDef) and not any(
                        "njit" in ast.unparse(d) or "overload" in ast.unparse(d)
                        for d in fn.decorator_list):
                    for sub in ast.walk(fn):
                        if isinstance(sub, ast.Call) and ast.unparse(sub.func) in helpers:
                            found.append(f"{path.name}: {fn.name} calls {ast.unparse(sub.func)}")
    assert not found
