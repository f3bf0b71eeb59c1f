"""The Models Genesis U-Net (docs/method.md#network), 3D or 2D, any width and depth.

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

Every module takes the conv settings of `ConvSettings` (and the whole-net ones `NetSettings`) as
keyword fields and hands them down unchanged (`settings`), so a config key reaches every layer.

Skip dropout (`pretrain.skip_drop_rate`, an addition beyond the original): `UNet(x, train,
skip_keep)` multiplies every skip connection of sample n by skip_keep[n], so a 0 makes the decoder
restore that sample from the bottleneck alone. skip_keep=None (the default) is the plain U-Net,
the same computation as without the argument.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genesis_jax import errors
from genesis_jax.models import kernels, layers

VARIANTS = ("pytorch", "keras")
BN_MODES = ("standard", "original")


def check_spatial_shape(shape: Sequence[int], depth: int) -> None:
  """Raises ConfigError unless every spatial size is divisible by 2**depth."""
  bad = [s for s in shape if s % (2 ** depth) != 0 or s <= 0]
  if bad:
    raise errors.ConfigError(
        f"Spatial shape {tuple(shape)} is invalid for a U-Net of depth {depth}: every spatial size "
        f"must be divisible by 2**depth = {2 ** depth} (one halving per pooling); "
        f"offending sizes: {bad}. Choose crop sizes divisible by {2 ** depth} or a smaller "
        f"model.depth.")


def check_fields(variant: str, bn: str, weight_init: str = "flax") -> None:
  """Raises ConfigError unless `variant`, `bn` and `weight_init` name a known network variant, BN
  mode and initialisation."""
  layers.check_init(weight_init)
  if variant not in VARIANTS:
    raise errors.ConfigError(f"model.variant must be one of {VARIANTS}, got {variant!r}.")
  if bn not in BN_MODES:
    raise errors.ConfigError(f"model.bn must be one of {BN_MODES}, got {bn!r}.")


class ConvSettings(nn.Module, kw_only=True):
  """The settings every module with convs takes (keyword only) and passes to its children.

  variant: "pytorch" or "keras" (BN constants, upsampling); bn: "standard" or "original";
  dtype: compute dtype (parameters stay float32); conv_impl: `kernels.CONV_IMPLS`;
  winograd_min_macs: the size below which a conv does not use Winograd; weight_init: "flax" or
  "pytorch", the initialisation of conv kernels and biases (`layers.INITS`) (`model.*` keys;
  `model.init` is weight_init here, as `init` is a flax Module method).
  """
  variant: str = "pytorch"
  bn: str = "standard"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  winograd_min_macs: float = kernels.DEFAULT_WINOGRAD_MIN_MACS
  weight_init: str = "flax"


class NetSettings(ConvSettings, kw_only=True):
  """ConvSettings plus the shape of the whole network: width, depth (poolings), spatial_dims."""
  width: int = 32
  depth: int = 3
  spatial_dims: int = 3


def settings(module: nn.Module, kind: type[nn.Module] = ConvSettings) -> dict[str, Any]:
  """The fields `kind` (ConvSettings or NetSettings) declares, as `module` holds them."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(kind)
          if f.name not in ("parent", "name")}


