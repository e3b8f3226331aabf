"""Conv/Linear + BatchNorm fusion (``torch.ao.quantization.fuse_modules``) on
models whose BatchNorm layers are numbabn's.

``fuse_modules`` looks fusers up by the exact classes of the modules, so it
refuses numbabn's layers.  On import, this adds to PyTorch's table of default
fusers, for each pattern with a ``torch.nn.BatchNorm1d/2d/3d``, the same
pattern with numbabn's layer; its fuser makes the layer PyTorch's class again
(:func:`restore_batchnorm`: the same object, parameters and buffers) and calls
PyTorch's fuser.  Eval-mode fusion folds the layer into the convolution
(``torch.nn.utils.fuse_conv_bn_eval``, which takes numbabn's layers as they
are); training-mode (QAT) fusion and BN+ReLU give PyTorch's fused modules.
"""

from __future__ import annotations

from ._modules import RESTORE, SWAP


def _fuser_on_stock(fuser):
    def fuse(is_qat, *modules):
        for m in modules:
            stock = RESTORE.get(type(m))
            if stock is not None:
                m.__class__ = stock
        return fuser(is_qat, *modules)

    fuse.__name__ = f"numbabn_{getattr(fuser, '__name__', 'fuser')}"
    return fuse


def register_fusers() -> bool:
    """Add numbabn's layers to ``fuse_modules``' default fusers; returns whether
    PyTorch's table was found (it is private and may move)."""
    try:
        from torch.ao.quantization import fuser_method_mappings as fmm

        table = fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    except (ImportError, AttributeError):
        return False
    for pattern, fuser in list(table.items()):
        if any(t in SWAP for t in pattern):
            ours = tuple(SWAP.get(t, t) for t in pattern)
            table.setdefault(ours, _fuser_on_stock(fuser))
    return True
