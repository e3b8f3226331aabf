"""Synchronised batch norm: statistics of the batch formed by every rank's rows.

Built on the split primitives of :mod:`numbabn.functional`.  Each call makes
two collectives, both ``Allgather``: a small descriptor first (see
:func:`numbabn.distributed._comm.agree`), so that a bad input on one rank
raises the same error on every rank instead of leaving the others waiting,
then the data (per-feature float64 partials).  Partials are combined in rank
order on every rank, so every rank gets bitwise the same statistics and sums,
whatever algorithm the MPI library uses.
"""

from __future__ import annotations

import numpy as np

from .. import _backend
from .. import _validate as v
from .. import functional as F
from ..layers import _check
from ..layers.base import Layer
from ..layers import batchnorm as _batchnorm_layers
from ..layers.batchnorm import _BatchNorm
from . import _comm
from ._comm import CollectiveTypeError, CollectiveValueError, require_same

TRAIN, BACKWARD = "sync_batch_norm_train", "sync_batch_norm_backward"


def _host_only(x, name="x"):
    if _backend.is_device_array(x):
        raise TypeError(f"numbabn.distributed works on NumPy arrays (the CPU backend); {name} is a "
                        f"GPU array ({type(x).__name__}). Copy it to the host first.")


def _forward_descriptor(x, weight, bias, eps, axis, out, precheck):
    """This rank's checks of a training forward (those of batch_norm_train, but
    an empty batch is allowed); the descriptor the ranks compare."""
    if precheck is not None:
        precheck()
    _host_only(x)
    _, layout, x, weight, bias, out = F._prepare(
        x, axis, allow_empty_batch=True, weight=weight, bias=bias, out=out)
    nfeat = layout.shape3[1]
    F._check_affine(weight, bias, nfeat, x.dtype)
    eps = v.check_eps(eps)
    if out is not None:
        v.check_out(out, x)
    return dict(nfeat=nfeat, dtype=_comm.DTYPE_CODES[x.dtype], ndim=x.ndim,
                axis=v.check_axis(axis, x.ndim), weight=weight is not None, bias=bias is not None,
                eps=np.float64(eps).view(np.int64), count=layout.count)


def _require_same_shape_class(table, op):
    require_same(table, "nfeat", "the number of features C", op)
    require_same(table, "dtype", "the dtype", op, error=CollectiveTypeError, show=_comm.dtype_name)
    require_same(table, "ndim", "the number of dimensions", op)
    require_same(table, "axis", "the feature axis", op)
    require_same(table, "weight", "whether weight is given", op, show=lambda b: "yes" if b else "no")


def _sync_train(x, weight, bias, eps, axis, out, comm, precheck=None):
    """:func:`sync_batch_norm_train` returning also the global biased variance
    (float64) and the global count (the layer's running statistics need them)."""
    comm = _comm.resolve(comm)
    table = _comm.agree(comm, TRAIN, lambda: _forward_descriptor(x, weight, bias, eps, axis, out,
                                                                 precheck))
    _require_same_shape_class(table, TRAIN)
    require_same(table, "bias", "whether bias is given", TRAIN, show=lambda b: "yes" if b else "no")
    require_same(table, "eps", "eps", TRAIN, show=lambda bits: repr(float(np.int64(bits).view(np.float64))))
    counts = [int(c) for c in table["count"]]
    total = sum(counts)
    if total < 2:
        raise CollectiveValueError(
            f"{TRAIN}: expected more than 1 value per feature over all ranks when training; got "
            f"{total} (values per feature on each rank: {counts}).")
    nfeat = int(table["nfeat"][0])
    count, mean, m2 = F.batch_moments(x, axis)
    send = np.empty(1 + 2 * nfeat)
    send[0], send[1:1 + nfeat], send[1 + nfeat:] = count, mean, m2
    rows = _comm.allgather_rows(comm, send)
    count, mean, m2 = F.merge_moments([int(c) for c in rows[:, 0]], rows[:, 1:1 + nfeat],
                                      rows[:, 1 + nfeat:])
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)  # as the kernels' invstd_of, in float64
    y = F.batch_norm_elemt(x, mean, invstd, weight, bias, axis, out)
    return y, mean, invstd, var, count


