"""Layer tests: gradients against central finite differences (float64), forwards
against plain NumPy loops, BatchNorm against PyTorch, state dicts and input checks."""

import numpy as np
import pytest

from numbabn.layers import BatchNorm1d, BatchNorm2d
from numbabn.kit import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential, Sigmoid
from numbabn.kit._kernels import pooling as pool_kernels
from numbabn.kit._kernels import tiles as conv_kernels
from numbabn.kit.losses import cross_entropy
from numbabn.mnist.models import bn_paper_mlp, mnist_cnn

F64 = np.float64


# --------------------------------------------------------------------------- #
# Independent references, written as plain loops.
# --------------------------------------------------------------------------- #
def naive_conv2d(x, w, b, stride, padding):
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    xp = np.zeros((n, cin, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((n, cout, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            y[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return y + (0 if b is None else b[None, :, None, None])


def naive_max_pool(x, k, s, p):
    n, c, h, w = x.shape
    xp = np.full((n, c, h + 2 * p, w + 2 * p), -np.inf)
    xp[:, :, p:p + h, p:p + w] = x
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    y = np.empty((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = xp[:, :, i * s:i * s + k, j * s:j * s + k].max(axis=(2, 3))
    return y


# --------------------------------------------------------------------------- #
# Finite-difference gradient check.
# --------------------------------------------------------------------------- #
def fd_check(layer, x, rng, n_probe=40, h=1e-6, rtol=1e-5, atol=1e-7):
    """Compare ``backward`` (dx and every grad) with central differences of
    ``L = sum(forward(x) * r)`` at ``n_probe`` random coordinates per array."""
    r = rng.standard_normal(layer.forward(x.copy()).shape)

    def loss():
        return float(np.sum(layer.forward(x.copy()) * r))

    layer.forward(x.copy())
    dx = layer.backward(r.copy())
    analytic = {"x": dx, **{k: g.copy() for k, g in layer.grads.items()}}
    targets = {"x": x, **layer.params}
    assert set(layer.grads) == set(layer.params)
    for name, arr in targets.items():
        flat = arr.reshape(-1)
        assert np.shares_memory(flat, arr)
        for i in rng.choice(flat.size, size=min(n_probe, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + h
            up = loss()
            flat[i] = old - h
            down = loss()
            flat[i] = old
            numeric = (up - down) / (2 * h)
            got = analytic[name].reshape(-1)[i]
            assert abs(got - numeric) <= atol + rtol * abs(numeric) + 1e-6 * np.abs(r).sum() * h, \
                f"{type(layer).__name__} d{name}[{i}]: backward {got}, finite difference {numeric}"


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(rng, bias):
    fd_check(Linear(7, 5, bias=bias, dtype=F64, rng=rng), rng.standard_normal((6, 7)), rng)


def test_linear_forward_matches_matmul(rng):
    layer = Linear(4, 3, rng=rng)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(layer.forward(x), x.astype(F64) @ layer.weight.T.astype(F64) + layer.bias,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,fan_in,fan_out,bias", [(33, 2064, 70, True), (8, 512, 1, False),
                                                  (128, 9216, 128, True), (5, 40, 9, True)])
def test_linear_direct_matches_float64(rng, monkeypatch, tile_kernels, n, fan_in, fan_out, bias):
    """The tiles (float32, K blocks of LINEAR_K_BLOCK) against the float64 layer;
    bits that do not depend on the thread count; small layers keep BLAS."""
    import numba
    from numbabn import _config

    monkeypatch.setattr(_config, "LINEAR_K_BLOCK", 512)
    layer = Linear(fan_in, fan_out, bias=bias, rng=rng)
    assert layer._direct(n) == (n * fan_in * fan_out >= _config.LINEAR_DIRECT_MIN_MACS)
    monkeypatch.setattr(_config, "LINEAR_DIRECT_MIN_MACS", 1)
    assert layer._direct(n) == (fan_in % tile_kernels.LANES == 0)   # 40: AVX2's tiles only
    ref = Linear(fan_in, fan_out, bias=bias, dtype=F64)
    ref.load_state_dict(layer.state_dict())
    x = rng.standard_normal((n, fan_in)).astype(np.float32)
    dy = rng.standard_normal((n, fan_out)).astype(np.float32)
    runs = []
    previous = numba.get_num_threads()
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        runs.append((layer.forward(x), layer.backward(dy), *[g.copy() for g in layer.grads.values()]))
    numba.set_num_threads(previous)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    wants = [ref.forward(x.astype(F64)), ref.backward(dy.astype(F64)), *ref.grads.values()]
    for got, want in zip(runs[0], wants):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    monkeypatch.setattr(_config, "LINEAR_DIRECT_MIN_MACS", None)
    assert not layer._direct(n)


CONV_CASES = [  # cin, cout, kernel, stride, padding, (h, w)
    (1, 3, 3, 1, 0, (7, 6)),
    (3, 4, (2, 3), (2, 1), (1, 2), (8, 7)),
    (2, 2, 3, 2, 1, (5, 5)),
]


@pytest.mark.parametrize("cin,cout,k,s,p,hw", CONV_CASES)
def test_conv2d_forward_matches_naive(rng, cin, cout, k, s, p, hw):
    conv = Conv2d(cin, cout, k, stride=s, padding=p, dtype=F64, rng=rng)
    x = rng.standard_normal((3, cin) + hw)
    y = conv.forward(x)
    ref = naive_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin,cout,k,s,p,hw", CONV_CASES)
def test_conv2d_gradients(rng, cin, cout, k, s, p, hw):
    fd_check(Conv2d(cin, cout, k, stride=s, padding=p, dtype=F64, rng=rng),
             rng.standard_normal((2, cin) + hw), rng)


def test_conv2d_accepts_any_memory_layout(rng):
    conv = Conv2d(3, 4, 3, dtype=F64, rng=rng)
    x = rng.standard_normal((2, 5, 6, 3)).transpose(0, 3, 1, 2)   # channels-last memory
    np.testing.assert_array_equal(conv.forward(x), conv.forward(np.ascontiguousarray(x)))


def test_conv2d_chunked_batch_matches_whole(rng, monkeypatch):
    from numbabn.kit import conv as conv_module
    conv = Conv2d(2, 3, 3, dtype=F64, rng=rng)
    x = rng.standard_normal((5, 2, 6, 6))
    dy = rng.standard_normal((5, 3, 4, 4))
    y_whole, dx_whole = conv.forward(x), conv.backward(dy)
    dw_whole = conv.grads["weight"].copy()
    monkeypatch.setattr(conv_module._config, "IM2COL_CHUNK_BYTES", 1)   # one image per chunk
    np.testing.assert_allclose(conv.forward(x), y_whole, rtol=1e-13)
    np.testing.assert_allclose(conv.backward(dy), dx_whole, rtol=1e-13)
    np.testing.assert_allclose(conv.grads["weight"], dw_whole, rtol=1e-12)


def test_conv2d_reused_column_buffer_gives_fresh_results(rng):
    """The layer reuses its column buffer: results must equal a fresh layer's, for
    batches of other sizes in between (bigger, smaller) and an eval pass."""
    import copy

    conv = Conv2d(2, 3, 3, dtype=F64, rng=rng)
    fresh = copy.deepcopy(conv)
    x1, x2, x3 = (rng.standard_normal((n, 2, 6, 6)) for n in (4, 7, 2))
    dy = rng.standard_normal((2, 3, 4, 4))
    conv.forward(x1)
    conv.backward(rng.standard_normal((4, 3, 4, 4)))
    conv.eval().forward(x2)
    conv.train()
    y = conv.forward(x3)
    dx = conv.backward(dy)
    np.testing.assert_array_equal(y, fresh.forward(x3))
    np.testing.assert_array_equal(dx, fresh.backward(dy))
    np.testing.assert_array_equal(conv.grads["weight"], fresh.grads["weight"])


DIRECT_CASES = [  # cin, cout, kernel, padding, (h, w), bias: float32 stride-1 direct convolutions
    (32, 64, 3, 0, (9, 8), True),      # the cnn's second convolution, smaller images
    (1, 32, 3, 0, (8, 9), True),       # the first (input gradient through GEMM and col2im)
    (16, 48, (3, 2), (1, 0), (7, 13), False),   # 3 vectors of 16 outputs, padding, no bias
    (16, 16, 1, 0, (3, 31), True),     # rows of 31 pixels: tiles across rows, the last one short
    (48, 128, (2, 5), (1, 2), (5, 6), True),    # two blocks of 64 outputs, padded input gradient
    (16, 32, 2, 3, (4, 4), True),      # padding >= kernel: input gradient through GEMM
    (8, 24, 3, 1, (6, 11), True),      # multiples of 8 only: direct with AVX2's tiles, else im2col
    (24, 8, (1, 3), (0, 1), (5, 26), False),   # AVX2: 1-vector tiles; rows of 26 pixels
]


@pytest.mark.parametrize("cin,cout,k,p,hw,bias", DIRECT_CASES)
def test_conv2d_direct_matches_float64(rng, tile_kernels, cin, cout, k, p, hw, bias):
    """The direct kernels (float32) against the float64 im2col layer with the same
    weights (output, input gradient and both parameter gradients) and the output
    against plain NumPy loops."""
    conv = Conv2d(cin, cout, k, padding=p, bias=bias, rng=rng)
    assert conv._direct() == (cout % tile_kernels.LANES == 0)
    ref = Conv2d(cin, cout, k, padding=p, bias=bias, dtype=F64)
    ref.load_state_dict(conv.state_dict())
    x = rng.standard_normal((11, cin) + hw).astype(np.float32)
    y = conv.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = conv.backward(dy)
    y_ref, dx_ref = ref.forward(x.astype(F64)), ref.backward(dy.astype(F64))
    y_naive = naive_conv2d(x.astype(F64), ref.weight, ref.bias, (1, 1), conv.padding)
    for got, want in ([(y, y_ref), (y, y_naive), (dx, dx_ref)]
                      + [(conv.grads[k], ref.grads[k]) for k in ref.grads]):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert conv.backward(dy, input_grad=False) is None


def _direct_conv_bits(kernels, x, w, b, dy, pad, tasks, block_images):
    """Forward, input gradient and weight gradient of the direct kernels."""
    y, dx, dw = np.empty(dy.shape, np.float32), np.empty_like(x), np.empty_like(w)
    w_flip = np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))
    kernels.conv_forward(x, w, b, True, pad, pad, 128, y, tasks)
    kernels.conv_input_grad(dy, w_flip, pad, pad, 128, dx, tasks)
    kernels.conv_weight_grad(x, dy, pad, pad, block_images, 128, dw)
    return y, dx, dw


def test_conv2d_direct_bits_do_not_depend_on_threads_or_task_count(rng, tile_kernels):
    """Tasks and threads share the images only: every output value (and the weight
    gradient's fixed blocks of images) is summed in the same order."""
    import numba

    x = rng.standard_normal((9, 6, 7, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 32, 64)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    dy = rng.standard_normal((9, 6, 7, 64)).astype(np.float32)
    runs = []
    previous = numba.get_num_threads()
    for threads, tasks in [(1, 1), (numba.config.NUMBA_NUM_THREADS, 4)]:
        numba.set_num_threads(threads)
        runs.append(_direct_conv_bits(tile_kernels, x, w, b, dy, 1, tasks, 2))
    numba.set_num_threads(previous)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not conv_kernels.DIRECT_CONV_CPU,
                    reason="the register tiles need AVX2 and FMA or AVX-512")
def test_tile_widths_give_the_same_bits(rng):
    """AVX2's tiles (8 floats, 6 x 2 vectors) and AVX-512's (16 floats, 6 x 4,
    13 x 2, 8 x 1) sum every value in the same order, repeated rows of partial
    tiles included: the same bits for the convolutions and the linear gradients
    (the linear forward's lanes are added in trees of another size)."""
    kernels = [conv_kernels.with_lanes(lanes) for lanes in (8, 16)]
    x = rng.standard_normal((5, 7, 26, 32)).astype(np.float32)    # rows of 26 and 28 pixels
    w = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    dy = rng.standard_normal((5, 7, 26, 32)).astype(np.float32)
    runs = [_direct_conv_bits(k, x, w, b, dy, 1, 2, 2) for k in kernels]
    xl = rng.standard_normal((13, 272)).astype(np.float32)
    wl = rng.standard_normal((19, 272)).astype(np.float32)
    dyl = rng.standard_normal((13, 19)).astype(np.float32)
    for k, run in zip(kernels, runs):
        dxl, dwl = np.empty_like(xl), np.empty_like(wl)
        k.linear_input_grad(dyl, wl, 128, dxl)
        k.linear_weight_grad(dyl, xl, 128, dwl)
        run += (dxl, dwl)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_conv2d_direct_switch_falls_back_to_im2col(rng, monkeypatch):
    """CONV_DIRECT=False, float64, strides and channel counts off the 16-grid take im2col."""
    from numbabn.kit import conv as conv_module
    conv = Conv2d(16, 32, 3, rng=rng)
    assert conv._direct() == conv_kernels.DIRECT_CONV_CPU
    monkeypatch.setattr(conv_module._config, "CONV_DIRECT", False)
    assert not conv._direct()
    monkeypatch.undo()
    assert not Conv2d(16, 32, 3, dtype=F64)._direct()
    assert not Conv2d(16, 32, 3, stride=2)._direct()
    assert not Conv2d(16, 20, 3)._direct()
    assert not Conv2d(4, 32, 3)._direct_input_grad()
    assert Conv2d(8, 24, 3)._direct() == (conv_kernels.DIRECT_CONV_CPU and conv_kernels.LANES == 8)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_max_pool_forward_and_gradients(rng, k, s, p):
    x = rng.standard_normal((2, 3, 7, 6))
    pool = MaxPool2d(k, stride=s, padding=p)
    np.testing.assert_array_equal(pool.forward(x), naive_max_pool(x, k, s, p))
    fd_check(pool, x, rng)


@pytest.mark.parametrize("k,hw", [(2, (7, 6)), (3, (6, 8)), ((2, 3), (5, 9))])
def test_max_pool_tiled_backward_matches_scatter(rng, k, hw):
    """Windows that tile the input: the one-write backward gives the scatter-add
    kernel's bits (0 in leftover rows and columns, -0.0 in dy as 0.0)."""

    pool = MaxPool2d(k)
    pool.forward(rng.standard_normal((2, 5) + hw).astype(np.float32))
    argmax = pool._cache[0]
    dy = rng.standard_normal(argmax.shape).astype(np.float32)
    dy[0, 0, 0, :2] = [-0.0, np.nan]
    dx_tiled, dx_scatter = (np.full((2,) + hw + (5,), 7, np.float32) for _ in range(2))
    pool_kernels.max_pool_backward_tiled(dy, argmax, *pool.kernel_size, dx_tiled)
    pool_kernels.max_pool_backward(dy, argmax, dx_scatter)
    assert dx_tiled.tobytes() == dx_scatter.tobytes()


def test_max_pool_ties_go_to_the_first_maximum():
    x = np.zeros((1, 1, 2, 2))
    pool = MaxPool2d(2)
    pool.forward(x)
    np.testing.assert_array_equal(pool.backward(np.ones((1, 1, 1, 1))), [[[[1.0, 0.0], [0.0, 0.0]]]])


@pytest.mark.parametrize("make", [ReLU, Sigmoid, Flatten], ids=lambda m: m.__name__)
def test_parameterless_gradients(rng, make):
    fd_check(make(), rng.standard_normal((4, 3, 5)), rng)


def test_sigmoid_is_stable_for_large_inputs():
    y = Sigmoid().forward(np.array([[-1e4, -50.0, 0.0, 50.0, 1e4]]))
    np.testing.assert_allclose(y, [[0.0, 1 / (1 + np.exp(50.0)), 0.5, 1 / (1 + np.exp(-50.0)), 1.0]],
                               rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("layout", ["c", "nhwc-memory", "strided"])
def test_relu_backward_layouts_and_nonfinite(rng, layout):
    """The flat kernel (dense arrays in any axis order) and the strided fallback
    both give ``dy`` where ``y > 0`` and 0 elsewhere, even for NaN/inf in ``dy``
    (PyTorch's threshold_backward), in the layout of the output."""
    shape = (3, 4, 5, 6)
    def make(a):
        if layout == "nhwc-memory":
            return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        if layout == "strided":
            big = np.zeros(shape[:-1] + (2 * shape[-1],), a.dtype)
            big[..., ::2] = a
            return big[..., ::2]
        return a
    x = make(rng.standard_normal(shape).astype(np.float32))
    dy = rng.standard_normal(shape).astype(np.float32)
    dy[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    x[0, 0, 0, :3] = [-1.0, -2.0, 3.0]
    dy = make(dy)
    relu = ReLU()
    y = relu.forward(x)
    dx = relu.backward(dy)
    np.testing.assert_array_equal(dx, np.where(y > 0, dy, 0))
    assert dx[0, 0, 0, 0] == 0 and dx[0, 0, 0, 1] == 0 and dx[0, 0, 0, 2] == -np.inf
    assert dx.strides == y.strides


def test_flatten_backward_returns_the_input_layout(rng):
    x = rng.standard_normal((3, 5, 4, 6)).astype(np.float32).transpose(0, 3, 1, 2)  # channels-last
    for flatten in (Flatten(), Flatten(start_dim=2)):
        y = flatten.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = flatten.backward(dy)
        assert dx.strides == x.strides
        np.testing.assert_array_equal(dx, dy.reshape(x.shape))
    c_order = np.ascontiguousarray(x)
    flatten = Flatten()
    assert flatten.backward(flatten.forward(c_order)).flags.c_contiguous


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_forward_has_np_maximum_bits(rng, monkeypatch, inplace):
    from numbabn import _config

    monkeypatch.setattr(_config, "SERIAL_MAX_ELEMS", 0)   # the kernel even for small inputs
    x = rng.standard_normal((4, 6, 5, 3)).astype(np.float32)
    x.reshape(-1)[:7] = [-0.0, 0.0, np.nan, -np.nan, np.inf, -np.inf, -1.0]
    x = x.transpose(0, 3, 1, 2)   # channels-last memory
    want = np.maximum(x, 0)
    y = ReLU(inplace=inplace).forward(x)
    assert y.tobytes(order="A") == want.tobytes(order="A") and y.strides == x.strides
    assert (y is x) == inplace


def test_relu_inplace_writes_into_input(rng):
    x = rng.standard_normal((3, 4))
    y = ReLU(inplace=True).forward(x)
    assert y is x and (x >= 0).all()


def test_dropout_train_and_eval(rng):
    x = rng.standard_normal((200, 50))
    drop = Dropout(0.3, rng=np.random.default_rng(0))
    y = drop.forward(x)
    kept = y != 0
    assert 0.65 < kept.mean() < 0.75
    np.testing.assert_allclose(y[kept], x[kept] / 0.7)
    np.testing.assert_array_equal(drop.backward(np.ones_like(x)), np.where(kept, 1 / 0.7, 0.0))
    # The same seed gives the same mask; eval mode is the identity.
    np.testing.assert_array_equal(Dropout(0.3, rng=np.random.default_rng(0)).forward(x), y)
    np.testing.assert_array_equal(drop.eval().forward(x), x)


@pytest.mark.parametrize("shape,layout", [((16, 64, 6, 5), "channels-last"), ((33, 7), "c"),
                                          ((3, 4, 5), "c"), ((1,), "c")])
@pytest.mark.parametrize("p", [0.25, 0.5, 0.9])
def test_dropout_draws_numpys_masks_in_parallel(rng, monkeypatch, shape, layout, p):
    """The parallel PCG64 kernel gives NumPy's masks (rng.random(x.shape,
    float32) >= p) and leaves the generator as NumPy's draw does, after an odd
    or even number of earlier draws, with any thread count; the gradient takes
    the input's layout."""
    import numba
    from numbabn import _config

    monkeypatch.setattr(_config, "SERIAL_MAX_ELEMS", 0)   # the kernel even for small inputs
    x = rng.standard_normal(shape).astype(np.float32)
    if layout == "channels-last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = rng.standard_normal(shape).astype(np.float32)
    previous = numba.get_num_threads()
    for threads, earlier in [(1, 0), (numba.config.NUMBA_NUM_THREADS, 1), (1, 3)]:
        ours, numpys = np.random.default_rng(earlier), np.random.default_rng(earlier)
        ours.random(earlier, dtype=np.float32)
        numpys.random(earlier, dtype=np.float32)
        numba.set_num_threads(threads)
        try:
            drop = Dropout(p, rng=ours)
            y, dx = drop.forward(x), drop.backward(dy)
        finally:
            numba.set_num_threads(previous)
        scale = np.multiply(numpys.random(shape, dtype=np.float32) >= p, 1.0 / (1.0 - p), dtype=np.float32)
        np.testing.assert_array_equal(y, x * scale)
        np.testing.assert_array_equal(dx, dy * scale)
        assert dx.strides == x.strides
        assert ours.bit_generator.state == numpys.bit_generator.state
        assert ours.random() == numpys.random()


@pytest.mark.parametrize("shape,cls", [((6, 4), BatchNorm1d), ((5, 4, 3), BatchNorm1d),
                                       ((3, 4, 3, 2), BatchNorm2d)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(rng, shape, cls, training):
    bn = cls(4, dtype=F64)
    bn.weight[...] = rng.uniform(0.5, 2.0, 4)
    bn.bias[...] = rng.standard_normal(4)
    bn.running_mean[...] = rng.standard_normal(4)
    bn.running_var[...] = rng.uniform(0.5, 2.0, 4)
    bn.train(training)
    fd_check(bn, rng.standard_normal(shape) * 2 + 1, rng)


def test_sequential_gradients(rng):
    model = Sequential(Linear(5, 6, dtype=F64, rng=rng), BatchNorm1d(6, dtype=F64), Sigmoid(),
                       Linear(6, 3, dtype=F64, rng=rng))
    fd_check(model, rng.standard_normal((8, 5)), rng)


def test_small_cnn_gradients(rng):
    model = Sequential(Conv2d(1, 2, 3, dtype=F64, rng=rng), ReLU(), BatchNorm2d(2, dtype=F64),
                       MaxPool2d(2), Flatten(), Linear(8, 3, dtype=F64, rng=rng))
    fd_check(model, rng.standard_normal((3, 1, 6, 6)), rng, n_probe=15)


# --------------------------------------------------------------------------- #
# BatchNorm against PyTorch.
# --------------------------------------------------------------------------- #
BN_CONFIGS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
              dict(momentum=0.3, eps=1e-3)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", BN_CONFIGS, ids=str)
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (16, 5)), ("BatchNorm1d", (8, 5, 3)),
                                       ("BatchNorm2d", (4, 5, 3, 6))])
def test_batchnorm_matches_torch(rng, dtype, config, cls, shape):
    torch = pytest.importorskip("torch")
    ours = {"BatchNorm1d": BatchNorm1d, "BatchNorm2d": BatchNorm2d}[cls](5, dtype=dtype, **config)
    ref = getattr(torch.nn, cls)(5, **config).to(torch.float64 if dtype == np.float64 else torch.float32)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)

    def compare(x, dy):
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = ref(xt)
        yt.backward(torch.from_numpy(dy))
        y = ours.forward(x)
        dx = ours.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
        if ours.affine:
            np.testing.assert_allclose(ours.grads["weight"], ref.weight.grad.numpy(), **tol)
            np.testing.assert_allclose(ours.grads["bias"], ref.bias.grad.numpy(), **tol)
            ref.weight.grad = ref.bias.grad = None
        if ours.track_running_stats:
            np.testing.assert_allclose(ours.running_mean, ref.running_mean.numpy(), **tol)
            np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), **tol)
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)

    for step in range(4):
        x = (rng.standard_normal(shape) * 3 + step).astype(dtype)
        compare(x, rng.standard_normal(shape).astype(dtype))
        if ours.affine:   # a stand-in for an optimizer step
            delta = rng.standard_normal(5).astype(dtype) * 0.1
            ours.weight += delta
            ours.bias -= delta
            with torch.no_grad():
                ref.weight += torch.from_numpy(delta)
                ref.bias -= torch.from_numpy(delta)
    ours.eval()
    ref.eval()
    compare((rng.standard_normal(shape) * 2 - 1).astype(dtype), rng.standard_normal(shape).astype(dtype))


def test_batchnorm_channels_last_input_keeps_layout(rng):
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    bn_a, bn_b = BatchNorm2d(3), BatchNorm2d(3)
    y_cl = bn_b.forward(x_cl)
    np.testing.assert_allclose(y_cl, bn_a.forward(x), rtol=1e-5, atol=1e-6)
    assert y_cl.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_allclose(bn_b.running_var, bn_a.running_var, rtol=1e-6)


def test_models_match_torch_forward_and_state_dict_keys(rng):
    torch = pytest.importorskip("torch")
    from scripts.bench_train import torch_model_like
    model = mnist_cnn(rng)
    net = torch_model_like(model)           # loads our state dict by key
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    drops = [m for m in list(model.layers) + list(net) if type(m).__name__ == "Dropout"]
    assert len(drops) == 4
    for mode in (True, False):
        model.train(mode)
        net.train(mode)
        for m in drops:  # in training mode the two frameworks' masks differ: compare without
            m.p = 0.5 if not mode else 0.0
        np.testing.assert_allclose(model.forward(x.copy()), net(torch.from_numpy(x)).detach().numpy(),
                                   rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- #
# State dicts and input checks.
# --------------------------------------------------------------------------- #
def test_state_dict_round_trip(rng):
    a = bn_paper_mlp(np.random.default_rng(0))
    b = bn_paper_mlp(np.random.default_rng(1))
    a.forward(rng.random((10, 1, 28, 28), dtype=np.float32))   # moves running stats
    state = a.state_dict()
    assert set(state) == set(a.params) | set(a.buffers)
    assert "2.num_batches_tracked" in state and "2.running_var" in state   # 0 is Flatten
    assert int(state["2.num_batches_tracked"]) == 1
    b.load_state_dict(state)
    for key, value in b.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    state["1.weight"] += 1.0                               # a copy: changes do not leak back
    assert not np.array_equal(state["1.weight"], a.params["1.weight"])


def test_load_state_dict_errors_leave_layer_unchanged(rng):
    model = mnist_cnn(rng)
    before = model.state_dict()
    bad_shape = dict(before, **{"0.weight": np.zeros((32, 1, 5, 5), np.float32)})
    bad_shape["11.bias"] = np.ones(10, np.float32)          # valid, checked before the bad one fails
    with pytest.raises(ValueError, match=r"'0.weight' must have shape \(32, 1, 3, 3\)"):
        model.load_state_dict(bad_shape)
    missing = {k: v for k, v in before.items() if k != "2.running_mean"}
    with pytest.raises(KeyError, match=r"Missing: \['2.running_mean'\]"):
        model.load_state_dict(missing)
    with pytest.raises(KeyError, match=r"unexpected: \['99.weight'\]"):
        model.load_state_dict(dict(before, **{"99.weight": np.zeros(3)}))
    with pytest.raises(TypeError, match="castable"):
        model.load_state_dict(dict(before, **{"0.bias": before["0.bias"].astype(np.complex64)}))
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize("layer,x,error,match", [
    (Linear(4, 3), np.zeros((2, 5), np.float32), ValueError, r"shape \(\*, 4\), with 4 at axis 1; got shape \(2, 5\)"),
    (Linear(4, 3), np.zeros((2, 4), np.float64), TypeError, "expects dtype float32"),
    (Linear(4, 3), [[0.0] * 4], TypeError, "numpy.ndarray"),
    (Conv2d(3, 2, 3), np.zeros((2, 1, 5, 5), np.float32), ValueError, r"\(\*, 3, \*, \*\)"),
    (Conv2d(1, 2, 5), np.zeros((2, 1, 3, 3), np.float32), ValueError, "smaller than the kernel"),
    (BatchNorm2d(3), np.zeros((2, 3, 4), np.float32), ValueError, r"\(\*, 3, \*, \*\)"),
    (BatchNorm1d(3), np.zeros((2, 4), np.float32), ValueError, r"\(\*, 3\)"),
    (MaxPool2d(2), np.zeros((2, 3), np.float32), ValueError, "4 dimensions"),
    (ReLU(), np.zeros(3, np.int64), TypeError, "float32 or float64"),
])
def test_bad_inputs_raise_clear_errors(layer, x, error, match):
    with pytest.raises(error, match=match):
        layer.forward(x)


def test_bad_input_does_not_change_batchnorm_state():
    bn = BatchNorm1d(3)
    with pytest.raises(ValueError):
        bn.forward(np.ones((1, 3), np.float32))   # one value per feature cannot be trained on
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.running_var, np.ones(3))


def test_backward_checks(rng):
    layer = Linear(4, 3)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((2, 3), np.float32))
    layer.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"dy of shape \(2, 3\)"):
        layer.backward(np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("make,match", [
    (lambda: BatchNorm1d(0), "num_features"),
    (lambda: BatchNorm1d(3, momentum=1.5), "momentum"),
    (lambda: BatchNorm1d(3, eps=0.0), "eps"),
    (lambda: Conv2d(1, 2, (3, 3, 3)), "kernel_size"),
    (lambda: MaxPool2d(2, padding=2), "half the kernel"),
    (lambda: Dropout(1.0), "p must be"),
    (lambda: Linear(3, 2, dtype=np.int32), "float32 or float64"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_cross_entropy_matches_torch_and_is_stable(rng):
    logits = rng.standard_normal((7, 5)) * 3
    targets = rng.integers(0, 5, 7)
    loss, dlogits = cross_entropy(logits, targets)
    # Finite differences of the loss.
    h = 1e-6
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (cross_entropy(up, targets)[0] - cross_entropy(down, targets)[0]) / (2 * h)
    np.testing.assert_allclose(dlogits, numeric, rtol=1e-6, atol=1e-9)
    big = np.array([[1e4, 0.0, -1e4]], np.float32)
    loss_big, grad_big = cross_entropy(big, np.array([1]))
    assert loss_big == pytest.approx(1e4) and np.isfinite(grad_big).all()
    torch = pytest.importorskip("torch")
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets))
    assert loss == pytest.approx(float(ref), rel=1e-12)


@pytest.mark.parametrize("targets,match", [(np.array([0, 3]), r"\[0, 3\)"), (np.array([0.0, 1.0]), "integer")])
def test_cross_entropy_bad_targets(targets, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(np.zeros((2, 3)), targets)


@pytest.mark.parametrize("build", [
    lambda rng: Sequential(Conv2d(1, 3, 3, dtype=F64, rng=rng), ReLU(), BatchNorm2d(3, dtype=F64),
                           Flatten(), Linear(3 * 4 * 4, 5, dtype=F64, rng=rng)),
    lambda rng: Sequential(Flatten(), Linear(36, 5, dtype=F64, rng=rng), ReLU(),
                           BatchNorm1d(5, dtype=F64), Linear(5, 2, dtype=F64, rng=rng)),
    lambda rng: Sequential(BatchNorm2d(1, dtype=F64), Conv2d(1, 2, 3, dtype=F64, rng=rng), Flatten()),
], ids=["conv-first", "flatten-then-linear", "batchnorm-first"])
def test_backward_without_input_grad_gives_the_same_parameter_grads(rng, build):
    """``input_grad=False`` skips dL/dx of the input, nothing else: the same
    parameter gradients to the bit, and None returned."""
    model = build(np.random.default_rng(5))
    x = rng.standard_normal((4, 1, 6, 6))
    y = model.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = model.backward(dy)
    assert dx.shape == x.shape
    full = {k: v.copy() for k, v in model.grads.items()}
    for g in model.grads.values():
        g[...] = np.nan
    model.forward(x)
    assert model.backward(dy, input_grad=False) is None
    for k, g in model.grads.items():
        np.testing.assert_array_equal(g, full[k], err_msg=k)


def test_backward_without_input_grad_and_no_parameters(rng):
    model = Sequential(ReLU(), Flatten())
    x = rng.standard_normal((2, 3, 4))
    model.forward(x)
    assert model.backward(rng.standard_normal((2, 12)), input_grad=False) is None
    with pytest.raises(TypeError, match="input_grad"):
        model.backward(rng.standard_normal((2, 12)), input_grad="no")
