"""``Conv2d`` as im2col + one BLAS GEMM, channels-last inside.

Inputs and outputs have PyTorch's logical shape ``(N, C, H, W)``, but the output
is a transposed view of channels-last memory ``(N, H, W, C)``: that is the
GEMM's natural output, BatchNorm2d reads it with its channels-contiguous kernels,
elementwise layers keep the layout, and the next Conv2d gets its channels-last
input without a copy.

Float32 stride-1 convolutions with output channels in multiples of the tiles'
vector width run as direct convolutions on a CPU with AVX-512 (16 floats) or
AVX2 and FMA (8 floats), the width being the one Numba compiles for (see
:mod:`numbabn.kit._kernels.tiles` and ``_config.CONV_DIRECT``): the forward,
the weight gradient and (when the input channels are a multiple of the width
too) the input gradient sum register tiles straight from the images, with no
column buffer.

Other convolutions use im2col and one BLAS GEMM.  The batch is processed in
chunks of at most ``IM2COL_CHUNK_BYTES`` of columns.  In training mode, when the
whole batch fits in one chunk, the forward's columns are kept for the backward
pass; otherwise the backward recomputes each chunk's.  The column buffer is kept
by the layer and reused from call to call: a fresh buffer of that size (85 MB
for the cnn's second convolution) comes from the system each time and costs its
page faults (about 11 ms per step here).
"""

from __future__ import annotations

import numba
import numpy as np

from .. import _config
from ..layers import _check
from ._kernels import im2col as _im2col
from ._kernels import tiles as _tiles
from ._init import fan_in_uniform
from ..layers.base import Layer


