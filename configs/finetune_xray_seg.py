"""2D nodule segmentation on the built-in radiographs: projected nodule masks of the phantoms.

  python -m genesis_jax.main --config configs/finetune_xray_seg.py --workdir runs/xray_seg_scratch
  python -m genesis_jax.main --config configs/finetune_xray_seg.py --workdir runs/xray_seg_genesis \
      --config.finetune.init=runs/pretrain_xray2d

PA and lateral DRRs of 120 phantom subjects (phantom_seed 1) with their 2D nodule masks (a pixel is
nodule when its ray crosses a nodule voxel), in the MSD / nnU-Net 2D layout (imagesTr/<case>_0000
.png, labelsTr/<case>.png). Split by subject: 64 train, 16 validation, 40 test; images letterboxed
to 64 x 64; the 2D Genesis U-Net (width 8), sigmoid + soft Dice, Adam 1e-3, early stop on
validation loss; test Dice and IoU per image.

A folder of your own in that layout: --config.data.source=folder --config.data.path=DIR.
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.finetune_config()
  c.task.kind = "segment"
  c.task.n_class = 1
  c.model.spatial_dims = 2
  c.model.width = 8
  c.data.source = "phantom_xray"
  c.data.phantom_seed = 1
  c.data.phantom_shape = (128, 128, 96)
  c.data.crop = (64, 64)
  c.data.train_cases = 64
  c.data.val_cases = 16
  c.data.test_cases = 40
  c.train.batch_size = 16
  c.num_steps = 300
  c.eval_every = 25
  c.checkpoint_every = 25
  c.train.early_stop_patience = 4
  if variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for finetune_xray_seg.py: it has no "
                             f"variants.")
  return c
