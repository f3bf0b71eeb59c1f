"""Checks a config against the schema, in one place, before anything runs or is written.

`validate(config)` checks every key of the config's mode: no unknown keys and no keys of another
mode, types, allowed values, ranges, and the rules that tie keys together (crop against the
model's depth, the monitored value against the task, data.path against data.source, ...).
Every problem raises `errors.ConfigError` (or `MissingPathError`) with one line that names the
key and the way out.
"""
from __future__ import annotations

import copy
import difflib
import glob
import math
import os
from typing import Any, Mapping

from genesis_jax import errors
from genesis_jax.config import schema
from genesis_jax.config.schema import EXP, FT, PRE


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _did_you_mean(value, candidates) -> str:
  near = difflib.get_close_matches(str(value), [str(c) for c in candidates], n=1, cutoff=0.6)
  return f" Did you mean {near[0]!r}?" if near else ""


def check_value(path: str, value: Any, key: schema.Key | None = None) -> None:
  """Raises ConfigError unless `value` fits the key declared at `path` (type, choices, range)."""
  key = key or schema.lookup(path)
  if key is None:
    raise errors.ConfigError(unknown_key_message(path))
  name = f"config.{path}"
  legacy = isinstance(value, str) or (key.item is tuple and isinstance(value, (tuple, list))
                                      and any(isinstance(v, str) for v in value))
  if legacy and key.type is not str and path in schema.LEGACY:
    raise errors.ConfigError(f"{name}={value!r}: the old string form is gone; write "
                             f"{name} = {schema.LEGACY[path]} (see docs/config.md).")
  if not _has_type(value, key.type):
    raise errors.ConfigError(f"{name}={value!r} must be {_type_name(key.type)}.")
  if key.choices is not None and value not in key.choices:
    raise errors.ConfigError(f"{name}={value!r} is not one of {tuple(key.choices)}."
                             + _did_you_mean(value, key.choices))
  if key.type is tuple:
    value = tuple(value)
    if key.length is not None and len(value) not in key.length:
      raise errors.ConfigError(f"{name}={value!r} must have {' or '.join(map(str, key.length))} "
                               f"entries.")
    for v in value:
      if key.item is not None and not _has_type(v, key.item):
        raise errors.ConfigError(f"{name}={value!r}: every entry must be {_type_name(key.item)}.")
      if key.range is not None and v not in key.range:
        raise errors.ConfigError(f"{name}={value!r}: every entry must be {_range_text(key.range)}.")
  elif key.range is not None and value not in key.range:
    raise errors.ConfigError(f"{name}={value!r} must be {_range_text(key.range)}.")


def _has_type(value, type_) -> bool:
  if type_ is float:
    return is_number(value)
  if type_ is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if type_ is tuple:
    return isinstance(value, (tuple, list))
  if type_ is dict:
    return isinstance(value, Mapping) or hasattr(value, "items")
  return isinstance(value, type_)


def _type_name(type_) -> str:
  return {int: "an integer", float: "a number", str: "a string", bool: "True or False",
          tuple: "a tuple", dict: "a dict"}.get(type_, type_.__name__)


def _range_text(r: schema.Range) -> str:
  text = str(r)
  return text if text[0] in "<>" else f"in {text}"


def unknown_key_message(path: str, family: str | None = None) -> str:
  """One line for a key this config does not have: the family it belongs to, or the closest."""
  name = f"config.{path}"
  declared = [(p, k) for p, k in schema.keys() if p == path or p.startswith(path + ".")]
  if declared and family is not None:
    owners = sorted({f for _, k in declared for f in k.families}, key=list(schema.FAMILIES).index)
    if family in owners:
      return (f"{name} is missing from this config: build it with "
              f"schema.{schema.BUILDERS[family]} and change what differs.")
    owner = " or ".join(schema.FAMILY_NAMES[f] for f in owners)
    modes = ", ".join(m for f in owners for m in schema.FAMILIES[f])
    msg = (f"{name} is a {owner} key (modes {modes}); this {schema.FAMILY_NAMES[family]} config "
           f"(modes {', '.join(schema.FAMILIES[family])}) does not use it.")
    if family == EXP:
      msg += (" Set it for the trials in config.experiment.overrides (or a task's or an arm's "
              "overrides).")
    return msg
  known = [p for p, _ in schema.keys(family)]
  known += sorted({p.rpartition(".")[0] for p in known if "." in p})
  near = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
  if not near:  # A misspelt section: match the leaf name among the keys.
    leaf = path.rpartition(".")[2]
    near = [p for p in known if p.rpartition(".")[2] in
            difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in known], n=1)][:1]
  hint = f" Did you mean config.{near[0]}?" if near else " See docs/config.md for the keys."
  return f"{name} is not a config key.{hint}"


