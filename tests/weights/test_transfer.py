"""Transfer: a checkpoint of another network (width, depth, 2D/3D) is refused in one line that
names the checkpoint's size and the config key to change, not every mismatching array."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from genesis_jax.config import schema
from genesis_jax.models import heads
from genesis_jax.weights import transfer


def _variables(task="restore", width=4, depth=3, spatial_dims=3):
  c = schema.pretrain_config().model
  c.width, c.depth, c.spatial_dims = width, depth, spatial_dims
  model = heads.build_model(c, task=task, n_class=1)
  x = np.zeros((1, *(16, 16, 8)[:spatial_dims], 1), np.float32)
  return jax.device_get(jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(0)))


def _refusal(init, loaded) -> str:
  with pytest.raises(transfer.TransferError) as e:
    transfer.merge_params(init, loaded, source="runs/pre")
  return str(e.value)


def test_a_width_8_checkpoint_into_a_width_16_model_says_so_in_one_line():
  msg = _refusal(_variables("classify", width=16), _variables(width=8))
  assert msg.startswith("runs/pre: the checkpoint is width 8 (config.model.width=16)")
  assert "--config.model.width=8" in msg and "config.finetune.init" in msg
  assert "\n" not in msg and "params/" not in msg  # not one entry per array


def test_depth_and_dimensionality_mismatches_are_named():
  msg = _refusal(_variables("classify", depth=3), _variables(depth=2))
  assert "the checkpoint is depth 2 (config.model.depth=3)" in msg
  assert "--config.model.depth=2" in msg
  msg = _refusal(_variables("segment", spatial_dims=3), _variables(spatial_dims=2))
  assert "the checkpoint is 2D (config.model.spatial_dims=3)" in msg


def test_architecture_reads_width_depth_and_dims_from_the_shapes():
  flat = {"/".join(k): v for k, v in
          traverse_util.flatten_dict(_variables(width=4, depth=2)).items()}
  assert transfer.architecture(flat) == {"width": 4, "spatial_dims": 3, "depth": 2}
  assert transfer.architecture({}) == {}
