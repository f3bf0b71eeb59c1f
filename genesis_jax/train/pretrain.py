"""Genesis pre-training: corrupt on device, restore, MSE(sigmoid(model(corrupt(x))), x).

This module holds what is particular to pre-training: its train and eval steps, the validation
loss over the prepared cubes and the restoration-sample PNGs; the run itself is loop.py's.

The train step is a pure function (state, batch) -> (state, metrics), jitted once with the state
replicated and donated and the batch sharded over the `data` mesh axis. Its randomness comes only
from `fold_in(state.rng, state.step)`, split per sample inside `corrupt_batch`, so a run gives the
same result on any device count and continues exactly after a restore.

Two opt-in additions beyond the original aim to keep the deep features informative (the decoder
can restore through its skip connections alone, leaving the bottleneck little to learn):
`pretrain.skip_drop_rate` zeroes every skip connection of a random share of the samples (the mask
is drawn per sample from the same step key, so it too is the same on any device count), and
`pretrain.bottleneck_loss_weight` adds the restoration loss of a second pass with every skip
zeroed. Both at 0 (the default) leave the step exactly as the original's.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from genesis_jax import corruptions, errors
from genesis_jax.config import validate
from genesis_jax.train import loop, optim
from genesis_jax.train import step as step_lib
from genesis_jax.train.state import TrainState


def restoration_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Per-sample MSE between the sigmoid output (as the original's out_tr) and the clean cube."""
  pred = jax.nn.sigmoid(logits.astype(jnp.float32))
  return jnp.mean(jnp.square(pred - target.astype(jnp.float32)),
                  axis=tuple(range(1, target.ndim)))


@dataclasses.dataclass(frozen=True)
class RestoreParams:
  """The `pretrain` section: skip dropout and the bottleneck-only auxiliary loss (0 = off)."""
  skip_drop_rate: float = 0.0
  bottleneck_loss_weight: float = 0.0

  @classmethod
  def from_config(cls, cfg: Any) -> RestoreParams:
    """From `config.pretrain`; None or a missing field keeps the default (off)."""
    if cfg is None:
      return cls()
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    return cls(**{f.name: float(get(f.name, f.default)) for f in dataclasses.fields(cls)})


# fold_in salt of the skip-dropout mask's key (the corruptions split the step key itself).
SKIP_DROP_SALT = 0x5D1


def skip_keep_mask(key: jax.Array, n: int, rate: float) -> jax.Array:
  """(n,) float32: 0 for the samples whose skips are dropped (each with probability `rate`), else 1.

  One uniform per sample from `fold_in(key, SKIP_DROP_SALT)`: a function of the step key and the
  sample's index in the global batch only, so the same on any device count.
  """
  u = jax.random.uniform(jax.random.fold_in(key, SKIP_DROP_SALT), (n,))
  return (u >= rate).astype(jnp.float32)


def make_train_step(corruption: corruptions.CorruptionParams,
                    restore: RestoreParams = RestoreParams()) -> Callable:
  """The pre-training step. With `restore` off (the default) the traced computation is exactly
  the original's; skip_drop_rate > 0 passes a per-sample skip mask to the U-Net, and
  bottleneck_loss_weight > 0 adds the loss of a pass with every skip zeroed (its batch-norm
  statistics updates are discarded: the running statistics follow the plain pass)."""
  drop, aux = restore.skip_drop_rate, restore.bottleneck_loss_weight

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    inputs, targets = corruptions.corrupt_batch(key, batch["image"], corruption)
    extra = {}
    if drop > 0:
      extra["skip_keep"] = skip_keep_mask(key, inputs.shape[0], drop)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      logits, updates = state.apply_fn(variables, inputs, train=True, mutable=["batch_stats"],
                                       **extra)
      loss = jnp.mean(restoration_loss(logits, targets))
      if aux > 0:
        no_skips = jnp.zeros((inputs.shape[0],), jnp.float32)
        bottom_logits, _ = state.apply_fn(variables, inputs, train=True, skip_keep=no_skips,
                                          mutable=["batch_stats"])
        loss = loss + aux * jnp.mean(restoration_loss(bottom_logits, targets))
      return loss, updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return step_lib.guarded_update(state, grads, batch_stats, loss)

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


def evaluate_source(state, source, eval_step, mesh, per_process: int, *, max_batches: int | None,
                    seed: int, keep_first: bool = False) -> dict:
  """Mean loss over a random-access source; the corruption keys are fixed, so evals compare."""
  key = jax.random.PRNGKey(seed + 1_000_003)
  total, count, first = 0.0, 0.0, None
  rows = lambda idx: {"image": np.stack([np.asarray(source[int(i)]) for i in idx])}
  batches = step_lib.global_eval_batches(len(source), per_process, mesh, rows,
                                         max_batches=max_batches)
  for b, batch in enumerate(batches):
    out = eval_step(state, batch, jax.random.fold_in(key, b))
    total += float(out["loss_sum"])
    count += float(out["count"])
    if keep_first and first is None:
      first = {k: step_lib.local_rows(out[k]) for k in ("inputs", "targets", "restored")}
  return {"val_loss": total / max(count, 1.0), "first": first}


