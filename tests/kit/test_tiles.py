"""The register tiles are chosen from the features of the CPU Numba compiles for."""

import llvmlite.binding as llvm

from numbabn.kit._kernels import tiles

# Feature strings as llvmlite's get_host_cpu_features().flatten() gives them:
# a "-" entry is a feature the CPU lacks (AMD Zen 3: AVX2, no AVX-512).
ZEN3 = ("+sse2,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,-avx512f,-avx512bw,-avx512cd,-avx512dq,"
        "-avx512vl,-avx512bf16,+popcnt")
ZEN4 = ("+sse2,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+avx512f,+avx512bw,+avx512cd,+avx512dq,"
        "+avx512vl,+avx512bf16,+popcnt")


def test_a_disabled_avx512f_is_not_avx512():
    assert "avx512f" not in tiles.enabled_features(ZEN3)
    assert not tiles.tiles_fit("znver3", ZEN3)
    # even with a CPU name that has AVX-512, an explicit -avx512f wins
    assert not tiles.tiles_fit("skylake-avx512", ZEN3)


def test_avx512f_enables_the_tiles():
    assert "avx512f" in tiles.enabled_features(ZEN4)
    assert tiles.tiles_fit("znver4", ZEN4)
    assert tiles.tiles_fit("generic", "+avx2,+avx512f")


def test_without_a_feature_string_the_cpu_name_decides():
    assert tiles.tiles_fit("skylake-avx512", "")
    assert tiles.tiles_fit("znver4", "")
    assert not tiles.tiles_fit("haswell", "")
    assert not tiles.tiles_fit("znver3", "+avx2,+fma")


def test_the_choice_here_follows_this_host():
    features = llvm.get_host_cpu_features().flatten()
    name, compiled = tiles._compile_target()
    expected = tiles.tiles_fit(name, compiled)
    assert tiles.DIRECT_CONV_CPU == (expected and tiles._cg is not None)
    if compiled == features:  # no NUMBA_CPU_FEATURES override
        assert tiles.DIRECT_CONV_CPU == ("avx512f" in tiles.enabled_features(features))
