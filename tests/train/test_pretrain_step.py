"""The pre-training step's opt-in additions (`pretrain.*`): off is the original step exactly, on
changes the computation, and the skip-dropout mask depends only on the step key."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genesis_jax import corruptions
from genesis_jax.config import schema, validate
from genesis_jax.models import heads
from genesis_jax.train import optim, pretrain, sharding
from genesis_jax.train import step as step_lib

from conftest import tiny_pretrain_config


def _reference_train_step(corruption):
  """The pre-training step as it was before `pretrain.*` existed (kept here verbatim)."""

  def train_step(state, batch):
    key = jax.random.fold_in(state.rng, state.step)
    inputs, targets = corruptions.corrupt_batch(key, batch["image"], corruption)

    def loss_fn(params):
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
          mutable=["batch_stats"])
      return jnp.mean(pretrain.restoration_loss(logits, targets)), updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return step_lib.guarded_update(state, grads, batch_stats, loss)

  return train_step


@pytest.fixture(scope="module")
def setup():
  """(state, batch, corruption, mesh) of a tiny pre-training step: width 4, SGD, batch 8 of
  16x16x8 (tiny_pretrain_config), at depth 1 and with only the non-linear transform: off vs the
  original and on vs off are about the step's additions, not the network's depth or the
  corruptions, and these compile in a fraction of the time."""
  c = tiny_pretrain_config("unused", 6)
  c.model.depth = 1
  c.corruption.transforms = "nonlinear"
  model = heads.build_model(c.model, task="restore", n_class=1)
  tx = optim.make_optimizer(c.train, global_batch=8, num_steps=c.num_steps)
  mesh = sharding.make_mesh()
  variables = step_lib.init_variables(model, (16, 16, 8, 1), c.seed)
  state = step_lib.create_state(model, tx, c.seed, mesh, variables)
  image = np.random.default_rng(0).random((8, 16, 16, 8, 1), dtype=np.float32)
  corruption = corruptions.CorruptionParams.from_config(c.corruption)
  return state, {"image": jnp.asarray(image)}, corruption, mesh


def _run(step_fn, state, batch, mesh, steps=2):
  """`steps` steps of `step_fn` jitted as training jits it (the same step: one compile)."""
  step = step_lib.jit_train_step(step_fn, state, mesh)
  state = jax.tree.map(lambda x: x.copy(), state)  # The jitted step donates (consumes) its state.
  out = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    out.append(metrics)
  return state, out


def _assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_off_is_bit_identical_to_the_original_step(setup):
  state, batch, corruption, mesh = setup
  off = pretrain.make_train_step(corruption, pretrain.RestoreParams(0.0, 0.0))
  ref = _reference_train_step(corruption)
  assert str(jax.make_jaxpr(off)(state, batch)) == str(jax.make_jaxpr(ref)(state, batch))
  s_off, m_off = _run(off, state, batch, mesh)
  s_ref, m_ref = _run(ref, state, batch, mesh)
  _assert_trees_equal((s_off.params, s_off.batch_stats, s_off.opt_state, m_off),
                      (s_ref.params, s_ref.batch_stats, s_ref.opt_state, m_ref))
  # The config's defaults are off.
  assert pretrain.RestoreParams.from_config(schema.pretrain_config().pretrain) == \
      pretrain.RestoreParams()
  assert pretrain.RestoreParams.from_config(None) == pretrain.RestoreParams()


@pytest.mark.parametrize("restore", [pretrain.RestoreParams(skip_drop_rate=0.5),
                                     pretrain.RestoreParams(bottleneck_loss_weight=1.0)])
def test_on_changes_the_computation(setup, restore):
  state, batch, corruption, mesh = setup
  _, m_ref = _run(pretrain.make_train_step(corruption), state, batch, mesh, steps=1)
  s_on, m_on = _run(pretrain.make_train_step(corruption, restore), state, batch, mesh, steps=1)
  assert np.isfinite(float(m_on[0]["loss"])) and int(m_on[0]["nonfinite"]) == 0
  assert float(m_on[0]["loss"]) != float(m_ref[0]["loss"])
  assert float(m_on[0]["grad_norm"]) != float(m_ref[0]["grad_norm"])


def test_skip_keep_mask_rate_and_determinism():
  key = jax.random.PRNGKey(7)
  m = pretrain.skip_keep_mask(key, 4000, 0.3)
  assert m.dtype == jnp.float32 and set(np.unique(np.asarray(m))) == {0.0, 1.0}
  assert abs(float(1 - m.mean()) - 0.3) < 0.03
  np.testing.assert_array_equal(m, pretrain.skip_keep_mask(key, 4000, 0.3))
  np.testing.assert_array_equal(pretrain.skip_keep_mask(key, 8, 0.0), np.ones(8))
  np.testing.assert_array_equal(pretrain.skip_keep_mask(key, 8, 1.0), np.zeros(8))
  # Sample i's draw depends on the key and i only: the same under jit with the batch sharded
  # over the devices there are (the multi-device runs of test_train_equivalence use this path).
  mesh = sharding.make_mesh()
  n = 2 * jax.device_count()
  sharded = jax.jit(lambda k, x: pretrain.skip_keep_mask(k, x.shape[0], 0.5) * x[:, 0],
                    out_shardings=sharding.batch_sharded(mesh))(
      key, jax.device_put(jnp.ones((n, 1)), sharding.batch_sharded(mesh)))
  np.testing.assert_array_equal(sharded, pretrain.skip_keep_mask(key, n, 0.5))


def test_config_keys_checked():
  c = schema.pretrain_config()
  assert c.pretrain.skip_drop_rate == 0.0 and c.pretrain.bottleneck_loss_weight == 0.0
  assert "pretrain" not in schema.finetune_config()
  validate.check_value("pretrain.skip_drop_rate", 0.5)
  validate.check_value("model.init", "pytorch")
  for key, bad in (("pretrain.skip_drop_rate", 1.5), ("pretrain.skip_drop_rate", -0.1),
                   ("pretrain.bottleneck_loss_weight", -1.0), ("model.init", "keras")):
    with pytest.raises(ValueError, match=key.split(".")[-1]):
      validate.check_value(key, bad)