def config_family(config) -> str:
  """The family a config was built for, from its sections (experiment, task or corruption)."""
  if "experiment" in config:
    return EXP
  if "task" in config:
    return FT
  return PRE


def items(config):
  """(dotted path, value) of every leaf of the config; dict-typed keys are leaves."""
  for name in config.keys():
    value = config[name]
    if name in schema.SECTIONS and name and hasattr(value, "keys"):
      for leaf in value.keys():
        yield f"{name}.{leaf}", value[leaf]
    else:
      yield name, value


def validate(config) -> None:
  """Checks the whole config for its mode; raises ConfigError naming the first problem."""
  mode = config.get("mode")
  if mode not in schema.MODES:
    raise errors.ConfigError(f"config.mode={mode!r} is not one of {schema.MODES}."
                             + _did_you_mean(mode, schema.MODES))
  family = schema.family_of(mode)
  built = config_family(config)
  if built != family:
    raise errors.ConfigError(
        f"config.mode={mode!r} needs a {schema.FAMILY_NAMES[family]} config (built with "
        f"schema.{schema.BUILDERS[family]}); this config is a {schema.FAMILY_NAMES[built]} "
        f"config (modes {', '.join(schema.FAMILIES[built])}).")
  present = dict(items(config))
  wanted = dict(schema.keys(family))
  for path, value in present.items():
    if path not in wanted:
      raise errors.ConfigError(unknown_key_message(path, family))
    check_value(path, value, wanted[path])
  missing = [p for p in wanted if p not in present]
  if missing:
    raise errors.ConfigError(f"config.{missing[0]} is missing: build the config with "
                             f"schema.{schema.BUILDERS[family]} and change what differs.")
  if family == EXP:
    _check_experiment(config.experiment)
  else:
    _check_model_and_data(config, family)
    _check_monitor(config, family)
  if family == FT:
    _check_task(config)


def _check_model_and_data(config, family: str) -> None:
  m, d = config.model, config.data
  crop, depth = tuple(d.crop), int(m.depth)
  if m.get("kind", "genesis") == "nnunet":
    _check_nnunet(config)
  elif len(crop) != int(m.spatial_dims):
    raise errors.ConfigError(f"config.data.crop={crop} has {len(crop)} entries but "
                             f"config.model.spatial_dims={m.spatial_dims}; give one size per "
                             f"spatial axis.")
  elif any(s % 2 ** depth for s in crop):
    raise errors.ConfigError(f"config.data.crop={crop}: every size must be divisible by "
                             f"{2 ** depth} (2**config.model.depth, depth={depth}).")
  for path, (lo, hi) in (("data.hu_window", d.hu_window), ("data.mri_percentiles",
                                                           d.mri_percentiles)):
    if not lo < hi:
      raise errors.ConfigError(f"config.{path}={(lo, hi)} must be (lo, hi) with lo < hi.")
  if family == PRE:
    if not d.scales:
      raise errors.ConfigError("config.data.scales is empty; give at least one factor, e.g. "
                               "(1.0,).")
    schema.transform_set(config.corruption.transforms)
    lung_rules = [k for k, on in (("data.lung_filter", d.lung_filter),
                                  ("data.sampler='lung_centred'", d.sampler == "lung_centred"))
                  if on]
    if lung_rules and d.modality != "ct":
      raise errors.ConfigError(f"config.{lung_rules[0]} reads Hounsfield units and needs "
                               f"config.data.modality='ct', got {d.modality!r}; turn it off for "
                               f"MRI.")
    if d.source == "images2d":
      _check_images2d(d, crop)
  if family == FT:
    if d.source not in ("phantom", "phantom_xray", "folder"):
      raise errors.ConfigError(f"config.data.source={d.source!r}: fine-tuning reads 'phantom' "
                               f"or 'folder' (or 'phantom_xray', the built-in radiographs; "
                               f"prepared cubes and .npy cubes are for pre-training).")
    if d.train_subset > d.train_cases:
      raise errors.ConfigError(f"config.data.train_subset={d.train_subset} must be in [0, "
                               f"train_cases={d.train_cases}] (0 = all training cases).")
  if config.mode == "predict":
    return  # The data this run reads is the fine-tuning run's own (its config.json).
  if d.source in ("folder", "prepared", "npy", "images2d") and not d.path:
    raise errors.ConfigError(f"config.data.source={d.source!r} needs config.data.path.")
  if d.source == "phantom_xray" and len(crop) != 2:
    raise errors.ConfigError(f"config.data.source='phantom_xray' holds 2D radiographs: set "
                             f"config.model.spatial_dims=2 and a 2-entry config.data.crop, got "
                             f"{crop}.")
  if d.path and d.source not in ("phantom", "phantom_xray") and not glob.glob(d.path):
    raise errors.MissingPathError(f"config.data.path={d.path!r} does not exist.")


