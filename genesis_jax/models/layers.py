"""The Flax modules of the Genesis U-Net's layers: Conv, UpConv and BatchNorm.

Each module holds its parameters (float32, in flax's layouts) and calls the array functions of
`kernels.py`, which compute the textbook layer in a form XLA runs fast on every backend:

* `Conv`: a stride-1 'SAME' convolution, native or "unfold" (2D convs over (y, z), with
  Winograd along x where it applies) as `conv_impl` and `winograd_min_macs` choose.
* `UpConv`: the 2x2x2 stride-2 transposed conv as one matmul and a depth-to-space reshape.
* `BatchNorm`: float32 statistics and a hand-written gradient; "original" mode normalises with
  batch statistics even at eval, as the released PyTorch model did, without touching running
  stats.

Conv and UpConv take `weight_init` (`model.init`): "flax" (lecun_normal kernels, zero biases; the
default) or "pytorch" (PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and
biases, `conv_inits`). BatchNorm starts at scale 1, bias 0 either way, as in PyTorch.

All arrays are channels-last: (N, x, y, z, C) for 3D and (N, x, y, C) for 2D.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from genesis_jax import errors
from genesis_jax.models import kernels


def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """lecun_normal (fan_in = prod(kernel) * C_in), drawn as a 2D (fan_in, C_out) array.

  Same distribution as `nn.initializers.lecun_normal()` on the full shape; drawing it flat keeps
  XLA:CPU compile time low (rank-5 random number generation is slow to compile there).
  """
  flat = nn.initializers.lecun_normal()(key, (math.prod(shape[:-1]), shape[-1]), dtype)
  return flat.reshape(shape)


INITS = ("flax", "pytorch")


def pytorch_uniform(fan_in: int):
  """PyTorch's default init of conv and linear weights and biases: U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5) for the weight; the same bound for the
  bias). Drawn flat like `kernel_init`, then reshaped."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    flat = jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound)
    return flat.reshape(shape)
  return init


def check_init(init: str) -> None:
  """Raises ConfigError unless `init` names a known initialisation (`model.init`)."""
  if init not in INITS:
    raise errors.ConfigError(f"model.init must be one of {INITS}, got {init!r}.")


def conv_inits(init: str, fan_in: int) -> tuple[Callable, Callable]:
  """(kernel init, bias init) of a conv or dense layer whose PyTorch fan_in is `fan_in`.

  "flax": lecun_normal kernel, zero bias (the default). "pytorch": both U(-1/sqrt(fan_in),
  1/sqrt(fan_in)), PyTorch's default for Conv3d/ConvTranspose3d/Linear.
  """
  check_init(init)
  if init == "flax":
    return kernel_init, nn.initializers.zeros
  return pytorch_uniform(fan_in), pytorch_uniform(fan_in)


class Conv(nn.Module):
  """Stride-1 'SAME' convolution with bias; kernel (*kernel_size, C_in, C_out) as in `nn.Conv`.

  conv_impl: one of `kernels.CONV_IMPLS` (`model.conv_impl`); winograd_min_macs: the size below
  which the unfold conv does not use Winograd (`model.winograd_min_macs`); weight_init: `INITS`.
  """
  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  winograd_min_macs: float = kernels.DEFAULT_WINOGRAD_MIN_MACS
  weight_init: str = "flax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    # PyTorch's fan_in of Conv3d: C_in * prod(kernel).
    k_init, b_init = conv_inits(self.weight_init, x.shape[-1] * self.kernel_size ** nd)
    kernel = self.param("kernel", k_init,
                        (self.kernel_size,) * nd + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", b_init, (self.features,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    impl, _, tile = kernels.resolve_conv_impl(self.conv_impl).partition(":")
    if impl == "unfold" and nd == 3 and self.kernel_size > 1:
      y = kernels.conv_unfold_3d(x, kernel, int(tile) if tile else None, self.winograd_min_macs)
    elif self.kernel_size == 1:
      y = jnp.einsum("...c,co->...o", x, kernel.reshape(kernel.shape[-2:]))
    else:
      y = kernels.conv_native(x, kernel)
    return kernels.add_channel_bias(y, bias)


class UpConv(nn.Module):
  """2x upsampling by a stride-2 kernel-2 transposed conv with bias (PyTorch ConvTranspose3d)."""
  features: int
  dtype: Any = jnp.float32
  weight_init: str = "flax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    # PyTorch's fan_in of ConvTranspose3d is weight.size(1) * prod(kernel), and its weight is
    # (C_in, C_out, *kernel): the OUTPUT channels times 2**nd (C_in = C_out in this network).
    k_init, b_init = conv_inits(self.weight_init, self.features * 2 ** nd)
    kernel = self.param("kernel", k_init,
                        (2,) * nd + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", b_init, (self.features,), jnp.float32)
    y = kernels.upconv_depth_to_space(x.astype(self.dtype), kernel.astype(self.dtype))
    return kernels.add_channel_bias(y, bias)


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
    x = x.astype(self.dtype)
    if train or self.always_batch_stats:
      y, mean, var = kernels.batch_norm_train(x, scale, bias, self.epsilon)
      if train and not self.is_initializing():
        mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
        count = x.size // c
        update_var = var * (count / max(count - 1, 1)) if self.unbiased_running_var else var
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * update_var
      return y
    mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
    add = bias - ra_mean.value * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)
