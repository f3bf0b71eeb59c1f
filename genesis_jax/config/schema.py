"""The config schema: every key a config may set, with the original recipe's values (SPEC.md).

Config files in configs/ start from `pretrain_config()` and change a few fields; a key not
defined here is an error (configs are locked). Axis order everywhere: channels-last, (N, x, y, z, C)
for 3D and (N, x, y, C) for 2D.
"""
import ml_collections



def pretrain_config() -> ml_collections.ConfigDict:
  """Every config key, with the values of the original PyTorch pre-training recipe."""
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"  # pretrain | finetune | evaluate | predict | prepare | experiment
  c.seed = 0
  c.num_steps = 200_000  # Upper bound; early stopping usually ends the run first.

  c.model = ml_collections.ConfigDict()
  c.model.variant = "pytorch"  # "pytorch" (transposed-conv UNet3D) | "keras" (nearest upsampling)
  c.model.width = 32  # Channels of the first conv; the original doubles per level (32, 64, ...).
  c.model.depth = 3  # Number of poolings; spatial sizes must be divisible by 2**depth.
  c.model.spatial_dims = 3  # 3 for cubes (x, y, z), 2 for slices (x, y).
  c.model.bn = "standard"  # "standard" (running averages at eval) | "original" (batch stats always)
  c.model.dtype = "float32"  # Compute dtype: "float32" | "bfloat16" (params stay float32).
  # 3D convs: "auto" (= "unfold" on CPU/GPU, "native" on TPU) | "native" (XLA/cuDNN 3D conv) |
  # "unfold" (2D convs + Winograd along x: the same conv, 1.4x faster on an H200, several times
  # on CPU) | "unfold:4" (F(4, 3) also in TF32/bf16: faster; TF32 gradient error 1.6x) |
  # "unfold:2" | "unfold:0" (no Winograd).
  c.model.conv_impl = "auto"

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
  c.data.scales = (1.0,)  # In-plane zoom-out factors; cube k of a scan uses scales[k % len].
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
  c.data.phantom_seed = 0  # Built-in data: which subjects (target tasks use other seeds).
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
  # What "best" and early stopping follow: val_loss (all modes), or the task metric when
  # fine-tuning: auc (classify), dice or iou (segment). Losses are minimised, metrics maximised.
  c.train.monitor = "val_loss"

  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 20
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.samples_every_eval = True  # PNG grids in <workdir>/samples/ at each evaluation.


  return c


def finetune_config() -> ml_collections.ConfigDict:
  """Target-task fine-tuning: the original's recipe (Adam 1e-3, early stopping on val loss)."""
  c = pretrain_config()
  c.mode = "finetune"
  c.num_steps = 2000

  c.task = ml_collections.ConfigDict()
  c.task.kind = "classify"  # classify (encoder + MLP head) | segment (encoder-decoder)
  c.task.n_class = 1  # 1 = binary (sigmoid); >1 = softmax over classes.
  c.task.loss = "dice"  # segment: "dice" | "dice+ce". classify: BCE (n_class 1) or CE.
  # classify: the encoder level whose global average pool feeds the head: -1 = the deepest (the
  # original), 0 = the finest (full resolution) ... depth - 1; for probing what each level holds.
  c.task.feature_level = -1

  c.finetune = ml_collections.ConfigDict()
  c.finetune.init = ""  # "" = scratch; a pre-training workdir, converted dir, or .pt/.h5 file.
  c.finetune.which = "best"  # best | latest checkpoint of a pre-training workdir.
  c.finetune.step = -1  # A given checkpoint step instead (-1 = use `which`).
  c.finetune.freeze_encoder = False
  c.finetune.pretrained_lr_mult = 1.0  # Learning-rate multiplier for the loaded sub-trees.
  c.finetune.keep_head = False  # segment: keep the pre-trained 1x1 output conv if shapes match.
  c.finetune.dont_load = ()  # fnmatch patterns of param paths to keep fresh, e.g. "params/decoder/*".
  c.finetune.adapt_input_channels = False  # Replicate a 1-channel first conv to C channels / C.

  # Target-task data (config.data.source "phantom" or "folder"). For "folder": segment reads the
  # MSD / nnU-Net layout at data.path (imagesTr/, labelsTr/); classify reads scans at data.path
  # and the LUNA16-style CSV at data.candidates.
  c.data.candidates = ""
  c.data.train_cases = 8  # Labelled budget: number of training subjects (cases).
  c.data.train_subset = 0  # Train on the first k training cases only (0 = all); val/test unchanged.
  c.data.val_cases = 4
  c.data.test_cases = 8
  c.data.cubes_per_case = 16  # segment: training cubes per case.
  c.data.fg_fraction = 0.75  # segment: share of cubes centred on foreground.

  c.eval = ml_collections.ConfigDict()
  c.eval.overlap = 0.5  # Sliding-window overlap for whole-volume segmentation.
  c.eval.tta_flip = False
  c.eval.hd95 = False
  c.eval.write_predictions = False  # NIfTI predictions in <workdir>/predictions/.

  # mode=predict: the workdir's fine-tuned model on new scans (see genesis_jax/predict.py).
  c.predict = ml_collections.ConfigDict()
  c.predict.input = ""  # A scan (file or DICOM folder), a folder of scans, or a glob.
  c.predict.output = ""  # Folder for the outputs; default <workdir>/predict.
  c.predict.candidates = ""  # classify: CSV seriesuid,coordX,coordY,coordZ[,class] (LPS mm).
  c.predict.which = "best"  # best | latest checkpoint of the run.
  c.predict.threshold = 0.5  # segment, one class: mask = probability >= threshold.
  c.predict.probabilities = False  # segment: write float32 probabilities instead of labels.
  c.predict.batch_size = 4  # Windows (or candidate cubes) per forward pass.
  c.predict.overwrite = False  # Replace outputs already there (default: keep them, go on).
  c.predict.on_error = "raise"  # An unreadable scan: "raise", or "skip" (listed in the json).

  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-3
  c.train.schedule = "constant"
  c.train.batch_size = 16
  c.train.early_stop_patience = 10
  c.eval_every = 100
  c.eval_batches = 0  # 0 = the whole validation split.
  c.checkpoint_every = 100
  c.log_every = 20
  c.samples_every_eval = False
  return c


