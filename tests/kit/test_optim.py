"""SGD and Adam against torch.optim, state round-trips and argument checks."""

import zlib

import numpy as np
import pytest

from numbabn.kit.optim import SGD, Adam


def _params(rng, dtype):
    return {"a.weight": rng.standard_normal((4, 3)).astype(dtype),
            "a.bias": rng.standard_normal(4).astype(dtype)}


def _run_both(rng, ours_cls, torch_cls, kwargs, dtype=np.float64, steps=6):
    torch = pytest.importorskip("torch")
    params = _params(rng, dtype)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params.values()]
    ours = ours_cls(params, **kwargs)
    ref = torch_cls(tparams, **kwargs)
    for _ in range(steps):
        grads = {k: rng.standard_normal(p.shape).astype(dtype) for k, p in params.items()}
        ours.step(grads)
        for t, g in zip(tparams, grads.values()):
            t.grad = torch.from_numpy(g.copy())
        ref.step()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    for p, t in zip(params.values(), tparams):
        np.testing.assert_allclose(p, t.detach().numpy(), **tol)


SGD_CONFIGS = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3),
               dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2), dict(lr=0.1, weight_decay=0.1)]


@pytest.mark.parametrize("kwargs", SGD_CONFIGS, ids=str)
def test_sgd_matches_torch(rng_seed, kwargs):
    torch = pytest.importorskip("torch")
    _run_both(np.random.default_rng(rng_seed), SGD, torch.optim.SGD, kwargs)


ADAM_CONFIGS = [dict(lr=1e-3), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6), dict(lr=1e-2, weight_decay=0.1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", ADAM_CONFIGS, ids=str)
def test_adam_matches_torch(rng_seed, kwargs, dtype):
    torch = pytest.importorskip("torch")
    _run_both(np.random.default_rng(rng_seed), Adam, torch.optim.Adam, kwargs, dtype=dtype)


@pytest.fixture
def rng_seed(request):
    # Fixed per test (str hashes are salted per process; crc32 is not).
    return zlib.crc32(request.node.nodeid.encode())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_adam_kernel_gives_the_numpy_bits(rng, monkeypatch, dtype, weight_decay, kernel):
    """Contiguous parameters take the one-pass kernel (on the calling thread up
    to SERIAL_MAX_ELEMS values, else parallel), strided ones the NumPy
    expressions: the same values must come out to the bit, step after step."""
    from numbabn import _config
    monkeypatch.setattr(_config, "SERIAL_MAX_ELEMS", 1 << 20 if kernel == "serial" else 0)
    shapes = {"w": (33, 17), "b": (17,)}
    flat = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    strided = {k: np.zeros(s[:-1] + (2 * s[-1],), dtype)[..., ::2] for k, s in shapes.items()}
    for k in shapes:
        strided[k][...] = flat[k]
    start = {k: v.copy() for k, v in flat.items()}
    fast = Adam(flat, lr=3e-3, weight_decay=weight_decay)
    slow = Adam(strided, lr=3e-3, weight_decay=weight_decay)
    for _ in range(5):
        grads = {k: rng.standard_normal(s).astype(dtype) * 1e-3 for k, s in shapes.items()}
        fast.step(grads)
        slow.step({k: np.ascontiguousarray(g) for k, g in grads.items()})
        for k in shapes:
            np.testing.assert_array_equal(flat[k], strided[k])
    assert all(np.all(flat[k] != start[k]) for k in shapes)  # every value moved


def test_adam_first_step_moves_each_param_by_lr():
    # With bias correction the first step is lr * sign(g) (up to eps).
    params = {"w": np.array([1.0, -2.0, 3.0])}
    Adam(params, lr=0.1).step({"w": np.array([0.5, -4.0, 1e-3])})
    np.testing.assert_allclose(params["w"], [0.9, -1.9, 2.9], rtol=1e-6)


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: Adam(p, lr=0.01)])
def test_state_dict_resumes_bitwise(make):
    rng = np.random.default_rng(0)
    grads = [{"w": rng.standard_normal(5)} for _ in range(6)]
    straight = {"w": np.ones(5)}
    opt = make(straight)
    for g in grads:
        opt.step(g)
    first = {"w": np.ones(5)}
    opt_a = make(first)
    for g in grads[:3]:
        opt_a.step(g)
    resumed = {"w": first["w"].copy()}
    opt_b = make(resumed)
    opt_b.load_state_dict(opt_a.state_dict())
    for g in grads[3:]:
        opt_b.step(g)
    np.testing.assert_array_equal(resumed["w"], straight["w"])


def test_bad_grads_and_state_are_rejected_without_change():
    params = {"w": np.ones(3), "b": np.zeros(2)}
    opt = Adam(params)
    with pytest.raises(KeyError, match="keys of params"):
        opt.step({"w": np.ones(3)})
    with pytest.raises(ValueError, match=r"grads\['b'\] must be an ndarray of shape \(2,\)"):
        opt.step({"w": np.ones(3), "b": np.ones(3)})
    assert opt.step_count == 0 and (params["w"] == 1).all()
    state = opt.state_dict()
    with pytest.raises(KeyError, match="missing keys"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "exp_avg.w"})
    with pytest.raises(ValueError, match="'exp_avg_sq.b' must have shape"):
        opt.load_state_dict(dict(state, **{"exp_avg_sq.b": np.zeros(5)}))


@pytest.mark.parametrize("make,match", [
    (lambda: SGD({"w": np.ones(2)}, lr=-1.0), "lr"),
    (lambda: SGD({"w": np.ones(2)}, lr=0.1, nesterov=True), "Nesterov"),
    (lambda: Adam({"w": np.ones(2)}, betas=(0.9, 1.0)), "betas"),
    (lambda: Adam({}), "non-empty dict"),
    (lambda: Adam({"w": np.ones(2, np.int64)}), "float ndarray"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
