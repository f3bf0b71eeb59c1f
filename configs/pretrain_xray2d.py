"""Genesis X-ray 2D: Models Genesis pre-training on radiographs (CPU scale).

  python -m genesis_jax.main --config configs/pretrain_xray2d.py --workdir runs/pretrain_xray2d

By default on the built-in radiographs (`data.source="phantom_xray"`): PA and lateral DRRs of 24
phantom subjects drawn with the run's seed (0; the X-ray target tasks use phantom_seed 1, other
subjects), each normalised to [0, 1] by its 0.5 and 99.5 percentiles and cut into 32 random
64 x 64 crops. The 2D Genesis U-Net (3x3 convs, 2x2 pooling, width 8) learns to restore them from
the four Genesis corruptions.

Corruptions. The original's 2D pre-training code is not public (its authors shared the 2D
transforms on request only; the 2D weights they released later use a ResNet18 encoder), so its 2D
corruption parameters are not known. Here every size follows the 3D code's per-axis formulas from
the axis length (docs/method.md, "Sizes for other crop shapes"): at 64 x 64, shuffling blocks of
1-6 pixels a side, in-painting holes of 10-21, out-painting boxes of 28-37, with the original's
probabilities. The one count, local_blocks, is scaled so that the expected share of pixels a block
covers is the original's: 10,000 blocks in 64 x 64 x 32 cover 10,000 * 3.5 * 3.5 * 2 / 131,072 =
1.87 blocks per voxel; in 64 x 64 the same coverage takes 625 blocks (10,000 would shuffle every
pixel about 30 times over).

Variant ":folder": the same on a folder of your own radiographs (PNG, JPEG, TIFF, DICOM),
prepared by the 2D image prepare (data.source="images2d"): give --config.data.path=DIR.

Variant ":faithful": the original's optimiser recipe instead of Adam, as
configs/pretrain_phantom.py:faithful has it (docs/method.md#pre-training-recipe): SGD lr 1.0
momentum 0.9, batch 6, the learning rate halved every 40 evaluations ("epochs") and early stop
after 50 evaluations without a better validation loss. Adam with this recipe's short runs
collapses the deep features (bench/RESULTS.md, "The collapse is the optimiser's"). Only the
optimiser changes: the radiographs, crops and corruptions are the default's. (The original's
lung filter and lung-centred cubes are CT rules: radiographs have no Hounsfield units.)
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.pretrain_config()
  c.num_steps = 600
  c.model.spatial_dims = 2
  c.model.width = 8
  c.data.source = "phantom_xray"
  c.data.crop = (64, 64)
  c.data.phantom_subjects = 24
  c.data.phantom_shape = (128, 128, 96)
  c.data.cubes_per_scan = 32
  c.data.val_fraction = 0.15
  c.corruption.local_blocks = 625
  c.train.batch_size = 16
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-3
  c.train.schedule = "cosine"
  c.train.early_stop_patience = 0
  c.log_every = 25
  c.eval_every = 200
  c.eval_batches = 8
  c.checkpoint_every = 200
  if variant == "folder":
    c.data.source = "images2d"
  elif variant == "faithful":
    defaults.original_optimizer(c)  # The original's optimiser, as pretrain_genesis.py.
  elif variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for pretrain_xray2d.py (known: "
                             f"folder, faithful).")
  return c
