"""Phantom NCS: lung nodule segmentation, IoU on whole test volumes (sliding window).

  python -m genesis_jax.main --config configs/finetune_ncs.py --workdir runs/ncs_scratch
  python -m genesis_jax.main --config configs/finetune_ncs.py --workdir runs/ncs_genesis \
      --config.finetune.init=runs/pretrain_phantom

Mirrors the paper's NCS on the built-in phantoms with a small labelled budget (6 training
subjects). The whole encoder-decoder transfers; the 1x1 output conv is re-initialised (keep it
with --config.finetune.keep_head=True). Dice loss; Adam 1e-3; early stop on validation loss.
"""
from genesis_jax import defaults


def get_config(variant: str = ""):
  c = defaults.finetune_config()
  c.task.kind = "segment"
  c.task.n_class = 1
  c.task.loss = "dice"
  c.model.width = 8
  c.data.source = "phantom"
  c.data.phantom_seed = 1
  c.data.phantom_shape = (128, 128, 96)
  c.data.crop = (32, 32, 16)
  c.data.train_cases = 6
  c.data.val_cases = 4
  c.data.test_cases = 8
  c.data.cubes_per_case = 24
  c.data.fg_fraction = 0.75
  c.train.batch_size = 8
  c.num_steps = 200
  c.eval_every = 25
  c.checkpoint_every = 25
  c.train.early_stop_patience = 4
  if variant:
    raise ValueError(f"Unknown variant {variant!r} for finetune_ncs.py.")
  return c
