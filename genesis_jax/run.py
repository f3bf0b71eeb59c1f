"""Runs the job a config asks for (`config.mode`) in a workdir, after validating the config."""
from __future__ import annotations

import pathlib

from genesis_jax.config.validate import resolve_nnunet, validate


def run(config, workdir: str | pathlib.Path) -> dict:
  """Validates `config` (nothing is written before), then runs its mode in `workdir`."""
  validate(config)
  config = resolve_nnunet(config)  # model.kind='nnunet': crop and spacing from the plans.
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
  if config.mode == "probe":
    from genesis_jax.experiments import probe
    return probe.run(config, workdir)
  from genesis_jax.experiments import trials
  return trials.run(config, workdir)
