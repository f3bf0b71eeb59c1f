"""The Models Genesis U-Net (SPEC.md "The network"), 3D or 2D, any width and depth.

Arrays are channels-last: x (N, x, y, z, C) in 3D, (N, x, y, C) in 2D. Every spatial size must be
divisible by 2**depth (one halving per pooling). At the defaults (width 32, depth 3, 3D,
variant "pytorch") this is the authors' PyTorch UNet3D, 19,073,665 trainable parameters; variant
"keras" is their Keras network (nearest upsampling, BN momentum 0.99 / eps 1e-3).

Parameter tree (names used by the weight import, `weights/release.py`):
  encoder/down_{i}/conv_{j}/{conv,bn}   i = 0..depth (depth = the bottom), j = 0, 1
  decoder/up_{l}/up_conv                l = depth-1..0 (pytorch variant only)
  decoder/up_{l}/conv_{j}/{conv,bn}
  out                                   1x1 conv to out_channels (logits)
Level i of the encoder outputs width * 2**(i+1) channels; level l of the decoder the same as the
skip it consumes. The model returns logits; pre-training applies sigmoid + MSE like the original.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genesis_jax.models import layers

VARIANTS = ("pytorch", "keras")
BN_MODES = ("standard", "original")


def check_spatial_shape(shape: Sequence[int], depth: int) -> None:
  """Raises ValueError unless every spatial size is divisible by 2**depth."""
  bad = [s for s in shape if s % (2 ** depth) != 0 or s <= 0]
  if bad:
    raise ValueError(
        f"Spatial shape {tuple(shape)} is invalid for a U-Net of depth {depth}: every spatial size "
        f"must be divisible by 2**depth = {2 ** depth} (one halving per pooling); "
        f"offending sizes: {bad}.")


def _check_fields(variant: str, bn: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"model variant must be one of {VARIANTS}, got {variant!r}.")
  if bn not in BN_MODES:
    raise ValueError(f"model bn must be one of {BN_MODES}, got {bn!r}.")


class ConvUnit(nn.Module):
  """Conv 3x3(x3) with bias -> BatchNorm -> ReLU (the original's LUConv / create_convolution_block)."""
  features: int
  variant: str = "pytorch"
  bn: str = "standard"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.Conv(self.features, 3, dtype=self.dtype, conv_impl=self.conv_impl, name="conv")(x)
    keras = self.variant == "keras"
    x = layers.BatchNorm(
        momentum=0.99 if keras else 0.9, epsilon=1e-3 if keras else 1e-5,
        always_batch_stats=self.bn == "original", unbiased_running_var=not keras,
        dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x)


class DoubleConv(nn.Module):
  """Two conv units, `conv_0` then `conv_1` (one block of the original: ops.0, ops.1)."""
  features: tuple[int, int]
  variant: str = "pytorch"
  bn: str = "standard"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    unit = dict(variant=self.variant, bn=self.bn, dtype=self.dtype, conv_impl=self.conv_impl)
    x = ConvUnit(self.features[0], **unit, name="conv_0")(x, train)
    return ConvUnit(self.features[1], **unit, name="conv_1")(x, train)


class Encoder(nn.Module):
  """Contracting path. Returns (bottom, skips): bottom (N, *spatial / 2**depth, width * 2**(depth+1)),
  skips[i] (N, *spatial / 2**i, width * 2**(i+1)) for i = 0..depth-1 (finest first)."""
  width: int = 32
  depth: int = 3
  spatial_dims: int = 3
  variant: str = "pytorch"
  bn: str = "standard"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
    _check_fields(self.variant, self.bn)
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(
          f"Expected input (N, <{self.spatial_dims} spatial axes>, C), got shape {x.shape}.")
    check_spatial_shape(x.shape[1:-1], self.depth)
    unit = dict(variant=self.variant, bn=self.bn, dtype=self.dtype, conv_impl=self.conv_impl)
    skips = []
    for i in range(self.depth + 1):
      if i > 0:
        x = layers.max_pool(x)
      w = self.width * 2 ** i
      x = DoubleConv((w, 2 * w), **unit, name=f"down_{i}")(x, train)
      if i < self.depth:
        skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  """2x upsampling (`up_conv` transposed conv, or nearest for keras), concat [up, skip] on
  channels, then conv units `conv_0`, `conv_1` to `features` channels."""
  features: int
  variant: str = "pytorch"
  bn: str = "standard"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
    if self.variant == "pytorch":
      up = layers.UpConv(x.shape[-1], dtype=self.dtype, name="up_conv")(x)
    else:
      up = layers.upsample_nearest(x)
    x = jnp.concatenate([up.astype(self.dtype), skip.astype(self.dtype)], axis=-1)
    unit = dict(variant=self.variant, bn=self.bn, dtype=self.dtype, conv_impl=self.conv_impl)
    x = ConvUnit(self.features, **unit, name="conv_0")(x, train)
    return ConvUnit(self.features, **unit, name="conv_1")(x, train)


class Decoder(nn.Module):
  """Expanding path: per level, 2x upsampling, concat [up, skip] on channels, two conv units.

  Takes the Encoder's (bottom, skips) and returns (N, *spatial, 2 * width)."""
  width: int = 32
  depth: int = 3
  spatial_dims: int = 3
  variant: str = "pytorch"
  bn: str = "standard"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, bottom: jax.Array, skips: Sequence[jax.Array], train: bool) -> jax.Array:
    _check_fields(self.variant, self.bn)
    if len(skips) != self.depth:
      raise ValueError(f"Decoder of depth {self.depth} needs {self.depth} skips, got {len(skips)}.")
    unit = dict(variant=self.variant, bn=self.bn, dtype=self.dtype, conv_impl=self.conv_impl)
    x = bottom
    for level in reversed(range(self.depth)):
      x = UpBlock(self.width * 2 ** (level + 1), **unit, name=f"up_{level}")(x, skips[level], train)
    return x


class UNet(nn.Module):
  """Encoder -> Decoder -> 1x1 conv `out`; returns float32 logits (N, *spatial, out_channels)."""
  out_channels: int = 1
  width: int = 32
  depth: int = 3
  spatial_dims: int = 3
  variant: str = "pytorch"
  bn: str = "standard"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  def setup(self):
    kw = dict(width=self.width, depth=self.depth, spatial_dims=self.spatial_dims,
              variant=self.variant, bn=self.bn, dtype=self.dtype, conv_impl=self.conv_impl)
    self.encoder = Encoder(**kw)
    self.decoder = Decoder(**kw)
    self.out = layers.Conv(self.out_channels, 1, dtype=self.dtype)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bottom, skips = self.encoder(x, train)
    return self.out(self.decoder(bottom, skips, train)).astype(jnp.float32)
