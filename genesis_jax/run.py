"""Runs the job a config asks for (`config.mode`) in a workdir."""
from __future__ import annotations

import difflib
import glob
import pathlib

MODES = ("pretrain", "finetune", "evaluate", "predict", "prepare", "experiment")


def _choice(name: str, value, allowed) -> None:
  if value not in allowed:
    near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}.{hint}")


def _monitors(config) -> tuple[str, ...]:
  """Validation values that can select the best checkpoint in this config's mode."""
  task = config.get("task")
  if config.mode not in ("finetune", "evaluate", "predict") or task is None:
    return ("val_loss",)
  return ("val_loss", "auc") if task.kind == "classify" else ("val_loss", "dice", "iou")


def validate(config) -> None:
  """Checks enumerated config values up front, before anything is written."""
  _choice("config.mode", config.mode, MODES)
  m = config.get("model")
  if m is not None:
    _choice("config.model.variant", m.variant, ("pytorch", "keras"))
    _choice("config.model.bn", m.bn, ("standard", "original"))
    _choice("config.model.dtype", m.dtype, ("float32", "bfloat16"))
    from genesis_jax.models.layers import CONV_IMPLS  # no JAX call: safe before distributed init
    _choice("config.model.conv_impl", m.conv_impl, CONV_IMPLS)
    _choice("config.model.spatial_dims", m.spatial_dims, (2, 3))
  task = config.get("task")
  if task is not None and "feature_level" in task and task.feature_level != -1:
    depth = int(config.model.depth)
    if task.kind != "classify":
      raise ValueError(f"config.task.feature_level={task.feature_level} applies to "
                       f"classification only (task.kind={task.kind!r}); leave it at -1.")
    from genesis_jax.models.heads import check_feature_level  # no JAX call at import
    check_feature_level(task.feature_level, depth, "config.")
  t = config.get("train")
  if t is not None:
    _choice("config.train.optimizer", t.optimizer, ("sgd", "adam"))
    _choice("config.train.schedule", t.schedule, ("step", "plateau", "constant", "cosine"))
    _choice("config.train.nonfinite", t.nonfinite, ("stop", "skip"))
    if "monitor" in t:
      _choice("config.train.monitor", t.monitor, _monitors(config))
    if t.batch_size < 1:
      raise ValueError(f"config.train.batch_size={t.batch_size} must be >= 1 (per device).")
  p = config.get("predict")
  if config.mode == "predict":
    if p is None:
      raise ValueError("mode=predict needs a fine-tuning config (config.predict.*), e.g. the "
                       "config the run was fine-tuned with.")
    _choice("config.predict.which", p.which, ("best", "latest"))
    _choice("config.predict.on_error", p.on_error, ("raise", "skip"))
    if not p.input:
      raise ValueError("mode=predict needs config.predict.input: a scan, a folder of scans or "
                       "a glob.")
    if p.batch_size < 1:
      raise ValueError(f"config.predict.batch_size={p.batch_size} must be >= 1.")
    return  # The data section is the run's own (config.json), not this one's.
  d = config.get("data")
  if d is not None:
    _choice("config.data.source", d.source, ("phantom", "folder", "prepared", "npy"))
    _choice("config.data.modality", d.modality, ("ct", "mri"))
    _choice("config.data.on_error", d.on_error, ("skip", "raise"))
    if d.source in ("folder", "prepared", "npy") and not d.path:
      raise ValueError(f"config.data.source={d.source!r} needs config.data.path.")
    if d.path and d.source != "phantom" and not glob.glob(d.path):
      raise FileNotFoundError(f"config.data.path={d.path!r} does not exist.")


def run(config, workdir: str | pathlib.Path) -> dict:
  validate(config)
  workdir = pathlib.Path(workdir)
  if config.mode == "pretrain":
    from genesis_jax.train import pretrain
    return pretrain.train(config, workdir)
  if config.mode == "prepare":
    from genesis_jax.data import prepare
    path = prepare.ensure_dataset(config.data, workdir, seed=config.seed)
    print(f"prepared dataset: {path}")
    return {"dataset": str(path)}
  if config.mode == "finetune":
    from genesis_jax.train import finetune
    return finetune.train(config, workdir)
  if config.mode == "evaluate":
    from genesis_jax.train import finetune
    return finetune.evaluate(config, workdir)
  if config.mode == "predict":
    from genesis_jax import predict
    return predict.run(config, workdir)
  from genesis_jax.experiments import trials
  return trials.run(config, workdir)