class ConvUnit(ConvSettings):
  """Conv 3x3(x3) with bias -> BatchNorm -> ReLU (the original's LUConv, create_convolution_block).
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.Conv(self.features, 3, dtype=self.dtype, conv_impl=self.conv_impl,
                    winograd_min_macs=self.winograd_min_macs, weight_init=self.weight_init,
                    name="conv")(x)
    keras = self.variant == "keras"
    x = layers.BatchNorm(
        momentum=0.99 if keras else 0.9, epsilon=1e-3 if keras else 1e-5,
        always_batch_stats=self.bn == "original", unbiased_running_var=not keras,
        dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x)


class DoubleConv(ConvSettings):
  """Two conv units, `conv_0` then `conv_1` (one block of the original: ops.0, ops.1)."""
  features: tuple[int, int]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvUnit(self.features[0], **settings(self), name="conv_0")(x, train)
    return ConvUnit(self.features[1], **settings(self), name="conv_1")(x, train)


class Encoder(NetSettings):
  """Contracting path. Returns (bottom, skips).

  bottom (N, *spatial / 2**depth, width * 2**(depth+1)); skips[i] (N, *spatial / 2**i,
  width * 2**(i+1)) for i = 0..depth-1 (finest first).
  """

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
    check_fields(self.variant, self.bn)
    if x.ndim != self.spatial_dims + 2:
      raise errors.ConfigError(
          f"Expected input (N, <{self.spatial_dims} spatial axes>, C), got shape {x.shape}; "
          f"model.spatial_dims must match the data (3 for cubes, 2 for slices).")
    check_spatial_shape(x.shape[1:-1], self.depth)
    skips = []
    for i in range(self.depth + 1):
      if i > 0:
        x = kernels.max_pool(x)
      w = self.width * 2 ** i
      x = DoubleConv((w, 2 * w), **settings(self), name=f"down_{i}")(x, train)
      if i < self.depth:
        skips.append(x)
    return x, skips


class UpBlock(ConvSettings):
  """2x upsampling (`up_conv` transposed conv, or nearest for keras), concat [up, skip] on
  channels, then conv units `conv_0`, `conv_1` to `features` channels."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
    if self.variant == "pytorch":
      up = layers.UpConv(x.shape[-1], dtype=self.dtype, weight_init=self.weight_init,
                         name="up_conv")(x)
    else:
      up = kernels.upsample_nearest(x)
    x = jnp.concatenate([up.astype(self.dtype), skip.astype(self.dtype)], axis=-1)
    x = ConvUnit(self.features, **settings(self), name="conv_0")(x, train)
    return ConvUnit(self.features, **settings(self), name="conv_1")(x, train)


class Decoder(NetSettings):
  """Expanding path: per level, 2x upsampling, concat [up, skip] on channels, two conv units.

  Takes the Encoder's (bottom, skips) and returns (N, *spatial, 2 * width). skip_keep (N,), if
  given, scales every skip of sample n by skip_keep[n] (0 = the decoder sees zeros there)."""

  @nn.compact
  def __call__(self, bottom: jax.Array, skips: Sequence[jax.Array], train: bool,
               skip_keep: jax.Array | None = None) -> jax.Array:
    check_fields(self.variant, self.bn)
    if len(skips) != self.depth:
      raise ValueError(f"Decoder of depth {self.depth} needs {self.depth} skips, got {len(skips)}.")
    if skip_keep is not None:
      if skip_keep.shape != bottom.shape[:1]:
        raise ValueError(f"skip_keep must have shape ({bottom.shape[0]},) (one value per sample), "
                         f"got {skip_keep.shape}.")
      skips = [s * skip_keep.reshape((-1,) + (1,) * (s.ndim - 1)).astype(s.dtype) for s in skips]
    x = bottom
    for level in reversed(range(self.depth)):
      x = UpBlock(self.width * 2 ** (level + 1), **settings(self), name=f"up_{level}")(
          x, skips[level], train)
    return x


class UNet(NetSettings):
  """Encoder -> Decoder -> 1x1 conv `out`; returns float32 logits (N, *spatial, out_channels).

  skip_keep: None (the plain U-Net), or (N,) per-sample factors of every skip connection (0 drops
  them: restoration from the bottleneck alone; see the module docstring).
  """
  out_channels: int = 1

  def setup(self):
    self.encoder = Encoder(**settings(self, NetSettings))
    self.decoder = Decoder(**settings(self, NetSettings))
    self.out = layers.Conv(self.out_channels, 1, dtype=self.dtype, weight_init=self.weight_init)

  def __call__(self, x: jax.Array, train: bool, skip_keep: jax.Array | None = None) -> jax.Array:
    bottom, skips = self.encoder(x, train)
    return self.out(self.decoder(bottom, skips, train, skip_keep)).astype(jnp.float32)
