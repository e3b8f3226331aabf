"""The package's layering, checked by import-linter's contracts in pyproject.toml:
the MNIST app over the layer kit over the normalization library, the CPU and GPU
backends independent, no import cycles inside any package."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(capsys):
    cli = pytest.importorskip("importlinter.cli")
    cwd = os.getcwd()
    os.chdir(ROOT)  # lint-imports reads ./pyproject.toml
    try:
        status = cli.lint_imports(no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "0 broken" in out and "3 kept" in out, out