def channels_last(x):
    """View an ``(N, C, H, W)`` array as ``(N, H, W, C)``, C-contiguous (copying only if needed)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


class Conv2d(Layer):
    """2-D convolution (cross-correlation, as PyTorch) of ``(N, C_in, H, W)`` inputs.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    stride : int or (int, int), default 1
    padding : int or (int, int), default 0
        Zero padding on each side.
    bias : bool, default True
    dtype : float32 or float64, default float32
    rng : numpy.random.Generator or int, optional
        Source of the initial weights, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
        with ``fan_in = in_channels * kh * kw`` (PyTorch's default).

    Attributes
    ----------
    weight : ndarray ``(out_channels, in_channels, kh, kw)``
    bias : ndarray ``(out_channels,)`` or None

    Notes
    -----
    Output size is ``(H + 2 * padding - kh) // stride + 1`` (likewise for W).
    The output is channels-last in memory; see the module docstring.

    Examples
    --------
    >>> conv = Conv2d(1, 32, 3, rng=0)
    >>> y = conv.forward(x)          # x: (N, 1, 28, 28) float32 -> y: (N, 32, 26, 26)
    >>> dx = conv.backward(dy)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.in_channels = _check.positive_int(in_channels, "in_channels")
        self.out_channels = _check.positive_int(out_channels, "out_channels")
        self.kernel_size = _check.pair(kernel_size, "kernel_size")
        self.stride = _check.pair(stride, "stride")
        self.padding = _check.pair(padding, "padding", _check.nonnegative_int)
        self.dtype = _check.float_dtype(dtype)
        gen = _check.rng(rng)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        shape = (self.out_channels, self.in_channels, kh, kw)
        self.weight = fan_in_uniform(gen, shape, fan_in, self.dtype)
        self.params = {"weight": self.weight}
        self.bias = None
        if _check.flag(bias, "bias"):
            self.bias = fan_in_uniform(gen, self.out_channels, fan_in, self.dtype)
            self.params["bias"] = self.bias
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._cache = None
        self._workspace = np.empty(0, self.dtype)

    def _column_buffer(self, size):
        """``size`` elements of the layer's reusable column buffer (grown when needed)."""
        if self._workspace.size < size:
            self._workspace = np.empty(size, self.dtype)
        return self._workspace[:size]

    def output_size(self, height, width):
        """``(out_h, out_w)`` for an input of ``height x width``."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1

    def _check_input(self, x):
        _check.layer_input(x, "Conv2d", self.dtype, (None, self.in_channels, None, None))
        kh, kw = self.kernel_size
        ph, pw = self.padding
        if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise ValueError(
                f"Conv2d input of shape {tuple(x.shape)} is smaller than the kernel "
                f"{self.kernel_size} even with padding {self.padding}."
            )

    def _chunks(self, n_img, out_h, out_w):
        per_image = out_h * out_w * self._n_cols() * self.dtype.itemsize
        step = max(1, min(n_img, _config.IM2COL_CHUNK_BYTES // per_image))
        return [(n0, min(n0 + step, n_img)) for n0 in range(0, n_img, step)], step

    def _n_cols(self):
        kh, kw = self.kernel_size
        return kh * kw * self.in_channels

    def _weight_matrix(self):
        """The weight as the GEMM's ``(kh * kw * C_in, C_out)`` operand, matching im2col's order."""
        return self.weight.transpose(2, 3, 1, 0).reshape(self._n_cols(), self.out_channels)

    def _columns(self, x_nhwc, n0, n1, buffer, out_h, out_w):
        kh, kw = self.kernel_size
        cols = buffer[: (n1 - n0) * out_h * out_w * self._n_cols()]
        cols = cols.reshape(n1 - n0, out_h, out_w, kh, kw, self.in_channels)
        _im2col.im2col(x_nhwc[n0:n1], *self.stride, *self.padding, cols)
        return cols

    def _direct(self):
        """Whether the forward and the weight gradient run as direct convolutions."""
        return (_config.CONV_DIRECT and _tiles.DIRECT_CONV_CPU and self.dtype == np.float32
                and self.stride == (1, 1) and self.out_channels % _tiles.LANES == 0)

    def _direct_input_grad(self):
        """Whether the input gradient runs as a direct convolution too (its zero
        padding, ``kernel - 1 - padding``, must not be negative)."""
        return (self._direct() and self.in_channels % _tiles.LANES == 0
                and all(p < k for p, k in zip(self.padding, self.kernel_size)))

    def forward(self, x):
        """Return the convolution of ``x``, shape ``(N, C_out, out_h, out_w)``."""
        self._check_input(x)
        x_nhwc = channels_last(x)
        n_img = x.shape[0]
        out_h, out_w = self.output_size(*x.shape[2:])
        if self._direct():
            y = np.empty((n_img, out_h, out_w, self.out_channels), self.dtype)
            weight = np.ascontiguousarray(self.weight.transpose(2, 3, 1, 0))
            bias = self.bias if self.bias is not None else np.zeros(self.out_channels, self.dtype)
            _tiles.conv_forward(x_nhwc, weight, bias, self.bias is not None, *self.padding,
                                  _config.TILE_CHAIN, y, numba.get_num_threads())
            self._cache = (x_nhwc, None, y.shape)
            return y.transpose(0, 3, 1, 2)
        chunks, step = self._chunks(n_img, out_h, out_w)
        buffer = self._column_buffer(step * out_h * out_w * self._n_cols())
        wmat = self._weight_matrix()
        y = np.empty((n_img, out_h, out_w, self.out_channels), self.dtype)
        for n0, n1 in chunks:
            cols = self._columns(x_nhwc, n0, n1, buffer, out_h, out_w)
            y_chunk = y[n0:n1].reshape(-1, self.out_channels)
            np.matmul(cols.reshape(y_chunk.shape[0], -1), wmat, out=y_chunk)
            if self.bias is not None:
                y_chunk += self.bias
        kept = buffer if self.training and len(chunks) == 1 else None
        self._cache = (x_nhwc, kept, y.shape)
        return y.transpose(0, 3, 1, 2)

    def backward(self, dy, input_grad=True):
        """Return ``dL/dx`` (channels-last memory, NCHW shape; None when
        ``input_grad`` is False, which skips its GEMM and col2im); fill ``grads``."""
        x_nhwc, kept, y_shape = self._cache or (None, None, None)
        y_shape_nchw = None if y_shape is None else (y_shape[0], y_shape[3], y_shape[1], y_shape[2])
        _check.grad_output(dy, "Conv2d", y_shape_nchw, self.dtype)
        dy_nhwc = channels_last(dy)
        if self._direct():
            return self._backward_direct(x_nhwc, dy_nhwc, input_grad)
        n_img, out_h, out_w, c_out = y_shape
        chunks, step = self._chunks(n_img, out_h, out_w)
        buffer = kept if kept is not None else self._column_buffer(step * out_h * out_w * self._n_cols())
        self._cache = (x_nhwc, None, y_shape)   # the kept columns are overwritten below
        wmat_t = self._weight_matrix().T
        dwmat = np.zeros((self._n_cols(), c_out), self.dtype)
        dw_chunk = np.empty_like(dwmat)
        dbias = np.zeros(c_out, np.float64)
        dbias_chunk = np.empty_like(dbias)
        dx = np.empty(x_nhwc.shape, self.dtype) if input_grad else None
        kh, kw = self.kernel_size
        for n0, n1 in chunks:
            if kept is None:
                cols = self._columns(x_nhwc, n0, n1, buffer, out_h, out_w)
            else:
                cols = buffer.reshape(n1 - n0, out_h, out_w, kh, kw, self.in_channels)
            cols2d = cols.reshape(-1, self._n_cols())
            dy2d = dy_nhwc[n0:n1].reshape(-1, c_out)
            np.matmul(cols2d.T, dy2d, out=dw_chunk)
            dwmat += dw_chunk
            if self.bias is not None:
                _im2col.column_sums(dy2d, max(1, _config.CHUNK_ELEMS // dy2d.shape[1]), dbias_chunk)
                dbias += dbias_chunk
            if input_grad:
                # The chunk's columns are no longer needed: overwrite them with dcols.
                np.matmul(dy2d, wmat_t, out=cols2d)
                _im2col.col2im(cols, *self.stride, *self.padding, dx[n0:n1])
        self.grads["weight"][...] = dwmat.reshape(kh, kw, self.in_channels, c_out).transpose(3, 2, 0, 1)
        if self.bias is not None:
            self.grads["bias"][...] = dbias
        return dx.transpose(0, 3, 1, 2) if input_grad else None

    def _backward_direct(self, x_nhwc, dy_nhwc, input_grad):
        kh, kw = self.kernel_size
        dweight = np.empty((kh, kw, self.in_channels, self.out_channels), self.dtype)
        _tiles.conv_weight_grad(x_nhwc, dy_nhwc, *self.padding, _config.CONV_WGRAD_IMAGES,
                                  _config.TILE_CHAIN, dweight)
        self.grads["weight"][...] = dweight.transpose(3, 2, 0, 1)
        if self.bias is not None:
            dy2d = dy_nhwc.reshape(-1, self.out_channels)
            dbias = np.empty(self.out_channels, np.float64)
            _im2col.column_sums(dy2d, max(1, _config.CHUNK_ELEMS // dy2d.shape[1]), dbias)
            self.grads["bias"][...] = dbias
        if not input_grad:
            return None
        dx = np.empty(x_nhwc.shape, self.dtype)
        if self._direct_input_grad():
            weight_flip = np.ascontiguousarray(self.weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
            _tiles.conv_input_grad(dy_nhwc, weight_flip, *self.padding, _config.TILE_CHAIN, dx,
                                     numba.get_num_threads())
        else:
            self._input_grad_gemm(dy_nhwc, dx)
        return dx.transpose(0, 3, 1, 2)

    def _input_grad_gemm(self, dy_nhwc, dx):
        """``dx`` from ``dy @ weight`` columns and col2im, chunk by chunk."""
        n_img, out_h, out_w, c_out = dy_nhwc.shape
        kh, kw = self.kernel_size
        chunks, step = self._chunks(n_img, out_h, out_w)
        buffer = self._column_buffer(step * out_h * out_w * self._n_cols())
        wmat_t = self._weight_matrix().T
        for n0, n1 in chunks:
            cols = buffer[: (n1 - n0) * out_h * out_w * self._n_cols()]
            np.matmul(dy_nhwc[n0:n1].reshape(-1, c_out), wmat_t, out=cols.reshape(-1, self._n_cols()))
            cols = cols.reshape(n1 - n0, out_h, out_w, kh, kw, self.in_channels)
            _im2col.col2im(cols, *self.stride, *self.padding, dx[n0:n1])

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
