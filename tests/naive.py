"""Float64 NumPy twins of every numbabn operation: the independent reference.

Written for clarity, not speed: broadcasting over the full array, textbook
formulas, two-pass variance (``np.var``).  ``test_naive.py`` checks the backward
here against central finite differences.
"""

import numpy as np


def _axes(x, axis):
    axis = axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != axis), axis


def _bcast(v, x, axis):
    """Reshape a per-feature vector to broadcast against ``x``."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def batch_stats(x, axis=1):
    red, _ = _axes(x, axis)
    xd = np.asarray(x, dtype=np.float64)
    return xd.mean(axis=red), xd.var(axis=red)


def normalize(x, mean, var, weight=None, bias=None, eps=1e-5, axis=1):
    xd = np.asarray(x, dtype=np.float64)
    y = (xd - _bcast(mean, x, axis)) / np.sqrt(_bcast(var, x, axis) + eps)
    if weight is not None:
        y = y * _bcast(weight, x, axis)
    if bias is not None:
        y = y + _bcast(bias, x, axis)
    return y


def batch_norm_train(x, weight=None, bias=None, eps=1e-5, axis=1):
    mean, var = batch_stats(x, axis)
    y = normalize(x, mean, var, weight, bias, eps, axis)
    return y, mean, 1.0 / np.sqrt(var + eps)


def batch_norm_backward(dy, x, weight=None, eps=1e-5, axis=1):
    """Gradients of ``batch_norm_train`` wrt x, weight, bias (float64).

    Recomputes the batch statistics from ``x``: the textbook formula
    dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
    """
    red, _ = _axes(x, axis)
    xd = np.asarray(x, dtype=np.float64)
    g = np.asarray(dy, dtype=np.float64)
    mean, var = batch_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (xd - _bcast(mean, x, axis)) * _bcast(invstd, x, axis)
    w = np.ones_like(mean) if weight is None else np.asarray(weight, dtype=np.float64)
    dxhat_mean = g.mean(axis=red, keepdims=True)
    proj = (g * xhat).mean(axis=red, keepdims=True)
    dx = _bcast(w * invstd, x, axis) * (g - dxhat_mean - xhat * proj)
    dweight = (g * xhat).sum(axis=red)
    dbias = g.sum(axis=red)
    return dx, dweight, dbias


def update_running_stats(running_mean, running_var, mean, var, count, momentum=0.1):
    """Return the updated (running_mean, running_var), float64; inputs untouched."""
    rm = np.asarray(running_mean, dtype=np.float64)
    rv = np.asarray(running_var, dtype=np.float64)
    unbiased = np.asarray(var, dtype=np.float64) * count / (count - 1)
    return ((1 - momentum) * rm + momentum * np.asarray(mean, dtype=np.float64),
            (1 - momentum) * rv + momentum * unbiased)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, axis=1):
    """Return ``(y, new_running_mean, new_running_var)``; inputs untouched."""
    if not training:
        return (normalize(x, running_mean, running_var, weight, bias, eps, axis),
                running_mean, running_var)
    mean, var = batch_stats(x, axis)
    y = normalize(x, mean, var, weight, bias, eps, axis)
    if running_mean is None:
        return y, None, None
    count = x.size // x.shape[axis]
    rm, rv = update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y, rm, rv


def finite_difference(f, arrays, h=1e-6):
    """Central-difference gradient of scalar ``f()`` wrt each array, in place."""
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        it = np.nditer(a, flags=["multi_index"])
        for _ in it:
            i = it.multi_index
            old = a[i]
            a[i] = old + h
            fp = f()
            a[i] = old - h
            fm = f()
            a[i] = old
            g[i] = (fp - fm) / (2 * h)
        grads.append(g)
    return grads


def batch_renorm_train(x, running_mean, running_var, weight=None, bias=None, eps=1e-5,
                       rmax=3.0, rmin=None, dmax=5.0, axis=1):
    """Batch renormalization's training forward (Ioffe 2017, Algorithm 1), float64:
    returns ``(y, r, d)``; the running statistics are the ones before this step."""
    mu_b, var_b = batch_stats(x, axis)
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    rmin = 1.0 / rmax if rmin is None else rmin
    r = np.clip(sigma_b / sigma, rmin, rmax)
    d = np.clip((mu_b - np.asarray(running_mean, np.float64)) / sigma, -dmax, dmax)
    xhat = (np.asarray(x, np.float64) - _bcast(mu_b, x, axis)) / _bcast(sigma_b, x, axis)
    y = xhat * _bcast(r, x, axis) + _bcast(d, x, axis)
    if weight is not None:
        y = y * _bcast(weight, x, axis)
    if bias is not None:
        y = y + _bcast(bias, x, axis)
    return y, r, d


def batch_renorm_backward(dy, x, r, d, weight=None, eps=1e-5, axis=1):
    """Gradients of :func:`batch_renorm_train` wrt x, weight, bias with ``r`` and
    ``d`` held constant (the paper's stop-gradient)."""
    w = np.ones(x.shape[axis]) if weight is None else np.asarray(weight, np.float64)
    dx, dxhat_sum, dbias = batch_norm_backward(dy, x, w * r, eps, axis)
    return dx, r * dxhat_sum + d * dbias, dbias


# --------------------------------------------------------------------------- #
# Per-row normalizations (layer, group, instance, RMS norm): float64 twins.
# Each works on x seen as (rows, reduced) in logical (C) order.
# --------------------------------------------------------------------------- #
def _row_grads(dy, xd, g, rstd, xhat, center):
    """dx of a per-row normalisation given g = dL/dxhat (rows, reduced):
    ``rstd * (g - mean(g) - xhat * mean(g * xhat))``, without ``mean(g)`` when
    the rows are not centred (RMS norm)."""
    dx = g - xhat * (g * xhat).mean(axis=1, keepdims=True)
    if center:
        dx = dx - g.mean(axis=1, keepdims=True)
    return rstd * dx


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Return ``(y, mean, rstd)``; statistics of shape ``x.shape[:-k] + (1,) * k``."""
    k = len(normalized_shape)
    lead = x.shape[:x.ndim - k]
    x2 = np.asarray(x, dtype=np.float64).reshape(int(np.prod(lead)), -1)
    mean = x2.mean(axis=1, keepdims=True)
    var = x2.var(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    y = (x2 - mean) * rstd
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(1, -1)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(1, -1)
    stat_shape = lead + (1,) * k
    return y.reshape(x.shape), mean.reshape(stat_shape), rstd.reshape(stat_shape)


def layer_norm_backward(dy, x, normalized_shape, weight=None, eps=1e-5):
    """Return ``(dx, dweight, dbias)`` of :func:`layer_norm` (statistics recomputed)."""
    k = len(normalized_shape)
    rows = int(np.prod(x.shape[:x.ndim - k]))
    x2 = np.asarray(x, dtype=np.float64).reshape(rows, -1)
    g2 = np.asarray(dy, dtype=np.float64).reshape(rows, -1)
    mean = x2.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(x2.var(axis=1, keepdims=True) + eps)
    xhat = (x2 - mean) * rstd
    w = np.ones(x2.shape[1]) if weight is None else np.asarray(weight, np.float64).reshape(-1)
    dx = _row_grads(g2, x2, g2 * w, rstd, xhat, True)
    shape = tuple(normalized_shape)
    return (dx.reshape(x.shape), (g2 * xhat).sum(axis=0).reshape(shape),
            g2.sum(axis=0).reshape(shape))


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """Return ``(y, rstd)``; ``eps=None`` is the machine epsilon of x's dtype."""
    eps = np.finfo(np.asarray(x).dtype).eps if eps is None else eps
    k = len(normalized_shape)
    lead = x.shape[:x.ndim - k]
    x2 = np.asarray(x, dtype=np.float64).reshape(int(np.prod(lead)), -1)
    rstd = 1.0 / np.sqrt((x2 * x2).mean(axis=1, keepdims=True) + eps)
    y = x2 * rstd
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(1, -1)
    return y.reshape(x.shape), rstd.reshape(lead + (1,) * k)


def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None):
    """Return ``(dx, dweight)`` of :func:`rms_norm`."""
    eps = np.finfo(np.asarray(x).dtype).eps if eps is None else eps
    k = len(normalized_shape)
    rows = int(np.prod(x.shape[:x.ndim - k]))
    x2 = np.asarray(x, dtype=np.float64).reshape(rows, -1)
    g2 = np.asarray(dy, dtype=np.float64).reshape(rows, -1)
    rstd = 1.0 / np.sqrt((x2 * x2).mean(axis=1, keepdims=True) + eps)
    xhat = x2 * rstd
    w = np.ones(x2.shape[1]) if weight is None else np.asarray(weight, np.float64).reshape(-1)
    dx = _row_grads(g2, x2, g2 * w, rstd, xhat, False)
    return dx.reshape(x.shape), (g2 * xhat).sum(axis=0).reshape(tuple(normalized_shape))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Return ``(y, mean, rstd)``; statistics of shape ``(N, num_groups)``."""
    n, c = x.shape[:2]
    x3 = np.asarray(x, dtype=np.float64).reshape(n * num_groups, -1)
    mean = x3.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(x3.var(axis=1, keepdims=True) + eps)
    y = ((x3 - mean) * rstd).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(per_channel)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(per_channel)
    return y, mean.reshape(n, num_groups), rstd.reshape(n, num_groups)


def group_norm_backward(dy, x, num_groups, weight=None, eps=1e-5):
    """Return ``(dx, dweight, dbias)`` of :func:`group_norm`."""
    n, c = x.shape[:2]
    per_channel = (1, c) + (1,) * (x.ndim - 2)
    xd = np.asarray(x, dtype=np.float64)
    gd = np.asarray(dy, dtype=np.float64)
    x3 = xd.reshape(n * num_groups, -1)
    mean = x3.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(x3.var(axis=1, keepdims=True) + eps)
    xhat = (x3 - mean) * rstd
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    g3 = (gd * w.reshape(per_channel)).reshape(x3.shape)
    dx = _row_grads(None, x3, g3, rstd, xhat, True).reshape(x.shape)
    axes = (0,) + tuple(range(2, x.ndim))
    return dx, (gd * xhat.reshape(x.shape)).sum(axis=axes), gd.sum(axis=axes)


def instance_norm(x, weight=None, bias=None, eps=1e-5):
    """Return ``(y, mean, rstd)`` with input statistics; statistics ``(N, C)``."""
    return group_norm(x, x.shape[1], weight, bias, eps)


def instance_norm_backward(dy, x, weight=None, eps=1e-5):
    return group_norm_backward(dy, x, x.shape[1], weight, eps)


def instance_running_stats(running_mean, running_var, x, momentum=0.1):
    """PyTorch's update: the mean over samples of the instances' means and
    unbiased variances.  Returns the new (running_mean, running_var), float64."""
    n, c = x.shape[:2]
    x3 = np.asarray(x, dtype=np.float64).reshape(n, c, -1)
    count = x3.shape[2]
    batch_mean = x3.mean(axis=2).mean(axis=0)
    batch_var = (x3.var(axis=2) * count / (count - 1)).mean(axis=0)
    return ((1 - momentum) * np.asarray(running_mean, np.float64) + momentum * batch_mean,
            (1 - momentum) * np.asarray(running_var, np.float64) + momentum * batch_var)