def sync_batch_norm_train(x, weight=None, bias=None, eps=1e-5, axis=1, comm=None, out=None):
    """Training forward with the statistics of every rank's rows together.

    Collective: every rank of ``comm`` must call it with the same feature
    count, dtype, number of dimensions, feature axis, ``eps`` and affine
    arguments (its own rows, any number, 0 included).  The result is the
    rank's share of :func:`numbabn.batch_norm_train` of the concatenation of
    every rank's ``x`` along the batch axes.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2 (NumPy arrays only)
        This rank's rows; the batch may be empty.
    weight, bias : ndarray ``(C,)`` and ``x.dtype``, optional
    eps : float, default 1e-5
    axis : int, default 1, the feature axis
    comm : mpi4py communicator, default ``MPI.COMM_WORLD``
    out : ndarray, optional, where to write ``y`` (may be ``x``)

    Returns
    -------
    y : ndarray like ``x``
    mean, invstd : ndarray ``(C,)`` **float64**
        The exact global statistics (``invstd = 1 / sqrt(var + eps)`` with the
        biased global variance), bitwise the same on every rank; pass them to
        :func:`sync_batch_norm_backward` as they are.

    Raises
    ------
    ValueError, TypeError
        On every rank at once (as :class:`CollectiveValueError` or
        :class:`CollectiveTypeError`) when any rank's arguments are bad or the
        ranks disagree, naming the rank; also when all ranks together have
        fewer than 2 values per feature.

    Examples
    --------
    >>> y, mean, invstd = sync_batch_norm_train(x, weight, bias)      # under mpiexec
    >>> dx, dweight, dbias = sync_batch_norm_backward(dy, x, mean, invstd, weight)
    """
    y, mean, invstd, _, _ = _sync_train(x, weight, bias, eps, axis, out, comm)
    return y, mean, invstd


def _backward_descriptor(dy, x, mean, invstd, weight, axis, out, precheck):
    if precheck is not None:
        precheck()
    _host_only(x)
    _host_only(dy, "dy")
    _, layout, x, dy, mean, invstd, weight, out = F._prepare(
        x, axis, allow_empty_batch=True, dy=dy, mean=mean, invstd=invstd, weight=weight, out=out)
    v.check_same_as(dy, "dy", x)
    nfeat = layout.shape3[1]
    v.check_stat(mean, "mean", nfeat, x.dtype)
    v.check_stat(invstd, "invstd", nfeat, x.dtype)
    if weight is not None:
        v.check_vector(weight, "weight", nfeat, x.dtype)
    if out is not None:
        v.check_out(out, x)
    return dict(nfeat=nfeat, dtype=_comm.DTYPE_CODES[x.dtype], ndim=x.ndim,
                axis=v.check_axis(axis, x.ndim), weight=weight is not None, count=layout.count,
                check=_comm.fingerprint(mean, invstd))


def _sync_backward(dy, x, mean, invstd, weight, axis, out, comm, precheck=None):
    comm = _comm.resolve(comm)
    table = _comm.agree(comm, BACKWARD, lambda: _backward_descriptor(dy, x, mean, invstd, weight,
                                                                     axis, out, precheck))
    _require_same_shape_class(table, BACKWARD)
    require_same(table, "check", "mean and invstd (pass what sync_batch_norm_train returned, "
                 "unchanged)", BACKWARD, show=lambda h: f"checksum {h & 0xffffffff:08x}")
    total = int(table["count"].sum())
    if total < 1:
        raise CollectiveValueError(f"{BACKWARD}: every rank's batch is empty.")
    nfeat = int(table["nfeat"][0])
    sum_dy, sum_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis)
    rows = _comm.allgather_rows(comm, np.concatenate([sum_dy, sum_dy_xmu]))
    sums = _comm.sum_rows(rows)
    dx = F.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sums[:nfeat], sums[nfeat:], total,
                                     axis, out)
    if weight is None:
        return dx, None, None
    dweight = (np.asarray(invstd, np.float64) * sum_dy_xmu).astype(x.dtype)
    return dx, dweight, sum_dy.astype(x.dtype)


