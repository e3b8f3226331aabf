"""Same as the ``numbabn-mnist`` command: ``PYTHONPATH=. python scripts/train_mnist.py --help``."""

from numbabn.mnist.train import cli

if __name__ == "__main__":
    cli()
