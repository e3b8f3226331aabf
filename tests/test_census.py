"""The shape census of ``benchmarks/census.py``: the architectures' layer counts
(as their published definitions have them), and every implementation validated
on small stand-ins of its cases (the benchmarks time the full shapes)."""

import numpy as np
import pytest

from benchmarks import census as cs


def _layers(name):
    return list(cs.MODELS[name]())


@pytest.mark.parametrize("name,count", [
    ("resnet18-cifar b32", 20),  # 1 stem + 8 blocks x 2 + 3 shortcuts
    ("resnet50 b8", 53),  # torchvision's resnet50: 53 BatchNorm2d
    ("densenet121-cifar b32", 120),  # 58 dense layers x 2 + 3 transitions + final
    ("mobilenetv2-cifar b32", 57),  # stem + 17 blocks x 3 + 4 shortcuts + head
    ("bert-base b32x128", 25),  # 12 layers x 2 + embeddings
])
def test_architecture_layer_counts(name, count):
    assert len(_layers(name)) == count


def test_shapes_follow_the_architectures():
    r18 = _layers("resnet18-cifar b32")
    assert r18[0] == ("batch", (32, 64, 32, 32)) and r18[-1] == ("batch", (32, 512, 4, 4))
    mb = _layers("mobilenetv2-cifar b128")
    assert ("batch", (128, 960, 4, 4)) in mb and mb[-1] == ("batch", (128, 1280, 4, 4))
    r50 = _layers("resnet50 b32")
    assert r50[0] == ("batch", (32, 64, 112, 112)) and r50[-1] == ("batch", (32, 2048, 7, 7))
    gn = _layers("resnet50-gn b8")
    assert all(e[0] == "group" and e[2] == 32 and e[1][1] % 32 == 0 for e in gn)
    dn = _layers("densenet121-cifar b32")
    assert dn[-1] == ("batch", (32, 1024, 4, 4))


def test_census_counts_uses_and_layouts():
    cases = cs.census(["resnet18-cifar b32"])
    # 4 distinct BN shapes x 2 layouts x 2 dtypes; uses add up to the 20 layers per variant
    assert len(cases) == 16
    f32 = [c for c in cases if c.layout == "NCHW" and c.dtype == "float32"]
    assert sum(c.uses for c in f32) == 20
    assert {c.layout for c in cs.census(["bert-base b32x128"])} == {"rows"}


SMALL = [
    cs.CensusCase("batch", (4, 6, 3, 3), "NCHW", "float32"),
    cs.CensusCase("batch", (4, 6, 3, 3), "NHWC", "float64"),
    cs.CensusCase("batch", (8, 5), "rows", "float32"),
    cs.CensusCase("layer", (6, 16), "rows", "float32"),
    cs.CensusCase("rms", (6, 16), "rows", "float64"),
    cs.CensusCase("group", (2, 8, 3, 3), "NCHW", "float32", groups=4),
    cs.CensusCase("group", (2, 8, 3, 3), "NHWC", "float32", groups=2),
    cs.CensusCase("instance", (2, 4, 5, 5), "NCHW", "float32"),
]


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.label)
def test_every_implementation_validates(case):
    inp = cs.CensusInputs(case)
    if case.layout == "NHWC":
        assert inp.x.strides[1] == inp.x.itemsize  # channels innermost in memory
    for op in case.ops:
        ref = cs.reference(op, inp)
        fns = cs.implementations(op, inp, threads=1)
        assert "numbabn" in fns
        for name, fn in fns.items():
            cs.validate(op, name, fn(), ref, case.dtype)


def test_validate_rejects_a_wrong_result():
    inp = cs.CensusInputs(SMALL[0])
    ref = cs.reference("eval", inp)
    with pytest.raises(AssertionError):
        cs.validate("eval", "numbabn", (np.asarray(ref[0]) * 1.01,), ref, "float32")
