"""The register tiles' vector width comes from the features of the CPU Numba
compiles for; an AVX2 build (Haswell, AVX-512 off) runs the 8-lane tiles."""

import json
import os
import subprocess
import sys

import llvmlite.binding as llvm
import numpy as np
import pytest

from numbabn.kit._kernels import tiles

# Feature strings as llvmlite's get_host_cpu_features().flatten() gives them:
# a "-" entry is a feature the CPU lacks (AMD Zen 3: AVX2, no AVX-512).
ZEN3 = ("+sse2,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,-avx512f,-avx512bw,-avx512cd,-avx512dq,"
        "-avx512vl,-avx512bf16,+popcnt")
ZEN4 = ("+sse2,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+avx512f,+avx512bw,+avx512cd,+avx512dq,"
        "+avx512vl,+avx512bf16,+popcnt")
SANDY_BRIDGE = "+sse2,+avx,-avx2,-fma,-avx512f"


def test_avx2_with_fma_gives_8_lanes():
    assert "avx512f" not in tiles.enabled_features(ZEN3)
    assert tiles.tile_lanes("znver3", ZEN3) == 8
    # even with a CPU name that has AVX-512, an explicit -avx512f wins
    assert tiles.tile_lanes("skylake-avx512", ZEN3) == 8


def test_avx512f_gives_16_lanes():
    assert "avx512f" in tiles.enabled_features(ZEN4)
    assert tiles.tile_lanes("znver4", ZEN4) == 16
    assert tiles.tile_lanes("generic", "+avx2,+avx512f") == 16


def test_no_fused_multiply_add_no_tiles():
    assert tiles.tile_lanes("sandybridge", SANDY_BRIDGE) == 0
    assert tiles.tile_lanes("haswell", "+avx2,-fma") == 0
    assert tiles.tile_lanes("generic", "") == 0


def test_without_a_feature_string_the_cpu_name_decides():
    assert tiles.tile_lanes("skylake-avx512", "") == 16
    assert tiles.tile_lanes("znver4", "") == 16
    assert tiles.tile_lanes("haswell", "") == 8
    assert tiles.tile_lanes("znver3", "+avx2") == 8       # fma from the name
    assert tiles.tile_lanes("sandybridge", "+avx2") == 0  # a name without fma


def test_the_choice_here_follows_this_host():
    features = llvm.get_host_cpu_features().flatten()
    name, compiled = tiles._compile_target()
    lanes = tiles.tile_lanes(name, compiled)
    assert tiles.DIRECT_CONV_CPU == (lanes > 0 and tiles._cg is not None)
    assert tiles.LANES == (lanes or 8)
    if compiled == features:  # no NUMBA_CPU_FEATURES override
        enabled = tiles.enabled_features(features)
        assert lanes == (16 if "avx512f" in enabled else 8 if {"avx2", "fma"} <= enabled else 0)


def test_with_lanes():
    assert tiles.with_lanes(tiles.LANES) is tiles
    other = tiles.with_lanes(24 - tiles.LANES)
    assert other.LANES == 24 - tiles.LANES and other is tiles.with_lanes(other.LANES)
    assert other.conv_forward is not tiles.conv_forward
    with pytest.raises(ValueError, match="lanes must be 8"):
        tiles.with_lanes(4)


_AVX2_BUILD = """
import json, sys
import numpy as np
from numbabn.kit._kernels import tiles
from tests.kit.test_tiles import tile_outputs
outputs = tile_outputs(tiles)
np.savez(sys.argv[1], *outputs)
asm = "".join(tiles.conv_forward.inspect_asm().values())
print(json.dumps({"lanes": tiles.LANES, "direct": tiles.DIRECT_CONV_CPU,
                  "zmm": asm.count("zmm"), "ymm": asm.count("ymm")}))
"""


def tile_outputs(kernels):
    """The forward, input and weight gradient of a convolution and a linear
    layer's forward and gradients on the tiles of ``kernels``, on seeded inputs."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((3, 6, 26, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    dy = rng.standard_normal((3, 6, 26, 32)).astype(np.float32)
    y, dx, dw = np.empty(dy.shape, np.float32), np.empty_like(x), np.empty_like(w)
    kernels.conv_forward(x, w, b, True, 1, 1, 128, y, 2)
    kernels.conv_input_grad(dy, np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2)),
                            1, 1, 128, dx, 2)
    kernels.conv_weight_grad(x, dy, 1, 1, 2, 128, dw)
    xl = rng.standard_normal((9, 528)).astype(np.float32)
    wl = rng.standard_normal((7, 528)).astype(np.float32)
    yl = np.empty((9, 7), np.float32)
    kernels.linear_forward(xl, wl, b[:7], True, 256, yl, 2)
    return y, dx, dw, yl


@pytest.mark.slow
@pytest.mark.skipif(not tiles.DIRECT_CONV_CPU, reason="the register tiles need AVX2 and FMA or AVX-512")
def test_an_avx2_build_runs_the_8_lane_tiles(tmp_path):
    """Compiled for Haswell with AVX-512 off (benchmarks.avx2's environment, an
    empty kernel cache): 8 lanes, no zmm register in the code, and the bits of
    this process's 8-lane tiles."""
    from benchmarks.avx2 import avx2_environ

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = avx2_environ()
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = tmp_path / "outputs.npz"
    done = subprocess.run([sys.executable, "-c", _AVX2_BUILD, str(out)], env=env, cwd=root,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["lanes"] == 8 and report["direct"]
    assert report["zmm"] == 0 and report["ymm"] > 0
    theirs = np.load(out)
    for i, ours in enumerate(tile_outputs(tiles.with_lanes(8))):
        np.testing.assert_array_equal(theirs[f"arr_{i}"], ours)
