"""The config schema: every key a config may set, declared once with its type, range and meaning.

Keys live in sections (`model`, `corruption`, `data`, `train`, ...; "" is the top level). Each key
belongs to one or more config families:

  pretrain    modes pretrain and prepare           (built by `pretrain_config()`)
  finetune    modes finetune, evaluate, predict and probe (built by `finetune_config()`)
  experiment  mode experiment                      (built by `experiment_config()`)

A builder returns a ConfigDict with the keys of its family only, so a key that the mode does not
use (say `--config.corruption.local_rate` on a fine-tuning run) is an error, not silently ignored.
`genesis_jax.config.validate` checks a config against this schema; `genesis_jax.config.reference`
writes docs/config.md from it. Defaults are the original recipe's (docs/method.md, "Pre-training
recipe" and "Fine-tuning recipe"). Axis order everywhere: channels-last, (N, x, y, z, C) for 3D
and (N, x, y, C) for 2D.

This module imports nothing else from the package but `errors`: every layer may read it.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from genesis_jax import errors
from genesis_jax.config.keys import (  # noqa: F401 - the schema's vocabulary, re-exported
    PRE, FT, EXP, FAMILIES, MODES, BUILDERS, FAMILY_NAMES, family_of, Range,
    Key, PerFamily, per, FIXED, MAY, POSITIVE, NON_NEGATIVE, PROBABILITY, declare)

# 3D convs; "unfold:N" fixes the Winograd tile along x (0 = none, 2 = F(2, 3), 4 = F(4, 3)).
CONV_IMPLS = ("auto", "native", "unfold", "unfold:0", "unfold:2", "unfold:4")
# The four Genesis transforms and the paper's ablation groups (I non-linear, II local shuffling,
# III out-painting, IV in-painting); docs/method.md, "Ablation groups".
TRANSFORMS = ("nonlinear", "local", "outpaint", "inpaint")
PRESETS = {
    "all": frozenset(TRANSFORMS),
    "v": frozenset(TRANSFORMS),
    "i&ii": frozenset({"nonlinear", "local"}),
    "iii&iv": frozenset({"outpaint", "inpaint"}),
    "none": frozenset(),
}
MONITORS = {PRE: ("val_loss",), "classify": ("val_loss", "auc"),
            "segment": ("val_loss", "dice", "iou"), "multilabel": ("val_loss", "auc")}


def transform_set(spec) -> frozenset[str]:
  """corruption.transforms -> the set of transforms: a preset ("all"/"V", "I&II", "III&IV",
  "none"), a "+"-joined subset ("nonlinear+local"), or a collection of names."""
  if not isinstance(spec, str):
    out = frozenset(spec)
  elif spec.strip().lower() in PRESETS:
    out = PRESETS[spec.strip().lower()]
  else:
    out = frozenset(p.strip().lower() for p in spec.split("+") if p.strip())
    if not out:
      raise errors.ConfigError(f"corruption.transforms = {spec!r} is empty.")
  unknown = out - set(TRANSFORMS)
  if unknown:
    raise errors.ConfigError(
        f"corruption.transforms = {spec!r}: unknown {sorted(unknown)}; known: {list(TRANSFORMS)}"
        f" or presets {sorted(PRESETS)}.")
  return out


def arm(init: str = "", overrides: dict | None = None) -> dict:
  """An experiment arm: its initialisation ("" = scratch, "@pretrain" = the experiment's own
  pre-training, "@pretrain:<variant>" = one of experiment.pretrain_variants, or a path) and
  overrides of the task configs, keyed like the config ({"train": {"monitor": "auc"}}; dotted
  keys such as {"train.monitor": "auc"} are nested)."""
  return {"init": init, "overrides": nest(overrides or {})}


def task(config: str, overrides: dict | None = None) -> dict:
  """An experiment task: a fine-tuning config file (path.py or path.py:variant) and overrides."""
  return {"config": config, "overrides": nest(overrides or {})}


def original_optimizer(c) -> None:
  """Sets a pre-training config's optimiser to the original's (pretrain_config()'s defaults:
  batch, SGD, learning rate, momentum, step decay and its factor, patience), the decay every 40
  evaluations (c.eval_every must be set first). Used by the configs' `:faithful` variants."""
  base = pretrain_config().train
  for key in ("batch_size", "optimizer", "learning_rate", "momentum", "schedule", "decay_factor",
              "early_stop_patience"):
    c.train[key] = base[key]
  c.train.decay_every = 40 * c.eval_every