def write_restoration_samples(first: dict, path: pathlib.Path, max_rows: int = 4) -> None:
  """PNG grid, one row per cube: clean target | corrupted input | restored (mid slices)."""
  if jax.process_index() != 0:
    return
  from genesis_jax.eval import visualize
  rows = []
  for i in range(min(max_rows, len(first["targets"]))):
    rows.append([visualize.mid_slice(first[k][i]) for k in ("targets", "inputs", "restored")])
  path.parent.mkdir(parents=True, exist_ok=True)
  visualize.save_image_grid(path, rows, row_labels=[f"cube {i}" for i in range(len(rows))],
                            col_labels=["original", "corrupted", "restored"])


def train(config, workdir: str | pathlib.Path) -> dict:
  """Runs (or resumes) pre-training in `workdir`. Returns a summary dict (also summary.json)."""
  from genesis_jax.data import pipeline, prepare  # Data stays out of jitted code paths.

  config = validate.resolve_nnunet(config)  # model.kind='nnunet': crop, spacing from the plans.
  run = loop.start_run(config, workdir, "pre-training")
  dataset_dir = prepare.ensure_dataset(config.data, run.workdir, seed=config.seed)
  train_src = pipeline.CubeSource(dataset_dir, "train")
  val_src = pipeline.CubeSource(dataset_dir, "val")
  sample = np.asarray(train_src[0])
  is_nnunet = config.model.get("kind", "genesis") == "nnunet"  # Shape checked against the plans.
  loop.check_sample_rank(sample.shape, config.model.spatial_dims,
                         0 if is_nnunet else config.model.depth)
  loader = pipeline.pretrain_loader(
      train_src, batch_size=run.per_process, seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count(), worker_count=config.data.num_workers)

  model = build_restoration_model(config.model, sample.shape)
  tx = optim.make_optimizer(config.train, global_batch=run.global_batch,
                            num_steps=config.num_steps)
  variables = step_lib.init_variables(model, sample.shape, config.seed)
  corruption = corruptions.CorruptionParams.from_config(config.corruption)
  restore = RestoreParams.from_config(config.get("pretrain"))
  state, train_step = loop.build_state(run, model, tx, variables,
                                       make_train_step(corruption, restore))
  eval_step = jax.jit(make_eval_step(corruption))

  def evaluate(state):
    return evaluate_source(
        state, val_src, eval_step, run.mesh, run.per_process,
        max_batches=config.eval_batches or None, seed=config.seed, keep_first=True)

  def on_eval(state, result, step):
    if config.samples_every_eval and result.get("first") is not None:
      write_restoration_samples(result["first"], run.workdir / "samples" / f"step_{step:07d}.png")

  summary = loop.finish(run, loop.run_training(
      run, state=state, data_iter=iter(loader), train_step=train_step, evaluate=evaluate,
      on_eval=on_eval))
  if is_nnunet and jax.process_index() == 0:
    from genesis_jax.weights import nnunet_cli  # pylint: disable=import-outside-toplevel
    out = run.workdir / nnunet_cli.EXPORT_NAME
    nnunet_cli.export(run.workdir, out)
    loop.log(f"nnU-Net checkpoint (best step): {out}; fine-tune with nnUNetv2_train ... "
             f"-pretrained_weights {out}")
  return summary


def build_restoration_model(model_cfg, sample_shape: tuple[int, ...]):
  """The restoration network: the Genesis U-Net (model.kind='genesis') or the nnU-Net plans'
  network (kind='nnunet') with one output per input channel on its full-resolution decoder stage
  and no deep supervision. Data whose cube shape or channel count the plans do not expect is a
  DataError naming both."""
  from genesis_jax.models import heads  # pylint: disable=import-outside-toplevel
  if model_cfg.get("kind", "genesis") != "nnunet":
    return heads.build_model(model_cfg, task="restore", n_class=sample_shape[-1])
  from genesis_jax.config import nnunet_plans  # pylint: disable=import-outside-toplevel
  from genesis_jax.models import nnunet  # pylint: disable=import-outside-toplevel
  plan = nnunet_plans.load_plans(model_cfg.plans, model_cfg.configuration)
  where = f"config.model.plans={model_cfg.plans!r} [{model_cfg.configuration}]"
  if tuple(sample_shape[:-1]) != tuple(plan.patch_size):
    raise errors.DataError(
        f"the pre-training cubes are {tuple(sample_shape[:-1])} but {where} has patch size "
        f"{tuple(plan.patch_size)} (x, y, z); prepare the data with the plans' patch size "
        f"(leave config.data.crop unset with a folder or phantom source).")
  if sample_shape[-1] != plan.n_input_channels:
    raise errors.DataError(
        f"the pre-training cubes have {sample_shape[-1]} channel(s) but {where} expects "
        f"{plan.n_input_channels} input channels; the exported network would not load into "
        f"nnU-Net. Pre-train for a single-channel (e.g. CT) plans file.")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.get("dtype", "float32")]
  return nnunet.build(plan, num_classes=sample_shape[-1], deep_supervision=False, dtype=dtype,
                      conv_impl=model_cfg.get("conv_impl", "auto"))
