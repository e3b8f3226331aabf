"""Numba kernels of the layer kit, one module per layer family: ``im2col``
(the BLAS path of Conv2d and Linear), ``tiles`` (direct convolutions and linear
layers on AVX-512 or AVX2 register tiles), ``pooling``, ``activation`` and ``dropout``.
Private: inputs arrive checked."""
