"""The shape census (``benchmarks/census.py``) as pytest-benchmark groups: one group
per case and operation, numbabn against PyTorch's ATen kernels and ONNX Runtime
(where it has the operator), every result validated against float64 before it is
timed.

    pytest benchmarks/test_bench_census.py -k "resnet or 4, 4"   # a subset
    pytest benchmarks/ --benchmark-disable                        # smoke test: validate only
    PYTHONPATH=. python scripts/bench_census.py                   # the report (ratios, geomeans)
"""

import pytest

from benchmarks.census import IMPLS, CensusInputs, census, implementations, reference, validate

CASES = [(c, op) for c in census() for op in c.ops]
_cache = {}


def _get(case, op):
    key = (case, op)
    if key not in _cache:
        _cache.clear()
        inp = CensusInputs(case)
        _cache[key] = inp, reference(op, inp)
    return _cache[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,op", CASES, ids=[f"{op}-{c.label}".replace(" ", "-") for c, op in CASES])
def test_census(benchmark, case, op, impl):
    inp, ref = _get(case, op)
    fns = implementations(op, inp)
    if impl not in fns:
        pytest.skip(f"{impl} has no {op} for this case or is not installed")
    fn = fns[impl]
    validate(op, impl, fn(), ref, case.dtype)
    benchmark.group = f"census {op} {case.label}"
    benchmark.extra_info["uses"] = case.uses
    benchmark.extra_info["models"] = ", ".join(case.models)
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
