"""Genesis pre-training: corrupt on device, restore, MSE(sigmoid(model(corrupt(x))), x).

The train step is a pure function (state, batch) -> (state, metrics), jitted once with the state
replicated and donated and the batch sharded over the `data` mesh axis. Its randomness comes only
from `fold_in(state.rng, state.step)`, split per sample inside `corrupt_batch`, so a run gives the
same result on any device count and continues exactly after a restore.
"""
from __future__ import annotations

import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genesis_jax import corruptions
from genesis_jax.train import checkpoints as ckpt_lib
from genesis_jax.train import loop, optim, sharding
from genesis_jax.train.state import TrainState


def restoration_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Per-sample MSE between the sigmoid output (as the original's out_tr) and the clean cube."""
  pred = jax.nn.sigmoid(logits.astype(jnp.float32))
  return jnp.mean(jnp.square(pred - target.astype(jnp.float32)),
                  axis=tuple(range(1, target.ndim)))


def make_train_step(corruption: corruptions.CorruptionParams) -> Callable:

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    inputs, targets = corruptions.corrupt_batch(key, batch["image"], corruption)

    def loss_fn(params):
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
          mutable=["batch_stats"])
      return jnp.mean(restoration_loss(logits, targets)), updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loop.guarded_update(state, grads, batch_stats, loss)

  return train_step


def make_eval_step(corruption: corruptions.CorruptionParams) -> Callable:

  def eval_step(state: TrainState, batch: dict, key: jax.Array) -> dict:
    inputs, targets = corruptions.corrupt_batch(key, batch["image"], corruption)
    logits = state.apply_fn(state.variables, inputs, train=False)
    per_sample = restoration_loss(logits, targets)
    w = batch["weight"]
    return {"loss_sum": jnp.sum(per_sample * w), "count": jnp.sum(w),
            "inputs": inputs, "targets": targets, "restored": jax.nn.sigmoid(logits)}

  return eval_step


def train(config, workdir: str | pathlib.Path) -> dict:
  """Runs (or resumes) pre-training in `workdir`. Returns a summary dict (also summary.json)."""
  from genesis_jax.data import pipeline, prepare  # Data stays out of jitted code paths.
  from genesis_jax.models import heads

  workdir = pathlib.Path(workdir)
  ckpt_lib.check_writable(workdir)
  mesh = sharding.make_mesh()
  loop.log(f"pre-training | {sharding.describe(mesh)}")
  loop.save_config(config, workdir)

  dataset_dir = prepare.ensure_dataset(config.data, workdir, seed=config.seed)
  train_src = pipeline.CubeSource(dataset_dir, "train")
  val_src = pipeline.CubeSource(dataset_dir, "val")
  sample = np.asarray(train_src[0])
  loop.check_sample_rank(sample.shape, config.model.spatial_dims, config.model.depth)

  per_process = sharding.per_process_batch(config.train.batch_size)
  global_batch = sharding.global_batch_size(config.train.batch_size)
  loader = pipeline.pretrain_loader(
      train_src, batch_size=per_process, seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count(), worker_count=config.data.num_workers)
  data_iter = iter(loader)

  model = heads.build_model(config.model, task="restore", n_class=sample.shape[-1])
  tx = optim.make_optimizer(config.train, global_batch=global_batch, num_steps=config.num_steps)
  state = loop.create_state(model, tx, sample.shape, config.seed, mesh)
  loop.log(f"model: {loop.count_params(state.params):,} parameters | global batch {global_batch} "
           f"({config.train.batch_size} per device) | lr {optim.base_learning_rate(config.train, global_batch):g}")

  corruption = corruptions.CorruptionParams.from_config(config.corruption)
  train_step = loop.jit_train_step(make_train_step(corruption), state, mesh)
  eval_step = jax.jit(make_eval_step(corruption))

  def evaluate(state):
    return loop.evaluate_source(
        state, val_src, eval_step, mesh, per_process, max_batches=config.eval_batches or None,
        seed=config.seed, keep_first=True)

  def on_eval(state, result, step):
    if config.samples_every_eval and result.get("first") is not None:
      loop.write_restoration_samples(result["first"], workdir / "samples" / f"step_{step:07d}.png")

  return loop.run_training(
      config, workdir, state=state, data_iter=data_iter, train_step=train_step, mesh=mesh,
      evaluate=evaluate, on_eval=on_eval, cubes_per_step=global_batch)
