"""GPU backend: numba.cuda kernels (``kernels``), host drivers with the same
names and signatures as :mod:`numbabn._cpu.feature_ops` (``ops``), and the device-array
twin of :mod:`numbabn._layout` (``layout``).

Importing this package imports ``numba.cuda``; :mod:`numbabn._backend` does so
only when a device array is first seen.
"""
