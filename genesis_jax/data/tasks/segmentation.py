"""Segmentation data in the Medical Segmentation Decathlon / nnU-Net layout, cut into cubes.

  root/imagesTr/<case>.nii.gz            (MSD: one file per case, 4D when multi-channel)
  root/imagesTr/<case>_0000.nii.gz, ...  (nnU-Net: one file per channel)
  root/labelsTr/<case>.nii.gz            (integer class per voxel, same grid as the image)
  root/dataset.json                      (optional; its "labels" give the class count)
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from genesis_jax import errors
from genesis_jax.data import preprocess as preprocess_lib
from genesis_jax.data.readers import VolumeReadError, check_volume, find_scans, load_volume, scan_id
from genesis_jax.data.tasks.cubes import as_3d_crop, stack_cubes
from genesis_jax.data.volume import Volume

# nnU-Net names channel files <case>_0000.nii.gz, <case>_0001.nii.gz, ...
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# Label and image grids must agree to this many mm (float noise in the headers is tolerated).
_AFFINE_ATOL_MM = 1e-3


@dataclasses.dataclass(frozen=True)
class SegmentationCase:
  case_id: str
  image: pathlib.Path  # The image file of the chosen channel.
  label: pathlib.Path
  channel: int | None  # Channel index into a 4D (MSD multi-modal) image, else None.


def read_num_classes(root: str | pathlib.Path) -> int | None:
  """Number of classes from root/dataset.json ("labels"), or None when there is no such file.

  Accepts the MSD form {"0": "background", "1": "tumour"} and the nnU-Net v2 form
  {"background": 0, "tumour": 1}.
  """
  path = pathlib.Path(root) / "dataset.json"
  if not path.exists():
    return None
  try:
    meta = json.loads(path.read_text())
    labels = meta["labels"]
    if all(isinstance(v, str) for v in labels.values()):
      ids = [int(k) for k in labels]
    else:
      ids = [int(v) for v in labels.values()]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise VolumeReadError(f"{path}: cannot read the 'labels' of dataset.json ({e!r}).") from e
  if not ids or min(ids) < 0:
    raise VolumeReadError(f"{path}: 'labels' must map class ids 0..n-1, got {labels}.")
  return max(ids) + 1


def segmentation_cases(root: str | pathlib.Path, channel: int | None = None
                       ) -> list[SegmentationCase]:
  """Lists and matches images and labels of an MSD / nnU-Net folder without reading voxels.

  Args:
    root: the task folder holding imagesTr/ and labelsTr/.
    channel: which channel to use for multi-channel data (nnU-Net _000c files or 4D MSD images);
      None means single-channel data (nnU-Net _0000 files are then accepted).
  Raises VolumeReadError on a missing folder, an image without a label or a label without an image.
  """
  root = pathlib.Path(root)
  images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
  for d in (images_dir, labels_dir):
    if not d.is_dir():
      raise VolumeReadError(f"{d}: missing; expected the MSD layout root/imagesTr, root/labelsTr.")
  labels = {scan_id(p): p for p in find_scans(labels_dir)}
  images: dict[str, pathlib.Path] = {}
  channels: dict[str, int | None] = {}
  for path in find_scans(images_dir):
    name = scan_id(path)
    m = _CHANNEL_SUFFIX.match(name)
    # A name that is itself a label's name is an MSD case (4D when multi-channel); otherwise
    # <case>_000c is nnU-Net's file for channel c. Checking labels first keeps MSD ids such as
    # "lung_0001" from being misread as channel 1 of case "lung".
    if name in labels or not m or m["case"] not in labels:
      images[name], channels[name] = path, channel
    elif int(m["channel"]) == (channel or 0):
      images[m["case"]], channels[m["case"]] = path, None
  missing = sorted(set(images) - set(labels))
  if missing:
    raise VolumeReadError(
        f"{labels_dir}: no label for image(s) {', '.join(str(images[c]) for c in missing[:5])}"
        f"{' ...' if len(missing) > 5 else ''} (expected labelsTr/<case> with the image's suffix).")
  extra = sorted(set(labels) - set(images))
  if extra:
    raise VolumeReadError(
        f"{images_dir}: no image for label(s) {', '.join(str(labels[c]) for c in extra[:5])}"
        f"{' ...' if len(extra) > 5 else ''}.")
  return [SegmentationCase(c, images[c], labels[c], channels[c]) for c in sorted(images)]


def load_segmentation_case(case: SegmentationCase, num_classes: int | None = None
                           ) -> tuple[Volume, np.ndarray]:
  """Reads one case; the label map is checked against the image and returned as uint8 (x, y, z)."""
  image = load_volume(case.image, channel=case.channel)
  label_vol = load_volume(case.label)
  if label_vol.shape != image.shape:
    raise VolumeReadError(
        f"{case.label}: label shape {label_vol.shape} does not match image {case.image} shape"
        f" {image.shape} (x, y, z, after reorientation to RAS).")
  if not np.allclose(label_vol.affine, image.affine, rtol=0, atol=_AFFINE_ATOL_MM):
    raise VolumeReadError(
        f"{case.label}: label affine does not match image {case.image}; they are not on the same"
        f" voxel grid.\nlabel:\n{label_vol.affine}\nimage:\n{image.affine}")
  values = label_vol.data
  if not np.isfinite(values).all() or (values != np.round(values)).any():
    raise VolumeReadError(f"{case.label}: label values must be whole numbers (class ids).")
  lo, hi = int(values.min()), int(values.max())
  limit = 256 if num_classes is None else num_classes
  if lo < 0 or hi >= limit:
    what = f"dataset.json declares {num_classes} classes" if num_classes else "uint8 class ids"
    raise VolumeReadError(
        f"{case.label}: label values span [{lo}, {hi}], outside the class range [0,"
        f" {limit - 1}] ({what}).")
  return image, values.astype(np.uint8)


def load_segmentation_pairs(root: str | pathlib.Path, channel: int | None = None
                            ) -> list[tuple[Volume, np.ndarray]]:
  """All (image Volume, uint8 label (x, y, z)) pairs of an MSD / nnU-Net task folder, validated.

  Holds every case in memory; for large tasks iterate `segmentation_cases` with
  `load_segmentation_case` instead.
  """
  num_classes = read_num_classes(root)
  return [load_segmentation_case(c, num_classes) for c in segmentation_cases(root, channel)]


def segmentation_cubes(pairs: Sequence[tuple[Volume, np.ndarray]], crop: Sequence[int], cfg: Any,
                       *, per_case: int, fg_fraction: float, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Random training cubes from (image, label) pairs.

  Each image is preprocessed with `cfg` (config.data; its label follows the same resampling and
  crop). Per case, `per_case` cubes; each contains a random foreground voxel (label > 0) with
  probability `fg_fraction` (when the case has any), else sits uniformly at random.

  Returns images (N, *crop, 1) float32 in [0, 1] and masks (N, *crop, 1) uint8 class ids,
  N = len(pairs) * per_case. A volume smaller than the crop is a VolumeReadError.
  """
  crop3, is_2d = as_3d_crop(crop)
  if not 0.0 <= fg_fraction <= 1.0:
    raise errors.ConfigError(f"config.data.fg_fraction must be in [0, 1], got {fg_fraction}.")
  rng = np.random.default_rng(seed)
  size = np.array(crop3)
  images, masks = [], []
  for vol, labels in pairs:
    vol, labels = preprocess_lib.preprocess_pair(vol, labels, cfg)
    check_volume(vol, min_shape=crop3)
    shape = np.array(vol.shape)
    fg = np.argwhere(labels > 0)
    for _ in range(per_case):
      if len(fg) and rng.random() < fg_fraction:
        voxel = fg[rng.integers(len(fg))]
        origin = np.clip(voxel - rng.integers(0, size), 0, shape - size)
      else:
        origin = rng.integers(0, shape - size + 1)
      box = tuple(slice(o, o + s) for o, s in zip(origin, size))
      images.append(vol.data[box])
      masks.append(labels[box])
  return stack_cubes(images, np.float32, is_2d), stack_cubes(masks, np.uint8, is_2d)
