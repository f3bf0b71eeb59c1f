"""Target-task models on the Genesis U-Net (docs/method.md#target-task-heads-and-losses): a
classifier on the encoder, a segmenter on the whole encoder-decoder, and `build_model`, which
makes either (or the restoration U-Net) from `config.model`.

Transfer copies subtrees by name: `encoder` is the same module in UNet and Classifier, so a
pre-trained `params['encoder']` (and `batch_stats['encoder']`) drops into a Classifier unchanged,
and a whole pre-trained tree into a segmentation UNet (whose `out` may differ in n_class).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genesis_jax import errors
from genesis_jax.config.validate import check_feature_level
from genesis_jax.models import kernels, layers, unet


class ClassifierHead(nn.Module):
  """Global average pool over space -> Dense 1024 -> ReLU -> Dense n_class (float32 logits).

  weight_init "pytorch" draws the Dense weights and biases as PyTorch's nn.Linear does,
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)); "flax" keeps flax's Dense defaults."""
  n_class: int
  hidden: int = 1024
  dtype: Any = jnp.float32
  weight_init: str = "flax"

  def dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
    if self.weight_init == "flax":
      return nn.Dense(features, dtype=self.dtype, name=name)
    k_init, b_init = layers.conv_inits(self.weight_init, fan_in)
    return nn.Dense(features, dtype=self.dtype, kernel_init=k_init, bias_init=b_init, name=name)

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    pooled = features.astype(jnp.float32).mean(axis=tuple(range(1, features.ndim - 1)))
    h = nn.relu(self.dense(self.hidden, pooled.shape[-1], "dense_0")(pooled))
    return self.dense(self.n_class, self.hidden, "dense_1")(h).astype(jnp.float32)


class Classifier(unet.NetSettings):
  """Encoder + ClassifierHead on its deepest features. x (N, *spatial, C) -> logits (N, n_class).

  `feature_level` k in [0, depth) feeds the head from encoder level k instead (0 = the finest,
  full resolution; the skip the decoder would take), for probing what each level encodes; -1 or
  `depth` is the deepest (the original). Deeper levels are then unused.
  """
  n_class: int
  feature_level: int = -1

  def setup(self):
    self.encoder = unet.Encoder(**unet.settings(self, unet.NetSettings))
    self.classifier = ClassifierHead(self.n_class, dtype=self.dtype, weight_init=self.weight_init)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_feature_level(self.feature_level, self.depth)
    bottom, skips = self.encoder(x, train)
    level = self.feature_level % (self.depth + 1)
    return self.classifier(bottom if level == self.depth else skips[level])


TASKS = ("restore", "segment", "classify")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_cfg: Any, *, task: str = "restore", n_class: int = 1,
                in_channels: int | None = None, feature_level: int = -1) -> nn.Module:
  """Model for `task` from `config.model` (fields variant, width, depth, spatial_dims, bn, dtype,
  conv_impl, winograd_min_macs, init; a missing field takes its default).

  restore: UNet with n_class (= input channels) outputs (logits; sigmoid + MSE in the loss).
  segment: UNet with n_class outputs. classify: Classifier with n_class logits. in_channels is
  inferred at init.
  """
  del in_channels  # Flax infers input channels from the first batch.
  get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d: getattr(model_cfg, k, d)
  dtype_name = get("dtype", "float32")
  if dtype_name not in _DTYPES:
    raise errors.ConfigError(
        f"model.dtype must be one of {tuple(_DTYPES)}, got {dtype_name!r}.")
  kw = dict(width=int(get("width", 32)), depth=int(get("depth", 3)),
            spatial_dims=int(get("spatial_dims", 3)), variant=get("variant", "pytorch"),
            bn=get("bn", "standard"), dtype=_DTYPES[dtype_name],
            conv_impl=get("conv_impl", "auto"),
            winograd_min_macs=kernels.check_winograd_min_macs(
                get("winograd_min_macs", kernels.DEFAULT_WINOGRAD_MIN_MACS)),
            weight_init=get("init", "flax"))
  # Fail at build time, not at first call.
  unet.check_fields(kw["variant"], kw["bn"], kw["weight_init"])
  kernels.check_conv_impl(kw["conv_impl"])
  if task == "restore":  # One output per input channel: multi-sequence MRI restores every channel.
    return unet.UNet(out_channels=n_class, **kw)
  if task == "segment":
    return unet.UNet(out_channels=n_class, **kw)
  if task == "classify":
    check_feature_level(feature_level, kw["depth"])
    return Classifier(n_class=n_class, feature_level=feature_level, **kw)
  raise errors.ConfigError(f"task must be one of {TASKS}, got {task!r}.")
