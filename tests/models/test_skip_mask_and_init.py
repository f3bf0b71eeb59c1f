"""The U-Net's per-sample skip mask (skip dropout) and the `model.init` choices."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genesis_jax import errors
from genesis_jax.config import schema
from genesis_jax.models import heads, layers, unet


def _tiny(**model_overrides):
  c = schema.pretrain_config()
  c.model.width = 4
  for k, v in model_overrides.items():
    c.model[k] = v
  return c.model


@pytest.fixture(scope="module")
def tiny_unet():
  model = heads.build_model(_tiny(), task="restore", n_class=1)
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 8, 1))
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  return model, variables, x


def test_skip_keep_none_and_ones_equal_the_plain_unet(tiny_unet):
  model, variables, x = tiny_unet
  plain = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(model.apply(variables, x, train=False, skip_keep=None), plain)
  np.testing.assert_array_equal(model.apply(variables, x, train=False, skip_keep=jnp.ones(3)),
                                plain)
  # In training mode too (batch statistics), and the running-statistics updates are the same.
  out_a, upd_a = model.apply(variables, x, train=True, mutable=["batch_stats"])
  out_b, upd_b = model.apply(variables, x, train=True, skip_keep=jnp.ones(3),
                             mutable=["batch_stats"])
  np.testing.assert_array_equal(out_a, out_b)
  jax.tree.map(np.testing.assert_array_equal, upd_a, upd_b)


def test_zero_skip_keep_removes_the_skip_contribution(tiny_unet):
  model, variables, x = tiny_unet
  keep = jnp.array([1.0, 0.0, 1.0])
  out = model.apply(variables, x, train=False, skip_keep=keep)
  plain = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(out[0], plain[0])
  np.testing.assert_array_equal(out[2], plain[2])
  assert np.abs(np.asarray(out[1] - plain[1])).max() > 1e-4
  # Sample 1 is the decoder run on (bottom, zero skips): skips play no part in it any more.
  bottom, skips = model.apply(variables, x, train=False,
                              method=lambda m, x, train: m.encoder(x, train))
  zero = [jnp.zeros_like(s) for s in skips]
  by_hand = model.apply(
      variables, bottom, zero, False,
      method=lambda m, b, s, train: m.out(m.decoder(b, s, train)).astype(jnp.float32))
  np.testing.assert_allclose(out[1], by_hand[1], rtol=1e-6, atol=1e-6)
  # Changing sample 1's skips (another input's) while keeping its bottom changes nothing.
  other = [s[::-1] for s in skips]
  masked = model.apply(
      variables, bottom, other, False, keep,
      method=lambda m, b, s, train, k: m.decoder(b, s, train, k))
  masked_ref = model.apply(
      variables, bottom, skips, False, keep,
      method=lambda m, b, s, train, k: m.decoder(b, s, train, k))
  np.testing.assert_array_equal(masked[1], masked_ref[1])


def test_skip_keep_shape_checked(tiny_unet):
  model, variables, x = tiny_unet
  with pytest.raises(ValueError, match="skip_keep must have shape"):
    model.apply(variables, x, train=False, skip_keep=jnp.ones(2))


def test_default_init_is_flax_and_unchanged():
  assert schema.default("model.init") == "flax"
  x = jnp.zeros((1, 16, 16, 8, 1))
  a = heads.build_model(_tiny(), task="restore").init(jax.random.PRNGKey(3), x, train=False)
  b = heads.build_model(_tiny(init="flax"), task="restore").init(jax.random.PRNGKey(3), x,
                                                                  train=False)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # flax: lecun_normal kernels (unbounded normal, std 1/sqrt(fan_in)) and zero conv biases.
  conv = a["params"]["encoder"]["down_1"]["conv_0"]["conv"]
  np.testing.assert_array_equal(conv["bias"], 0.0)
  fan_in = 27 * 8
  assert 0.6 < np.std(conv["kernel"]) * math.sqrt(fan_in) < 1.2


@pytest.mark.parametrize("task", ["restore", "classify"])
def test_pytorch_init_bounds(task):
  """Every conv, transposed-conv and dense weight and bias within U(-1/sqrt(fan_in), ..), filling
  most of that range; BatchNorm scale 1, bias 0."""
  model = heads.build_model(_tiny(init="pytorch"), task=task, n_class=1)
  params = model.init(jax.random.PRNGKey(4), jnp.zeros((1, 16, 16, 8, 1)), train=False)["params"]
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [p.key for p in path]
    leaf = np.asarray(leaf)
    if "bn" in names:
      np.testing.assert_array_equal(leaf, 1.0 if names[-1] == "scale" else 0.0)
      continue
    parent = params
    for n in names[:-1]:
      parent = parent[n]
    kernel = np.asarray(parent["kernel"])
    if "up_conv" in names:  # PyTorch: weight (C_in, C_out, 2, 2, 2), fan_in = C_out * 8.
      fan_in = kernel.shape[-1] * 8
    else:  # Conv3d (C_in * k^3) and Linear (in_features).
      fan_in = math.prod(kernel.shape[:-1])
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(leaf).max() <= bound, jax.tree_util.keystr(path)
    if leaf.size >= 64:
      assert np.abs(leaf).max() > 0.9 * bound, jax.tree_util.keystr(path)
      assert abs(np.std(leaf) - bound / math.sqrt(3)) < 0.25 * bound, jax.tree_util.keystr(path)
    checked += 1
  assert checked >= (16 if task == "classify" else 30)


def test_init_choices_checked():
  assert layers.INITS == schema.lookup("model.init").choices
  with pytest.raises(errors.ConfigError, match="model.init"):
    heads.build_model(_tiny(init="keras"), task="restore")
  with pytest.raises(errors.ConfigError, match="model.init"):
    unet.check_fields("pytorch", "standard", "he")
