"""Building blocks shared by the backbones: inference-mode Conv+BatchNorm, BlurPool, padding.

Pure Flax/JAX, NHWC, no I/O. Every convolution takes an *explicit* padding so that the
PyTorch layers the weights were trained with are reproduced exactly: Flax's 'SAME' pads
a stride-2 convolution (bottom/right first) differently from PyTorch's symmetric
``padding=1`` and would silently shift every feature map by one pixel.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Padding = tuple[tuple[int, int], tuple[int, int]]

# PyTorch nn.BatchNorm2d default; EfficientNet-Lite uses 1e-3 (TensorFlow's default).
TORCH_BN_EPS = 1e-5

# Normalised 1-D binomial filters of the antialiased-cnns BlurPool (Zhang, ICML 2019).
_BINOMIAL = {
    1: (1.0,),
    2: (1.0, 1.0),
    3: (1.0, 2.0, 1.0),
    4: (1.0, 3.0, 3.0, 1.0),
    5: (1.0, 4.0, 6.0, 4.0, 1.0),
    6: (1.0, 5.0, 10.0, 10.0, 5.0, 1.0),
    7: (1.0, 6.0, 15.0, 20.0, 15.0, 6.0, 1.0),
}


def binomial_filter(size: int) -> np.ndarray:
  """The normalised 1-D binomial filter of `size` taps (the 2-D BlurPool filter is its outer product)."""
  a = np.asarray(_BINOMIAL[size], dtype=np.float64)
  return a / a.sum()


def symmetric_padding(kernel_size: int, dilation: int = 1) -> Padding:
  """PyTorch ``padding=(k - 1) // 2`` on both sides of both spatial axes."""
  p = dilation * (kernel_size - 1) // 2
  return ((p, p), (p, p))


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding of one axis: output ceil(size / stride), the extra pixel at the end.

  This is what EfficientNet-Lite was trained with in TensorFlow, and what the
  efficientnet-lite-pytorch ``Conv2d*SamePadding`` layers compute for an input of that size.
  """
  out = -(-size // stride)
  pad = max((out - 1) * stride + kernel_size - size, 0)
  return (pad // 2, pad - pad // 2)


class ConvBN(nn.Module):
  """Bias-free convolution followed by an inference-mode BatchNorm, folded into one conv.

  Parameters keep the PyTorch layout split in two collections (``params``: kernel, scale,
  bias; ``batch_stats``: mean, var) so that checkpoints map one tensor to one leaf; the
  BatchNorm is folded into the kernel at call time (a weight-sized op) which saves one full
  pass over the activations: y = conv(x, W * s) + (beta - mu * s), s = gamma / sqrt(var + eps).
  1x1 convolutions run as matmuls and depthwise ones as shifted slices (`depthwise_conv`):
  same results, several times faster on CPU than XLA's convolution emitter for these shapes.

  Attributes:
    features: number of output channels.
    kernel_size: square kernel size k.
    strides: convolution stride.
    padding: explicit ((top, bottom), (left, right)) zero padding, or None for the
      TensorFlow 'SAME' rule computed from the input shape (EfficientNet).
    groups: feature_group_count (groups == in_channels: depthwise).
    eps: BatchNorm epsilon.
    dtype: computation dtype (parameters stay float32).
    precision: XLA precision of the convolution.
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: Padding | None = ((0, 0), (0, 0))
  groups: int = 1
  eps: float = TORCH_BN_EPS
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, in_features // self.groups, self.features), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((self.features,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((self.features,), jnp.float32))
    mult = scale * jax.lax.rsqrt(var.value + self.eps)
    shift = bias - mean.value * mult
    if self.padding is None:
      padding = (tf_same_padding(x.shape[1], k, self.strides),
                 tf_same_padding(x.shape[2], k, self.strides))
    else:
      padding = self.padding
    w = (kernel * mult).astype(self.dtype)
    x = x.astype(self.dtype)
    if k == 1 and self.groups == 1 and not any(any(p) for p in padding):
      # A 1x1 convolution is a matmul over channels; XLA:CPU runs it several times faster
      # as a dot than through its convolution emitter.
      x = x[:, ::self.strides, ::self.strides, :]
      b, h, w_, c = x.shape
      y = jnp.dot(x.reshape(b * h * w_, c), w[0, 0], precision=self.precision)
      y = y.reshape(b, h, w_, self.features)
    elif self.groups > 1 and self.groups == in_features == self.features:
      y = depthwise_conv(x, w[:, :, 0, :], self.strides, padding)
    else:
      y = jax.lax.conv_general_dilated(
          x, w, window_strides=(self.strides, self.strides),
          padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=self.groups, precision=self.precision)
    return y + shift.astype(self.dtype)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  """Depthwise convolution as a sum of k*k shifted, strided slices times per-channel weights.

  Same result as ``conv_general_dilated(..., feature_group_count=C)`` (up to float
  summation order), but XLA fuses it into one elementwise loop: on CPU this is ~10x faster
  than its grouped convolution, which dominates EfficientNet's run time otherwise.

  Args:
    x: array of shape (B, H, W, C).
    kernel: array of shape (k, k, C).
    stride: spatial stride.
    padding: ((top, bottom), (left, right)) zero padding.

  Returns:
    array of shape (B, (H + top + bottom - k) // stride + 1, ..., C).
  """
  k = kernel.shape[0]
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  b, h, w, c = x.shape
  ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
  acc = None
  for i in range(k):
    for j in range(k):
      patch = jax.lax.slice(x, (0, i, j, 0),
                            (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                            (1, stride, stride, 1))
      term = patch * kernel[i, j]
      acc = term if acc is None else acc + term
  return acc


def blur_pool(x: jax.Array, filter_size: int = 4, stride: int = 2) -> jax.Array:
  """antialiased-cnns ``BlurPool(pad_type='reflect')`` on an NHWC batch.

  Reflect-pads by (floor((f-1)/2), ceil((f-1)/2)) on each spatial axis, then applies the
  f x f binomial filter depthwise with the given stride. The 2-D filter is separable, so it
  runs as two 1-D passes of strided slices (exact up to float rounding, and fusible by XLA).

  Args:
    x: array of shape (B, H, W, C).
    filter_size: binomial filter size f (GLAD / antialiased-cnns default 4).
    stride: subsampling stride.

  Returns:
    array of shape (B, floor((H + f - 1 - f) / stride) + 1, ..., C).
  """
  lo, hi = (filter_size - 1) // 2, -(-(filter_size - 1) // 2)
  x = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)), mode="reflect")
  taps = binomial_filter(filter_size)
  for axis in (1, 2):
    n_out = (x.shape[axis] - filter_size) // stride + 1
    acc = None
    for i, t in enumerate(taps):
      sl = jax.lax.slice_in_dim(x, i, i + stride * (n_out - 1) + 1, stride, axis)
      term = sl * jnp.asarray(t, x.dtype)
      acc = term if acc is None else acc + term
    x = acc
  return x


def max_pool(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
  """PyTorch ``MaxPool2d(window, stride, padding=pad)`` (padding with -inf) on NHWC."""
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)))


class Dense(nn.Module):
  """Linear layer whose parameters are named like ``nn.Dense`` (kernel (in, out), bias)."""

  features: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
    return y + bias.astype(self.dtype)


def last_requested(outputs: Sequence[str], order: Sequence[str]) -> int:
  """Index in `order` of the deepest requested output (the forward pass stops there)."""
  return max(order.index(o) for o in outputs)
