"""Phantom NCS: lung nodule segmentation, IoU on whole test volumes (sliding window).

  python -m genesis_jax.main --config configs/finetune_ncs.py --workdir runs/ncs_scratch
  python -m genesis_jax.main --config configs/finetune_ncs.py --workdir runs/ncs_genesis \
      --config.finetune.init=runs/pretrain_phantom

Mirrors the paper's NCS on the built-in phantoms with a small labelled budget (6 training
subjects). The whole encoder-decoder transfers; the 1x1 output conv is re-initialised (keep it
with --config.finetune.keep_head=True). Dice loss; Adam 1e-3; early stop on validation loss.

Variant ":faithful": as the original fine-tunes, the whole pre-trained U-Net, output conv
included (`finetune.keep_head=True`), and PyTorch's default initialisation for whatever is not
loaded (`model.init="pytorch"`: the whole network of a scratch run). The test results also give
the original's IoU definition (`mean_iou_original`, `pooled_iou_original`) beside the foreground
IoU (`mean_iou`).
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.phantom_task_config("segment")
  c.task.loss = "dice"
  c.data.cubes_per_case = 24
  c.data.fg_fraction = 0.75
  c.train.batch_size = 8
  if variant == "faithful":
    c.finetune.keep_head = True
    c.model.init = "pytorch"
  elif variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for finetune_ncs.py (known: "
                             f"faithful).")
  return c
