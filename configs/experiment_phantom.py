"""Scratch vs Genesis on the phantom target tasks (NCC AUC, NCS IoU), N trials each.

  python -m genesis_jax.main --config configs/experiment_phantom.py --workdir runs/experiment

Pre-trains first (configs/pretrain_phantom.py, in <workdir>/pretrain) unless done, then runs
experiment.trials fine-tuning trials per arm and task, and writes <workdir>/results.{md,json,png}.
"""
from genesis_jax import defaults


def get_config(variant: str = ""):
  c = defaults.experiment_config()
  c.experiment.tasks = "configs/finetune_ncc.py,configs/finetune_ncs.py"
  c.experiment.arms = "scratch=,genesis=@pretrain"
  c.experiment.pretrain_config = "configs/pretrain_phantom.py"
  c.experiment.trials = 5
  if variant:
    raise ValueError(f"Unknown variant {variant!r} for experiment_phantom.py.")
  return c
