"""The layer kit's fixtures: Conv2d and Linear on the register tiles of either
vector width."""

import pytest

from numbabn.kit import conv, linear
from numbabn.kit._kernels import tiles


@pytest.fixture(params=[16, 8], ids=["16-lanes", "8-lanes"])
def tile_kernels(request, monkeypatch):
    """The tile kernels of one vector width, AVX-512's 16 floats or AVX2's 8, as
    Conv2d's and Linear's: the host's own width, or :func:`tiles.with_lanes`'
    build of the other (AVX2 code runs on an AVX-512 host; on an AVX2 host the
    16-lane tiles split each vector in two)."""
    if not tiles.DIRECT_CONV_CPU:
        pytest.skip("the register tiles need AVX2 and FMA or AVX-512 (and a Numba they were checked with)")
    kernels = tiles.with_lanes(request.param)
    monkeypatch.setattr(conv, "_tiles", kernels)
    monkeypatch.setattr(linear, "_tiles", kernels)
    return kernels
