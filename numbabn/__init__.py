"""numbabn: fast, accurate batch normalization on Numba (CPU) and numba.cuda (GPU).

The functional API works on NumPy arrays of float32 or float64 with any feature
axis; see the README's "Conventions" section for the meaning of every argument.
"""

from .functional import (
    batch_moments,
    batch_norm,
    batch_norm_backward,
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_norm_elemt,
    batch_norm_relu_backward,
    batch_norm_relu_train,
    batch_norm_train,
    batch_stats,
    merge_moments,
    normalize,
    update_running_stats,
)

from .functional import __all__
from .norms import (
    group_norm,
    group_norm_backward,
    group_norm_train,
    instance_norm,
    instance_norm_backward,
    instance_norm_train,
    layer_norm,
    layer_norm_backward,
    layer_norm_train,
    rms_norm,
    rms_norm_backward,
    rms_norm_train,
)
from .norms import __all__ as _norms_all

__all__ = [*__all__, *_norms_all]

__version__ = "0.1.0"
