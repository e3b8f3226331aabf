"""Softmax cross-entropy with a stable log-sum-exp."""

from __future__ import annotations

import numpy as np

from .._validate import FLOAT_DTYPES, describe


def log_softmax(logits):
    """``logits - logsumexp(logits, axis=1)``, shifting by the row maximum so
    nothing overflows.

    Parameters
    ----------
    logits : ndarray ``(N, K)``, float32 or float64

    Returns
    -------
    ndarray ``(N, K)`` of the logits' dtype
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy(logits, targets):
    """Mean softmax cross-entropy and its gradient with respect to ``logits``.

    Parameters
    ----------
    logits : ndarray ``(N, K)``, float32 or float64
        Unnormalised class scores.
    targets : ndarray ``(N,)`` of ints in ``[0, K)``
        Class indices.

    Returns
    -------
    loss : float
        ``-mean(log_softmax(logits)[i, targets[i]])``, as
        ``torch.nn.functional.cross_entropy``.
    dlogits : ndarray ``(N, K)`` of the logits' dtype
        ``(softmax(logits) - onehot(targets)) / N``.

    Examples
    --------
    >>> loss, dlogits = cross_entropy(model.forward(x), y)
    >>> model.backward(dlogits)
    """
    if not isinstance(logits, np.ndarray) or logits.dtype not in FLOAT_DTYPES or logits.ndim != 2 \
            or logits.size == 0:
        raise TypeError(f"logits must be a non-empty (N, K) float32 or float64 ndarray; got {describe(logits)}.")
    targets = np.asarray(targets)
    n, k = logits.shape
    if targets.shape != (n,) or targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be an integer array of shape ({n},); got {describe(targets)}.")
    if targets.min() < 0 or targets.max() >= k:
        raise ValueError(f"targets must be class indices in [0, {k}); got values in "
                         f"[{targets.min()}, {targets.max()}].")
    logp = log_softmax(logits)
    rows = np.arange(n)
    loss = -float(np.mean(logp[rows, targets], dtype=np.float64))
    dlogits = np.exp(logp)
    dlogits[rows, targets] -= 1.0
    dlogits /= n
    return loss, dlogits
