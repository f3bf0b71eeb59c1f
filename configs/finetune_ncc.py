"""Phantom NCC: nodule false-positive reduction (true nodule vs look-alike candidate), AUC.

  python -m genesis_jax.main --config configs/finetune_ncc.py --workdir runs/ncc_scratch
  python -m genesis_jax.main --config configs/finetune_ncc.py --workdir runs/ncc_genesis \
      --config.finetune.init=runs/pretrain_phantom

Mirrors the paper's NCC on the built-in phantoms with a small labelled budget (6 training
subjects). Encoder + GAP -> Dense 1024 -> ReLU -> Dense 1, sigmoid + BCE; Adam 1e-3, early stop.

Variant ":faithful": PyTorch's default initialisation (`model.init="pytorch"`) for whatever is
not loaded: the whole network of a scratch run, the new head of a pre-trained one.
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.phantom_task_config("classify")
  c.train.batch_size = 16
  if variant == "faithful":
    c.model.init = "pytorch"
  elif variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for finetune_ncc.py (known: "
                             f"faithful).")
  return c