def nest(mapping: dict) -> dict:
  """{"a.b": 1, "c": {"d": 2}} -> {"a": {"b": 1}, "c": {"d": 2}} (ConfigDicts take no dots)."""
  out: dict = {}
  for key, value in mapping.items():
    *parents, leaf = str(key).split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = nest(value) if isinstance(value, dict) else value
  return out



_P, _F, _E = (PRE,), (FT,), (EXP,)

SECTIONS: dict[str, dict[str, Key]] = {
    "": {
        "mode": declare(PerFamily({PRE: "pretrain", FT: "finetune", EXP: "experiment"}),
                   "The job to run; a config family serves several modes (pretrain, prepare | "
                   "finetune, evaluate, predict, probe | experiment).", str, choices=MODES,
                   families=(PRE, FT, EXP), resume=MAY),
        "seed": declare(0, "Seed of initialisation, data order and corruptions.", range=NON_NEGATIVE),
        "num_steps": declare(per(200_000, 2000), "Training steps (an upper bound: early stopping "
                        "usually ends the run first).", range=POSITIVE, resume=MAY),
        "log_every": declare(per(50, 20), "Steps between training log lines and metrics rows.",
                        range=POSITIVE, resume=MAY),
        "eval_every": declare(per(1000, 100), "Steps between validation evaluations.", range=POSITIVE,
                         resume=MAY),
        "eval_batches": declare(20, "Validation batches per evaluation (0 = the whole split).",
                           range=NON_NEGATIVE, families=_P, resume=MAY),
        "checkpoint_every": declare(per(1000, 100), "Steps between checkpoints.", range=POSITIVE,
                               resume=MAY),
        "keep_checkpoints": declare(3, "Latest checkpoints kept (the best one is kept apart).",
                               range=POSITIVE, resume=MAY),
        "samples_every_eval": declare(True, "PNG grids of restorations in <workdir>/samples/ at each "
                                 "evaluation.", families=_P, resume=MAY),
    },
    "model": {
        "kind": declare("genesis", "Network: genesis (the Models Genesis U-Net of the keys below) or "
                   "nnunet (the network an nnU-Net v2 plans file describes: model.plans, "
                   "model.configuration; data.crop and data.spacing then come from the plans, "
                   "and corruption.local_blocks, left at its default, scales with the patch).",
                   choices=("genesis", "nnunet"), families=(PRE, FT)),
        "plans": declare("", "kind=nnunet: path to nnUNetPlans.json (nnU-Net v2).",
                    families=(PRE, FT)),
        "configuration": declare("3d_fullres", "kind=nnunet: the plans' configuration to build "
                            "(3d_fullres, 2d, 3d_lowres, ...).", families=(PRE, FT)),
        "variant": declare("pytorch", "U-Net flavour: pytorch (transposed-conv UNet3D) or keras "
                      "(nearest upsampling).", choices=("pytorch", "keras")),
        "width": declare(32, "Channels of the first conv; doubled per level (32, 64, ...).",
                    range=POSITIVE),
        "depth": declare(3, "Number of poolings; crop sizes must be divisible by 2**depth.",
                    range=POSITIVE),
        "spatial_dims": declare(3, "3 for cubes (x, y, z), 2 for slices (x, y).", choices=(2, 3)),
        "bn": declare("standard", "Batch norm: standard (running averages at eval) or original "
                 "(batch statistics always).", choices=("standard", "original")),
        "dtype": declare("float32", "Compute dtype (parameters stay float32).",
                    choices=("float32", "bfloat16")),
        "conv_impl": declare("auto", "3D convs: auto (unfold on CPU/GPU, native on TPU), native "
                        "(XLA/cuDNN 3D conv), unfold (2D convs + Winograd along x; the same conv), "
                        "unfold:N (Winograd tile N along x fixed: 0 none, 2 F(2,3), 4 F(4,3), "
                        "also in TF32/bf16).", choices=CONV_IMPLS, resume=MAY),
        "winograd_min_macs": declare(1e8, "unfold convs: a 3x3x3 conv layer uses Winograd along x "
                                "only when its multiply-adds (as a direct conv, over the batch "
                                "one device runs) are at least this (0 = always, inf = never).",
                                float, range=NON_NEGATIVE, resume=MAY),
        "init": declare("flax", "Conv and dense weights and biases: flax (lecun_normal, zero bias) or "
                   "pytorch (PyTorch's default: uniform in +-1/sqrt(fan_in)).",
                   choices=("flax", "pytorch")),
    },
    "corruption": {
        "transforms": declare("all", "Transforms applied: all/V, I&II, III&IV, none, or a +-joined "
                         "subset of nonlinear, local, outpaint, inpaint.", families=_P),
        "flip_rate": declare(0.4, "Probability of a random flip.", range=PROBABILITY, families=_P),
        "local_rate": declare(0.5, "Probability of local pixel shuffling.", range=PROBABILITY,
                         families=_P),
        "nonlinear_rate": declare(0.9, "Probability of the non-linear intensity transform.",
                             range=PROBABILITY, families=_P),
        "paint_rate": declare(0.9, "Probability of in- or out-painting.", range=PROBABILITY,
                         families=_P),
        "outpaint_rate": declare(0.8, "Share of painted samples that are out-painted (the rest are "
                            "in-painted).", range=PROBABILITY, families=_P),
        "local_blocks": declare(10_000, "Blocks shuffled by local pixel shuffling.",
                           range=NON_NEGATIVE, families=_P),
        "flip_compat": declare(False, "Reproduce the original's flip axes (channel, x, y; never z).",
                          families=_P),
    },
    "pretrain": {
        "skip_drop_rate": declare(0.0, "Share of samples whose skip connections are zeroed, so the "
                             "bottleneck must restore them (0 = off; not in the original).", float,
                             range=PROBABILITY, families=_P),
        "bottleneck_loss_weight": declare(0.0, "Weight of an added loss of a pass with every skip "
                                     "zeroed (0 = off; not in the original).", float,
                                     range=NON_NEGATIVE, families=_P),
    },
    "data": {
        "source": declare("phantom", "Where the data comes from: phantom (built-in), phantom_xray "
                     "(built-in radiographs: DRRs of the phantoms, 2D), folder (scans, or 2D "
                     "images with model.spatial_dims=2), prepared (a prepared dir), npy "
                     "(released cubes) or images2d (a folder of 2D images, e.g. radiographs, "
                     "for 2D pre-training); fine-tuning reads phantom, phantom_xray or folder.",
                     choices=("phantom", "phantom_xray", "folder", "prepared", "npy",
                              "images2d")),
        "path": declare("", "A folder of scans, a prepared dataset dir or a glob of .npy cubes "
                   "(pre-training); the task folder (fine-tuning: MSD/nnU-Net layout for "
                   "segment, scans for classify); phantom: where the data is written."),
        "prepared_dir": declare("", "Where `prepare` writes cubes (default <workdir>/data).",
                           families=_P),
        "crop": declare((64, 64, 32), "Cube size (x, y, z); two entries = 2D slices "
                   "(x, y).", tuple, item=int, range=POSITIVE, length=(2, 3)),
        "cubes_per_scan": declare(32, "Cubes sampled per scan.", range=POSITIVE, families=_P),
        "scales": declare((1.0,), "In-plane zoom-out factors; cube k of a scan uses scales[k % len].",
                     tuple, item=float, range=Range(0.0, lo_open=True), families=_P),
        "val_fraction": declare(0.2, "Share of scans held out for validation (split by scan).",
                           range=Range(0.0, 1.0, hi_open=True), families=_P),
        "modality": declare("ct", "Intensity normalisation: ct or mri.", choices=("ct", "mri")),
        "hu_window": declare((-1000.0, 1000.0), "CT: clip to (lo, hi) HU, then map linearly to "
                        "[0, 1].", tuple, item=float, length=(2,)),
        "mri_norm": declare("percentile", "MRI: per-volume normalisation.",
                       choices=("percentile", "zscore", "minmax")),
        "mri_percentiles": declare((0.5, 99.5), "MRI percentile: clip to these (lo, hi) percentiles.",
                              tuple, item=float, range=Range(0.0, 100.0), length=(2,)),
        "spacing": declare((), "Target voxel spacing in mm (x, y, z); empty = no resampling.",
                      tuple, item=float, range=Range(0.0, lo_open=True), length=(0, 3)),
        "body_crop": declare(False, "Crop each scan to the body bounding box first."),
        "lung_filter": declare(False, "Original chest-CT filter: keep cubes with < 15% voxels >= -150 "
                          "HU.", families=_P),
        "sampler": declare("anywhere", "Where cube centres fall: anywhere (uniform) or lung_centred "
                      "(on a voxel in -900..-500 HU, half a cube from every border; CT).",
                      choices=("anywhere", "lung_centred"), families=_P),
        "on_error": declare("skip", "Bulk prepare: skip (and report) or raise on a bad scan.",
                       choices=("skip", "raise"), families=_P),
        "image_size": declare((), "images2d: every image is fitted to this (x, y) size first; "
                         "empty = crop (the whole image is one sample); larger than crop: "
                         "cubes_per_scan random crops per image.", tuple, item=int,
                         range=POSITIVE, length=(0, 2), families=_P),
        "image_fit": declare("letterbox", "images2d: letterbox (whole image, aspect kept, padded "
                        "with 0) or crop (aspect kept, centre-cropped to fill).",
                        choices=("letterbox", "crop"), families=_P),
        "image_upscale": declare(False, "images2d: allow enlarging images smaller than image_size "
                            "(else letterbox pads them at native size and crop skips them).",
                            families=_P),
        "image_norm": declare("percentile", "images2d: per-image intensity normalisation to "
                         "[0, 1]: percentile (clip to image_percentiles) or minmax.",
                         choices=("percentile", "minmax"), families=_P),
        "image_percentiles": declare((0.5, 99.5), "images2d percentile: clip to these (lo, hi) "
                                "percentiles.", tuple, item=float, range=Range(0.0, 100.0),
                                length=(2,), families=_P),
        "num_workers": declare(0, "grain worker processes (0 = in-process).", range=NON_NEGATIVE),
        "phantom_subjects": declare(24, "Built-in data: number of phantom subjects.", range=POSITIVE,
                               families=_P),
        "phantom_seed": declare(0, "Built-in data: which subjects (target tasks use other seeds).",
                           range=NON_NEGATIVE),
        "phantom_shape": declare((128, 128, 96), "Built-in data: scan shape (x, y, z).", tuple,
                            item=int, range=POSITIVE, length=(3,)),
        "candidates": declare("", "classify, folder data: the LUNA16-style candidates CSV; "
                         "multilabel: the ChestX-ray8-style labels CSV (default "
                         "<path>/labels.csv).",
                         families=_F),
        "train_cases": declare(8, "Labelled budget: training subjects (cases).", range=POSITIVE,
                          families=_F),
        "train_subset": declare(0, "Train on the first k training cases only (0 = all); validation "
                           "and test cases unchanged.", range=NON_NEGATIVE, families=_F),
        "val_cases": declare(4, "Validation subjects.", range=POSITIVE, families=_F),
        "test_cases": declare(8, "Test subjects.", range=POSITIVE, families=_F),
        "cubes_per_case": declare(16, "segment: training cubes per case.", range=POSITIVE,
                             families=_F),
        "fg_fraction": declare(0.75, "segment: share of training cubes centred on foreground.",
                          range=PROBABILITY, families=_F),
        "slices": declare("axial", "A 2D model (2-entry crop) on 3D scans, classify: axial (the "
                     "candidate's axial slice, 1 channel) or orthogonal (its axial, coronal and "
                     "sagittal slices as 3 channels; a 1-channel init needs "
                     "finetune.adapt_input_channels). Segmentation is always axial, slice by "
                     "slice.", choices=("axial", "orthogonal"), families=_F),
    },
    "train": {
        "batch_size": declare(per(6, 16), "Per device; global batch = batch_size * device count.",
                         range=POSITIVE),
        "optimizer": declare(per("sgd", "adam"), "Optimizer.", choices=("sgd", "adam")),
        "learning_rate": declare(per(1.0, 1e-3), "Base learning rate.", float,
                            range=Range(0.0, lo_open=True), resume=MAY),
        "lr_scaling": declare("none", "none, or linear (lr *= global batch / base_batch_size).",
                         choices=("none", "linear"), resume=MAY),
        "base_batch_size": declare(6, "The global batch the learning rate is meant for (linear "
                              "scaling).", range=POSITIVE, resume=MAY),
        "momentum": declare(0.9, "SGD momentum (0 = none).", range=Range(0.0, 1.0, hi_open=True)),
        "schedule": declare(per("step", "constant"), "Learning-rate schedule: step (halve every "
                       "decay_every steps), plateau (halve after plateau_patience evaluations "
                       "without improvement), constant or cosine.",
                       choices=("step", "plateau", "constant", "cosine")),
        "decay_every": declare(40_000, "step: steps between decays (original: 40 epochs).",
                          range=POSITIVE, resume=MAY),
        "decay_factor": declare(0.5, "step and plateau: learning-rate factor per decay.",
                           range=Range(0.0, 1.0, lo_open=True), resume=MAY),
        "plateau_patience": declare(10, "plateau: evaluations without improvement before a decay.",
                               range=POSITIVE, resume=MAY),
        "grad_clip": declare(0.0, "Global-norm gradient clip (0 = off).", range=NON_NEGATIVE),
        "nonfinite": declare("stop", "A step whose loss or gradient is NaN/Inf: stop, or skip it.",
                        choices=("stop", "skip"), resume=MAY),
        "early_stop_patience": declare(per(50, 10), "Evaluations without improvement of the "
                                  "monitored value before stopping (0 = never).",
                                  range=NON_NEGATIVE, resume=MAY),
        "monitor": declare("val_loss", "What the best checkpoint and early stopping follow: val_loss, "
                      "or when fine-tuning the task metric (auc for classify; dice or iou for "
                      "segment). Losses are minimised, metrics maximised.",
                      choices=("val_loss", "auc", "dice", "iou")),
    },
    "task": {
        "kind": declare("classify", "classify (encoder + MLP head), multilabel (the same, one "
                   "sigmoid + BCE per finding; per-class and mean AUC; 2D images) or segment "
                   "(encoder-decoder).", choices=("classify", "segment", "multilabel"),
                   families=_F),
        "n_class": declare(1, "1 = binary (sigmoid); more = softmax over classes; multilabel: "
                      "the number of findings.", range=POSITIVE, families=_F),
        "loss": declare("dice", "segment: dice or dice+ce (classify always uses BCE or CE).",
                   choices=("dice", "dice+ce"), families=_F),
        "feature_level": declare(-1, "classify: the encoder level whose global average pool feeds "
                            "the head (-1 = the deepest, 0 = the finest ... depth).",
                            range=Range(-1), families=_F),
    },
    "finetune": {
        "init": declare("", "Initial weights: empty = scratch; a pre-training workdir, a converted "
                   "dir, or a released .pt/.h5 file.", families=_F),
        "which": declare("best", "Checkpoint of a pre-training workdir: best or latest.",
                    choices=("best", "latest"), families=_F),
        "step": declare(-1, "A given checkpoint step instead (-1 = use `which`).", range=Range(-1),
                   families=_F),
        "freeze_encoder": declare(False, "Train the head (and decoder) only.", families=_F),
        "pretrained_lr_mult": declare(1.0, "Learning-rate multiplier of the loaded sub-trees.",
                                 range=NON_NEGATIVE, families=_F),
        "keep_head": declare(False, "segment: keep the pre-trained 1x1 output conv if shapes match.",
                        families=_F),
        "dont_load": declare((), "fnmatch patterns of parameter paths to keep fresh, e.g. "
                        "'params/decoder/*'.", tuple, item=str, families=_F),
        "adapt_input_channels": declare(False, "Replicate a 1-channel first conv to C channels / C.",
                                   families=_F),
    },
    "eval": {
        "overlap": declare(0.5, "Sliding-window overlap for whole-volume segmentation.",
                      range=Range(0.0, 1.0, hi_open=True), families=_F),
        "tta_flip": declare(False, "Average predictions over flips (test-time augmentation).",
                       families=_F),
        "hd95": declare(False, "Also compute the 95th-percentile Hausdorff distance.", families=_F),
        "write_predictions": declare(False,
                                "Write NIfTI test predictions to <workdir>/test_predictions/.",
                                families=_F),
    },
    "predict": {
        "input": declare("", "mode=predict: a scan (file or DICOM folder), a folder of scans, or a "
                    "glob; for a run fine-tuned on 2D images, an image file, a folder of "
                    "images or a glob.", families=_F),
        "output": declare("", "Folder for the outputs (default <workdir>/predict).", families=_F),
        "candidates": declare("", "classify: CSV seriesuid,coordX,coordY,coordZ[,class] (LPS mm).",
                         families=_F),
        "which": declare("best", "Checkpoint of the run: best or latest.", choices=("best", "latest"),
                    families=_F),
        "threshold": declare(0.5, "segment, one class: mask = probability >= threshold.",
                        range=PROBABILITY, families=_F),
        "probabilities": declare(False, "segment: write float32 probabilities instead of labels.",
                            families=_F),
        "batch_size": declare(4, "Windows (or candidate cubes) per forward pass.", range=POSITIVE,
                         families=_F),
        "overwrite": declare(False, "Replace outputs already there (default: keep them, go on).",
                        families=_F),
        "on_error": declare("raise", "An unreadable scan: raise, or skip (listed in the json).",
                       choices=("raise", "skip"), families=_F),
        "checkpoint": declare("", "segment: an nnU-Net checkpoint (checkpoint_final.pth) to "
                         "predict with instead of the workdir's run; needs model.kind='nnunet' "
                         "and the model.plans / model.configuration it was trained with.",
                         families=_F),
    },
    "probe": {
        "pretrain_dir": declare("", "mode=probe: the pre-training workdir to analyse (its "
                           "checkpoints and config.json); empty = the run's --workdir. The probe "
                           "reads the task's training and validation cases (never its test "
                           "cases): classify, the candidate cubes and their classes; segment, "
                           "the cubes, labelled 1 when they hold any foreground voxel.",
                           families=_F),
        "which": declare("all", "Checkpoints probed: all (every saved step), best or latest; a "
                    "random init of the same network is always probed too.",
                    choices=("all", "best", "latest"), families=_F),
        "folds": declare(5, "Cross-validation folds of the linear probe, grouped by case (subject).",
                    range=Range(2), families=_F),
        "max_samples": declare(2000, "Cubes probed at most (a random subset; 0 = all).",
                          range=NON_NEGATIVE, families=_F),
        "C": declare(1.0, "Inverse L2 regularisation of the logistic-regression probe.", float,
                range=Range(0.0, lo_open=True), families=_F),
        "batch_size": declare(32, "Cubes per forward pass of the encoder.", range=POSITIVE,
                         families=_F),
        "report": declare("probe", "Output name: <workdir>/<report>.json and .png.", families=_F),
    },
    "experiment": {
        "tasks": declare({"finetune_ncc": task("configs/finetune_ncc.py"),
                     "finetune_ncs": task("configs/finetune_ncs.py")},
                    "Target tasks: name -> {config: a fine-tuning config file (path.py[:variant]), "
                    "overrides: {...}}; results go to <workdir>/<name>/.", dict, families=_E),
        "arms": declare({"scratch": arm(""), "genesis": arm("@pretrain")},
                   "Arms: name -> {init: '' (scratch), '@pretrain' (this experiment's "
                   "pre-training), '@pretrain:<variant>' (one of pretrain_variants) or a path, "
                   "overrides: {...}}; an arm's overrides apply after "
                   "the experiment-wide and the task's.", dict, families=_E),
        "pretrain_config": declare("configs/pretrain_phantom.py", "The pre-training config file an "
                              "'@pretrain' arm uses (run in <workdir>/pretrain).", families=_E),
        "pretrain_overrides": declare({}, "Overrides of the pre-training config, keyed like the "
                                 "config: {'num_steps': 1200}.", dict, families=_E),
        "pretrain_variants": declare({}, "Further pre-trainings: name -> overrides of the "
                                "pre-training config (after pretrain_overrides), or {config: "
                                "another pre-training config file, overrides: {...}} (that file "
                                "and its own overrides only); an arm with init "
                                "'@pretrain:<name>' starts from the one run in "
                                "<workdir>/pretrain_<name>.", dict, families=_E),
        "overrides": declare({}, "Overrides of every task config: {'num_steps': 200}.", dict,
                        families=_E),
        "trials": declare(5, "Trials per arm and task; trial t uses seed experiment.seed + t.",
                     range=POSITIVE, families=_E),
        "seed": declare(0, "Seed of trial 0.", range=NON_NEGATIVE, families=_E),
        "report": declare("results", "Report name: <workdir>/<report>.{md,json,png}.", families=_E),
        "compare": declare((), "Tests to run: pairs (arm, baseline arm); empty = every arm against "
                      "scratch (or the first arm).", tuple, item=tuple, families=_E),
    },
}

