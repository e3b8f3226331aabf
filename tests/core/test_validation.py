"""Bad input: the right exception, a message naming the argument, nothing modified."""

import numpy as np
import pytest

import numbabn as nb

C = 3


def _args(rng, dtype=np.float32):
    x = rng.standard_normal((8, C, 4)).astype(dtype)
    return dict(
        x=x,
        dy=rng.standard_normal(x.shape).astype(dtype),
        mean=rng.standard_normal(C).astype(dtype),
        var=rng.uniform(0.5, 2, C).astype(dtype),
        invstd=rng.uniform(0.5, 2, C).astype(dtype),
        weight=rng.standard_normal(C).astype(dtype),
        bias=rng.standard_normal(C).astype(dtype),
        running_mean=rng.standard_normal(C).astype(dtype),
        running_var=rng.uniform(0.5, 2, C).astype(dtype),
    )


def _call(name, a, **over):
    a = dict(a, **over)
    if name == "batch_stats":
        return nb.batch_stats(a["x"], axis=a.get("axis", 1))
    if name == "normalize":
        return nb.normalize(a["x"], a["mean"], a["var"], a["weight"], a["bias"],
                            eps=a.get("eps", 1e-5), axis=a.get("axis", 1), out=a.get("out"))
    if name == "batch_norm_train":
        return nb.batch_norm_train(a["x"], a["weight"], a["bias"], eps=a.get("eps", 1e-5),
                                   axis=a.get("axis", 1), out=a.get("out"))
    if name == "batch_norm_backward":
        return nb.batch_norm_backward(a["dy"], a["x"], a["mean"], a["invstd"], a["weight"],
                                      axis=a.get("axis", 1), out=a.get("out"))
    if name == "update_running_stats":
        return nb.update_running_stats(a["running_mean"], a["running_var"], a["mean"], a["var"],
                                       a.get("count", 10), momentum=a.get("momentum", 0.1))
    if name == "batch_norm":
        return nb.batch_norm(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                             training=a.get("training", True), momentum=a.get("momentum", 0.1),
                             eps=a.get("eps", 1e-5), axis=a.get("axis", 1))
    raise AssertionError(name)


