"""Probe of a phantom pre-training on the NCC phantom task: feature rank and linear probe per level.

  python -m genesis_jax.main --config configs/probe_phantom.py --workdir runs/probe_phantom \
      --config.probe.pretrain_dir=runs/pretrain_phantom

For every checkpoint of the pre-training and a random init of the same network: the effective
rank of each encoder level's pooled features and a logistic-regression probe (AUC, 5 folds
grouped by subject) on the candidate cubes of the NCC task's training and validation subjects
(the same phantom data as configs/finetune_ncc.py). Writes <workdir>/probe.json and probe.png.
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.phantom_task_config("classify")
  c.mode = "probe"
  c.probe.pretrain_dir = "runs/pretrain_phantom"
  if variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for probe_phantom.py: it has no "
                             f"variants.")
  return c
