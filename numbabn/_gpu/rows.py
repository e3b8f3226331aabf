"""numba.cuda per-row kernels and host drivers: the twins of :mod:`numbabn._cpu.rows`
(work in progress)."""
