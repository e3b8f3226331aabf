"""Packaging: NumPy and Numba are the only core dependencies, nothing optional is imported
by ``import numbabn``, MNIST ships as package data, and CI runs the README's commands."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("tqdm", "matplotlib", "torch", "mpi4py")


def _optional_imported_by(*modules):
    code = (f"import sys\nimport {', '.join(modules)}\n"
            f"import json; print(json.dumps([m for m in {OPTIONAL!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_numbabn_and_layers_imports_nothing_optional():
    assert _optional_imported_by("numbabn", "numbabn.layers") == []


def test_trainer_modules_import_their_extras_lazily():
    assert _optional_imported_by("numbabn.mnist.data", "numbabn.mnist.train", "numbabn.mnist.models") == []


def test_distributed_imports_mpi4py_only_when_used():
    assert _optional_imported_by("numbabn.distributed") == []


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_core_dependencies_are_numpy_and_numba_only(pyproject):
    names = [re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in pyproject["project"]["dependencies"]]
    assert names == ["numpy", "numba"]
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["train"] == ["tqdm>=4.60", "matplotlib>=3.7"]
    assert extras["mpi"] == ["mpi4py>=4", "mpich", "threadpoolctl>=3"]
    assert pyproject["project"]["scripts"]["numbabn-mnist"] == "numbabn.mnist.cli:cli"


def test_mnist_is_package_data(pyproject):
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["numbabn*"]
    patterns = pyproject["tool"]["setuptools"]["package-data"]["numbabn"]
    shipped = {p.relative_to(ROOT / "numbabn").as_posix() for pattern in patterns
               for p in (ROOT / "numbabn").glob(pattern)}
    assert {f"mnist/dataset/{split}-{kind}.gz" for split in ("train", "t10k")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")} <= shipped
    assert "mnist/dataset/README.md" in shipped  # the data set's credit and licence travel with it


def test_ci_runs_the_readme_test_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Tests\n"):]
    block = section[section.index("```bash\n") + 8:]
    block = block[:block.index("```")].strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    after = ci[ci.index("verbatim"):].splitlines()[1:]
    commands = [line for line in after if line.strip() and not line.startswith("#")]
    assert commands == block
    assert "pip install -e '.[test,train,mpi,half]' torch==2.13.0" in block and block[-1] == "pytest -n 2"
