"""The family's remembered calls (numbabn.norms._hosts): after a first valid
call, layer/RMS/group/instance norm skip validation and planning for plain
arrays with the same key.  Same bits, strides and dtypes as the general path;
any bad argument still takes the general path and raises before anything
changes."""

import numpy as np
import pytest

import numbabn as nb
from numbabn import norms


def _layouts(rng):
    base = (3 + 2 * rng.standard_normal((4, 6, 5, 8))).astype(np.float32)
    return {  # name: (x, viewable without a copy)
        "nchw": base,
        "channels_last": base.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2),
        "transposed": base.transpose(0, 1, 3, 2),
        "stepped": base[:, :, :, ::2],
        "float64": base.astype(np.float64),
    }


def _params(rng, shape, dtype):
    w = (1 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    b = (0.1 * rng.standard_normal(shape)).astype(dtype)
    return w, b


def _all_results(x, seed=5):
    """Every family function's results on ``x`` (N, 6, H, W), forward then backward."""
    rng = np.random.default_rng(seed)
    dy = np.empty_like(x)  # x's strides
    dy[...] = rng.standard_normal(x.shape)
    cdt = np.float32 if x.dtype.itemsize == 2 else x.dtype
    out = []
    w, b = _params(rng, x.shape[-2:], cdt)
    y, m, r = nb.layer_norm_train(x, x.shape[-2:], w, b)
    out += [y, m, r, *nb.layer_norm_backward(dy, x, m, r, x.shape[-2:], w)]
    out += [*nb.layer_norm_backward(dy, x, m.reshape(m.shape[:2]), r.reshape(r.shape[:2]),
                                    x.shape[-2:], None, param_grads=False)[:1]]
    y, r = nb.rms_norm_train(x, x.shape[-1], w[0])
    out += [y, r, *nb.rms_norm_backward(dy, x, r, x.shape[-1], w[0])]
    w, b = _params(rng, (x.shape[1],), cdt)
    y, m, r = nb.group_norm_train(x, 3, w, b, eps=1e-3)
    out += [y, m, r, *nb.group_norm_backward(dy, x, m, r, 3, w)]
    y, m, r = nb.group_norm_train(x, 3)
    out += [y, m, r, *nb.group_norm_backward(dy, x, m.astype(np.float64), r, 3)]
    y, m, r = nb.instance_norm_train(x, w, b)
    out += [y, m, r, *nb.instance_norm_backward(dy, x, m, r, w)]
    return out


def _no_general_path(*args, **kwargs):
    raise AssertionError("a remembered call took the general path")


@pytest.mark.parametrize("name", ["nchw", "channels_last", "transposed", "stepped", "float64"])
def test_remembered_calls_give_the_general_paths_bits_and_strides(rng, name, monkeypatch):
    x = _layouts(rng)[name]
    norms._hosts.clear()
    general = _all_results(x)  # first calls: the general path, which remembers
    assert {k[0] for k in norms._hosts} == {"layer", "rms", "group", "instance"}
    keys = set(norms._hosts)
    monkeypatch.setattr(norms._backend, "select", _no_general_path)
    fast = _all_results(x)
    assert set(norms._hosts) == keys  # nothing new: every call was remembered
    for i, (g, f) in enumerate(zip(general, fast)):
        assert g.shape == f.shape and g.strides == f.strides and g.dtype == f.dtype, (name, i)
        np.testing.assert_array_equal(f, g, err_msg=f"{name} result {i}")


def test_remembered_half_calls_give_the_general_paths_bits(rng, monkeypatch):
    x = _layouts(rng)["nchw"].astype(np.float16)
    norms._hosts.clear()
    general = _all_results(x)
    monkeypatch.setattr(norms._backend, "select", _no_general_path)
    fast = _all_results(x)
    for i, (g, f) in enumerate(zip(general, fast)):
        assert g.dtype == f.dtype and g.strides == f.strides, i
        np.testing.assert_array_equal(f, g, err_msg=f"result {i}")


def _good(rng):
    x = (3 + 2 * rng.standard_normal((4, 6, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = _params(rng, (6,), np.float32)
    wl, bl = _params(rng, (5,), np.float32)
    return x, dy, w, b, wl, bl


# (function, call, expected error, a word of its message): each call is made
# after the same function's good call on the same x (remembered).
BAD = [
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_train(x, 3, w.astype(np.float64), b),
     TypeError, "weight"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_train(x, 3, w[:5], b), ValueError,
     "weight"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_train(x, 3, w, list(b)), TypeError, "bias"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_train(x, 3, w, b, eps=0.0), ValueError,
     "eps"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_train(x, 3, w, b, eps=True), TypeError,
     "eps"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_train(x, 3.0, w, b), TypeError,
     "num_groups"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_train(x, 4, w, b), ValueError,
     "num_groups"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_backward(dy[:2], x, m, r, 3, w),
     ValueError, "dy"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_backward(dy.astype(np.float64), x, m, r, 3,
                                                               w), TypeError, "dy"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_backward(dy, x, m[:, :2], r, 3, w),
     ValueError, "mean"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_backward(dy, x, m, r.astype(np.int32), 3,
                                                               w), TypeError, "rstd"),
    ("group", lambda x, dy, w, b, m, r: nb.group_norm_backward(dy, x, m, r, 3, w,
                                                               param_grads=1), TypeError,
     "param_grads"),
    ("layer", lambda x, dy, w, b, m, r: nb.layer_norm_train(x, (5.0,), w[:5], b[:5]), TypeError,
     "normalized_shape"),
    ("layer", lambda x, dy, w, b, m, r: nb.layer_norm_train(x, (True,), w[:5], b[:5]),
     TypeError, "normalized_shape"),
    ("layer", lambda x, dy, w, b, m, r: nb.layer_norm_train(x, 5, w[:4], b[:5]), ValueError,
     "weight"),
    ("layer", lambda x, dy, w, b, m, r: nb.layer_norm_backward(dy, x, m, r[:2], 5, w[:5]),
     ValueError, "rstd"),
    ("rms", lambda x, dy, w, b, m, r: nb.rms_norm_train(x, 5, w[:5], eps=-1.0), ValueError,
     "eps"),
    ("rms", lambda x, dy, w, b, m, r: nb.rms_norm_backward(dy, x, r, 5, w[:5].astype(np.float16)),
     TypeError, "weight"),
    ("instance", lambda x, dy, w, b, m, r: nb.instance_norm_train(x, w, b, eps=float("inf")),
     ValueError, "eps"),
    ("instance", lambda x, dy, w, b, m, r: nb.instance_norm_backward(dy, x, m, r, w[:3]),
     ValueError, "weight"),
]


def _good_call(kind, x, dy, w, b, wl, bl):
    """The good forward and backward of ``kind``; returns the saved (mean, rstd)."""
    if kind == "group":
        _, m, r = nb.group_norm_train(x, 3, w, b)
        nb.group_norm_backward(dy, x, m, r, 3, w)
    elif kind == "layer":
        _, m, r = nb.layer_norm_train(x, 5, wl, bl)
        nb.layer_norm_backward(dy, x, m, r, 5, wl)
    elif kind == "rms":
        _, r = nb.rms_norm_train(x, 5, wl)
        nb.rms_norm_backward(dy, x, r, 5, wl)
        m = None
    else:
        _, m, r = nb.instance_norm_train(x, w, b)
        nb.instance_norm_backward(dy, x, m, r, w)
    return m, r


@pytest.mark.parametrize("kind,call,exc,word", BAD,
                         ids=[f"{k}-{i}" for i, (k, *_) in enumerate(BAD)])
def test_bad_input_after_a_good_call_is_refused_and_nothing_changes(rng, kind, call, exc, word):
    x, dy, w, b, wl, bl = _good(rng)
    m, r = _good_call(kind, x, dy, w, b, wl, bl)
    assert any(k[0] == kind and k[1] == x.shape for k in norms._hosts)
    if kind in ("layer", "rms"):
        w, b = np.concatenate([wl, w[5:]]), np.concatenate([bl, b[5:]])
    arrays = [a for a in (x, dy, w, b, m, r) if a is not None]
    before = [a.copy() for a in arrays]
    with pytest.raises(exc) as info:
        call(x, dy, w, b, m, r)
    assert word.lower() in str(info.value).lower(), str(info.value)
    for a, c in zip(arrays, before):
        np.testing.assert_array_equal(a, c)


def test_numpy_scalars_and_other_keys_take_the_general_path_with_the_same_bits(rng):
    x, dy, w, b, wl, bl = _good(rng)
    norms._hosts.clear()
    ref = nb.group_norm_train(x, 3, w, b, eps=1e-5)
    for eps in (np.float64(1e-5), 1e-5):
        got = nb.group_norm_train(x, np.int64(3), w, b, eps=eps)
        for a, c in zip(ref, got):
            np.testing.assert_array_equal(a, c)
    assert not any(type(k[4]) is not int for k in norms._hosts if k[0] == "group")
