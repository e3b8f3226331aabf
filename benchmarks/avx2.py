"""Run a command as on an AVX2 CPU without AVX-512, on any x86 host.

    PYTHONPATH=. python -m benchmarks.avx2 python scripts/bench_train.py --both-paths

Numba compiles for ``NUMBA_CPU_NAME=haswell`` *and* ``NUMBA_CPU_FEATURES``: the
host's features with every AVX-512 (and AMX, AVX10) feature turned off.  The
name alone is not enough: Numba's JIT takes the host's feature string whenever
``NUMBA_CPU_FEATURES`` is unset, so ``haswell`` with the host's ``+avx512f``
still emits AVX-512.  Kernels go to their own cache folder
(``~/.cache/numbabn-avx2`` or ``$NUMBABN_AVX2_CACHE``), and PyTorch and OpenBLAS
are pinned to AVX2 alike (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``OPENBLAS_CORETYPE=Haswell``).
"""

from __future__ import annotations

import os
import sys

_OFF = ("avx512", "amx", "avx10", "evex512")


def avx2_features(host_features: str) -> str:
    """``host_features`` (an LLVM feature string) with AVX-512 and later turned off."""
    out = []
    for entry in host_features.split(","):
        name = entry.strip().lstrip("+-")
        if name:
            out.append(("-" if name.startswith(_OFF) else entry.strip()[0]) + name)
    return ",".join(out)


def avx2_environ(environ=None) -> dict:
    import llvmlite.binding as llvm

    env = dict(os.environ if environ is None else environ)
    env.update({
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": avx2_features(llvm.get_host_cpu_features().flatten()),
        "NUMBA_CACHE_DIR": env.get("NUMBABN_AVX2_CACHE",
                                   os.path.expanduser("~/.cache/numbabn-avx2")),
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
    })
    return env


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(__doc__)
    os.execvpe(argv[0], argv, avx2_environ())


if __name__ == "__main__":
    main()
