"""Fine-tuning on target tasks: classification (encoder + MLP head) and segmentation (U-Net).

Initialisation from scratch or from pre-trained weights (transfer.py reports what was loaded);
frozen encoder or lower learning rate for loaded sub-trees; early stopping on validation loss with
the best checkpoint kept; at the end the best checkpoint is evaluated on the test split and written
to `<workdir>/eval.json` (classification: AUC; segmentation: Dice/IoU per case on whole volumes by
sliding-window inference).

Validation runs on the device as in pre-training: the eval step returns loss sums (and the Dice
statistics) and the probabilities the task metrics need. The run itself is loop.py's.
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
from flax import traverse_util

from genesis_jax import errors
from genesis_jax.config import schema
from genesis_jax.config.validate import resolve_nnunet
from genesis_jax.data import store
from genesis_jax.data import tasks as task_data
from genesis_jax.eval import metrics as metrics_lib
from genesis_jax.train import loop, optim, sharding
from genesis_jax.train import step as step_lib
from genesis_jax.train.state import TrainState
from genesis_jax.weights import transfer

KINDS = ("classify", "segment", "multilabel")
# Multi-label classification: one sigmoid + BCE per class (n_class findings), per-class AUC.
CLASSIFIERS = ("classify", "multilabel")


# ----------------------------------------------------------------------------------- losses
def dice_statistics(logits: jax.Array, labels: jax.Array, n_class: int,
                    weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sums of y*p, y and p per foreground class over the batch: the soft Dice's statistics.

  Binary: sigmoid of the single output channel. Multi-class: softmax, classes 1..K-1.
  labels: (N, *spatial, 1) integer class ids; `weight` (N,) of 0/1 leaves out padded rows.
  Sums over several batches give the Dice of their union (a whole validation split).
  """
  logits = logits.astype(jnp.float32)
  if n_class == 1:
    p, y = jax.nn.sigmoid(logits), labels.astype(jnp.float32)
  else:
    p = jax.nn.softmax(logits, axis=-1)[..., 1:]
    y = jax.nn.one_hot(labels[..., 0], n_class)[..., 1:]
  if weight is None:
    yw, pw = y, p
  else:
    w = weight.reshape((-1,) + (1,) * (p.ndim - 1))
    yw, pw = y * w, p * w
  axes = tuple(range(p.ndim - 1))
  return jnp.sum(yw * p, axis=axes), jnp.sum(yw, axis=axes), jnp.sum(pw, axis=axes)


def soft_dice_loss(yp, y, p):
  """The original's soft Dice loss, 1 - (2 sum(y p) + 1) / (sum y + sum p + 1), mean over classes,
  from `dice_statistics` (jax or numpy arrays)."""
  return 1.0 - ((2 * yp + 1) / (y + p + 1)).mean()


def dice_loss(logits: jax.Array, labels: jax.Array, n_class: int) -> jax.Array:
  """The soft Dice loss over the whole batch (docs/method.md)."""
  return soft_dice_loss(*dice_statistics(logits, labels, n_class))


def cross_entropy_terms(logits: jax.Array, labels: jax.Array, n_class: int) -> jax.Array:
  """Per-element BCE (n_class 1, shaped like logits) or softmax CE (one per row or voxel)."""
  logits = logits.astype(jnp.float32)
  if n_class == 1:
    return optax.sigmoid_binary_cross_entropy(
        logits, labels.astype(jnp.float32).reshape(logits.shape))
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels.reshape(logits.shape[:-1]).astype(jnp.int32))


def cross_entropy(logits: jax.Array, labels: jax.Array, n_class: int) -> jax.Array:
  """Per-element mean BCE (n_class 1) or softmax CE; labels are integer class ids."""
  return jnp.mean(cross_entropy_terms(logits, labels, n_class))


