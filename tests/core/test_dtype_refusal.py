"""Dtypes other than float32/float64/float16/bfloat16 (integers, bool, complex,
non-native byte order, ml_dtypes' float8 types when installed) are refused by every public
function and layer with one TypeError naming the accepted dtypes and the one
given, before anything is computed or written."""

import numpy as np
import pytest

import numbabn
from numbabn import layers as L

N, C, S = 4, 3, 5


def _float8_params():
    names = ["float8_e4m3fn", "float8_e5m2"]
    try:
        import ml_dtypes
    except ImportError:
        return [pytest.param(None, id=n, marks=pytest.mark.skip(reason="ml_dtypes not installed"))
                for n in names]
    return [pytest.param(np.dtype(getattr(ml_dtypes, n)), id=n) for n in names]


BAD = [pytest.param(np.dtype(d), id=str(np.dtype(d))) for d in
       [np.int8, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, np.int16]]
BAD += [pytest.param(np.dtype(">f4"), id="float32-big-endian"),
        pytest.param(np.dtype(">f2"), id="float16-big-endian")] + _float8_params()
ACCEPTED = "float32, float64, float16 or bfloat16 (native byte order)"
ACCEPTED_RE = r"float32, float64, float16 or bfloat16 \(native byte order\)"


def _arrays(rng):
    f32 = np.float32
    x = rng.standard_normal((N, C, S)).astype(f32)
    return dict(
        x=x, dy=rng.standard_normal(x.shape).astype(f32), y=np.maximum(x, 0),
        mean=rng.standard_normal(C).astype(f32), var=rng.uniform(0.5, 2, C).astype(f32),
        invstd=rng.uniform(0.5, 2, C).astype(f32), weight=rng.uniform(0.5, 2, C).astype(f32),
        bias=rng.standard_normal(C).astype(f32), rm=rng.standard_normal(C).astype(f32),
        rv=rng.uniform(0.5, 2, C).astype(f32), out=np.zeros(x.shape, f32),
        row=np.ones((N, C, 1), f32), group=np.ones((N, C), f32),
        lweight=rng.uniform(0.5, 2, S).astype(f32), lbias=rng.standard_normal(S).astype(f32),
    )


# Every public function, called with valid float32 arguments from ``a``; the
# first array argument (``x``, or ``running_mean``, ``means``) is the one made bad.
CALLS = {
    "batch_stats": lambda a: numbabn.batch_stats(a["x"]),
    "normalize": lambda a: numbabn.normalize(a["x"], a["mean"], a["var"], a["weight"],
                                             a["bias"], out=a["out"]),
    "batch_norm_train": lambda a: numbabn.batch_norm_train(a["x"], a["weight"], a["bias"],
                                                           out=a["out"]),
    "batch_norm_backward": lambda a: numbabn.batch_norm_backward(
        a["dy"], a["x"], a["mean"], a["invstd"], a["weight"], out=a["out"]),
    "update_running_stats": lambda a: numbabn.update_running_stats(
        a["x"][0, :, 0], a["rv"], a["mean"], a["var"], 10),
    "batch_norm": lambda a: numbabn.batch_norm(a["x"], a["rm"], a["rv"], a["weight"], a["bias"],
                                               training=True),
    "batch_moments": lambda a: numbabn.batch_moments(a["x"]),
    "merge_moments": lambda a: numbabn.merge_moments([3, 4], a["x"][:2, :, 0], a["x"][2:, :, 0]),
    "batch_norm_elemt": lambda a: numbabn.batch_norm_elemt(a["x"], a["mean"], a["invstd"],
                                                           a["weight"], a["bias"], out=a["out"]),
    "batch_norm_backward_reduce": lambda a: numbabn.batch_norm_backward_reduce(
        a["dy"], a["x"], a["mean"], a["invstd"]),
    "batch_norm_backward_elemt": lambda a: numbabn.batch_norm_backward_elemt(
        a["dy"], a["x"], a["mean"], a["invstd"], a["weight"], a["mean"], a["var"], 20,
        out=a["out"]),
    "batch_norm_relu_train": lambda a: numbabn.batch_norm_relu_train(a["x"], a["weight"],
                                                                     a["bias"], out=a["out"]),
    "batch_norm_relu_backward": lambda a: numbabn.batch_norm_relu_backward(
        a["dy"], a["y"], a["x"], a["mean"], a["invstd"], a["weight"], out=a["out"]),
    "layer_norm": lambda a: numbabn.layer_norm(a["x"], S, a["lweight"], a["lbias"]),
    "layer_norm_train": lambda a: numbabn.layer_norm_train(a["x"], S, a["lweight"], a["lbias"]),
    "layer_norm_backward": lambda a: numbabn.layer_norm_backward(
        a["dy"], a["x"], a["row"], a["row"], S, a["lweight"]),
    "group_norm": lambda a: numbabn.group_norm(a["x"], C, a["weight"], a["bias"]),
    "group_norm_train": lambda a: numbabn.group_norm_train(a["x"], C, a["weight"], a["bias"]),
    "group_norm_backward": lambda a: numbabn.group_norm_backward(
        a["dy"], a["x"], a["group"], a["group"], C, a["weight"]),
    "instance_norm": lambda a: numbabn.instance_norm(a["x"], a["rm"], a["rv"], a["weight"],
                                                     a["bias"]),
    "instance_norm_train": lambda a: numbabn.instance_norm_train(a["x"], a["weight"], a["bias"]),
    "instance_norm_backward": lambda a: numbabn.instance_norm_backward(
        a["dy"], a["x"], a["group"], a["group"], a["weight"]),
    "rms_norm": lambda a: numbabn.rms_norm(a["x"], S, a["lweight"]),
    "rms_norm_train": lambda a: numbabn.rms_norm_train(a["x"], S, a["lweight"]),
    "rms_norm_backward": lambda a: numbabn.rms_norm_backward(a["dy"], a["x"], a["row"], S,
                                                             a["lweight"]),
}
# Per-feature arguments of x's dtype (a bad one is named with the dtype x needs).
WEIGHTED = {"normalize": "weight", "batch_norm_train": "weight", "batch_norm_backward": "weight",
            "batch_norm": "weight", "batch_norm_elemt": "bias", "batch_norm_relu_train": "bias",
            "batch_norm_relu_backward": "weight", "layer_norm": "lweight",
            "layer_norm_backward": "lweight", "group_norm": "bias", "instance_norm": "rm",
            "instance_norm_train": "bias", "rms_norm_train": "lweight",
            "update_running_stats": "rv", "batch_norm_backward_elemt": "weight"}