def _check_images2d(d, crop: tuple) -> None:
  """data.source='images2d' (a folder of 2D images, data/prepare2d.py)."""
  if len(crop) != 2:
    raise errors.ConfigError(f"config.data.source='images2d' reads 2D images: set "
                             f"config.model.spatial_dims=2 and a 2-entry config.data.crop, got "
                             f"{crop}.")
  size = tuple(d.image_size) or crop
  if len(size) != 2 or any(s < c for s, c in zip(size, crop)):
    raise errors.ConfigError(f"config.data.image_size={tuple(d.image_size)} must be empty or two "
                             f"sizes (x, y), each >= config.data.crop={crop}.")
  if tuple(d.scales) != (1.0,):
    raise errors.ConfigError(f"config.data.scales={tuple(d.scales)}: zoomed crops are for scans; "
                             "with source='images2d' set config.data.image_size (every image is "
                             "fitted to it) and leave scales at (1.0,).")
  if not d.image_percentiles[0] < d.image_percentiles[1]:
    raise errors.ConfigError(f"config.data.image_percentiles={tuple(d.image_percentiles)} must be "
                             "(lo, hi) with lo < hi.")


# model.kind='nnunet': the Genesis U-Net's shape keys, left at their defaults (model.dtype and
# model.conv_impl apply to the plans' network too, and so do the skip-mask pre-training options).
GENESIS_ONLY = ("model.variant", "model.width", "model.depth", "model.bn", "model.init")


def nnunet_values(config) -> dict[str, Any]:
  """{dotted key: value} that model.kind='nnunet' takes from the plans: data.crop (the patch
  size), model.spatial_dims and, for 3D configurations, data.spacing (all in (x, y, z) order)
  and, when left at its default, corruption.local_blocks scaled to the patch (local_blocks_for).
  Raises ConfigError (MissingPathError) for a missing, unreadable or unsupported plans file."""
  m = config.model
  if not m.plans:
    raise errors.ConfigError("config.model.kind='nnunet' needs config.model.plans: the path to "
                             "an nnU-Net v2 nnUNetPlans.json (in nnUNet_preprocessed/<dataset>/).")
  if not os.path.exists(m.plans):  # A folder: load_plans names the plans files in it.
    raise errors.MissingPathError(f"config.model.plans={m.plans!r} does not exist; give the path "
                                  f"to nnUNetPlans.json.")
  from genesis_jax.config import nnunet_plans  # pylint: disable=import-outside-toplevel
  plan = nnunet_plans.load_plans(m.plans, m.configuration)
  out = {"data.crop": tuple(int(s) for s in plan.patch_size),
         "model.spatial_dims": int(plan.spatial_dims)}
  if len(plan.spacing) == 3:  # 2D plans give the in-plane spacing only: no resampling then.
    out["data.spacing"] = tuple(float(s) for s in plan.spacing)
    corruption = config.get("corruption")  # Pre-training only.
    if corruption is not None and corruption.local_blocks == schema.default(
        "corruption.local_blocks"):
      out["corruption.local_blocks"] = local_blocks_for(out["data.crop"])
  return out


