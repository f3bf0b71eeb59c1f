"""The config schema: every key a config may set, with the original recipe's values (SPEC.md).

Config files in configs/ start from `pretrain_config()` and change a few fields; a key not
defined here is an error (configs are locked). Axis order everywhere: channels-last, (N, x, y, z, C)
for 3D and (N, x, y, C) for 2D.
"""
import ml_collections



def pretrain_config() -> ml_collections.ConfigDict:
  """Every config key, with the values of the original PyTorch pre-training recipe."""
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"  # pretrain | finetune | evaluate | prepare | experiment
  c.seed = 0
  c.num_steps = 200_000  # Upper bound; early stopping usually ends the run first.

  c.model = ml_collections.ConfigDict()
  c.model.variant = "pytorch"  # "pytorch" (transposed-conv UNet3D) | "keras" (nearest upsampling)
  c.model.width = 32  # Channels of the first conv; the original doubles per level (32, 64, ...).
  c.model.depth = 3  # Number of poolings; spatial sizes must be divisible by 2**depth.
  c.model.spatial_dims = 3  # 3 for cubes (x, y, z), 2 for slices (x, y).
  c.model.bn = "standard"  # "standard" (running averages at eval) | "original" (batch stats always)
  c.model.dtype = "float32"  # Compute dtype: "float32" | "bfloat16" (params stay float32).
  c.model.conv_impl = "auto"  # "auto" | "native" | "unfold" (CPU-fast exact 3D conv formulation)

  c.corruption = ml_collections.ConfigDict()
  c.corruption.transforms = "all"  # "all"/"V", "I&II", "III&IV", or a "+"-joined subset of
  #   nonlinear, local, outpaint, inpaint (e.g. "nonlinear+local").
  c.corruption.flip_rate = 0.4
  c.corruption.local_rate = 0.5
  c.corruption.nonlinear_rate = 0.9
  c.corruption.paint_rate = 0.9
  c.corruption.outpaint_rate = 0.8  # In-painting gets 1 - outpaint_rate of painted cubes.
  c.corruption.local_blocks = 10_000
  c.corruption.flip_compat = False  # True reproduces the original's flip axis bug.

  c.data = ml_collections.ConfigDict()
  c.data.source = "phantom"  # phantom | folder (scans) | prepared (a prepared dir) | npy (released cubes)
  c.data.path = ""  # Folder of scans, a prepared dataset dir, or a glob of released .npy cubes.
  c.data.prepared_dir = ""  # Where `prepare` writes; default <workdir>/data.
  c.data.crop = (64, 64, 32)  # Cube size (x, y, z); two entries = 2D slices (x, y).
  c.data.cubes_per_scan = 32
  c.data.val_fraction = 0.2  # Split by scan, never by cube.
  c.data.modality = "ct"  # ct | mri
  c.data.hu_window = (-1000.0, 1000.0)  # CT: clip, then map linearly to [0, 1].
  c.data.mri_norm = "percentile"  # MRI: "percentile" | "zscore" | "minmax"
  c.data.mri_percentiles = (0.5, 99.5)
  c.data.spacing = ()  # Target voxel spacing in mm (x, y, z); empty = no resampling.
  c.data.body_crop = False  # Crop each scan to the body bounding box first.
  c.data.lung_filter = False  # Original chest-CT filter: keep cubes with < 15% voxels >= -150 HU.
  c.data.on_error = "skip"  # Bulk prepare: "skip" (and report) or "raise" on a bad scan.
  c.data.num_workers = 0  # grain worker processes (0 = in-process).
  c.data.phantom_subjects = 24  # Built-in data: number of phantom subjects.
  c.data.phantom_shape = (128, 128, 96)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 6  # Per device; global batch = batch_size * device count.
  c.train.optimizer = "sgd"  # sgd | adam
  c.train.learning_rate = 1.0
  c.train.lr_scaling = "none"  # "none" | "linear" (lr *= global_batch / base_batch)
  c.train.base_batch_size = 6
  c.train.momentum = 0.9
  c.train.schedule = "step"  # step | plateau | constant | cosine
  c.train.decay_every = 40 * 1000  # Steps between halvings for "step" (original: 40 epochs).
  c.train.decay_factor = 0.5
  c.train.plateau_patience = 10  # Evaluations without improvement before halving ("plateau").
  c.train.grad_clip = 0.0  # Global-norm clip; 0 disables.
  c.train.nonfinite = "stop"  # "stop" | "skip" a step whose loss or gradient is NaN/Inf.
  c.train.early_stop_patience = 50  # Evaluations without val improvement; 0 disables.

  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 20
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.samples_every_eval = True  # PNG grids in <workdir>/samples/ at each evaluation.


  return c
