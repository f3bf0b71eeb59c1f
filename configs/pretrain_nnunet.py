"""Genesis pre-training of the network an nnU-Net v2 plans file describes, then nnU-Net fine-tuning.

  python -m genesis_jax.main --config configs/pretrain_nnunet.py --workdir runs/pretrain_nnunet \
      --config.model.plans=$nnUNet_preprocessed/Dataset003_Liver/nnUNetPlans.json \
      --config.data.source=folder --config.data.path=$nnUNet_raw/Dataset003_Liver
  nnUNetv2_train 3 3d_fullres 0 -pretrained_weights runs/pretrain_nnunet/nnunet_pretrained.pth

The network (PlainConvUNet or ResidualEncoderUNet), the patch size (data.crop) and the target
spacing (data.spacing, 3D configurations) come from the plans' configuration
(`model.configuration`, default 3d_fullres); setting data.crop or data.spacing to other values is
an error. The restoration head is a 1-channel output on the full-resolution decoder stage, without
deep supervision. The corruptions scale per axis with the patch size as they do with any cube
(docs/method.md, "Sizes for other crop shapes"). An nnU-Net raw dataset folder is a folder of
scans: its imagesTr/ and imagesTs/ scans are pre-trained on and labelsTr/ is skipped (single-
channel data such as CT; plans of a multi-channel dataset are refused). So is a preprocessed
configuration folder (--config.data.path=$nnUNet_preprocessed/Dataset003_Liver/
nnUNetPlans_3d_fullres): its .npz, unpacked .npy or, with the blosc2 package, .b2nd cases,
read back to HU and already at the plans' spacing (data/nnunet_preprocessed.py). At the end the
best checkpoint is written as <workdir>/nnunet_pretrained.pth; any other checkpoint with
`python -m genesis_jax.weights.nnunet_cli export --workdir W --out FILE.pth [--which latest]`.

CPU-scale defaults: phantom CT and configs/nnunet_plans_phantom.json, a small PlainConvUNet plans
file written as nnU-Net would plan the phantoms (4 stages, 8..64 features, anisotropic first stage,
patch 32 x 32 x 16, spacing 0.85 x 0.85 x 1.75 mm); 200 steps, batch 2, Adam 1e-3 (the original's
SGD at lr 1.0 is tuned for the BatchNorm U-Net, not for nnU-Net's InstanceNorm networks). Phantom
scans must be at least the plans' patch size: raise data.phantom_shape for larger patches.
"""
import pathlib

from genesis_jax import errors
from genesis_jax.config import schema as defaults

PHANTOM_PLANS = pathlib.Path(__file__).resolve().parent / "nnunet_plans_phantom.json"


def get_config(variant: str = ""):
  c = defaults.pretrain_config()
  c.model.kind = "nnunet"
  c.model.plans = str(PHANTOM_PLANS)
  c.model.configuration = "3d_fullres"
  c.num_steps = 200
  c.data.phantom_subjects = 8
  c.data.cubes_per_scan = 16
  c.data.val_fraction = 0.25
  c.train.batch_size = 2
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-3
  c.train.schedule = "constant"
  c.train.early_stop_patience = 0
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  if variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for pretrain_nnunet.py: it has no "
                             f"variants.")
  return c