def local_blocks_for(crop, blocks: int | None = None, reference=(64, 64, 32)) -> int:
  """The local-shuffle block count that covers a `crop` cube as often as `blocks` (default
  corruption.local_blocks, the original's 10,000) cover the original's 64 x 64 x 32 cube.

  Block sizes scale with the axes (uniform in 1 .. s//10, docs/method.md "Sizes for other crop
  shapes") but the count does not, so a fixed count shuffles less of a larger patch (about 70%
  of the voxels of a 128^3 patch against 78% of 64 x 64 x 32). Expected cover = count x mean
  block volume / cube volume, the mean block size per axis being (max(1, s//10) + 1) / 2."""
  blocks = schema.default("corruption.local_blocks") if blocks is None else blocks
  def mean_block(c):
    out = 1.0
    for s in c:
      out *= (max(1, int(s) // 10) + 1) / 2
    return out
  volume = lambda c: float(math.prod(int(s) for s in c))
  cover = blocks * mean_block(reference) / volume(reference)
  return max(1, round(cover * volume(crop) / mean_block(crop)))


def _check_nnunet(config) -> None:
  """kind='nnunet': the plans load, and the keys the plans decide are left at their defaults or
  set to the plans' values (a different value is an error, not silently replaced)."""
  for path in GENESIS_ONLY:
    section, _, name = path.partition(".")
    if section in config and name in config[section]:
      value = config[section][name]
      if value != schema.default(path):
        raise errors.ConfigError(
            f"config.{path}={value!r} applies to config.model.kind='genesis'; with kind='nnunet' "
            f"the network comes from config.model.plans: leave it at its default "
            f"({schema.default(path)!r}).")
  for path, value in nnunet_values(config).items():
    section, _, name = path.partition(".")
    now = config[section][name]
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if now != schema.default(path) and as_tuple(now) != as_tuple(value):
      raise errors.ConfigError(
          f"config.{path}={now!r} conflicts with the nnU-Net plans ({value!r} from "
          f"config.model.plans={config.model.plans!r}, configuration "
          f"{config.model.configuration!r}): with model.kind='nnunet' the plans decide it; leave "
          f"config.{path} unset.")


def resolve_nnunet(config):
  """`config` with the values model.kind='nnunet' takes from the plans written in (a copy; the
  config itself when kind is 'genesis'), so config.json and the data preparation see them."""
  if "kind" not in config.get("model", {}) or config.model.kind != "nnunet":
    return config
  config = copy.deepcopy(config)
  for path, value in nnunet_values(config).items():
    section, _, name = path.partition(".")
    config[section][name] = value
  return config


def _check_monitor(config, family: str) -> None:
  allowed = schema.MONITORS[PRE if family == PRE else config.task.kind]
  monitor = config.train.monitor
  if monitor not in allowed:
    raise errors.ConfigError(f"config.train.monitor={monitor!r} is not one of {allowed}.")


def check_feature_level(level: int, depth: int, where: str = "") -> None:
  """Raises unless `level` names an encoder level of a `depth`-pooling U-Net (-1: the deepest).

  `where` prefixes the field names in the message ("config." for the config check)."""
  if not -1 <= level <= depth:
    raise errors.ConfigError(
        f"{where}task.feature_level={level} must be in [-1, {where}model.depth={depth}] "
        f"(0 = finest encoder level, -1 or {depth} = the deepest).")


def _check_task(config) -> None:
  task = config.task
  if task.kind == "multilabel" and config.data.source == "phantom":
    raise errors.ConfigError("config.task.kind='multilabel' reads 2D images with a labels CSV: "
                             "use config.data.source='phantom_xray' (built-in radiographs) or "
                             "'folder'.")
  crop = tuple(config.data.crop)
  if config.data.get("slices", "axial") == "orthogonal" and (
      task.kind != "classify" or len(crop) != 2 or crop[0] != crop[1]
      or config.data.source not in ("phantom", "folder")):
    raise errors.ConfigError(f"config.data.slices='orthogonal' (3 central slices of a 3D "
                             f"candidate) needs task.kind='classify' on 3D scans with a square "
                             f"2-entry config.data.crop (model.spatial_dims=2), got kind "
                             f"{task.kind!r}, crop {crop}, source {config.data.source!r}.")
  if task.feature_level != -1:
    if task.kind not in ("classify", "multilabel"):
      raise errors.ConfigError(
          f"config.task.feature_level={task.feature_level} applies to classification only "
          f"(task.kind={task.kind!r}); leave it at -1.")
    check_feature_level(task.feature_level, int(config.model.depth), "config.")
  nnunet = config.model.get("kind", "genesis") == "nnunet"
  if nnunet and task.kind != "segment":
    raise errors.ConfigError(
        f"config.task.kind={task.kind!r} with config.model.kind='nnunet': an nnU-Net plans file "
        f"describes a segmentation network, so only task.kind='segment' fine-tunes it; classify "
        f"with the Genesis U-Net (model.kind='genesis').")
  if config.predict.checkpoint and not nnunet:
    raise errors.ConfigError(
        f"config.predict.checkpoint={config.predict.checkpoint!r} is an nnU-Net checkpoint: set "
        f"config.model.kind='nnunet' and config.model.plans (with model.configuration) to the "
        f"plans it was trained with.")
  if config.mode == "predict" and not config.predict.input:
    raise errors.ConfigError("mode=predict needs config.predict.input: a scan, a folder of "
                             "scans or a glob.")


def _check_experiment(exp) -> None:
  for what, fields, required in (("tasks", {"config", "overrides"}, "config"),
                                 ("arms", {"init", "overrides"}, "init")):
    entries = exp[what]
    if not list(entries.keys()):
      raise errors.ConfigError(f"config.experiment.{what} is empty; see docs/config.md.")
    for name in entries.keys():
      entry = entries[name]
      where = f"config.experiment.{what}.{name}"
      if not hasattr(entry, "keys"):
        raise errors.ConfigError(f"{where}={entry!r} must be a dict with keys {sorted(fields)}, "
                                 f"as in config.experiment.{what} = "
                                 f"{schema.LEGACY['experiment.' + what]}.")
      extra = set(entry.keys()) - fields
      if extra or required not in entry:
        raise errors.ConfigError(f"{where} has keys {sorted(entry.keys())}; expected "
                                 f"{required!r} and optionally 'overrides'.")
      if not isinstance(entry[required], str) or (what == "tasks" and not entry[required]):
        raise errors.ConfigError(f"{where}.{required}={entry[required]!r} must be a "
                                 f"{'config file path' if what == 'tasks' else 'string'}.")
      if "overrides" in entry and not hasattr(entry["overrides"], "keys"):
        raise errors.ConfigError(f"{where}.overrides must be a dict keyed like the config.")
  variants = set(exp.get("pretrain_variants", {}).keys())
  for name in exp.arms.keys():
    init = exp.arms[name]["init"]
    if init.startswith("@pretrain:") and init.partition(":")[2] not in variants:
      raise errors.ConfigError(f"config.experiment.arms.{name}.init={init!r} names no pre-training "
                               f"variant; config.experiment.pretrain_variants has "
                               f"{sorted(variants) or 'none'}.")
    if init.startswith("@") and init != "@pretrain" and not init.startswith("@pretrain:"):
      raise errors.ConfigError(f"config.experiment.arms.{name}.init={init!r}: use '@pretrain', "
                               f"'@pretrain:<variant>', '' (scratch) or a path.")
  for name in variants:
    if not hasattr(exp.pretrain_variants[name], "keys"):
      raise errors.ConfigError(f"config.experiment.pretrain_variants.{name} must be a dict of "
                               f"overrides keyed like the pre-training config.")
    entry = exp.pretrain_variants[name]
    if "config" in entry and (not isinstance(entry["config"], str) or not entry["config"]
                              or set(entry.keys()) - {"config", "overrides"}
                              or not hasattr(entry.get("overrides", {}), "keys")):
      raise errors.ConfigError(f"config.experiment.pretrain_variants.{name}: a variant with its "
                               f"own config file is {{'config': 'configs/<file>.py[:variant]', "
                               f"'overrides': {{...}}}}, got {entry!r}.")
  arms = set(exp.arms.keys())
  for pair in exp.compare:
    if len(pair) != 2 or not set(pair) <= arms:
      raise errors.ConfigError(f"config.experiment.compare entry {tuple(pair)!r} must be a pair "
                               f"(arm, baseline arm) of config.experiment.arms {sorted(arms)}.")
  if not exp.report:
    raise errors.ConfigError("config.experiment.report is empty; name the report, e.g. 'results'.")
