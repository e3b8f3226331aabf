"""Parameter initialisation shared by Linear and Conv2d (PyTorch's defaults)."""

import numpy as np


def fan_in_uniform(rng, shape, fan_in, dtype):
    """Draw ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's default for weights
    (``kaiming_uniform_`` with ``a=sqrt(5)``) and for biases."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)
