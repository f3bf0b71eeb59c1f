"""Building blocks of the Genesis U-Net, written so that XLA runs them fast on every backend.

All arrays are channels-last: (N, x, y, z, C) for 3D and (N, x, y, C) for 2D. Every formulation
here computes exactly the same function as the textbook layer (up to float rounding); they differ
only in how XLA sees the computation:

* `Conv`: a 3x3x3 convolution, either native (`lax.conv_general_dilated`, the fast path under
  cuDNN/TPU) or "unfold": the input is stacked with its x-shifted copies on the channel axis and a
  2D 3x3 conv runs over (y, z) with x folded into the batch. XLA:CPU runs 2D convs through Eigen
  much faster than 3D ones (SPEC.md, measured anchors).
* `UpConv`: the 2x2x2 stride-2 transposed conv as one matmul followed by a depth-to-space
  reshape. XLA's gradient of a strided `conv_transpose` is very slow (CPU and CUDA); the matmul's
  is not. Kernels are stored in flax `nn.ConvTranspose` layout (spatially flipped, see SPEC.md).
* `max_pool`: 2x max pooling by reshape + max, whose gradient avoids `select_and_scatter`.
* `BatchNorm`: float32 statistics in one fused pass; "original" mode normalises with batch
  statistics even at eval, as the released PyTorch model did, without touching running stats.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "native", "unfold")


def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """lecun_normal (fan_in = prod(kernel) * C_in), drawn as a 2D (fan_in, C_out) array.

  Same distribution as `nn.initializers.lecun_normal()` on the full shape; drawing it flat keeps
  XLA:CPU compile time low (rank-5 random number generation takes ~10 s to compile there).
  """
  flat = nn.initializers.lecun_normal()(key, (math.prod(shape[:-1]), shape[-1]), dtype)
  return flat.reshape(shape)


def resolve_conv_impl(conv_impl: str) -> str:
  """"auto" -> "unfold" on CPU (Eigen 2D convs beat XLA:CPU 3D convs), "native" elsewhere."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  if conv_impl == "auto":
    return "unfold" if jax.default_backend() == "cpu" else "native"
  return conv_impl


def _conv_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' stride-1 conv; kernel (*k, C_in, C_out), x (N, *spatial, C_in)."""
  nd = x.ndim - 2
  spatial = "DHW"[-nd:] if nd <= 3 else None
  dn = lax.conv_dimension_numbers(
      x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  return lax.conv_general_dilated(x, kernel, (1,) * nd, "SAME", dimension_numbers=dn)


def _conv_unfold_3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Exact 3x3x3 'SAME' conv as a 2D 3x3 conv over (y, z) on an x-unfolded input.

  x (N, X, Y, Z, C) is padded by one along x and its three x-shifted views are concatenated on
  channels, index kx*C + c; then (N*X, Y, Z, 3C) is convolved with the kernel regrouped to
  (ky, kz, kx*C + c, O). Folding x into the batch is a free reshape (x is the leading spatial axis).
  """
  n, sx, sy, sz, c = x.shape
  kx, ky, kz, _, o = kernel.shape
  r = kx // 2
  xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0), (0, 0)))
  stacked = jnp.concatenate([xp[:, i:i + sx] for i in range(kx)], axis=-1)
  k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(ky, kz, kx * c, o)
  y = _conv_native(stacked.reshape(n * sx, sy, sz, kx * c), k2)
  return y.reshape(n, sx, sy, sz, o)


class Conv(nn.Module):
  """Stride-1 'SAME' convolution with bias; kernel (*kernel_size, C_in, C_out) as in `nn.Conv`."""
  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    kernel = self.param("kernel", kernel_init,
                        (self.kernel_size,) * nd + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    impl = resolve_conv_impl(self.conv_impl)
    if impl == "unfold" and nd == 3 and self.kernel_size > 1:
      y = _conv_unfold_3d(x, kernel)
    elif self.kernel_size == 1:
      y = jnp.einsum("...c,co->...o", x, kernel.reshape(kernel.shape[-2:]))
    else:
      y = _conv_native(x, kernel)
    return y + bias.astype(self.dtype)


def upconv_depth_to_space(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Transposed conv with kernel 2 and stride 2, no padding, as matmul + depth-to-space.

  kernel is in flax `nn.ConvTranspose` layout (2, .., 2, C_in, C_out) with transpose_kernel=False,
  i.e. spatially flipped relative to PyTorch: out[2p + i] = x[p] @ kernel[1 - i] per axis.
  """
  nd = x.ndim - 2
  n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
  o = kernel.shape[-1]
  w = kernel[(slice(None, None, -1),) * nd]  # un-flip: w[i] multiplies into out[2p + i]
  w = jnp.moveaxis(w, -2, 0).reshape(c, (2 ** nd) * o)
  y = (x.reshape(-1, c) @ w).reshape(n, *spatial, *(2,) * nd, o)
  # (n, p1.., pd, i1.., id, o) -> (n, p1, i1, .., pd, id, o)
  perm = [0] + [a for d in range(nd) for a in (1 + d, 1 + nd + d)] + [1 + 2 * nd]
  return jnp.transpose(y, perm).reshape(n, *(2 * s for s in spatial), o)


class UpConv(nn.Module):
  """2x upsampling by a stride-2 kernel-2 transposed conv with bias (PyTorch ConvTranspose3d)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    kernel = self.param("kernel", kernel_init,
                        (2,) * nd + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = upconv_depth_to_space(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


def upsample_nearest(x: jax.Array) -> jax.Array:
  """2x nearest-neighbour upsampling of every spatial axis (Keras UpSampling3D)."""
  n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
  y = x.reshape(n, *[a for s in spatial for a in (s, 1)], c)
  y = jnp.broadcast_to(y, (n, *[a for s in spatial for a in (s, 2)], c))
  return y.reshape(n, *(2 * s for s in spatial), c)


def max_pool(x: jax.Array) -> jax.Array:
  """2x max pooling (window 2, stride 2) over every spatial axis, via reshape."""
  nd = x.ndim - 2
  n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
  y = x.reshape(n, *[a for s in spatial for a in (s // 2, 2)], c)
  return y.max(axis=tuple(2 + 2 * d for d in range(nd)))


class BatchNorm(nn.Module):
  """Batch normalisation over all axes but the last, statistics in float32.

  momentum is flax's (decay of the running average): PyTorch's 0.1 is 0.9 here, Keras' 0.99 is 0.99.
  always_batch_stats: normalise with batch statistics at eval too (the released PyTorch model);
  running statistics are then only updated when `train` is True.
  unbiased_running_var: update running_var with the unbiased batch variance, as PyTorch does.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  always_batch_stats: bool = False
  unbiased_running_var: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train or self.always_batch_stats:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = xf.mean(axes)
      var = jnp.maximum((xf * xf).mean(axes) - mean * mean, 0.0)
      if train and not self.is_initializing():
        count = x.size // c
        update_var = var * (count / max(count - 1, 1)) if self.unbiased_running_var else var
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * update_var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)
