"""One benchmark group per operation and case: numbabn, plain NumPy, PyTorch (when
installed) and a copy of the same array (the bandwidth ceiling).  Each result is
validated against the float64 reference before it is timed; ``extra_info`` holds
the GB/s of minimal traffic.

    pytest benchmarks/                        # all groups
    pytest benchmarks/ -k "fwd_train and 56"  # a subset
    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=min,median,ops
"""

import pytest

from benchmarks.cases import CASES, IMPLS, OPS, TRAFFIC, Inputs, implementations, reference, validate

_cache = {}


def _get(case, op):
    """Inputs and reference for one case and op, kept while its group runs (they are large)."""
    key = (case, op)
    if key not in _cache:
        _cache.clear()
        inp = Inputs(case)
        _cache[key] = inp, reference(op, inp)
    return _cache[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, op, case, impl):
    inp, ref = _get(case, op)
    fns = implementations(op, inp)
    if impl not in fns:
        pytest.skip(f"{impl} does not apply to {op}" if impl == "numbabn_out" else f"{impl} is not installed")
    fn = fns[impl]
    validate(op, impl, fn(), ref, case.dtype)
    benchmark.group = f"{op} {case.label}"
    benchmark.extra_info["traffic_bytes"] = TRAFFIC[op] * case.nbytes if impl != "copy" else 2 * case.nbytes
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return
    best = benchmark.stats.stats.min
    benchmark.extra_info["gbps"] = round(benchmark.extra_info["traffic_bytes"] / best / 1e9, 2)