def phantom_task_config(kind: str) -> ml_collections.ConfigDict:
  """Fine-tuning on the built-in phantom target tasks (configs/finetune_ncc.py, finetune_ncs.py).

  Both tasks read the same phantom subjects (seed 1, disjoint from pre-training's seed 0) with
  the same split and labelled budget, so one data set serves both; width 8 and 32x32x16 cubes
  keep a trial within minutes on a CPU.
  """
  c = finetune_config()
  c.task.kind = kind
  c.task.n_class = 1
  c.model.width = 8
  c.data.source = "phantom"
  c.data.phantom_seed = 1
  c.data.phantom_shape = (128, 128, 96)
  c.data.crop = (32, 32, 16)
  c.data.train_cases = 6
  c.data.val_cases = 4
  c.data.test_cases = 8
  c.num_steps = 200
  c.eval_every = 25
  c.checkpoint_every = 25
  c.train.early_stop_patience = 4
  return c


def experiment_config() -> ml_collections.ConfigDict:
  """Scratch-vs-Genesis experiment: N fine-tuning trials per arm and task, then a results table."""
  c = finetune_config()
  c.mode = "experiment"
  c.experiment = ml_collections.ConfigDict()
  # Target-task config files, comma-separated (each a fine-tuning config with get_config()),
  # each optionally with its own overrides: "configs/finetune_ncs.py[num_steps=100|eval_every=25]".
  c.experiment.tasks = "configs/finetune_ncc.py,configs/finetune_ncs.py"
  # Arms "name=init" comma-separated; init "" = scratch, "@pretrain" = the pre-training this
  # experiment runs first in <workdir>/pretrain with experiment.pretrain_config, or a path.
  # Per-arm overrides follow in brackets: "probe=@pretrain[finetune.freeze_encoder=True]".
  c.experiment.arms = "scratch=,genesis=@pretrain"
  c.experiment.pretrain_config = "configs/pretrain_phantom.py"
  c.experiment.pretrain_overrides = ""  # "key=value,key=value" applied to the pre-training config.
  c.experiment.overrides = ""  # "key=value,..." applied to every task config (e.g. num_steps=200).
  c.experiment.trials = 5
  c.experiment.seed = 0  # Trial t of every arm uses seed experiment.seed + t.
  c.experiment.report = "results"  # <workdir>/<report>.{md,json,png}
  # Tests to run, "arm:other,arm:other"; "" = every arm against scratch (or the first arm).
  c.experiment.compare = ""
  return c
