"""What batch normalization does, measured: the tutorials' claims on MNIST.

A grid of short, seeded runs of the batch-norm paper's MLP, one panel (and one
PNG) per claim: higher learning rates, poorer initialisation, gradient
stability, regularisation, small batches (:mod:`numbabn.mnist.claims`).

    PYTHONPATH=. python scripts/bn_claims.py --quick     # the reduced grid, under 5 minutes on 2 cores
    PYTHONPATH=. python scripts/bn_claims.py             # the full grid, under an hour

Writes ``claims.json`` (every run's settings and measurements, the verdicts) and
``claim_<panel>.png`` to ``--out`` (default ``runs/bn_claims``), and prints a
table saying for each claim whether the data support it.
"""

import sys

from numbabn.mnist.claims import main

if __name__ == "__main__":
    sys.exit(main())
