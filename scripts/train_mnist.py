"""Same as the ``numbabn-mnist`` command: ``PYTHONPATH=. python scripts/train_mnist.py --help``."""

import sys

from numbabn.train import main

if __name__ == "__main__":
    sys.exit(main())
