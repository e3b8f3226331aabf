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
