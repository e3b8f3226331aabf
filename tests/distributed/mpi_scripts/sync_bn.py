"""Run under ``mpiexec -n 2``: sync_batch_norm_train/backward, SyncBatchNorm and
convert_sync_batchnorm against one process on the concatenated batch, and bad
inputs on one rank.  Each rank prints one JSON line (see common.emit)."""

import numpy as np
from common import digest, emit, rel_err, world

import numbabn as nb
from numbabn.distributed import (CollectiveError, SyncBatchNorm, convert_sync_batchnorm,
                                 sync_batch_norm_backward, sync_batch_norm_train)
from numbabn.layers import BatchNorm1d, BatchNorm2d
from numbabn.kit import Linear, ReLU, Sequential
comm = world()
rank, size = comm.Get_rank(), comm.Get_size()
assert size == 2, "run with mpiexec -n 2"

# (name, per-rank rows, shape of the whole batch (rows on axis 0), feature axis)
LAYOUTS = [("dense", (8, 5), 1), ("ncl", (8, 4, 9), 1), ("nchw", (8, 5, 6, 7), 1),
           ("nhwc", (8, 6, 7, 5), -1)]
SPLITS = [(4, 4), (3, 5), (0, 8)]


def case(name, shape, axis, dtype, split, seed):
    rng = np.random.default_rng(seed)  # the same whole batch on every rank
    c = shape[axis]
    per_feature = [1] * len(shape)
    per_feature[axis] = c
    x = (rng.uniform(-3, 3, c).reshape(per_feature)
         + rng.uniform(0.5, 2, c).reshape(per_feature) * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)
    lo = sum(split[:rank])
    mine = slice(lo, lo + split[rank])
    y_ref, mean_ref, invstd_ref = nb.batch_norm_train(x, w, b, axis=axis)
    dx_ref, dw_ref, db_ref = nb.batch_norm_backward(dy, x, mean_ref, invstd_ref, w, axis=axis)

    y, mean, invstd = sync_batch_norm_train(x[mine], w, b, axis=axis)
    dx, dw, db = sync_batch_norm_backward(dy[mine], x[mine], mean, invstd, w, axis=axis)
    dw_sum = sum(np.asarray(a, np.float64) for a in comm.allgather(dw))
    db_sum = sum(np.asarray(a, np.float64) for a in comm.allgather(db))
    return {
        "case": f"{name}-{np.dtype(dtype).name}-{split[0]}+{split[1]}",
        "dtype": np.dtype(dtype).name,
        "stats_dtype": [mean.dtype.name, invstd.dtype.name],
        "err": {"y": rel_err(y, y_ref[mine]), "mean": rel_err(mean, mean_ref),
                "invstd": rel_err(invstd, invstd_ref), "dx": rel_err(dx, dx_ref[mine]),
                "dweight_sum": rel_err(dw_sum, dw_ref), "dbias_sum": rel_err(db_sum, db_ref)},
        "shapes_ok": y.shape == x[mine].shape and dx.shape == x[mine].shape,
        "stats_digest": digest(mean, invstd),
    }


cases = []
seed = 0
for name, shape, axis in LAYOUTS:
    for dtype in (np.float32, np.float64):
        for split in SPLITS:
            seed += 1
            cases.append(case(name, shape, axis, dtype, split, seed))


# -- the layer: two training steps and an eval step against BatchNorm2d on the whole batch -- #
def layer_case(dtype, split):
    rng = np.random.default_rng(100)
    x_all = [(rng.standard_normal((6, 3, 4, 5)) * 2 + 1).astype(dtype) for _ in range(2)]
    dy_all = [rng.standard_normal((6, 3, 4, 5)).astype(dtype) for _ in range(2)]
    lo = sum(split[:rank])
    mine = slice(lo, lo + split[rank])
    ref, sbn = BatchNorm2d(3, dtype=dtype), SyncBatchNorm(3, dtype=dtype)
    for layer in (ref, sbn):
        layer.weight[...] = [0.5, 1.0, 2.0]
        layer.bias[...] = [0.1, -0.2, 0.3]
    err = {"y": 0.0, "dx": 0.0, "dweight_sum": 0.0, "dbias_sum": 0.0}
    for x, dy in zip(x_all, dy_all):
        y_ref = ref.forward(x)
        dx_ref = ref.backward(dy)
        y = sbn.forward(x[mine])
        dx = sbn.backward(dy[mine])
        err["y"] = max(err["y"], rel_err(y, y_ref[mine]))
        err["dx"] = max(err["dx"], rel_err(dx, dx_ref[mine]))
        for key in ("weight", "bias"):
            total = sum(np.asarray(a, np.float64) for a in comm.allgather(sbn.grads[key]))
            err[f"d{key}_sum"] = max(err[f"d{key}_sum"], rel_err(total, ref.grads[key]))
    err["running_mean"] = rel_err(sbn.running_mean, ref.running_mean)
    err["running_var"] = rel_err(sbn.running_var, ref.running_var)
    sbn.eval()
    ref.eval()
    err["eval_y"] = rel_err(sbn.forward(x_all[0][mine]), ref.forward(x_all[0])[mine])
    return {"case": f"layer-{np.dtype(dtype).name}-{split[0]}+{split[1]}", "err": err,
            "num_batches_tracked": int(sbn.num_batches_tracked),
            "running_digest": digest(sbn.running_mean, sbn.running_var),
            "state_keys_match": sorted(sbn.state_dict()) == sorted(ref.state_dict())}


