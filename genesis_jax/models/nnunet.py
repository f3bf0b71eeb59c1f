"""nnU-Net v2's networks in Flax: PlainConvUNet and ResidualEncoderUNet of
dynamic_network_architectures, built from an nnU-Net plans file (`config/nnunet_plans.py`).

Same computation as the PyTorch classes nnU-Net builds from the same plans: per stage, convs with
the stage's kernel size (padding (k-1)//2, the first one strided by the stage's stride) ->
InstanceNorm (affine, biased variance, eps from the plans) -> LeakyReLU; the decoder upsamples
with a transposed conv whose kernel equals the stride, concatenates [up, skip] and runs
n_conv_per_stage_decoder convs; a 1x1 conv "seg layer" per decoder stage gives the logits of the
full-resolution stage (all stages with deep supervision, full resolution first). The residual
encoder (ResNet-D BasicBlockD) has a stem conv, then per block conv1 (strided, norm, nonlin) and
conv2 (norm, no nonlin) plus a skip (average pooling by the stride, then a 1x1 conv without bias
and a norm where the channels change), and the nonlin after the sum.

Arrays are channels-last in our axis order: (N, x, y, z, C) in 3D, (N, x, y, C) in 2D; kernel
sizes and strides are in our order too (`NnUNetPlan.arch`). Every spatial size must be divisible
by the product of the strides along its axis. There is no batch statistic (InstanceNorm), so the
variables are `params` only and `train` changes nothing; `skip_keep` scales the skips per sample
as in the U-Net (models/unet.py), both kept for its call signature. Where `conv_impl` resolves to
"unfold" (`kernels.py`), stride-1 3D convs with 3 taps along x use the U-Net's unfold conv and
strided convs `kernels.conv_space_to_depth` (same parameters and values; XLA:CPU's gradient of a
strided conv is slow); the others, and every conv under "native", XLA's conv with PyTorch's
padding.

Parameter tree (names used by `weights/nnunet.py`, which maps them to the PyTorch state_dict):
  PlainConvUNet:        encoder/stage_{s}/conv_{j}/{conv,norm}
  ResidualEncoderUNet:  encoder/stem/conv_0/{conv,norm},
                        encoder/stage_{s}/block_{b}/{conv1,conv2,skip}/{conv,norm}
  both:                 decoder/transpconv_{d}, decoder/stage_{d}/conv_{j}/{conv,norm},
                        decoder/seg_{d}      (d = 0 the lowest resolution, as in PyTorch)
conv: kernel (*k, C_in, C_out) (+ bias where conv_bias); norm: scale, bias. All seg layers get
parameters, deep supervision or not (as in PyTorch, so every checkpoint loads either way).

Initialisation as nnU-Net's: kaiming_normal (negative slope 1e-2, PyTorch's fan_in) for conv and
transposed-conv kernels, zero biases, norms at scale 1 / bias 0; ResidualEncoderUNet's last norm
of each block at 0 (init_last_bn_before_add_to_0).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from genesis_jax import errors
from genesis_jax.models import kernels

NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")


def he_normal(fan_in: int, neg_slope: float = 1e-2):
  """PyTorch's kaiming_normal_(a=neg_slope) for a weight whose fan_in is `fan_in`."""
  std = math.sqrt(2.0 / (1.0 + neg_slope ** 2)) / math.sqrt(max(fan_in, 1))

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    # Drawn flat at the next power of two and cut: few distinct shapes to compile (iid normals,
    # the same distribution).
    size = math.prod(shape)
    flat = jax.random.normal(key, (1 << max(size - 1, 0).bit_length(),), dtype)[:size]
    return (std * flat).reshape(shape)
  return init


def leaky_relu(x: jax.Array, negative_slope: float) -> jax.Array:
  return nn.relu(x) if negative_slope == 0 else jnp.where(x >= 0, x, negative_slope * x)


def check_input(x: jax.Array, strides: Sequence[Sequence[int]], spatial_dims: int) -> None:
  """ConfigError unless x is (N, *spatial, C) with each size divisible by its strides' product."""
  if x.ndim != spatial_dims + 2:
    raise errors.ConfigError(
        f"nnU-Net network expects input (N, <{spatial_dims} spatial axes>, C), got {x.shape}.")
  for axis, size in enumerate(x.shape[1:-1]):
    total = math.prod(s[axis] for s in strides)
    if size % total:
      raise errors.ConfigError(
          f"Spatial shape {x.shape[1:-1]} does not fit the plans' network: axis {axis} must be "
          f"divisible by {total} (the product of its strides); use the plans' patch size.")


