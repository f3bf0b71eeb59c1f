"""Phantom NCC: nodule false-positive reduction (true nodule vs look-alike candidate), AUC.

  python -m genesis_jax.main --config configs/finetune_ncc.py --workdir runs/ncc_scratch
  python -m genesis_jax.main --config configs/finetune_ncc.py --workdir runs/ncc_genesis \
      --config.finetune.init=runs/pretrain_phantom

Mirrors the paper's NCC on the built-in phantoms with a small labelled budget (6 training
subjects). Encoder + GAP -> Dense 1024 -> ReLU -> Dense 1, sigmoid + BCE; Adam 1e-3, early stop.
"""
from genesis_jax import defaults


def get_config(variant: str = ""):
  c = defaults.finetune_config()
  c.task.kind = "classify"
  c.task.n_class = 1
  c.model.width = 8
  c.data.source = "phantom"
  c.data.phantom_seed = 1
  c.data.phantom_shape = (128, 128, 96)
  c.data.crop = (32, 32, 16)
  c.data.train_cases = 6
  c.data.val_cases = 4
  c.data.test_cases = 8
  c.train.batch_size = 16
  c.num_steps = 200
  c.eval_every = 25
  c.checkpoint_every = 25
  c.train.early_stop_patience = 4
  if variant:
    raise ValueError(f"Unknown variant {variant!r} for finetune_ncc.py.")
  return c