layers = [layer_case(np.float32, (3, 3)), layer_case(np.float64, (1, 5)),
          layer_case(np.float32, (0, 6))]


# -- convert_sync_batchnorm on a nested Sequential, against the original on the whole batch -- #
def build(seed):
    rng = np.random.default_rng(seed)
    # No bias before a batch norm: its gradient is zero up to rounding (nothing to compare).
    return Sequential(Linear(6, 5, bias=False, rng=rng), BatchNorm1d(5),
                      Sequential(ReLU(), Linear(5, 4, bias=False, rng=rng), BatchNorm1d(4)),
                      Linear(4, 3, rng=rng))


ref_model, model = build(7), build(7)
before = {key: value for key, value in model.params.items()}
before_buffers = dict(model.buffers)
old_bn = [model[1], model[2][2]]
assert convert_sync_batchnorm(model) is model
same_arrays = (all(model.params[k] is before[k] for k in before)
               and all(model.buffers[k] is before_buffers[k] for k in before_buffers)
               and model[1].weight is old_bn[0].weight and model[2][2].running_var is old_bn[1].running_var)
types = [type(model[1]).__name__, type(model[2][2]).__name__]
rng = np.random.default_rng(8)
x_all = rng.standard_normal((10, 6)).astype(np.float32)
dy_all = rng.standard_normal((10, 3)).astype(np.float32)
mine = slice(0, 4) if rank == 0 else slice(4, 10)
out_ref = ref_model.forward(x_all)
ref_model.backward(dy_all)
out = model.forward(x_all[mine])
model.backward(dy_all[mine])
convert_err = {"logits": rel_err(out, out_ref[mine])}
for key, g in model.grads.items():
    total = sum(np.asarray(a, np.float64) for a in comm.allgather(g))
    convert_err[f"grad {key}"] = rel_err(total, ref_model.grads[key])
convert = {"types": types, "same_arrays": bool(same_arrays), "err": convert_err,
           "buffers_digest": digest(*[model.buffers[k] for k in sorted(model.buffers)])}


# -- bad input on one rank: every rank raises, then the next good call works -- #
def attempt(label, call):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    try:
        call(x)
        outcome = {"label": label, "raised": None}
    except CollectiveError as e:
        outcome = {"label": label, "raised": [c.__name__ for c in type(e).__mro__
                                              if c.__name__ in ("ValueError", "TypeError", "RuntimeError")],
                   "message": str(e), "ranks": e.ranks}
    y, mean, invstd = sync_batch_norm_train(x)  # still in step: a good call goes through
    outcome["then_ok"] = bool(np.isfinite(y).all())
    return outcome


w3 = np.ones(3, np.float32)
faults = [
    attempt("string input", lambda x: sync_batch_norm_train(x if rank == 0 else "x")),
    attempt("dtype", lambda x: sync_batch_norm_train(x if rank == 0 else x.astype(np.float64))),
    attempt("features", lambda x: sync_batch_norm_train(x if rank == 0 else x[:, :2])),
    attempt("weight shape", lambda x: sync_batch_norm_train(x, w3 if rank == 0 else np.ones(4, np.float32))),
    attempt("eps", lambda x: sync_batch_norm_train(x, eps=1e-5 if rank == 0 else 1e-3)),
    attempt("one value", lambda x: sync_batch_norm_train(x[:1] if rank == 0 else x[:0])),
    attempt("backward mean", lambda x: sync_batch_norm_backward(
        x, x, *(lambda m, s: (m + rank, s))(*sync_batch_norm_train(x)[1:]))),
    attempt("backward dy", lambda x: sync_batch_norm_backward(
        x if rank == 0 else x[:2], x, *sync_batch_norm_train(x)[1:])),
    attempt("layer input", lambda x: SyncBatchNorm(3).forward(x if rank == 0 else x[:, :2])),
    attempt("layer dtype", lambda x: SyncBatchNorm(3).forward(x if rank == 0 else x.astype(np.float64))),
]

emit(comm, cases=cases, layers=layers, convert=convert, faults=faults)