def task_loss(kind: str, loss_name: str, n_class: int) -> Callable:
  if kind == "multilabel":  # labels (N, K) 0/1: the mean of K independent BCEs.
    return lambda logits, labels: cross_entropy(logits, labels, 1)
  if kind == "classify":
    return lambda logits, labels: cross_entropy(logits, labels, n_class)
  if loss_name == "dice":
    return lambda logits, labels: dice_loss(logits, labels, n_class)
  if loss_name == "dice+ce":
    return lambda logits, labels: (dice_loss(logits, labels, n_class)
                                   + cross_entropy(logits, labels, n_class))
  raise errors.ConfigError(f"config.task.loss={loss_name!r}: expected 'dice' or 'dice+ce'.")


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
    return step_lib.guarded_update(state, grads, batch_stats, loss)

  return train_step


# Outputs of the eval step that add up over batches.
SUM_KEYS = ("ce_sum", "ce_count", "dice_yp", "dice_y", "dice_p")


def make_eval_step(apply_fn: Callable, kind: str, n_class: int) -> Callable:
  """`eval_step(variables, batch) -> dict`: the loss sums of the batch (cross-entropy and, for
  segmentation, the Dice statistics; padded rows weigh 0), and its rows' probabilities and labels
  for the task metrics."""

  n_out = 1 if kind == "multilabel" else n_class  # Multi-label: a sigmoid per class.

  def eval_step(variables, batch: dict) -> dict:
    logits = apply_fn(variables, batch["image"], train=False)
    w = batch["weight"]
    ce = cross_entropy_terms(logits, batch["label"], n_out)
    ce = ce.reshape(ce.shape[0], -1)
    out = {"ce_sum": jnp.sum(ce * w[:, None]), "ce_count": jnp.sum(w) * ce.shape[1],
           "probs": probabilities(logits, n_out), "label": batch["label"], "weight": w}
    if kind == "segment":
      out["dice_yp"], out["dice_y"], out["dice_p"] = dice_statistics(
          logits, batch["label"], n_class, w)
    return out

  return eval_step


def jit_eval_step(apply_fn: Callable, config, mesh) -> Callable:
  """The eval step jitted with replicated outputs: every process sees all rows of a batch."""
  return jax.jit(make_eval_step(apply_fn, config.task.kind, int(config.task.n_class)),
                 out_shardings=sharding.replicated(mesh))


def evaluate_split(variables, eval_step, images: np.ndarray, labels: np.ndarray, config, mesh,
                   per_process: int) -> dict:
  """`val_loss` and the task metrics (auc; dice, iou) of one split, in fixed-size batches."""
  sums: dict = {}
  probs, ys = [], []
  rows = lambda idx: {"image": images[idx], "label": labels[idx]}
  for batch in step_lib.global_eval_batches(len(images), per_process, mesh, rows):
    out = jax.device_get(eval_step(variables, batch))
    keep = out["weight"] > 0
    probs.append(out["probs"][keep])
    ys.append(out["label"][keep])
    for k in SUM_KEYS:
      if k in out:
        sums[k] = sums.get(k, 0.0) + np.asarray(out[k], np.float64)
  return split_metrics(config, sums, np.concatenate(probs), np.concatenate(ys))


def split_metrics(config, sums: dict, probs: np.ndarray, labels: np.ndarray) -> dict:
  """The loss of the split from the eval step's sums; the task metric from its probabilities."""
  kind, n_class = config.task.kind, int(config.task.n_class)
  ce = float(sums["ce_sum"] / max(float(sums["ce_count"]), 1.0))
  if kind == "multilabel":
    out = {"val_loss": ce}
    aucs = metrics_lib.multilabel_auc(labels.reshape(len(labels), -1),
                                      probs.reshape(len(probs), -1))
    if aucs["mean"] is not None:
      out["auc"] = aucs["mean"]  # What train.monitor="auc" follows.
      out["auc_per_class"] = aucs["per_class"]
    return out
  if kind == "classify":
    out = {"val_loss": ce}
    y = labels.reshape(-1)
    if len(np.unique(y)) > 1 and n_class <= 2:
      out["auc"] = metrics_lib.auc(y, probs.reshape(-1) if n_class == 1 else probs[:, 1])
    return out
  loss = float(soft_dice_loss(sums["dice_yp"], sums["dice_y"], sums["dice_p"]))
  if config.task.loss == "dice+ce":
    loss += ce
  pred = metrics_lib.foreground(probs)
  target = labels[..., 0] > 0
  return {"val_loss": loss, "dice": metrics_lib.dice(pred, target),
          "iou": metrics_lib.iou(pred, target)}


