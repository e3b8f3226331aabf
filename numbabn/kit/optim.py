"""Optimizers with PyTorch's update rules: :class:`SGD` and :class:`Adam`.

An optimizer holds a model's ``params`` dictionary (live arrays, updated in
place) and is given the matching ``grads`` at each :meth:`Optimizer.step`.
Its state (step count, momentum and moment buffers) round-trips through
:meth:`Optimizer.state_dict` as a flat dictionary of arrays, so a checkpoint
restores it bitwise.
"""

from __future__ import annotations

import numbers

import numpy as np
from numba import njit, prange

from .. import _cache, _config
from .._config import CPU_JIT_IEEE_PARALLEL, NO_ENTRY_POINTS
from .._validate import describe


def _nonnegative(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number; got {describe(value)}.")
    return float(value)


class Optimizer:
    """Base class: parameter bookkeeping, gradient checks and state round-trips.

    Parameters
    ----------
    params : dict of str to ndarray
        The model's live parameters (``model.params``); updated in place.
    lr : float
        Learning rate.
    weight_decay : float, default 0
        L2 penalty added to the gradient (``grad + weight_decay * param``), as
        PyTorch's ``weight_decay``.
    """

    #: Names of the per-parameter state buffers, in the order of ``state_dict``.
    _buffer_names: tuple = ()

    def __init__(self, params, lr, weight_decay=0.0):
        if not hasattr(params, "items") or not params:
            raise TypeError(f"params must be a non-empty dict of name -> ndarray (model.params); "
                            f"got {describe(params)}.")
        for key, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype.kind != "f" or not p.flags.writeable:
                raise TypeError(f"params['{key}'] must be a writeable float ndarray; got {describe(p)}.")
        self.params = dict(params)
        self.lr = _nonnegative(lr, "lr")
        self.weight_decay = _nonnegative(weight_decay, "weight_decay")
        self.step_count = 0
        self.state = {name: {key: np.zeros_like(p) for key, p in self.params.items()}
                      for name in self._buffer_names}

    def step(self, grads):
        """Update every parameter in place from ``grads`` (same keys and shapes as ``params``)."""
        self._check_grads(grads)
        self.step_count += 1
        for key, p in self.params.items():
            g = grads[key]
            if self.weight_decay:
                g = g + self.weight_decay * p
            self._update(key, p, g)

    def _update(self, key, p, g):
        raise NotImplementedError

    def _check_grads(self, grads):
        if not hasattr(grads, "keys") or set(grads) != set(self.params):
            given = sorted(grads) if hasattr(grads, "keys") else describe(grads)
            raise KeyError(f"grads must have the keys of params, {sorted(self.params)}; got {given}.")
        for key, p in self.params.items():
            g = grads[key]
            if not isinstance(g, np.ndarray) or g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(f"grads['{key}'] must be an ndarray of shape {p.shape} and dtype "
                                 f"{p.dtype}; got {describe(g)}.")

    def state_dict(self):
        """Copies of the optimizer state: ``"step"`` and ``"<buffer>.<param key>"`` arrays."""
        out = {"step": np.array(self.step_count, np.int64)}
        for name, buffers in self.state.items():
            out.update({f"{name}.{key}": b.copy() for key, b in buffers.items()})
        return out

    def load_state_dict(self, state):
        """Restore a :meth:`state_dict`; checks keys and shapes before changing anything."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing keys {missing or 'none'}; "
                           f"unexpected keys {unexpected or 'none'}.")
        for key, ref in expected.items():
            if np.shape(state[key]) != ref.shape:
                raise ValueError(f"{type(self).__name__}.load_state_dict: '{key}' must have shape "
                                 f"{ref.shape}; got {np.shape(state[key])}.")
        self.step_count = int(state["step"])
        for name, buffers in self.state.items():
            for key, b in buffers.items():
                np.copyto(b, state[f"{name}.{key}"], casting="same_kind")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (PyTorch's rule).

    ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` on the first
    step), then ``p -= lr * buf`` (or ``lr * (g + momentum * buf)`` with
    Nesterov momentum).

    Parameters
    ----------
    params : dict of str to ndarray
    lr : float
    momentum : float, default 0
    dampening : float, default 0
    weight_decay : float, default 0
    nesterov : bool, default False

    Examples
    --------
    >>> opt = SGD(model.params, lr=0.1, momentum=0.9)
    >>> model.backward(dlogits); opt.step(model.grads)
    """

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        self.momentum = _nonnegative(momentum, "momentum")
        self.dampening = _nonnegative(dampening, "dampening")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0.")
        self.nesterov = bool(nesterov)
        self._buffer_names = ("momentum_buffer",) if self.momentum else ()
        super().__init__(params, lr, weight_decay)

    def _update(self, key, p, g):
        if self.momentum:
            buf = self.state["momentum_buffer"][key]
            if self.step_count == 1:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += (1.0 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction, as ``torch.optim.Adam``.

    ``m = b1 * m + (1 - b1) * g``, ``v = b2 * v + (1 - b2) * g**2``,
    ``p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)``.

    Parameters
    ----------
    params : dict of str to ndarray
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0

    Examples
    --------
    >>> opt = Adam(model.params, lr=1e-3)
    >>> opt.step(model.grads)
    """

    _buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1); got {betas!r}.")
        self.betas = (float(b1), float(b2))
        self.eps = _nonnegative(eps, "eps")
        super().__init__(params, lr, weight_decay)

    def _update(self, key, p, g):
        b1, b2 = self.betas
        m = self.state["exp_avg"][key]
        v = self.state["exp_avg_sq"][key]
        if p.dtype in _KERNEL_DTYPES and all(a.flags.c_contiguous for a in (p, g, m, v)):
            t = p.dtype.type
            kernel = adam_kernel if p.size > _config.SERIAL_MAX_ELEMS else adam_kernel_serial
            kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                         t(b1), t(1.0 - b1), t(b2), t(1.0 - b2),
                         t(self.lr / (1.0 - b1 ** self.step_count)),
                         np.sqrt(1.0 - b2 ** self.step_count), t(self.eps))
            return
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * np.square(g)
        step_size = self.lr / (1.0 - b1 ** self.step_count)
        denom = np.sqrt(v)
        denom /= np.sqrt(1.0 - b2 ** self.step_count)
        denom += self.eps
        p -= step_size * (m / denom)


_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# The serial twin of the parallel kernels: the same flags, one thread.
_CPU_JIT_IEEE_SERIAL = {**CPU_JIT_IEEE_PARALLEL, "parallel": False}
_CPU_HELPER_IEEE = {**_CPU_JIT_IEEE_SERIAL, **NO_ENTRY_POINTS}  # (called by the two above)


@njit(**_CPU_HELPER_IEEE)
def _adam_value(p, g, m, v, i, b1, c1, b2, c2, step_size, bc2_sqrt, eps):
    gi = g[i]
    mi = m[i] * b1 + c1 * gi
    vi = v[i] * b2 + c2 * (gi * gi)
    m[i] = mi
    v[i] = vi
    denom = p.dtype.type(np.sqrt(vi) / bc2_sqrt) + eps
    p[i] -= step_size * (mi / denom)


@njit(**CPU_JIT_IEEE_PARALLEL)
def adam_kernel(p, g, m, v, b1, c1, b2, c2, step_size, bc2_sqrt, eps):
    """:meth:`Adam._update` in one pass over flat arrays (4 ms of NumPy passes
    for the cnn's 1.2 million parameters), with the same roundings as its NumPy
    expressions: scalars in ``p``'s dtype except ``bc2_sqrt`` (float64, as
    ``np.sqrt`` of a Python float), and no fused multiply-adds."""
    for i in prange(p.shape[0]):
        _adam_value(p, g, m, v, i, b1, c1, b2, c2, step_size, bc2_sqrt, eps)


@njit(**_CPU_JIT_IEEE_SERIAL)
def adam_kernel_serial(p, g, m, v, b1, c1, b2, c2, step_size, bc2_sqrt, eps):
    """:func:`adam_kernel` on the calling thread, for small parameters (the
    same bits): waking the thread pool costs more than their update."""
    for i in range(p.shape[0]):
        _adam_value(p, g, m, v, i, b1, c1, b2, c2, step_size, bc2_sqrt, eps)


_cache.check(globals())  # before any kernel above loads from the disk cache
