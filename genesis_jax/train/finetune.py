"""Fine-tuning on target tasks: classification (encoder + MLP head) and segmentation (U-Net).

Initialisation from scratch or from pre-trained weights (transfer.py reports what was loaded);
frozen encoder or lower learning rate for loaded sub-trees; early stopping on validation loss with
the best checkpoint kept; at the end the best checkpoint is evaluated on the test split and written
to `<workdir>/eval.json` (classification: AUC; segmentation: Dice/IoU per case on whole volumes by
sliding-window inference).
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genesis_jax.eval import metrics as metrics_lib
from genesis_jax.train import checkpoints as ckpt_lib
from genesis_jax.data import tasks as task_data
from genesis_jax.train import loop, optim, sharding
from genesis_jax.weights import transfer
from genesis_jax.train.state import TrainState

KINDS = ("classify", "segment")


# ----------------------------------------------------------------------------------- losses
def dice_loss(logits: jax.Array, labels: jax.Array, n_class: int) -> jax.Array:
  """The original's soft Dice, 1 - (2 sum(y p) + 1) / (sum y + sum p + 1), over the whole batch.

  Binary: sigmoid of the single output channel. Multi-class: softmax, mean over foreground classes.
  labels: (N, *spatial, 1) integer class ids.
  """
  logits = logits.astype(jnp.float32)
  if n_class == 1:
    p, y = jax.nn.sigmoid(logits), labels.astype(jnp.float32)
  else:
    p = jax.nn.softmax(logits, axis=-1)[..., 1:]
    y = jax.nn.one_hot(labels[..., 0], n_class)[..., 1:]
  axes = tuple(range(p.ndim - 1))
  d = (2 * jnp.sum(y * p, axis=axes) + 1) / (jnp.sum(y, axis=axes) + jnp.sum(p, axis=axes) + 1)
  return 1.0 - jnp.mean(d)


def cross_entropy(logits: jax.Array, labels: jax.Array, n_class: int) -> jax.Array:
  """Per-element mean BCE (n_class 1) or softmax CE; labels are integer class ids."""
  logits = logits.astype(jnp.float32)
  if n_class == 1:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32).reshape(logits.shape)))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels.reshape(logits.shape[:-1]).astype(jnp.int32)))


def task_loss(kind: str, loss_name: str, n_class: int) -> Callable:
  if kind == "classify":
    return lambda logits, labels: cross_entropy(logits, labels, n_class)
  if loss_name == "dice":
    return lambda logits, labels: dice_loss(logits, labels, n_class)
  if loss_name == "dice+ce":
    return lambda logits, labels: dice_loss(logits, labels, n_class) + cross_entropy(logits, labels, n_class)
  raise ValueError(f"config.task.loss={loss_name!r}: expected 'dice' or 'dice+ce'.")


def probabilities(logits: jax.Array, n_class: int) -> jax.Array:
  return jax.nn.sigmoid(logits) if n_class == 1 else jax.nn.softmax(logits, axis=-1)


# ------------------------------------------------------------------------------------ steps
def make_train_step(loss_fn: Callable) -> Callable:

  def train_step(state: TrainState, batch: dict):
    def objective(params):
      logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                       batch["image"], train=True, mutable=["batch_stats"])
      return loss_fn(logits, batch["label"]), updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return loop.guarded_update(state, grads, batch_stats, loss)

  return train_step


def make_eval_step(n_class: int) -> Callable:

  def eval_step(state: TrainState, images: jax.Array) -> jax.Array:
    return probabilities(state.apply_fn(state.variables, images, train=False), n_class)

  return eval_step


def predict(state, eval_step, images: np.ndarray, mesh, per_process: int) -> np.ndarray:
  """Probabilities for every row of `images` (this process's view: all rows, single process)."""
  outs = []
  for idx, w in loop.padded_batches(len(images), per_process):
    out = eval_step(state, sharding.to_global({"image": images[idx]}, mesh)["image"])
    outs.append(loop.local_rows(out)[w > 0])
  return np.concatenate(outs)


def split_metrics(kind: str, n_class: int, loss_fn, probs: np.ndarray, labels: np.ndarray) -> dict:
  """Validation loss and the task metric from host-side probabilities."""
  p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
  if kind == "classify":
    y = labels.reshape(-1)
    if n_class == 1:
      s = p.reshape(-1)
      loss = float(-np.mean(y * np.log(s) + (1 - y) * np.log(1 - s)))
    else:
      loss = float(-np.mean(np.log(p[np.arange(len(y)), y.astype(int)])))
      s = p[:, 1] if n_class == 2 else p
    out = {"val_loss": loss}
    if len(np.unique(y)) > 1 and (n_class <= 2):
      out["auc"] = metrics_lib.auc(y, s)
    return out
  pred = metrics_lib.foreground(p)
  target = labels[..., 0] > 0
  logits = np.log(p / (1 - p)) if n_class == 1 else np.log(p)
  loss = float(loss_fn(jnp.asarray(logits), jnp.asarray(labels)))
  return {"val_loss": loss, "dice": metrics_lib.dice(pred, target), "iou": metrics_lib.iou(pred, target)}


# -------------------------------------------------------------------------------- the run
def _optimizer(config, report: transfer.TransferReport | None, global_batch: int):
  pretrained = set()
  if report is not None:
    pretrained = {p.split("/")[1] for p in report.loaded if p.startswith("params/")}
  ft = config.finetune
  # freeze_encoder also applies to a scratch init (the random-features baseline of a probe).
  if not ft.freeze_encoder and (not pretrained or ft.pretrained_lr_mult == 1.0):
    return optim.make_optimizer(config.train, global_batch=global_batch, num_steps=config.num_steps)

  def label(params):
    return {k: jax.tree.map(lambda _: "pretrained" if k in pretrained else "new", v)
            for k, v in params.items()}

  def wrap(make_opt):
    if ft.freeze_encoder:
      # Freezing means the loaded encoder; a loaded decoder keeps training at the mult rate.
      frozen = optax.set_to_zero()
      pre = optax.chain(make_opt(), optax.scale(float(ft.pretrained_lr_mult)))

      def label_frozen(params):
        return {k: jax.tree.map(lambda _: ("frozen" if k == "encoder" else
                                           "pretrained" if k in pretrained else "new"), v)
                for k, v in params.items()}
      return optax.multi_transform({"frozen": frozen, "pretrained": pre, "new": make_opt()},
                                   label_frozen)
    return optax.multi_transform(
        {"pretrained": optax.chain(make_opt(), optax.scale(float(ft.pretrained_lr_mult))),
         "new": make_opt()}, label)

  return optim.make_optimizer(config.train, global_batch=global_batch,
                              num_steps=config.num_steps, wrap=wrap)


def _initial_variables(config, model, sample_shape, workdir):
  key = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # Same key as loop.create_state.
  dummy = jnp.zeros((1, *sample_shape), jnp.float32)
  init_vars = jax.device_get(jax.jit(lambda k: model.init(k, dummy, train=False))(key))
  ft = config.finetune
  if not ft.init:
    return init_vars, None
  loaded, _ = transfer.load_pretrained(ft.init, which=ft.which,
                                       step=None if ft.step < 0 else int(ft.step))
  dont_load = list(ft.dont_load)
  if config.task.kind == "segment" and not ft.keep_head:
    dont_load.append("*/out/*")
  merged, report = transfer.merge_params(
      init_vars, loaded, source=str(ft.init), dont_load=dont_load,
      adapt_input_channels=ft.adapt_input_channels)
  loop.log(report.summary())
  if jax.process_index() == 0:
    (workdir / "transfer_report.json").write_text(json.dumps(report.to_json(), indent=1))
  return merged, report


def _setup(config, workdir: pathlib.Path):
  from genesis_jax.models import heads
  kind = config.task.kind
  if kind not in KINDS:
    raise ValueError(f"config.task.kind={kind!r}: expected one of {KINDS}.")
  data = task_data.load(config, workdir)
  sample_shape = data["train"][0].shape[1:]
  loop.check_sample_rank(sample_shape, config.model.spatial_dims, config.model.depth)
  model = heads.build_model(config.model, task=kind, n_class=int(config.task.n_class),
                            feature_level=int(config.task.feature_level))
  return data, sample_shape, model


def train(config, workdir) -> dict:
  from genesis_jax.data import pipeline
  workdir = pathlib.Path(workdir)
  ckpt_lib.check_writable(workdir)
  mesh = sharding.make_mesh()
  loop.log(f"fine-tuning ({config.task.kind}) | {sharding.describe(mesh)}")
  loop.save_config(config, workdir)
  data, sample_shape, model = _setup(config, workdir)
  n_class, kind = int(config.task.n_class), config.task.kind
  variables, report = _initial_variables(config, model, sample_shape, workdir)
  per_process = sharding.per_process_batch(config.train.batch_size)
  global_batch = sharding.global_batch_size(config.train.batch_size)
  tx = _optimizer(config, report, global_batch)
  state = loop.create_state(model, tx, sample_shape, config.seed, mesh, variables=variables)
  x_train, y_train = data["train"]
  loop.log(f"{kind}: {len(x_train)} training samples of {sample_shape}, "
           f"{len(data['val'][0])} val, init={config.finetune.init or 'scratch'}")
  loader = pipeline.task_loader(x_train, y_train, batch_size=per_process, seed=config.seed,
                                shard_index=jax.process_index(), shard_count=jax.process_count(),
                                worker_count=config.data.num_workers)
  data_iter = iter(loader)
  loss_fn = task_loss(kind, config.task.loss, n_class)
  train_step = loop.jit_train_step(make_train_step(loss_fn), state, mesh)
  eval_step = jax.jit(make_eval_step(n_class))

  def evaluate(state):
    x_val, y_val = data["val"]
    probs = predict(state, eval_step, x_val, mesh, per_process)
    return split_metrics(kind, n_class, loss_fn, probs, y_val)

  summary = loop.run_training(config, workdir, state=state, data_iter=data_iter,
                              train_step=train_step, mesh=mesh, evaluate=evaluate,
                              cubes_per_step=global_batch)
  summary["test"] = _test(config, workdir, state, model, data, mesh, eval_step, per_process)
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
  return summary


def _restore_best(workdir: pathlib.Path, state: TrainState) -> TrainState:
  loaded, _ = transfer.load_pretrained(str(workdir), which="best")
  return state.replace(params=jax.tree.map(jnp.asarray, loaded["params"]),
                       batch_stats=jax.tree.map(jnp.asarray, loaded["batch_stats"]))


def _test(config, workdir, state, model, data, mesh, eval_step, per_process) -> dict:
  """Evaluates the best checkpoint on the test split; writes <workdir>/eval.json."""
  state = _restore_best(workdir, state)
  kind, n_class = config.task.kind, int(config.task.n_class)
  result: dict = {"kind": kind, "init": config.finetune.init or "scratch"}
  if kind == "classify":
    x, y = data["test"]
    probs = predict(state, eval_step, x, mesh, per_process)
    result.update(split_metrics(kind, n_class, None, probs, y))
    result["n"] = int(len(y))
  else:
    result.update(_segment_volumes(config, workdir, state, data["test_volumes"]))
  if jax.process_index() == 0:
    (workdir / "eval.json").write_text(json.dumps(result, indent=2, default=float))
  loop.log("test: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))
  return result


def _segment_volumes(config, workdir, state, volumes) -> dict:
  """Whole-volume sliding-window segmentation of the test cases (a 2D model slice by slice);
  per-case Dice/IoU (and HD95)."""
  from genesis_jax.eval import inference
  from genesis_jax.data import readers
  n_class = int(config.task.n_class)
  window = tuple(config.data.crop)
  # The variables are an argument, not a closure constant: baking 19M weights into the program
  # bloats compilation (measured: 128 MB of HLO for a 64 MB closure).
  apply_jit = jax.jit(lambda variables, x: probabilities(
      state.apply_fn(variables, x, train=False), n_class))
  apply = functools.partial(apply_jit, state.variables)
  preds, targets, spacings = [], [], []
  out_dir = workdir / "test_predictions"
  for vol, label in volumes:
    probs = inference.segment_volume(apply, vol.data, window, overlap=config.eval.overlap,
                                     tta_flip=config.eval.tta_flip)
    pred = metrics_lib.foreground(probs)
    if config.eval.write_predictions and jax.process_index() == 0:  # On the scan's own grid.
      inference.write_segmentation(out_dir / (readers.case_id(vol.source) + "_pred.nii.gz"),
                                   probs, vol, readers.load_volume(vol.source))
    preds.append(pred)
    targets.append(label > 0)
    spacings.append(vol.spacing)
  return metrics_lib.segmentation_metrics(preds, targets, spacing=spacings, hd=config.eval.hd95)


def evaluate(config, workdir) -> dict:
  """`mode=evaluate`: test metrics of the best checkpoint in `workdir` (written to eval.json)."""
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh()
  data, sample_shape, model = _setup(config, workdir)
  per_process = sharding.per_process_batch(config.train.batch_size)
  tx = optim.make_optimizer(config.train, global_batch=1, num_steps=1)
  state = loop.create_state(model, tx, sample_shape, config.seed, mesh)
  return _test(config, workdir, state, model, data, mesh, jax.jit(make_eval_step(int(config.task.n_class))),
               per_process)