# -------------------------------------------------------------------------------- the run
def _optimizer(config, report: transfer.TransferReport | None, global_batch: int):
  pretrained = set()  # Parameter paths ("encoder/.../kernel") that were loaded, leaf by leaf.
  if report is not None:
    pretrained = {p.split("/", 1)[1] for p in report.loaded if p.startswith("params/")}
  ft = config.finetune
  # freeze_encoder also applies to a scratch init (the random-features baseline of a probe).
  if not ft.freeze_encoder and (not pretrained or ft.pretrained_lr_mult == 1.0):
    return optim.make_optimizer(config.train, global_batch=global_batch, num_steps=config.num_steps)

  def by_leaf(params, name):  # name(top-level key, leaf path) -> label, for every leaf
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: name(k.split("/")[0], k) for k in flat}, sep="/")

  def label(params):
    return by_leaf(params, lambda _, path: "pretrained" if path in pretrained else "new")

  def wrap(make_opt):
    if ft.freeze_encoder:
      # Freezing means the loaded encoder; a loaded decoder keeps training at the mult rate.
      frozen = optax.set_to_zero()
      pre = optax.chain(make_opt(), optax.scale(float(ft.pretrained_lr_mult)))

      def label_frozen(params):
        return by_leaf(params, lambda top, path: ("frozen" if top == "encoder" else
                                                  "pretrained" if path in pretrained else "new"))
      return optax.multi_transform({"frozen": frozen, "pretrained": pre, "new": make_opt()},
                                   label_frozen)
    return optax.multi_transform(
        {"pretrained": optax.chain(make_opt(), optax.scale(float(ft.pretrained_lr_mult))),
         "new": make_opt()}, label)

  return optim.make_optimizer(config.train, global_batch=global_batch,
                              num_steps=config.num_steps, wrap=wrap)


def _initial_variables(config, model, sample_shape, workdir):
  init_vars = step_lib.init_variables(model, sample_shape, config.seed)
  ft = config.finetune
  if not ft.init:
    return init_vars, None
  dont_load = list(ft.dont_load)
  if is_nnunet(config.model):
    loaded, keep_seg = _nnunet_pretrained(config)
    if not keep_seg:
      dont_load.append(transfer.SEG_PATTERN)
  else:
    loaded, _ = transfer.load_pretrained(ft.init, which=ft.which,
                                         step=None if ft.step < 0 else int(ft.step))
    if config.task.kind == "segment" and not ft.keep_head:
      dont_load.append("*/out/*")
  merged, report = transfer.merge_params(
      init_vars, loaded, source=str(ft.init), dont_load=dont_load,
      adapt_input_channels=ft.adapt_input_channels)
  loop.log(report.summary())
  if jax.process_index() == 0:
    store.write_bytes(workdir / "transfer_report.json",
                      json.dumps(report.to_json(), indent=1).encode())
  return merged, report


def is_nnunet(model_cfg) -> bool:
  """Whether `config.model` is the network of an nnU-Net plans file (model.kind='nnunet')."""
  return model_cfg.get("kind", "genesis") == "nnunet"


def build_task_model(model_cfg, kind: str, n_class: int, feature_level: int = -1):
  """The fine-tuning network of `config.model` for task `kind`: the Genesis U-Net's
  (models/heads.py), or for model.kind='nnunet' the plans' network with `n_class` outputs on its
  full-resolution decoder stage, without deep supervision (segmentation only: nnU-Net plans
  describe segmentation networks)."""
  if not is_nnunet(model_cfg):
    from genesis_jax.models import heads  # pylint: disable=import-outside-toplevel
    return heads.build_model(model_cfg, task="classify" if kind in CLASSIFIERS else kind,
                             n_class=n_class, feature_level=feature_level)
  if kind != "segment":
    raise errors.ConfigError(NNUNET_SEGMENT_ONLY.format(kind=kind))
  from genesis_jax.config import nnunet_plans  # pylint: disable=import-outside-toplevel
  from genesis_jax.models import nnunet  # pylint: disable=import-outside-toplevel
  plan = nnunet_plans.load_plans(model_cfg.plans, model_cfg.configuration)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.get("dtype", "float32")]
  return nnunet.build(plan, num_classes=n_class, deep_supervision=False, dtype=dtype,
                      conv_impl=model_cfg.get("conv_impl", "auto"))


