"""Segmentation fine-tuning of the network an nnU-Net v2 plans file describes (model.kind=nnunet).

  # from scratch, a genesis_jax pre-training of that network, or an nnU-Net checkpoint
  python -m genesis_jax.main --config configs/finetune_nnunet.py --workdir runs/ncs_nnunet
  python -m genesis_jax.main --config configs/finetune_nnunet.py --workdir runs/ncs_nnunet_genesis \
      --config.finetune.init=runs/pretrain_nnunet       # configs/pretrain_nnunet.py's workdir
  R=$nnUNet_results/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres
  python -m genesis_jax.main --config configs/finetune_nnunet.py --workdir runs/liver_nnunet_ft \
      --config.finetune.init=$R/fold_0/checkpoint_final.pth --config.model.plans=$R/plans.json \
      --config.data.source=folder --config.data.path=$nnUNet_raw/Dataset003_Liver \
      --config.task.n_class=3
  # predict with a fine-tuned run, or straight from an nnU-Net checkpoint and its plans
  python -m genesis_jax.main --config configs/finetune_nnunet.py --workdir runs/ncs_nnunet \
      --config.mode=predict --config.predict.input=/data/new_scans
  python -m genesis_jax.main --config configs/finetune_nnunet.py --workdir runs/predict_nnunet \
      --config.mode=predict --config.predict.input=/data/new_scans \
      --config.model.plans=$R/plans.json --config.predict.checkpoint=$R/fold_0/checkpoint_final.pth

The network, patch size (data.crop) and spacing (data.spacing, 3D configurations) come from the
plans (`model.plans`, `model.configuration`, default 3d_fullres). A pre-training workdir loads
every layer but the segmentation outputs (re-initialised for task.n_class; `finetune.keep_head`
keeps them); an nnU-Net .pth keeps its segmentation outputs when their class count is
task.n_class (nnU-Net counts the background: n_class=2 for one foreground label, softmax), else
they are re-initialised; transfer_report.json says what was loaded. Fine-tuning uses genesis_jax's
recipe: no deep supervision (the full-resolution output only), task.loss on it, the data's
intensities mapped to [0, 1] by data.hu_window as in pre-training, not nnU-Net's normalisation
(InstanceNorm after the first conv cancels an affine change of the input except where the convs'
zero padding reaches, near the patch borders; fine-tuning adapts to the rest). Predicting from a
checkpoint_final.pth reproduces nnU-Net's CTNormalization exactly (genesis_jax/predict.py).

Defaults: the phantom NCS task (configs/finetune_ncs.py) with configs/nnunet_plans_phantom.json.
"""
import pathlib

from genesis_jax import errors
from genesis_jax.config import schema as defaults

PHANTOM_PLANS = pathlib.Path(__file__).resolve().parent / "nnunet_plans_phantom.json"


def get_config(variant: str = ""):
  c = defaults.phantom_task_config("segment")
  c.model.kind = "nnunet"
  c.model.plans = str(PHANTOM_PLANS)
  c.model.configuration = "3d_fullres"
  # The plans decide the network and the patch: the Genesis U-Net's width and the phantom tasks'
  # crop back at their defaults.
  c.model.width = defaults.default("model.width", defaults.FT)
  c.data.crop = defaults.default("data.crop", defaults.FT)
  c.task.loss = "dice"
  c.data.cubes_per_case = 24
  c.data.fg_fraction = 0.75
  c.train.batch_size = 8
  if variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for finetune_nnunet.py: it has no "
                             f"variants.")
  return c