# Keys whose value was a string in a small language of its own, with an example of the dict or
# tuple they take now.
LEGACY = {
    "experiment.arms": "{'scratch': {'init': ''}, 'genesis': {'init': '@pretrain', "
                       "'overrides': {'train': {'monitor': 'auc'}}}}",
    "experiment.tasks": "{'finetune_ncc': {'config': 'configs/finetune_ncc.py', "
                        "'overrides': {'num_steps': 100}}}",
    "experiment.overrides": "{'num_steps': 200}",
    "experiment.pretrain_overrides": "{'num_steps': 1200}",
    "experiment.compare": "(('genesis', 'scratch'),)",
}


def keys(family: str | None = None):
  """(dotted path, Key) of every key, or of one family's keys, in declaration order."""
  for section, entries in SECTIONS.items():
    for name, key in entries.items():
      if family is None or family in key.families:
        yield (f"{section}.{name}" if section else name), key


def lookup(path: str) -> Key | None:
  """The Key declared at a dotted path, or None."""
  section, _, name = path.rpartition(".")
  return SECTIONS.get(section, {}).get(name)


def default(path: str, family: str = PRE) -> Any:
  """The default value of a key in a family (e.g. `default("corruption.flip_rate")`)."""
  key = lookup(path)
  if key is None:
    raise KeyError(path)
  return key.default_for(family)


def build(family: str) -> ml_collections.ConfigDict:
  """A ConfigDict with the keys of one family at their defaults."""
  c = ml_collections.ConfigDict()
  for path, key in keys(family):
    section, _, name = path.rpartition(".")
    node = c
    if section:
      if section not in c:
        c[section] = ml_collections.ConfigDict()
      node = c[section]
    node[name] = key.default_for(family)
  return c


def pretrain_config() -> ml_collections.ConfigDict:
  """Pre-training (modes pretrain and prepare), with the original PyTorch recipe's values."""
  return build(PRE)


def finetune_config() -> ml_collections.ConfigDict:
  """Target-task fine-tuning (modes finetune, evaluate, predict): the original's recipe (Adam
  1e-3, early stopping on validation loss)."""
  return build(FT)


def experiment_config() -> ml_collections.ConfigDict:
  """Scratch-vs-Genesis experiment: N fine-tuning trials per arm and task, then a results table.

  Only `mode` and the `experiment` section: the trials' settings come from the task config
  files and the experiment's overrides."""
  return build(EXP)


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

