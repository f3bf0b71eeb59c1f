"""Multi-label classification of the built-in radiographs (DRRs of the phantoms), mean AUC.

  python -m genesis_jax.main --config configs/finetune_xray_cls.py --workdir runs/xray_cls_scratch
  python -m genesis_jax.main --config configs/finetune_xray_cls.py --workdir runs/xray_cls_genesis \
      --config.finetune.init=runs/pretrain_xray2d

The ChestX-ray8-style task on phantom radiographs (genesis_jax/data/phantoms/drr.py): PA and
lateral DRRs of 120 phantom subjects (phantom_seed 1, as the 3D target tasks; a quarter drawn
without nodules), 10 findings: from each phantom's own nodules Nodule, Multiple_Nodules,
Large_Nodule, Small_Nodule, Right_Nodule, Left_Nodule, and the radiograph findings drawn into a
copy of its CT for the radiographs only (radiograph_findings.py; each in half the subjects): Mass,
Cardiomegaly, Effusion, Consolidation ("No Finding" = none). Split by subject: 64 train, 16
validation, 40 test. Images letterboxed to 64 x 64; a 2D Genesis encoder (width 8) + GAP ->
Dense 1024 -> ReLU -> Dense 10, a sigmoid + BCE per finding; Adam 1e-3, early stop on mean AUC.
How separable the findings are from raw pixels (a logistic-regression baseline per finding):
bench/drr_separability.py.

Use a folder of your radiographs instead with --config.data.source=folder
--config.data.path=DIR (DIR/labels.csv in ChestX-ray8 columns, images in DIR/images/ or
DIR/imagesTr/) and --config.task.n_class=<number of findings>.
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.finetune_config()
  c.task.kind = "multilabel"
  c.task.n_class = 10  # len(genesis_jax.data.phantoms.drr.FINDINGS)
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
  c.train.monitor = "auc"
  c.num_steps = 300
  c.eval_every = 25
  c.checkpoint_every = 25
  c.train.early_stop_patience = 4
  if variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for finetune_xray_cls.py: it has no "
                             f"variants.")
  return c
