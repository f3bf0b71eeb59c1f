"""Pre-training on unlabelled phantom CT for the phantom Scratch-vs-Genesis experiment (CPU scale).

  python -m genesis_jax.main --config configs/pretrain_phantom.py --workdir runs/pretrain_phantom

The phantom subjects here (phantom_seed 0) are disjoint from the target tasks' (phantom_seed 1).
Width 8 and 32x32x16 cubes keep it within reach of a 2-core CPU; the recipe is the original's
otherwise except Adam (SGD at lr 1.0 needs far more steps than a CPU run can afford).
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.pretrain_config()
  c.num_steps = 600
  c.model.width = 8
  c.data.crop = (32, 32, 16)
  c.data.phantom_subjects = 24
  c.data.phantom_shape = (128, 128, 96)
  c.data.cubes_per_scan = 64
  c.data.val_fraction = 0.15
  c.train.batch_size = 8
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-3
  c.train.schedule = "cosine"
  c.train.early_stop_patience = 0
  c.log_every = 25
  c.eval_every = 200
  c.eval_batches = 8
  c.checkpoint_every = 200
  if variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for pretrain_phantom.py: it has no "
                             f"variants.")
  return c
