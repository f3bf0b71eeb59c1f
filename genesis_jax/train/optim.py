"""Optimizers and learning-rate schedules from `config.train`.

The learning rate always lives in the optimizer state (`optax.inject_hyperparams`), so it is
logged, checkpointed, and, for the Keras-style "plateau" schedule, changed at evaluation time by
the host (`scale_learning_rate`) without recompiling the step.
"""
from __future__ import annotations

import optax

from genesis_jax import errors

SCHEDULES = ("step", "plateau", "constant", "cosine")
OPTIMIZERS = ("sgd", "adam")


def base_learning_rate(train_cfg, global_batch: int) -> float:
  lr = float(train_cfg.learning_rate)
  if train_cfg.lr_scaling == "linear":
    lr *= global_batch / float(train_cfg.base_batch_size)
  elif train_cfg.lr_scaling != "none":
    raise errors.ConfigError(
        f"config.train.lr_scaling={train_cfg.lr_scaling!r}: expected 'none' or 'linear'.")
  return lr


def make_schedule(train_cfg, base_lr: float, num_steps: int):
  kind = train_cfg.schedule
  if kind == "step":
    return optax.exponential_decay(base_lr, transition_steps=int(train_cfg.decay_every),
                                   decay_rate=float(train_cfg.decay_factor), staircase=True)
  if kind == "cosine":
    return optax.cosine_decay_schedule(base_lr, decay_steps=max(1, int(num_steps)))
  if kind in ("constant", "plateau"):
    return base_lr  # "plateau" is changed by the host, see scale_learning_rate.
  raise errors.ConfigError(f"config.train.schedule={kind!r}: expected one of {SCHEDULES}.")


def _base_optimizer(train_cfg, learning_rate) -> optax.GradientTransformation:
  if train_cfg.optimizer == "sgd":
    return optax.sgd(learning_rate, momentum=float(train_cfg.momentum) or None)
  if train_cfg.optimizer == "adam":
    return optax.adam(learning_rate)
  raise errors.ConfigError(
      f"config.train.optimizer={train_cfg.optimizer!r}: expected one of {OPTIMIZERS}.")


def make_optimizer(train_cfg, *, global_batch: int, num_steps: int,
                   wrap=None) -> optax.GradientTransformation:
  """`wrap(make_opt) -> tx` lets fine-tuning add per-subtree rules (freezing, lower lr); it gets a
  function that builds a fresh base optimizer (each subtree needs its own state)."""
  schedule = make_schedule(train_cfg, base_learning_rate(train_cfg, global_batch), num_steps)
  clip = float(train_cfg.grad_clip)

  def build(learning_rate):
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    make_opt = lambda: _base_optimizer(train_cfg, learning_rate)
    opt = make_opt() if wrap is None else wrap(make_opt)
    return optax.chain(*parts, opt)

  return optax.inject_hyperparams(build)(learning_rate=schedule)


def scale_learning_rate(opt_state, factor: float):
  """Multiply the injected learning rate (for schedule='plateau'). Returns a new opt_state."""
  hp = dict(opt_state.hyperparams)
  hp["learning_rate"] = hp["learning_rate"] * factor
  return opt_state._replace(hyperparams=hp)


def set_learning_rate(opt_state, learning_rate: float):
  """Sets the injected learning rate (a resume with a new constant rate). Returns a new
  opt_state; the value keeps the dtype the state holds it in."""
  hp = dict(opt_state.hyperparams)
  hp["learning_rate"] = hp["learning_rate"] * 0 + learning_rate
  return opt_state._replace(hyperparams=hp)