NNUNET_SEGMENT_ONLY = (
    "config.task.kind={kind!r} with config.model.kind='nnunet': an nnU-Net plans file describes a "
    "segmentation network, so only task.kind='segment' fine-tunes it; classify with the Genesis "
    "U-Net (model.kind='genesis').")


def _nnunet_pretrained(config) -> tuple[dict, bool]:
  """(variables, keep the seg layers) of finetune.init for the plans' network: an nnU-Net .pth
  (its seg layers kept when their class count is task.n_class; a genesis_jax export's
  restoration head never) or a model.kind='nnunet' pre-training workdir (seg layers, i.e. the
  restoration head, re-initialised unless finetune.keep_head)."""
  from genesis_jax.config import nnunet_plans  # pylint: disable=import-outside-toplevel
  ft, m = config.finetune, config.model
  plan = nnunet_plans.load_plans(m.plans, m.configuration)
  path = pathlib.Path(ft.init)
  if path.is_file():
    loaded, info = transfer.load_nnunet_checkpoint(path, plan, int(config.task.n_class))
    if not info["seg_loaded"]:
      loop.log(f"{ft.init}: segmentation layers re-initialised ("
               + ("a genesis_jax pre-training export" if info["genesis_export"] else
                  f"{info['classes']} classes in the checkpoint, task.n_class="
                  f"{config.task.n_class}") + ")")
    return loaded, info["seg_loaded"]
  loaded, model_cfg = transfer.load_pretrained(ft.init, which=ft.which,
                                               step=None if ft.step < 0 else int(ft.step))
  if model_cfg is not None and not is_nnunet(model_cfg):
    raise transfer.TransferError(
        f"config.finetune.init={ft.init!r} is a pre-training of the Genesis U-Net "
        f"(model.kind={model_cfg.get('kind', 'genesis')!r}), not of an nnU-Net plans' network; "
        f"give a model.kind='nnunet' pre-training or an nnU-Net .pth, or fine-tune with "
        f"model.kind='genesis'.")
  return loaded, bool(ft.keep_head)


def _setup(config, workdir: pathlib.Path):
  kind = config.task.kind
  if kind not in KINDS:
    raise errors.ConfigError(f"config.task.kind={kind!r}: expected one of {KINDS}.")
  data = task_data.load(config, workdir)
  sample_shape = data["train"][0].shape[1:]
  loop.check_sample_rank(sample_shape, config.model.spatial_dims,
                         0 if is_nnunet(config.model) else config.model.depth)
  model = build_task_model(config.model, kind, int(config.task.n_class),
                           int(config.task.feature_level))
  return data, sample_shape, model


def train(config, workdir) -> dict:
  """Runs (or resumes) fine-tuning in `workdir`, then tests its best checkpoint. Returns the
  summary (also summary.json), its test metrics under "test" (also eval.json)."""
  from genesis_jax.data import pipeline
  kind, n_class = config.task.kind, int(config.task.n_class)
  config = resolve_nnunet(config)  # model.kind='nnunet': crop and spacing from the plans.
  run = loop.start_run(config, workdir, f"fine-tuning ({kind})")
  data, sample_shape, model = _setup(config, run.workdir)
  variables, report = _initial_variables(config, model, sample_shape, run.workdir)
  tx = _optimizer(config, report, run.global_batch)
  loss_fn = task_loss(kind, config.task.loss, n_class)
  state, train_step = loop.build_state(run, model, tx, variables, make_train_step(loss_fn))
  x_train, y_train = data["train"]
  loop.log(f"{kind}: {len(x_train)} training samples of {sample_shape}, "
           f"{len(data['val'][0])} val, init={config.finetune.init or 'scratch'}")
  loader = pipeline.task_loader(x_train, y_train, batch_size=run.per_process, seed=config.seed,
                                shard_index=jax.process_index(), shard_count=jax.process_count(),
                                worker_count=config.data.num_workers)
  eval_step = jit_eval_step(model.apply, config, run.mesh)

  def evaluate(state):
    return evaluate_split(state.variables, eval_step, *data["val"], config, run.mesh,
                          run.per_process)

  summary = loop.run_training(run, state=state, data_iter=iter(loader), train_step=train_step,
                              evaluate=evaluate)
  summary["test"] = _test(config, run.workdir, model, data, run.mesh, eval_step, run.per_process)
  return loop.finish(run, summary)