def sync_batch_norm_backward(dy, x, mean, invstd, weight=None, axis=1, comm=None, out=None):
    """Gradients of :func:`sync_batch_norm_train` (collective, like it).

    ``dx`` is this rank's share of the gradient of the global batch norm: the
    per-feature ``sum(dy)`` and ``sum(dy * (x - mean))`` are summed over every
    rank (in rank order, bitwise the same everywhere) with one ``Allgather``.

    Parameters
    ----------
    dy, x : ndarray of the same shape and dtype (this rank's rows)
    mean, invstd : ndarray ``(C,)``, as returned by :func:`sync_batch_norm_train`
        (the same on every rank; this is checked)
    weight : ndarray ``(C,)`` and ``x.dtype``, optional
    axis : int, default 1
    comm : mpi4py communicator, default ``MPI.COMM_WORLD``
    out : ndarray, optional, where to write ``dx`` (may be ``dy`` or ``x``)

    Returns
    -------
    dx : ndarray like ``x``
    dweight, dbias : ndarray ``(C,)`` of ``x.dtype``, or None without ``weight``
        **This rank's share**: ``invstd * sum(dy * (x - mean))`` and ``sum(dy)``
        over its own rows, as PyTorch's SyncBatchNorm; their sum over the ranks
        is the gradient of the whole batch (what a data-parallel gradient sum
        adds up).
    """
    return _sync_backward(dy, x, mean, invstd, weight, axis, out, comm)


