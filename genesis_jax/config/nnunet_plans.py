"""nnU-Net v2 plans files (`nnUNetPlans.json`): the network a configuration describes, in our axes.

`load_plans(path, configuration)` reads a plans file, resolves the configuration (its
`inherits_from` chain, and the older v2 layout without an `architecture` entry, as nnU-Net's own
plans handler does), checks its `architecture` entry against what `models/nnunet.py` builds, and
returns an `NnUNetPlan`: the network class, its keyword arguments normalised and mapped to our axis
order, the patch size, spacing, spatial dims and input channels.

Axis rule. nnU-Net writes every per-axis list of a configuration (patch_size, spacing,
kernel_sizes, strides) in the numpy order of the image as its reader returns it, after
`transpose_forward`. Its readers return arrays in SimpleITK's order (z, y, x) (NibabelIO
transposes to match), so entry i of a 3D list belongs to world axis ('z', 'y', 'x')[t[i]] with
t = transpose_forward. Ours are (x, y, z): our axis j takes entry i where t[i] == 2 - j. With
the usual t = [0, 1, 2] that is the reversed list: kernel [1, 3, 3] (z, y, x) is (3, 3, 1) here.
A 2D configuration works on slices across the plans' first axis t[0]: its two entries belong to
world axes t[1], t[2]; ours are those two world axes in (x, y, z) order (for t = [0, 1, 2]:
(x, y), the reversed list). `NnUNetPlan.axes` holds, for each of our axes, the index of its entry
in the plans' lists (and so the torch tensor dim 2 + axes[j]); `weights/nnunet.py` permutes
kernels with it.

This module is pure Python (json, no flax): the config layer.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

from genesis_jax import errors

# Short class name -> arch kwargs (beyond the common ones) that the class takes.
NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")
COMMON_KWARGS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                 "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs",
                 "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "deep_supervision")
CLASS_KWARGS = {
    "PlainConvUNet": ("n_conv_per_stage", "nonlin_first"),
    "ResidualEncoderUNet": ("n_blocks_per_stage", "block", "bottleneck_channels",
                            "stem_channels"),
}
NONLINS = {"LeakyReLU": 0.01, "ReLU": 0.0}  # name -> default negative slope


@dataclasses.dataclass(frozen=True)
class NnUNetPlan:
  """One configuration of an nnU-Net v2 plans file, in our (x, y, z) axis order.

  network: "PlainConvUNet" or "ResidualEncoderUNet"; network_class_name: the plans' full name.
  arch: keyword arguments of `models/nnunet.py`'s module of that name (tuples, our axis order):
    n_stages, features_per_stage, kernel_sizes, strides, n_conv_per_stage_decoder, conv_bias,
    norm_eps, negative_slope, and n_conv_per_stage + nonlin_first (PlainConvUNet) or
    n_blocks_per_stage + stem_channels (ResidualEncoderUNet).
  patch_size, spacing: our axis order; spatial_dims: 2 or 3; n_input_channels: from the plans'
  per-channel intensity properties (or a dataset.json beside the plans file), 1 if neither.
  axes: for each of our axes, the index of its entry in the plans' per-axis lists (see the
  module docstring); world_axes: which of (x, y, z) our axes are ((0, 1, 2) in 3D, the two
  in-plane axes in 2D). transpose_forward: the plans' permutation. raw: the resolved
  configuration entry as the file has it; plans: the whole file.
  """
  path: str
  configuration: str
  network: str
  network_class_name: str
  arch: dict
  patch_size: tuple[int, ...]
  spacing: tuple[float, ...]
  spatial_dims: int
  n_input_channels: int
  axes: tuple[int, ...]
  world_axes: tuple[int, ...]
  transpose_forward: tuple[int, ...]
  batch_size: int | None
  normalization_schemes: tuple[str, ...]
  raw: dict = dataclasses.field(repr=False)
  plans: dict = dataclasses.field(repr=False)

  def to_ours(self, values) -> tuple:
    """A per-axis list in the plans' order -> our axis order."""
    return tuple(values[i] for i in self.axes)

  def to_plans(self, values) -> tuple:
    """A per-axis list in our order -> the plans' order (inverse of `to_ours`)."""
    out = [None] * len(self.axes)
    for j, i in enumerate(self.axes):
      out[i] = values[j]
    return tuple(out)


