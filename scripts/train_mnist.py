"""Same as the ``numbabn-mnist`` command: ``PYTHONPATH=. python scripts/train_mnist.py --help``."""

import os
import sys

# numbabn.train.QUIET_THREAD_POOLS, set before NumPy loads OpenBLAS; the user's settings win.
for _name, _value in {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "passive"}.items():
    os.environ.setdefault(_name, _value)

from numbabn.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
