"""pytest-benchmark suite: ``pytest benchmarks/`` (not part of the normal ``pytest``
run, whose ``testpaths`` is ``tests``).  Cases and implementations live in
``benchmarks/cases.py``, shared with ``scripts/bench_report.py``."""

import pytest

from benchmarks.cases import set_torch_threads


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    set_torch_threads()
