"""Genesis 2D demo: the same method on axial slices (x, y) of the built-in phantom CT data.

  python -m genesis_jax.main --config configs/demo_2d.py --workdir runs/demo_2d

Arrays are (N, x, y, C). The 2D network has the same blocks with 3x3 convs and 2x2 pooling.
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.pretrain_config()
  c.num_steps = 300
  c.model.spatial_dims = 2
  c.model.width = 8
  c.data.crop = (64, 64)
  c.data.phantom_subjects = 8
  c.data.phantom_shape = (96, 96, 64)
  c.data.val_fraction = 0.25
  c.train.batch_size = 16
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-3
  c.train.schedule = "constant"
  c.train.early_stop_patience = 0
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  if variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for demo_2d.py: it has no "
                             f"variants.")
  return c
