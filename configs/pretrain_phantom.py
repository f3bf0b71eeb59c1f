"""Pre-training on unlabelled phantom CT for the phantom Scratch-vs-Genesis experiment (CPU scale).

  python -m genesis_jax.main --config configs/pretrain_phantom.py --workdir runs/pretrain_phantom

The phantom subjects here (phantom_seed 0) are disjoint from the target tasks' (phantom_seed 1).
Width 8 and 32x32x16 cubes keep it within reach of a 2-core CPU; the recipe is the original's
otherwise except Adam (SGD at lr 1.0 needs far more steps than a CPU run can afford).

Variant ":faithful": the original's recipe (docs/method.md#pre-training-recipe) where a phantom run
can follow it. SGD lr 1.0 momentum 0.9, batch 6, the learning rate halved every 40 "epochs" and
early stop after 50 evaluations without a better validation loss, with one evaluation (200 steps,
about one pass over the training cubes) standing in for an epoch, as configs/pretrain_genesis.py
does; the original's lung filter (`data.lung_filter`), and lung-centred cubes
(`data.sampler="lung_centred"`) in place of its border exclusion, whose fixed margins (100 voxels
in-plane, 30 slices) fit only 512 x 512 LUNA16 slices: on phantoms the filter alone mostly keeps
air outside the body. Still unfaithful: phantoms instead of LUNA16, width 8 and 32x32x16 cubes
instead of the original's network and 64x64x32 cubes, 600 steps (a few epochs, where the original
trains until early stopping), and 8 validation batches per evaluation instead of the whole split.
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults


def get_config(variant: str = ""):
  c = defaults.pretrain_config()
  c.num_steps = 600
  c.model.width = 8
  c.data.crop = (32, 32, 16)
  c.data.phantom_subjects = 24
  c.data.phantom_shape = (128, 128, 96)
  c.data.cubes_per_scan = 64
  c.data.val_fraction = 0.15
  c.train.batch_size = 8
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-3
  c.train.schedule = "cosine"
  c.train.early_stop_patience = 0
  c.log_every = 25
  c.eval_every = 200
  c.eval_batches = 8
  c.checkpoint_every = 200
  if variant == "faithful":
    defaults.original_optimizer(c)  # The original's optimiser, as pretrain_genesis.py.
    c.data.lung_filter = True
    c.data.sampler = "lung_centred"
  elif variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for pretrain_phantom.py (known: "
                             f"faithful).")
  return c