class Settings(nn.Module, kw_only=True):
  """What every module takes (keyword only) and hands down unchanged (`settings`): dtype, the
  compute dtype (parameters stay float32); conv_impl, `kernels.CONV_IMPLS` ("auto": the unfold
  conv on CPU and GPU), used by stride-1 3D convs whose kernel has 3 taps along x; with it,
  strided convs run as space-to-depth + a stride-1 conv."""
  dtype: Any = jnp.float32
  conv_impl: str = "auto"


def settings(module: Settings) -> dict[str, Any]:
  return {"dtype": module.dtype, "conv_impl": module.conv_impl}


class Conv(Settings):
  """ConvNd as PyTorch: kernel (*k, C_in, C_out), stride, padding (k-1)//2, optional bias."""
  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    fan_in = x.shape[-1] * math.prod(self.kernel_size)
    kernel = self.param("kernel", he_normal(fan_in),
                        tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    stride_1 = all(s == 1 for s in self.strides)
    impl, _, tile = kernels.resolve_conv_impl(self.conv_impl).partition(":")
    if all(k == 1 for k in self.kernel_size) and stride_1:
      y = jnp.einsum("...c,co->...o", x, kernel.reshape(kernel.shape[-2:]))
    elif impl == "unfold" and nd == 3 and stride_1 and self.kernel_size[0] == 3:
      y = kernels.conv_unfold_3d(x, kernel, int(tile) if tile else None)
    else:
      pad = [((k - 1) // 2, (k - 1) // 2) for k in self.kernel_size]
      if impl == "unfold" and not stride_1:
        y = kernels.conv_space_to_depth(x, kernel, tuple(self.strides), pad)
      else:
        spatial = "DHW"[-nd:]
        dn = lax.conv_dimension_numbers(x.shape, kernel.shape,
                                        (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
        y = lax.conv_general_dilated(x, kernel, tuple(self.strides), pad, dimension_numbers=dn)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
          y.dtype)
    return y


class TransposedConv(Settings):
  """ConvTransposeNd with kernel = stride (non-overlapping): kernel (*stride, C_in, C_out)."""
  features: int
  strides: tuple[int, ...]
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    # PyTorch's fan_in of a ConvTranspose weight (C_in, C_out, *k) is C_out * prod(k).
    kernel = self.param("kernel", he_normal(self.features * math.prod(self.strides)),
                        tuple(self.strides) + (x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    # y[n, i*s + r, ..., o] = sum_c x[n, i, ..., c] kernel[r, ..., c, o]
    letters = "xyz"[:nd]
    offsets = "abd"[:nd]
    y = jnp.einsum(f"n{letters}c,{offsets}co->n" + "".join(l + o for l, o in zip(letters, offsets))
                   + "o", x, kernel)
    spatial = tuple(n * s for n, s in zip(x.shape[1:-1], self.strides))
    y = y.reshape((x.shape[0],) + spatial + (self.features,))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
          y.dtype)
    return y


class InstanceNorm(nn.Module):
  """InstanceNormNd(affine=True): per sample and channel over the spatial axes, biased variance,
  statistics in float32."""
  eps: float = 1e-5
  zero_init: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.zeros if self.zero_init else nn.initializers.ones,
                       (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=True)
    mul = lax.rsqrt(var + self.eps) * scale
    return ((x32 - mean) * mul + bias).astype(self.dtype)


class ConvNormAct(Settings):
  """ConvDropoutNormReLU: conv -> norm -> nonlin (nonlin_first: conv -> nonlin -> norm).
  negative_slope None: no nonlin."""
  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  use_bias: bool
  norm_eps: float
  negative_slope: float | None
  nonlin_first: bool = False
  zero_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv(self.features, self.kernel_size, self.strides, self.use_bias, **settings(self),
             name="conv")(x)
    norm = InstanceNorm(self.norm_eps, self.zero_norm, self.dtype, name="norm")
    if self.negative_slope is None:
      return norm(x)
    if self.nonlin_first:
      return norm(leaky_relu(x, self.negative_slope))
    return leaky_relu(norm(x), self.negative_slope)


def ones(nd: int) -> tuple[int, ...]:
  return (1,) * nd


class Block(Settings, kw_only=True):
  """Settings plus how every conv block of a network is built (keyword only, handed down
  unchanged by `block_settings`): conv_bias, norm_eps, negative_slope, nonlin_first."""
  conv_bias: bool = True
  norm_eps: float = 1e-5
  negative_slope: float = 0.01
  nonlin_first: bool = False


def block_settings(module: Block) -> dict[str, Any]:
  return {**settings(module), "conv_bias": module.conv_bias, "norm_eps": module.norm_eps,
          "negative_slope": module.negative_slope, "nonlin_first": module.nonlin_first}


def avg_pool(x: jax.Array, strides: Sequence[int]) -> jax.Array:
  """AvgPoolNd(kernel=stride, stride=stride) on sizes divisible by the stride."""
  if all(s == 1 for s in strides):
    return x
  shape = [x.shape[0]]
  for n, s in zip(x.shape[1:-1], strides):
    shape += [n // s, s]
  y = x.reshape(tuple(shape) + (x.shape[-1],))
  return jnp.mean(y, axis=tuple(range(2, 2 * len(strides) + 1, 2)), dtype=jnp.float32).astype(
      x.dtype)


class BasicBlockD(Block):
  """ResNet-D basic block: conv1 (strided, norm, nonlin), conv2 (norm), skip (avg pool by the
  stride, then 1x1 conv + norm where channels change), nonlin after the sum (no nonlin_first)."""
  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    residual = avg_pool(x, self.strides)
    if x.shape[-1] != self.features:
      residual = ConvNormAct(self.features, ones(nd), ones(nd), False, self.norm_eps, None,
                             **settings(self), name="skip")(residual)
    out = ConvNormAct(self.features, self.kernel_size, self.strides, self.conv_bias,
                      self.norm_eps, self.negative_slope, **settings(self), name="conv1")(x)
    out = ConvNormAct(self.features, self.kernel_size, ones(nd), self.conv_bias, self.norm_eps,
                      None, zero_norm=True, **settings(self), name="conv2")(out)
    return leaky_relu(out + residual.astype(out.dtype), self.negative_slope)


class StackedBlocks(Block):
  """n blocks with one kernel size, the first one strided: StackedConvBlocks (ConvNormAct
  `conv_{j}`) or, residual, StackedResidualBlocks (BasicBlockD `block_{j}`)."""
  n: int
  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.n):
      strides = self.strides if j == 0 else ones(x.ndim - 2)
      if self.residual:
        x = BasicBlockD(self.features, self.kernel_size, strides, **block_settings(self),
                        name=f"block_{j}")(x)
      else:
        x = ConvNormAct(self.features, self.kernel_size, strides, self.conv_bias, self.norm_eps,
                        self.negative_slope, self.nonlin_first, **settings(self),
                        name=f"conv_{j}")(x)
    return x


class Encoder(Block):
  """PlainConvEncoder (one StackedBlocks `stage_{s}` of n_per_stage[s] convs per stage) or,
  residual, ResidualEncoder (a StackedBlocks `stem`, 1 conv of stem_channels at stride 1, then
  per stage n_per_stage[s] BasicBlockD); returns every stage's output."""
  features_per_stage: tuple[int, ...]
  kernel_sizes: tuple[tuple[int, ...], ...]
  strides: tuple[tuple[int, ...], ...]
  n_per_stage: tuple[int, ...]
  residual: bool = False
  stem_channels: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    if self.residual:
      x = StackedBlocks(1, self.stem_channels or self.features_per_stage[0], self.kernel_sizes[0],
                        ones(x.ndim - 2), **block_settings(self), name="stem")(x)
    skips = []
    for s, feats in enumerate(self.features_per_stage):
      x = StackedBlocks(self.n_per_stage[s], feats, self.kernel_sizes[s], self.strides[s],
                        self.residual, **block_settings(self), name=f"stage_{s}")(x)
      skips.append(x)
    return skips


def keep_skips(skips: list[jax.Array], skip_keep: jax.Array | None) -> list[jax.Array]:
  """Every skip but the bottleneck times skip_keep[n] for sample n (None: unchanged); the U-Net's
  skip dropout (models/unet.py)."""
  if skip_keep is None:
    return skips
  if skip_keep.shape != skips[0].shape[:1]:
    raise ValueError(f"skip_keep must have shape ({skips[0].shape[0]},) (one value per sample), "
                     f"got {skip_keep.shape}.")
  scale = [skip_keep.reshape((-1,) + (1,) * (s.ndim - 1)).astype(s.dtype) for s in skips[:-1]]
  return [s * k for s, k in zip(skips[:-1], scale)] + [skips[-1]]


class UNetDecoder(Block):
  """UNetDecoder: from the bottleneck up, transposed conv to the skip's channels, concat
  [up, skip], n_conv_per_stage_decoder convs, and a 1x1 seg layer per stage."""
  features_per_stage: tuple[int, ...]
  kernel_sizes: tuple[tuple[int, ...], ...]
  strides: tuple[tuple[int, ...], ...]
  n_conv_per_stage_decoder: tuple[int, ...]
  num_classes: int
  deep_supervision: bool = False

  @nn.compact
  def __call__(self, skips: Sequence[jax.Array]) -> jax.Array | list[jax.Array]:
    nd = skips[0].ndim - 2
    x = skips[-1]
    outputs = []
    n = len(self.features_per_stage)
    for d in range(n - 1):
      skip_feats = self.features_per_stage[-(d + 2)]
      x = TransposedConv(skip_feats, self.strides[-(d + 1)], self.conv_bias, **settings(self),
                         name=f"transpconv_{d}")(x)
      x = jnp.concatenate([x, skips[-(d + 2)].astype(x.dtype)], axis=-1)
      x = StackedBlocks(self.n_conv_per_stage_decoder[d], skip_feats, self.kernel_sizes[-(d + 2)],
                        ones(nd), **block_settings(self), name=f"stage_{d}")(x)
      seg = Conv(self.num_classes, ones(nd), ones(nd), True, **settings(self), name=f"seg_{d}")
      # Every seg layer gets parameters at init, as PyTorch builds them all.
      if self.deep_supervision or d == n - 2 or self.is_initializing():
        outputs.append(seg(x).astype(jnp.float32))
    if self.deep_supervision:
      return outputs[::-1]
    return outputs[-1]


class NnUNet(Settings):
  """What both networks share: the fields every plan has first, and the call (check the input,
  encode, scale the skips by skip_keep, decode with `UNetDecoder`). A subclass declares the rest
  and says how its encoder is built (`encoder_fields`)."""
  n_stages: int
  features_per_stage: tuple[int, ...]
  kernel_sizes: tuple[tuple[int, ...], ...]
  strides: tuple[tuple[int, ...], ...]

  def encoder_fields(self) -> dict[str, Any]:
    """`Encoder`'s n_per_stage, residual, stem_channels and the nonlin_first of both halves."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               skip_keep: jax.Array | None = None) -> jax.Array | list[jax.Array]:
    del train  # No dropout, no batch statistics.
    check_input(x, self.strides, len(self.strides[0]))
    fields = self.encoder_fields()
    blocks = {**settings(self), "conv_bias": self.conv_bias, "norm_eps": self.norm_eps,
              "negative_slope": self.negative_slope, "nonlin_first": fields.pop("nonlin_first")}
    skips = Encoder(self.features_per_stage, self.kernel_sizes, self.strides, **fields, **blocks,
                    name="encoder")(x)
    return UNetDecoder(self.features_per_stage, self.kernel_sizes, self.strides,
                       self.n_conv_per_stage_decoder, self.num_classes, self.deep_supervision,
                       **blocks, name="decoder")(keep_skips(skips, skip_keep))


class PlainConvUNet(NnUNet):
  """dynamic_network_architectures' PlainConvUNet (nnU-Net's default network).

  Fields as `NnUNetPlan.arch` for this class, plus num_classes, deep_supervision (a list of
  logits, full resolution first), dtype and conv_impl (`Settings`). skip_keep: as the U-Net's.
  """
  n_conv_per_stage: tuple[int, ...]
  n_conv_per_stage_decoder: tuple[int, ...]
  conv_bias: bool = True
  norm_eps: float = 1e-5
  negative_slope: float = 0.01
  nonlin_first: bool = False
  num_classes: int = 1
  deep_supervision: bool = False

  def encoder_fields(self) -> dict[str, Any]:
    return {"n_per_stage": self.n_conv_per_stage, "residual": False,
            "nonlin_first": self.nonlin_first}


class ResidualEncoderUNet(NnUNet):
  """dynamic_network_architectures' ResidualEncoderUNet (nnU-Net ResEnc presets): stem conv,
  BasicBlockD stages, the plain UNetDecoder. Fields as `NnUNetPlan.arch` plus num_classes,
  deep_supervision, dtype, conv_impl; skip_keep as the U-Net's."""
  n_blocks_per_stage: tuple[int, ...]
  n_conv_per_stage_decoder: tuple[int, ...]
  conv_bias: bool = True
  norm_eps: float = 1e-5
  negative_slope: float = 0.01
  stem_channels: int | None = None
  num_classes: int = 1
  deep_supervision: bool = False

  def encoder_fields(self) -> dict[str, Any]:
    return {"n_per_stage": self.n_blocks_per_stage, "residual": True,
            "stem_channels": self.stem_channels, "nonlin_first": False}


def build(plan, num_classes: int, deep_supervision: bool = False, dtype: Any = jnp.float32,
          conv_impl: str = "auto") -> nn.Module:
  """The Flax network of an `NnUNetPlan` (config/nnunet_plans.py) with `num_classes` outputs."""
  if plan.network not in NETWORKS:
    raise errors.ConfigError(f"Network {plan.network!r} is not supported; supported: {NETWORKS}.")
  if num_classes < 1:
    raise errors.ConfigError(f"num_classes must be >= 1, got {num_classes}.")
  kernels.check_conv_impl(conv_impl)
  cls = PlainConvUNet if plan.network == "PlainConvUNet" else ResidualEncoderUNet
  return cls(**plan.arch, num_classes=num_classes, deep_supervision=deep_supervision, dtype=dtype,
             conv_impl=conv_impl)
