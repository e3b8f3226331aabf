"""Shared pytest set-up.

GPU tests run under the CUDA simulator unless told otherwise: a plain ``pytest``
sets ``NUMBA_ENABLE_CUDASIM=1`` here, before anything imports ``numba.cuda``
(the flag is read once, when ``numba.cuda`` is first imported).  To run them on
a real GPU, say so explicitly: ``NUMBA_ENABLE_CUDASIM=0 pytest``.
"""

import os
import sys

if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules and "numba.cuda" not in sys.modules:
        from numba.core import config

        config.reload_config()  # numba was imported first (by a plugin, say)
