"""Demo pre-training on the built-in phantom CT data: a narrow Genesis U-Net, ~5 min on 2 CPU cores.

  python -m genesis_jax.main --config configs/demo.py --workdir runs/demo

Same method and corruptions as the full recipe (configs/pretrain_genesis.py), smaller everything:
width 8 instead of 32, 32x32x16 cubes, 8 phantom subjects. Train on your own scans instead with
--config.data.source=folder --config.data.path=/path/to/niftis.
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.pretrain_config()
  c.num_steps = 200
  c.model.width = 8
  c.data.crop = (32, 32, 16)
  c.data.phantom_subjects = 8
  c.data.phantom_shape = (96, 96, 64)
  c.data.cubes_per_scan = 32
  c.data.val_fraction = 0.25
  c.train.batch_size = 8
  c.train.optimizer = "adam"  # SGD at lr 1.0 needs many epochs; Adam shows the fall within minutes.
  c.train.learning_rate = 1e-3
  c.train.schedule = "constant"
  c.train.early_stop_patience = 0
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  if variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for demo.py: it has no "
                             f"variants.")
  return c
