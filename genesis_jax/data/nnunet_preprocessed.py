"""nnU-Net v2 preprocessed cases as pre-training scans: `data.source='folder'` with data.path a
preprocessed configuration folder (nnUNet_preprocessed/Dataset003_Liver/nnUNetPlans_3d_fullres).

Such a folder holds one file per case, written by nnUNetv2_preprocess: `<case>.npz` (key 'data',
nnU-Net v2 before 2.5), its unpacked `<case>.npy`, or `<case>.b2nd` (blosc2, v2.5 and later; read
only when the optional `blosc2` package is installed), each with `_seg` label files beside it
(skipped). The folder is recognised by its plans: a JSON in the parent folder whose configuration
has this folder's name as `data_identifier` (nnU-Net's layout), which says how to read the arrays:

- Axes. 'data' is (C, *axes) in the plans' axis order (after `transpose_forward`); channel 0 is
  read and mapped to our (x, y, z) with `config.nnunet_plans.axis_map` (the plans' axis rule).
- Spacing. The case is already resampled to the configuration's spacing (3D configurations); a 2D
  configuration resamples in-plane only and its slice spacing is not in the plans (1 mm is assumed,
  unused by 2D pre-training).
- Intensities. CTNormalization (clip to the foreground percentiles, then z-score with the
  foreground mean and std of the plans) is undone back to HU, so `data.modality='ct'` and its
  window apply as to any CT scan. Other schemes (ZScoreNormalization, ...) stay as nnU-Net wrote
  them: use `data.modality='mri'` (per-volume percentile normalisation).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from genesis_jax import errors
from genesis_jax.data.volume import Volume

SUFFIXES = (".npz", ".npy", ".b2nd")  # Preference order when a case has several.


def plans_of(folder: str | pathlib.Path) -> tuple[dict, str] | None:
  """(plans, configuration name) of a preprocessed configuration folder, or None if `folder` is
  not one (no plans JSON in its parent names it as a configuration's data_identifier)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return None
  for candidate in sorted(folder.parent.glob("*.json")):
    try:
      plans = json.loads(candidate.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
      continue
    configs = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configs, dict):
      continue
    for name, cfg in configs.items():
      if isinstance(cfg, dict) and cfg.get("data_identifier") == folder.name:
        return plans, name
  return None


def find_cases(folder: str | pathlib.Path) -> list[pathlib.Path]:
  """One file per case (not the `_seg` files), .npz before .npy before .b2nd, sorted by case."""
  by_case: dict[str, pathlib.Path] = {}
  for suffix in reversed(SUFFIXES):
    for p in pathlib.Path(folder).glob(f"*{suffix}"):
      case = p.name[: -len(suffix)]
      if not case.endswith("_seg") and not p.name.startswith("."):
        by_case[case] = p
  return [by_case[c] for c in sorted(by_case)]


def read_array(path: pathlib.Path) -> np.ndarray:
  """The (C, *axes) 'data' array of a case file."""
  try:
    if path.suffix == ".npz":
      with np.load(path) as z:
        if "data" not in z:
          raise errors.DataError(f"{path}: no 'data' array (keys {sorted(z.files)}); not an "
                                 f"nnU-Net preprocessed case.")
        return z["data"]
    if path.suffix == ".npy":
      return np.load(path, mmap_mode="r")
    try:
      import blosc2  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise errors.EnvironmentSetupError(
          f"{path}: .b2nd cases (nnU-Net 2.5 and later) need the blosc2 package: pip install "
          f"blosc2, or pre-train on the raw dataset folder (imagesTr) instead.") from e
    return blosc2.open(str(path), mode="r")[:]
  except (OSError, ValueError) as e:
    if isinstance(e, errors.GenesisError):
      raise
    raise errors.DataError(f"{path}: not a readable nnU-Net preprocessed case ({e}).") from e


def load_case(path: str | pathlib.Path) -> Volume:
  """Channel 0 of a preprocessed case as a Volume in (x, y, z), spacing from the plans, HU for
  CTNormalization (see the module docstring)."""
  from genesis_jax.config import nnunet_plans  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  found = plans_of(path.parent)
  if found is None:
    raise errors.DataError(f"{path}: no nnU-Net plans JSON in {path.parent.parent} names "
                           f"{path.parent.name!r} as a configuration's data_identifier.")
  plans, name = found
  cfg = nnunet_plans.resolve_configuration(plans, name, str(path.parent.parent))
  data = np.asarray(read_array(path))
  if data.ndim != 4:
    raise errors.DataError(f"{path}: 'data' has shape {data.shape}; expected (channels, three "
                           f"spatial axes) as nnU-Net preprocessing writes it.")
  axes, _ = nnunet_plans.axis_map(plans.get("transpose_forward", (0, 1, 2)), 3)
  volume = np.transpose(data[0], axes).astype(np.float32)
  spacing = [float(s) for s in cfg.get("spacing", ())]
  plans_spacing = spacing if len(spacing) == 3 else [1.0] + spacing[-2:]
  xyz_spacing = [plans_spacing[i] for i in axes]
  schemes = cfg.get("normalization_schemes") or ()
  if schemes and schemes[0] == "CTNormalization":
    props = (plans.get("foreground_intensity_properties_per_channel") or {}).get("0") or {}
    if "mean" not in props or "std" not in props:
      raise errors.DataError(f"{path}: CTNormalization without foreground mean/std in the plans "
                             f"(foreground_intensity_properties_per_channel); cannot restore HU.")
    volume = volume * max(float(props["std"]), 1e-8) + float(props["mean"])
  return Volume(data=volume, affine=np.diag(xyz_spacing + [1.0]), source=str(path))
