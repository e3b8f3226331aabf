"""GPU backend: the twins of :mod:`numbabn._cpu`, file for file and name for
name, on numba device arrays: ``feature_kernels`` / ``feature_ops`` (batch
norm), ``row_kernels`` / ``row_ops`` (the family), ``layout`` (device-array
views) and ``runtime`` (the launch layer, scratch and constants).

Importing this package imports ``numba.cuda``; :mod:`numbabn._backend` does so
only when a device array is first seen.
"""