def _best_variables(workdir: pathlib.Path) -> dict:
  loaded, _ = transfer.load_pretrained(str(workdir), which="best")
  return {"params": jax.tree.map(jnp.asarray, loaded["params"]),
          "batch_stats": jax.tree.map(jnp.asarray, loaded["batch_stats"])}


def _test(config, workdir, model, data, mesh, eval_step, per_process) -> dict:
  """Evaluates the best checkpoint on the test split; writes <workdir>/eval.json."""
  variables = _best_variables(workdir)
  kind = config.task.kind
  result: dict = {"kind": kind, "init": config.finetune.init or "scratch"}
  if kind in CLASSIFIERS:
    x, y = data["test"]
    result.update(evaluate_split(variables, eval_step, x, y, config, mesh, per_process))
    result["n"] = int(len(y))
    if "classes" in data:  # Multi-label: the finding of each entry of auc_per_class.
      result["classes"] = list(data["classes"])
  else:
    result.update(_segment_volumes(config, workdir, model, variables, data["test_volumes"]))
  if jax.process_index() == 0:
    store.write_bytes(workdir / "eval.json", json.dumps(result, indent=2, default=float).encode())
  loop.log("test: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))
  return result


def _segment_volumes(config, workdir, model, variables, volumes) -> dict:
  """Whole-volume sliding-window segmentation of the test cases (a 2D model slice by slice);
  per-case Dice/IoU (and HD95)."""
  from genesis_jax.eval import inference
  from genesis_jax.data import readers
  n_class = int(config.task.n_class)
  window = tuple(config.data.crop)
  # The variables are an argument, not a closure constant: baking the weights into the program
  # as constants bloats its compilation.
  apply_jit = jax.jit(lambda variables, x: probabilities(
      model.apply(variables, x, train=False), n_class))
  apply = functools.partial(apply_jit, variables)
  preds, targets, spacings, confusions = [], [], [], []
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
    confusions.append(metrics_lib.threshold_confusion(metrics_lib.foreground_probability(probs),
                                                      label > 0))
  return metrics_lib.segmentation_metrics(preds, targets, spacing=spacings, hd=config.eval.hd95,
                                          confusions=confusions)


def evaluate(config, workdir) -> dict:
  """`mode=evaluate`: test metrics of the best checkpoint in `workdir` (written to eval.json).

  A workdir without a fine-tuning checkpoint is refused before any data is read or written."""
  workdir = pathlib.Path(workdir)
  _, steps = transfer.checkpoint_steps(workdir / "checkpoints", "best")
  if not steps:
    raise errors.MissingPathError(
        f"--workdir {workdir} holds no checkpoint of a fine-tuning run (no checkpoints/best or "
        "checkpoints/latest); mode=evaluate tests a finished run: fine-tune in this workdir "
        "first (config.mode=finetune), or give the workdir of a finished fine-tuning run.")
  saved = workdir / "config.json"
  mode = json.loads(saved.read_text()).get("mode") if saved.is_file() else None
  if mode is not None and mode not in schema.FAMILIES[schema.FT]:
    raise errors.ConfigError(f"--workdir {workdir} is a {mode!r} run; mode=evaluate needs the "
                             "workdir of a fine-tuning run (config.mode=finetune).")
  mesh = sharding.make_mesh()
  data, _, model = _setup(config, workdir)
  return _test(config, workdir, model, data, mesh, jit_eval_step(model.apply, config, mesh),
               sharding.per_process_batch(config.train.batch_size))