def axis_map(transpose_forward, spatial_dims: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(axes, world_axes) for a plans' transpose_forward (see the module docstring).

  axes[j]: index into the plans' per-axis lists of our axis j; world_axes[j]: which of (x, y, z)
  our axis j is.
  """
  t = list(transpose_forward)
  if sorted(t) != [0, 1, 2]:
    raise errors.ConfigError(f"transpose_forward {t} is not a permutation of [0, 1, 2].")
  plans_axes = t if spatial_dims == 3 else t[1:]  # plans entries -> numpy axes (z, y, x) = 0,1,2
  world = [2 - a for a in plans_axes]              # -> world axes x, y, z = 0, 1, 2
  world_axes = tuple(sorted(world))
  return tuple(world.index(w) for w in world_axes), world_axes


def last_name(dotted: Any) -> str | None:
  """'torch.nn.modules.conv.Conv3d' -> 'Conv3d' (None stays None)."""
  return None if dotted is None else str(dotted).rsplit(".", 1)[-1]


def read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise errors.MissingPathError(f"nnU-Net plans file {path} does not exist (model.plans).")
  if os.path.isdir(path):
    raise errors.ConfigError(
        f"{path} is a folder; model.plans takes the plans file itself, e.g. "
        f"{os.path.join(path, 'nnUNetPlans.json')} (found there: "
        f"{sorted(n for n in os.listdir(path) if 'plans' in n.lower() and n.endswith('.json'))}).")
  if path.endswith(".pkl"):
    raise errors.ConfigError(
        f"{path} is a pickle: nnU-Net v1 plans (nnUNetPlansv2.1_plans_3D.pkl). Only nnU-Net v2 "
        f"plans are supported: run nnUNetv2_plan_and_preprocess and pass its nnUNetPlans.json.")
  try:
    with open(path) as f:
      plans = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.ConfigError(f"{path} is not a JSON nnU-Net v2 plans file ({e}); pass the "
                             f"nnUNetPlans.json that nnUNetv2_plan_and_preprocess wrote.") from e
  if not isinstance(plans, dict) or "configurations" not in plans:
    v1 = isinstance(plans, dict) and ("plans_per_stage" in plans or "num_stages" in plans)
    raise errors.ConfigError(
        f"{path} has no 'configurations': " + ("nnU-Net v1 plans (plans_per_stage). " if v1 else
                                                "not an nnU-Net v2 plans file. ")
        + "Only nnU-Net v2 plans (nnUNetPlans.json) are supported.")
  return plans


def resolve_configuration(plans: dict, name: str, path: str) -> dict:
  """The configuration with its `inherits_from` chain applied (child keys win)."""
  configs = plans["configurations"]
  seen = []
  while True:
    if name not in configs:
      raise errors.ConfigError(
          f"{path}: configuration {name!r} does not exist"
          + (f" (inherited by {seen[-1]!r})" if seen else "")
          + f"; the plans have {sorted(configs)} (model.configuration).")
    if name in seen:
      raise errors.ConfigError(f"{path}: circular inherits_from: {seen + [name]}.")
    seen.append(name)
    if "inherits_from" not in configs[name]:
      break
    name = configs[name]["inherits_from"]
  out: dict = {}
  for n in reversed(seen):
    out.update(copy.deepcopy(configs[n]))
  out.pop("inherits_from", None)
  return out


def legacy_architecture(config: dict, path: str) -> dict:
  """The `architecture` entry of an older v2 configuration (UNet_class_name, conv_kernel_sizes,
  pool_op_kernel_sizes, ...), rebuilt the way nnU-Net's ConfigurationManager does."""
  name = config.get("UNet_class_name")
  if name not in NETWORKS:
    raise errors.ConfigError(
        f"{path}: configuration has no 'architecture' entry and UNet_class_name {name!r} is not "
        f"one of the supported networks {NETWORKS}.")
  try:
    n = len(config["n_conv_per_stage_encoder"])
    dims = len(config["patch_size"])
    arch = {
        "n_stages": n,
        "features_per_stage": [min(config["UNet_base_num_features"] * 2 ** i,
                                   config["unet_max_num_features"]) for i in range(n)],
        "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
        "kernel_sizes": config["conv_kernel_sizes"],
        "strides": config["pool_op_kernel_sizes"],
        ("n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"):
            config["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
  except KeyError as e:
    raise errors.ConfigError(f"{path}: configuration without 'architecture' lacks {e} of the "
                             f"older v2 layout; rerun nnUNetv2_plan_experiment.") from e
  return {"network_class_name": name, "arch_kwargs": arch}


def per_stage(kwargs: dict, key: str, n: int, where: str, dims: int | None = None) -> tuple:
  """kwargs[key] as n entries (an int is repeated, as dynamic_network_architectures does); with
  dims, each entry a tuple of dims ints."""
  value = kwargs[key]
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = [value] * n
  if not isinstance(value, (list, tuple)) or len(value) != n:
    raise errors.ConfigError(f"{where}: {key} must have n_stages = {n} entries, got {value!r}.")
  if dims is None:
    return tuple(int(v) for v in value)
  out = []
  for v in value:
    v = [v] * dims if isinstance(v, int) else v
    if len(v) != dims:
      raise errors.ConfigError(f"{where}: {key} entry {v!r} does not have {dims} axes.")
    out.append(tuple(int(a) for a in v))
  return tuple(out)


def network_arch(arch_entry: dict, where: str) -> tuple[str, str, dict, int]:
  """(short class name, full class name, checked kwargs in the plans' axis order, spatial dims)."""
  full = arch_entry.get("network_class_name")
  net = last_name(full)
  if net not in NETWORKS:
    raise errors.ConfigError(f"{where}: network class {full!r} is not supported; supported: "
                             f"{NETWORKS} (dynamic_network_architectures).")
  kwargs = dict(arch_entry.get("arch_kwargs") or {})
  known = COMMON_KWARGS + CLASS_KWARGS[net]
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise errors.ConfigError(f"{where}: unknown arch_kwargs {unknown} for {net}; known: "
                             f"{sorted(known)}.")
  for key in ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
              "n_conv_per_stage_decoder", CLASS_KWARGS[net][0]):
    if key not in kwargs:
      raise errors.ConfigError(f"{where}: arch_kwargs lacks {key!r} (needed by {net}).")
  conv = last_name(kwargs["conv_op"])
  if conv not in ("Conv2d", "Conv3d"):
    raise errors.ConfigError(f"{where}: conv_op {kwargs['conv_op']!r} is not supported; "
                             f"supported: Conv2d, Conv3d.")
  dims = int(conv[4])
  norm = last_name(kwargs.get("norm_op"))
  if norm != f"InstanceNorm{dims}d":
    raise errors.ConfigError(f"{where}: norm_op {kwargs.get('norm_op')!r} is not supported; "
                             f"supported: InstanceNorm{dims}d (nnU-Net's default).")
  norm_kw = dict(kwargs.get("norm_op_kwargs") or {})
  if not norm_kw.get("affine", False) or norm_kw.get("track_running_stats", False):
    raise errors.ConfigError(f"{where}: norm_op_kwargs {norm_kw} not supported: InstanceNorm with "
                             f"affine=True and no running statistics only.")
  extra = sorted(set(norm_kw) - {"eps", "affine", "momentum", "track_running_stats"})
  if extra:
    raise errors.ConfigError(f"{where}: unknown norm_op_kwargs {extra}; known: eps, affine.")
  if kwargs.get("dropout_op") is not None:
    raise errors.ConfigError(f"{where}: dropout_op {kwargs['dropout_op']!r} is not supported "
                             f"(only None, nnU-Net's default).")
  nonlin = last_name(kwargs.get("nonlin"))
  if nonlin not in NONLINS:
    raise errors.ConfigError(f"{where}: nonlin {kwargs.get('nonlin')!r} is not supported; "
                             f"supported: {sorted(NONLINS)}.")
  nonlin_kw = dict(kwargs.get("nonlin_kwargs") or {})
  extra = sorted(set(nonlin_kw) - {"inplace", "negative_slope"})
  if extra or (nonlin == "ReLU" and "negative_slope" in nonlin_kw):
    raise errors.ConfigError(f"{where}: unknown nonlin_kwargs {nonlin_kw} for {nonlin}; known: "
                             f"inplace" + (", negative_slope." if nonlin == "LeakyReLU" else "."))
  n = int(kwargs["n_stages"])
  if n < 2:
    raise errors.ConfigError(f"{where}: n_stages must be >= 2, got {n}.")
  out = {
      "n_stages": n,
      "features_per_stage": per_stage(kwargs, "features_per_stage", n, where),
      "kernel_sizes": per_stage(kwargs, "kernel_sizes", n, where, dims),
      "strides": per_stage(kwargs, "strides", n, where, dims),
      "n_conv_per_stage_decoder": per_stage(kwargs, "n_conv_per_stage_decoder", n - 1, where),
      "conv_bias": bool(kwargs.get("conv_bias", False)),
      "norm_eps": float(norm_kw.get("eps", 1e-5)),
      "negative_slope": float(nonlin_kw.get("negative_slope", NONLINS[nonlin])),
  }
  bad = [k for k in out["kernel_sizes"] if any(a % 2 == 0 for a in k)]
  if bad:
    raise errors.ConfigError(f"{where}: even kernel sizes {bad} are not supported (odd only).")
  if net == "PlainConvUNet":
    out["n_conv_per_stage"] = per_stage(kwargs, "n_conv_per_stage", n, where)
    out["nonlin_first"] = bool(kwargs.get("nonlin_first", False))
  else:
    out["n_blocks_per_stage"] = per_stage(kwargs, "n_blocks_per_stage", n, where)
    block = last_name(kwargs.get("block", "BasicBlockD"))
    if block != "BasicBlockD" or kwargs.get("bottleneck_channels") is not None:
      raise errors.ConfigError(f"{where}: block {kwargs.get('block')!r} is not supported; "
                               f"supported: BasicBlockD (without bottleneck_channels).")
    stem = kwargs.get("stem_channels")
    out["stem_channels"] = int(stem) if stem is not None else out["features_per_stage"][0]
  return net, str(full), out, dims


def input_channels(plans: dict, path: str) -> int:
  props = plans.get("foreground_intensity_properties_per_channel")
  if isinstance(props, dict) and props:
    return len(props)
  dataset_json = os.path.join(os.path.dirname(path), "dataset.json")
  if os.path.isfile(dataset_json):
    try:
      with open(dataset_json) as f:
        info = json.load(f)
      names = info.get("channel_names") or info.get("modality")
      if names:
        return len(names)
    except (OSError, ValueError):
      pass
  return 1


def load_plans(path: str | os.PathLike, configuration: str) -> NnUNetPlan:
  """The network, patch size and spacing of `configuration` in an nnU-Net v2 plans file.

  Raises MissingPathError (no file) or ConfigError (v1 or not a plans file, no such
  configuration, unsupported class or kwargs), each naming what is supported.
  """
  path = os.fspath(path)
  plans = read_json(path)
  config = resolve_configuration(plans, configuration, path)
  where = f"{path} [{configuration}]"
  arch_entry = config.get("architecture") or legacy_architecture(config, path)
  net, full, arch, dims = network_arch(arch_entry, where)
  patch = config.get("patch_size")
  if not isinstance(patch, (list, tuple)) or len(patch) != dims:
    raise errors.ConfigError(f"{where}: patch_size {patch!r} does not have {dims} axes "
                             f"(conv_op is {dims}D).")
  spacing = config.get("spacing") or [1.0] * dims
  if len(spacing) != dims:
    raise errors.ConfigError(f"{where}: spacing {spacing!r} does not have {dims} axes.")
  for p, axis in zip(patch, range(dims)):
    total = 1
    for s in arch["strides"]:
      total *= s[axis]
    if p % total:
      raise errors.ConfigError(f"{where}: patch_size {patch} is not divisible by the product of "
                               f"the strides on axis {axis} ({total}).")
  tf = tuple(plans.get("transpose_forward", (0, 1, 2)))
  axes, world_axes = axis_map(tf, dims)

  def ours(values):
    return tuple(values[i] for i in axes)

  arch["kernel_sizes"] = tuple(ours(k) for k in arch["kernel_sizes"])
  arch["strides"] = tuple(ours(s) for s in arch["strides"])
  return NnUNetPlan(
      path=path, configuration=configuration, network=net, network_class_name=full, arch=arch,
      patch_size=ours([int(p) for p in patch]), spacing=ours([float(s) for s in spacing]),
      spatial_dims=dims, n_input_channels=input_channels(plans, path), axes=axes,
      world_axes=world_axes, transpose_forward=tf,
      batch_size=config.get("batch_size"),
      normalization_schemes=tuple(config.get("normalization_schemes") or ()),
      raw=config, plans=plans)