X_FUNCS = ["batch_stats", "normalize", "batch_norm_train", "batch_norm_backward", "batch_norm"]
ALL = X_FUNCS + ["update_running_stats"]
BAD_RUNNING = ["update_running_stats", "batch_norm"]
OUT_FUNCS = ["normalize", "batch_norm_train", "batch_norm_backward"]


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# (case id, functions it applies to, overrides builder, exception, word the message must contain)
CASES = [
    ("x-list", X_FUNCS, lambda a: dict(x=a["x"].tolist()), TypeError, "x"),
    ("x-int", X_FUNCS, lambda a: dict(x=a["x"].astype(np.int64)), TypeError, "x"),
    ("x-int16", X_FUNCS, lambda a: dict(x=a["x"].astype(np.int16)), TypeError, "int16"),
    ("x-bigendian", X_FUNCS, lambda a: dict(x=a["x"].astype(">f4")), TypeError, "x"),
    ("x-0d", X_FUNCS, lambda a: dict(x=np.array(1.0, np.float32)), ValueError, "dimensions"),
    ("x-python-float", X_FUNCS, lambda a: dict(x=1.0), TypeError, "x"),
    ("x-numpy-scalar", X_FUNCS, lambda a: dict(x=np.float32(1.0)), TypeError, "x"),
    ("x-1d", X_FUNCS, lambda a: dict(x=a["x"][:, 0, 0]), ValueError, "dimensions"),
    # normalize and batch_norm take an empty batch, as torch.nn.functional.batch_norm
    ("x-empty", ["batch_stats", "batch_norm_train", "batch_norm_backward"],
     lambda a: dict(x=a["x"][:0]), ValueError, "empty"),
    ("x-no-features", X_FUNCS, lambda a: dict(x=a["x"][:, :0]), ValueError, "empty"),
    ("axis-range", X_FUNCS, lambda a: dict(axis=3), ValueError, "axis"),
    ("axis-neg-range", X_FUNCS, lambda a: dict(axis=-4), ValueError, "axis"),
    ("axis-float", X_FUNCS, lambda a: dict(axis=1.0), TypeError, "axis"),
    ("one-value-per-feature", ["batch_norm_train", "batch_norm"],
     lambda a: dict(x=a["x"][:1, :, :1], dy=a["dy"][:1, :, :1]), ValueError, "more than 1 value"),
    ("weight-len", ["normalize", "batch_norm_train", "batch_norm_backward", "batch_norm"],
     lambda a: dict(weight=a["weight"][:2]), ValueError, "weight"),
    ("weight-dtype", ["normalize", "batch_norm_train", "batch_norm_backward", "batch_norm"],
     lambda a: dict(weight=a["weight"].astype(np.float64)), TypeError, "weight"),
    ("weight-2d", ["normalize", "batch_norm_train", "batch_norm"],
     lambda a: dict(weight=a["weight"].reshape(1, C)), ValueError, "weight"),
    ("weight-list", ["normalize", "batch_norm_train", "batch_norm"],
     lambda a: dict(weight=[1.0] * C), TypeError, "weight"),
    ("bias-len", ["normalize", "batch_norm_train", "batch_norm"],
     lambda a: dict(bias=a["bias"][:1]), ValueError, "bias"),
    ("bias-dtype", ["normalize", "batch_norm_train", "batch_norm"],
     lambda a: dict(bias=a["bias"].astype(np.float64)), TypeError, "bias"),
    ("mean-len", ["normalize", "batch_norm_backward", "update_running_stats"],
     lambda a: dict(mean=a["mean"][:2]), ValueError, "mean"),
    ("var-dtype", ["normalize"],
     lambda a: dict(var=a["var"].astype(np.float64)), TypeError, "var"),
    # The statistics may come in float64 (the kernels' own precision), never another dtype.
    ("stat-dtype", ["update_running_stats"],
     lambda a: dict(var=a["var"].astype(np.float16)), TypeError, "var"),
    ("invstd-len", ["batch_norm_backward"], lambda a: dict(invstd=a["invstd"][:2]), ValueError, "invstd"),
    ("eps-zero", ["normalize", "batch_norm_train", "batch_norm"], lambda a: dict(eps=0.0), ValueError, "eps"),
    ("eps-negative", ["normalize", "batch_norm_train", "batch_norm"], lambda a: dict(eps=-1e-5), ValueError, "eps"),
    ("eps-nan", ["normalize", "batch_norm_train", "batch_norm"], lambda a: dict(eps=float("nan")), ValueError, "eps"),
    ("eps-inf", ["normalize", "batch_norm_train", "batch_norm"], lambda a: dict(eps=float("inf")), ValueError, "eps"),
    ("eps-str", ["normalize", "batch_norm_train", "batch_norm"], lambda a: dict(eps="1e-5"), TypeError, "eps"),
    ("momentum-high", BAD_RUNNING, lambda a: dict(momentum=1.5), ValueError, "momentum"),
    ("momentum-negative", BAD_RUNNING, lambda a: dict(momentum=-0.1), ValueError, "momentum"),
    ("momentum-nan", BAD_RUNNING, lambda a: dict(momentum=float("nan")), ValueError, "momentum"),
    ("momentum-none", BAD_RUNNING, lambda a: dict(momentum=None), TypeError, "momentum"),
    ("running-mean-only", ["batch_norm"], lambda a: dict(running_var=None), ValueError, "running_var"),
    ("running-var-only", ["batch_norm"], lambda a: dict(running_mean=None), ValueError, "running_mean"),
    ("eval-without-running", ["batch_norm"],
     lambda a: dict(training=False, running_mean=None, running_var=None), ValueError, "running_mean"),
    ("running-len", BAD_RUNNING, lambda a: dict(running_var=a["running_var"][:2]), ValueError, "running_var"),
    ("running-dtype", ["batch_norm"], lambda a: dict(running_mean=a["running_mean"].astype(np.float64)),
     TypeError, "running_mean"),
    ("running-readonly", BAD_RUNNING, lambda a: dict(running_mean=_readonly(a["running_mean"])),
     ValueError, "read-only"),
    ("training-str", ["batch_norm"], lambda a: dict(training="yes"), TypeError, "training"),
    ("dy-shape", ["batch_norm_backward"], lambda a: dict(dy=a["dy"][:4]), ValueError, "dy"),
    ("dy-dtype", ["batch_norm_backward"], lambda a: dict(dy=a["dy"].astype(np.float64)), TypeError, "dy"),
    ("out-shape", OUT_FUNCS, lambda a: dict(out=np.empty((8, C, 5), np.float32)), ValueError, "out"),
    ("out-dtype", OUT_FUNCS, lambda a: dict(out=np.empty(a["x"].shape, np.float64)), TypeError, "out"),
    ("out-readonly", OUT_FUNCS, lambda a: dict(out=_readonly(a["x"])), ValueError, "out"),
    ("count-one", ["update_running_stats"], lambda a: dict(count=1), ValueError, "count"),
    ("count-float", ["update_running_stats"], lambda a: dict(count=10.0), TypeError, "count"),
    ("running-none", ["update_running_stats"], lambda a: dict(running_mean=None), TypeError, "running_mean"),
]

PARAMS = [pytest.param(func, build, exc, word, id=f"{func}-{cid}")
          for cid, funcs, build, exc, word in CASES for func in funcs]


def assert_refused_unchanged(func, a, build, exc, word):
    """``func`` with the arguments ``a`` overridden by ``build(a)`` raises ``exc``
    naming ``word``, and no array argument was modified."""
    over = build(a)
    merged = dict(a, **over)
    snapshot = {k: v.copy() for k, v in merged.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc) as info:
        _call(func, a, **over)
    assert word.lower() in str(info.value).lower(), str(info.value)
    for k, v in merged.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, snapshot[k], err_msg=f"{k} was modified")


@pytest.mark.parametrize("func,build,exc,word", PARAMS)
def test_bad_input_is_refused_and_nothing_changes(rng, func, build, exc, word):
    assert_refused_unchanged(func, _args(rng), build, exc, word)


def test_eval_mode_accepts_readonly_running_stats(rng):
    a = _args(rng)
    y = nb.batch_norm(a["x"], _readonly(a["running_mean"]), _readonly(a["running_var"]), training=False)
    assert np.all(np.isfinite(y))


def test_readonly_inputs_are_fine(rng):
    a = _args(rng)
    x = _readonly(a["x"])
    y, mean, invstd = nb.batch_norm_train(x, _readonly(a["weight"]), _readonly(a["bias"]))
    nb.batch_norm_backward(_readonly(a["dy"]), x, _readonly(mean), _readonly(invstd))
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_gives_an_empty_output_and_changes_nothing(rng, training):
    a = _args(rng)
    x = a["x"][:0]
    rm, rv = a["running_mean"].copy(), a["running_var"].copy()
    y = nb.batch_norm(x, a["running_mean"], a["running_var"], a["weight"], a["bias"],
                      training=training)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(a["running_mean"], rm)
    np.testing.assert_array_equal(a["running_var"], rv)
    assert nb.normalize(x, a["mean"], a["var"]).shape == x.shape
