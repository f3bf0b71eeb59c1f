"""Full Models Genesis pre-training recipe of the original (docs/method.md), on a folder of scans.

  python -m genesis_jax.main --config configs/pretrain_genesis.py --workdir runs/genesis \
      --config.data.source=folder --config.data.path=/data/luna16_nifti

64x64x32 cubes, batch 6 per device, SGD lr 1.0 momentum 0.9, lr halved every 40 epochs
(`:plateau` variant: halved after 10 evaluations without improvement, as the Keras code), MSE,
early stop after 50 evaluations without validation improvement, best kept.
Without --config.data.* it pre-trains on the built-in phantom CT data.
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.pretrain_config()
  if variant == "plateau":
    c.train.schedule = "plateau"
  elif variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for pretrain_genesis.py; known: "
                             f"'plateau'.")
  return c