# --------------------------------------------------------------------------- #
# The layer.
# --------------------------------------------------------------------------- #
class SyncBatchNorm(_BatchNorm):
    """Batch norm over the rows of every rank together, as ``torch.nn.SyncBatchNorm``.

    Same parameters, gradients, buffers and ``state_dict`` as
    :class:`numbabn.layers.BatchNorm2d`; takes ``(N, C, ...)`` inputs of any
    number of dimensions >= 2 (features on axis 1), with any ``N`` on each
    rank, 0 included.  In training mode (or without running statistics) the
    forward and backward are collective (every rank must call them, in the same
    mode); the running variance is updated with the unbiased *global* variance,
    so running statistics stay bitwise identical on every rank.  Eval mode uses
    the running statistics and does not communicate.

    ``dweight``/``dbias`` in ``grads`` are this rank's share (sum them over the
    ranks for the whole batch's gradient, as data-parallel training does).

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats
        As :class:`numbabn.layers.BatchNorm1d`.
    comm : mpi4py communicator, default ``MPI.COMM_WORLD`` (looked up at the first call)
    dtype : float32 or float64, default float32

    Examples
    --------
    >>> bn = SyncBatchNorm(64)
    >>> y = bn.forward(x)            # x: this rank's (n, 64, H, W) rows
    >>> dx = bn.backward(dy)
    """

    _ndims = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, dtype=np.float32):
        # Float32 and float64 only: the synchronised functions check their
        # arguments inside one collective, and half types are not taken there.
        _check.float_dtype(dtype)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, dtype=dtype)
        self.comm = comm
        self._cache = None

    @classmethod
    def from_batchnorm(cls, layer, comm=None):
        """A SyncBatchNorm holding ``layer``'s very arrays (parameters, gradients,
        buffers: the same objects, so an optimizer built on the model keeps working)."""
        if type(layer) not in _CONVERTIBLE:
            raise TypeError(f"expected a BatchNorm1d/2d/3d layer; got {type(layer).__name__}.")
        if getattr(layer, "virtual_batch_size", None) is not None:
            raise ValueError(f"{type(layer).__name__} with virtual_batch_size (ghost batch norm) has "
                             f"no synchronised version; build it without virtual_batch_size.")
        new = cls.__new__(cls)
        new.__dict__.update(vars(layer))
        new.params, new.grads, new.buffers = dict(layer.params), dict(layer.grads), dict(layer.buffers)
        new.comm = comm
        new._cache = None
        return new

    def _check_input(self, x):
        """Any ``(N, C, ...)`` array of the layer's dtype; ``N`` may be 0."""
        name = type(self).__name__
        ndim = getattr(x, "ndim", 2)
        pattern = (None, self.num_features) + (None,) * (max(ndim, 2) - 2)
        if isinstance(x, np.ndarray) and x.ndim >= 2 and x.shape[0] == 0:
            x = np.empty((1,) + x.shape[1:], x.dtype)  # the batch may be empty: check the rest
        _check.layer_input(x, name, self.dtype, pattern)

    def forward(self, x):
        """Normalise ``x`` (this rank's rows) over every axis but 1 with the
        statistics of every rank's rows (training), or the running statistics (eval)."""
        if self.training or not self.track_running_stats:
            y, mean, invstd, var, count = _sync_train(
                x, self.weight, self.bias, self.eps, 1, None, self.comm,
                precheck=lambda: self._check_input(x))
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                F.update_running_stats(self.running_mean, self.running_var, mean, var, count, factor)
            self._cache = (x, mean, invstd, y.shape)
            return y
        self._check_input(x)
        y = F.normalize(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        self._cache = (x, None, None, y.shape)
        return y

    def backward(self, dy, input_grad=True):
        """``dL/dx`` for this rank's rows (collective after a training forward);
        fills ``grads`` with this rank's share of ``dweight`` and ``dbias``."""
        x, mean, invstd, y_shape = self._cache or (None, None, None, None)
        name = type(self).__name__
        if mean is None:  # eval-mode forward (or none at all): local
            _check.grad_output(dy, name, y_shape, self.dtype)
            dx, dweight, dbias = self._backward_eval(dy, x)  # constants: no communication
        else:
            dx, dweight, dbias = _sync_backward(
                dy, x, mean, invstd, self.weight, 1, None, self.comm,
                precheck=lambda: _check.grad_output(dy, name, y_shape, self.dtype))
        if self.affine:
            self.grads["weight"][...] = dweight
            if "bias" in self.grads:
                self.grads["bias"][...] = dbias
        return dx if input_grad else None

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


_CONVERTIBLE = tuple(getattr(_batchnorm_layers, name) for name in ("BatchNorm1d", "BatchNorm2d",
                                                                    "BatchNorm3d")
                     if hasattr(_batchnorm_layers, name))


def convert_sync_batchnorm(model, comm=None):
    """Replace every BatchNorm1d/2d/3d layer of ``model`` by a :class:`SyncBatchNorm`.

    Works on a BatchNorm layer itself (returns its replacement) and on
    containers (``Sequential``, nested at any depth: anything with a ``layers``
    list), changed in place and returned.  Each replacement holds the original
    layer's arrays (the same objects: parameters, gradients, running
    statistics), so an optimizer built on ``model.params`` keeps updating them.
    Other batch-norm variants (batch renormalization, fused BatchNorm+ReLU,
    ghost batches) have no synchronised version: TypeError/ValueError.

    Examples
    --------
    >>> model = convert_sync_batchnorm(build_model("cnn", rng))
    """
    if not isinstance(model, Layer):
        raise TypeError(f"convert_sync_batchnorm expects a numbabn Layer; got {type(model).__name__}.")
    for layer in _walk(model):  # every check first: a refused model is left as it was
        if isinstance(layer, _BatchNorm) and not isinstance(layer, SyncBatchNorm):
            if type(layer) not in _CONVERTIBLE:  # batch renormalization, fused BN+ReLU, ...
                raise TypeError(
                    f"convert_sync_batchnorm: {type(layer).__name__} has no synchronised version "
                    f"(only {', '.join(t.__name__ for t in _CONVERTIBLE)} have).")
            if getattr(layer, "virtual_batch_size", None) is not None:
                raise ValueError(f"convert_sync_batchnorm: {type(layer).__name__} with "
                                 f"virtual_batch_size (ghost batch norm) has no synchronised version.")
    return _convert(model, comm)


def _walk(layer):
    yield layer
    children = getattr(layer, "layers", None)
    if isinstance(children, list):
        for child in children:
            yield from _walk(child)


def _convert(layer, comm):
    if isinstance(layer, SyncBatchNorm):
        if comm is not None:
            layer.comm = comm
        return layer
    if isinstance(layer, _BatchNorm):
        return SyncBatchNorm.from_batchnorm(layer, comm)
    children = getattr(layer, "layers", None)
    if isinstance(children, list):
        for i, child in enumerate(children):
            children[i] = _convert(child, comm)
    return layer