def test_every_public_function_is_covered():
    assert sorted(CALLS) == sorted(numbabn.__all__)


def _assert_refused(call, a, dtype, accepted=ACCEPTED):
    """``call(a)`` raises one TypeError naming ``accepted`` and ``dtype``; no array changed."""
    saved = {k: v.copy() for k, v in a.items()}
    with pytest.raises(TypeError) as info:
        call(a)
    message = str(info.value)
    assert accepted in message and str(dtype) in message, message
    for k, v in a.items():
        np.testing.assert_array_equal(v.view(np.uint8), saved[k].view(np.uint8),
                                      err_msg=f"{k} was modified")


@pytest.mark.parametrize("dtype", BAD)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_public_functions_refuse_other_dtypes(rng, name, dtype):
    if name == "merge_moments" and (np.issubdtype(dtype, np.floating)
                                    or np.issubdtype(dtype, np.integer)):
        pytest.skip("merge_moments takes array_like real numbers and converts them to float64")
    a = _arrays(rng)
    a["x"] = a["x"].astype(dtype)
    accepted = "float64" if name == "merge_moments" else ACCEPTED
    _assert_refused(CALLS[name], a, dtype, accepted)


@pytest.mark.parametrize("dtype", [np.dtype(np.int32), np.dtype(np.complex64),
                                   np.dtype(np.float16)], ids=str)
@pytest.mark.parametrize("name", sorted(WEIGHTED))
def test_per_feature_arguments_name_the_dtype_of_x(rng, name, dtype):
    a = _arrays(rng)
    a[WEIGHTED[name]] = a[WEIGHTED[name]].astype(dtype)
    _assert_refused(CALLS[name], a, dtype, accepted="float32")


LAYERS = {  # every layer: constructor arguments and a valid float32 input shape
    "BatchNorm1d": ((C,), (N, C, S)), "BatchNorm2d": ((C,), (N, C, 2, S)),
    "BatchNorm3d": ((C,), (N, C, 2, 2, S)), "BatchRenorm1d": ((C,), (N, C)),
    "BatchRenorm2d": ((C,), (N, C, 2, S)), "BatchNormReLU1d": ((C,), (N, C, S)),
    "BatchNormReLU2d": ((C,), (N, C, 2, S)), "LayerNorm": ((S,), (N, C, S)),
    "GroupNorm": ((1, C), (N, C, S)), "InstanceNorm1d": ((C,), (N, C, S)),
    "InstanceNorm2d": ((C,), (N, C, 2, S)), "InstanceNorm3d": ((C,), (N, C, 2, 2, S)),
    "RMSNorm": ((S,), (N, C, S)),
}


def test_every_layer_is_covered():
    assert sorted(LAYERS) == sorted(set(L.__all__) - {"Layer"})


@pytest.mark.parametrize("dtype", BAD)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_refuse_other_dtypes(rng, name, dtype):
    args, shape = LAYERS[name]
    kwargs = {"affine": True, "track_running_stats": True} if "Instance" in name else {}
    layer = getattr(L, name)(*args, **kwargs)
    for p in layer.params.values():
        p[...] = rng.standard_normal(p.shape)
    before = layer.state_dict()
    x = rng.standard_normal(shape).astype(dtype)
    with pytest.raises(TypeError, match=rf"{ACCEPTED_RE}.*got {str(dtype)}\."):
        layer.forward(x)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    with pytest.raises(TypeError, match=rf"dtype must be {ACCEPTED_RE}.*got {str(dtype)}"):
        getattr(L, name)(*args, dtype=dtype)


GPU_CALLS = ["batch_stats", "batch_norm_train", "batch_norm", "update_running_stats",
             "layer_norm_train", "group_norm", "instance_norm", "rms_norm_backward"]


@pytest.mark.parametrize("dtype", [np.dtype(d) for d in (np.int32, np.bool_, np.complex64,
                                                         np.int16)], ids=str)
@pytest.mark.parametrize("name", GPU_CALLS)
def test_gpu_twins_refuse_other_dtypes(rng, name, dtype):
    """Device arrays go through the same checks (on the CUDA simulator by default)."""
    cuda = pytest.importorskip("numba.cuda")
    if not cuda.is_available():
        pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM is off")
    a = _arrays(rng)
    a["x"] = a["x"].astype(dtype)
    host = {k: v.copy() for k, v in a.items()}
    dev = {k: cuda.to_device(v) for k, v in a.items()}
    with pytest.raises(TypeError, match=rf"{ACCEPTED_RE}; got {dtype}"):
        CALLS[name](dev)
    for k, v in dev.items():
        np.testing.assert_array_equal(v.copy_to_host(), host[k], err_msg=f"{k} was modified")
