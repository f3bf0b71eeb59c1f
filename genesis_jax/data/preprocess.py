"""Scan preprocessing driven by `config.data`: resample -> body crop -> intensity to [0, 1].

Fields read from `cfg` (see configs/pretrain_genesis.py): modality ("ct" | "mri"), hu_window
(lo, hi) in HU, mri_norm ("percentile" | "zscore" | "minmax"), mri_percentiles (lo, hi) in
percent, spacing (x, y, z) in mm or empty for none, body_crop (bool).

Geometry changes keep `Volume.affine` exact, so world coordinates (e.g. LUNA16 candidates) still
map to the right voxels after preprocessing. Labels follow the image through `preprocess_pair`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.ndimage

from genesis_jax import errors
from genesis_jax.data.volume import Volume

# Body mask threshold for CT: air is about -1000 HU, lung parenchyma about -850 HU, soft tissue
# about 0 HU; -500 separates the patient from the air around them (lungs are enclosed by it).
CT_BODY_THRESHOLD_HU = -500.0
# z-scores are clipped to +-this many standard deviations before mapping to [0, 1].
ZSCORE_CLIP = 3.0


def normalize_intensity(data: np.ndarray, cfg: Any) -> np.ndarray:
  """Maps raw intensities to float32 in [0, 1].

  CT: clip to `cfg.hu_window` = (lo, hi) HU, then (v - lo) / (hi - lo); the default (-1000, 1000)
  is the original's. MRI, per volume: "percentile" clips to the `cfg.mri_percentiles` (lo, hi)
  percentiles and maps that range to [0, 1]; "minmax" uses the volume's min and max; "zscore"
  standardises, clips to +-3 std and maps [-3, 3] to [0, 1]. A constant volume maps to zeros.
  """
  data = np.asarray(data, dtype=np.float32)
  modality = str(cfg.modality).lower()
  if modality == "ct":
    lo, hi = (float(v) for v in cfg.hu_window)
    if not hi > lo:
      raise errors.ConfigError(
          f"config data.hu_window must be (lo, hi) with lo < hi, got {cfg.hu_window}.")
  elif modality == "mri":
    norm = str(cfg.mri_norm).lower()
    if norm == "percentile":
      p_lo, p_hi = (float(v) for v in cfg.mri_percentiles)
      if not 0 <= p_lo < p_hi <= 100:
        raise errors.ConfigError(
            f"config data.mri_percentiles must be 0 <= lo < hi <= 100, got {cfg.mri_percentiles}.")
      lo, hi = (float(v) for v in np.percentile(data, [p_lo, p_hi]))
    elif norm == "minmax":
      lo, hi = float(data.min()), float(data.max())
    elif norm == "zscore":
      mean, std = float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))
      lo, hi = mean - ZSCORE_CLIP * std, mean + ZSCORE_CLIP * std
    else:
      raise errors.ConfigError(
          f"config data.mri_norm must be 'percentile', 'zscore' or 'minmax', got {cfg.mri_norm!r}.")
    if not hi > lo:
      return np.zeros_like(data)
  else:
    raise errors.ConfigError(f"config data.modality must be 'ct' or 'mri', got {cfg.modality!r}.")
  out = (np.clip(data, lo, hi) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
  # Rounding in the scale can step a hair outside [0, 1]; the contract is a closed interval.
  return np.clip(out, 0.0, 1.0, out=out)


def resampled_shape(shape: Sequence[int], scale: Sequence[float]) -> tuple[int, ...]:
  """Voxels per axis on the new grid: as many as fit from voxel 0's centre to the last one's."""
  return tuple(int(np.floor((n - 1) / s + 1e-6)) + 1 for n, s in zip(shape, scale))


def resample(vol: Volume, spacing: Sequence[float], order: int = 1) -> Volume:
  """Resamples to `spacing` (x, y, z) mm exactly, keeping voxel 0's centre where it was.

  The new grid starts at the old voxel (0, 0, 0) and steps by `spacing`, so it never samples
  outside the old grid (no extrapolation) and the new affine is the old one times a diagonal
  scale. `order`: spline order (1 = trilinear for images, 0 = nearest for labels).
  """
  target = np.asarray(spacing, dtype=np.float64)
  if target.shape != (3,) or not (np.isfinite(target) & (target > 0)).all():
    raise errors.ConfigError(
        f"config data.spacing must be 3 positive mm values (x, y, z), got {spacing}.")
  scale = target / np.asarray(vol.spacing)  # Old voxels per new voxel, per axis.
  if np.allclose(scale, 1.0, rtol=1e-6, atol=0):
    return vol
  shape = resampled_shape(vol.data.shape, scale)
  data = scipy.ndimage.affine_transform(
      vol.data, scale, offset=0.0, output_shape=shape, order=order, mode="nearest",
      prefilter=order > 1)
  affine = vol.affine @ np.diag([*scale, 1.0])
  return Volume(data=data.astype(vol.data.dtype, copy=False), affine=affine, source=vol.source)


def body_box(vol: Volume, threshold: float = CT_BODY_THRESHOLD_HU) -> tuple[slice, slice, slice]:
  """Bounding box (x, y, z slices) of the largest connected region brighter than `threshold`.

  Keeping only the largest component drops the scanner table and stray noise, which would
  otherwise stretch the box to the whole field of view. Returns the full volume when nothing is
  above the threshold.
  """
  mask = vol.data > threshold
  if not mask.any():
    return tuple(slice(0, n) for n in vol.data.shape)
  labels, count = scipy.ndimage.label(mask)
  if count > 1:
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
  return scipy.ndimage.find_objects(mask.astype(np.uint8))[0]


def crop(vol: Volume, box: Sequence[slice]) -> Volume:
  """The sub-volume `vol.data[box]`, its affine shifted so world coordinates are unchanged."""
  start = np.array([s.start or 0 for s in box], dtype=np.float64)
  affine = vol.affine.copy()
  affine[:3, 3] += vol.affine[:3, :3] @ start
  return Volume(data=vol.data[tuple(box)], affine=affine, source=vol.source)


def body_crop(vol: Volume, threshold_hu: float = CT_BODY_THRESHOLD_HU) -> Volume:
  """Crops to the body's bounding box (see `body_box`); the affine is updated."""
  return crop(vol, body_box(vol, threshold_hu))


def _body_threshold(vol: Volume, cfg: Any) -> float:
  if str(cfg.modality).lower() == "ct":
    return CT_BODY_THRESHOLD_HU
  # MRI has no absolute scale: the background is the darkest intensities, so call "body" what is
  # brighter than 5% of the way from the minimum to the 99th percentile.
  lo, hi = float(vol.data.min()), float(np.percentile(vol.data, 99))
  return lo + 0.05 * (hi - lo)


def preprocess_pair(vol: Volume, labels: np.ndarray | None, cfg: Any
                    ) -> tuple[Volume, np.ndarray | None]:
  """`preprocess` for an image and its voxel-aligned label map (nearest-neighbour resampled)."""
  spacing = tuple(cfg.spacing) if cfg.spacing else ()
  if spacing:
    if labels is not None:
      labels = resample(Volume(labels, vol.affine), spacing, order=0).data
    vol = resample(vol, spacing, order=1)
  if cfg.body_crop:
    box = body_box(vol, _body_threshold(vol, cfg))
    vol = crop(vol, box)
    if labels is not None:
      labels = labels[box]
  vol = Volume(data=normalize_intensity(vol.data, cfg), affine=vol.affine, source=vol.source)
  return vol, labels


def preprocess(vol: Volume, cfg: Any) -> Volume:
  """resample (if cfg.spacing) -> body crop (if cfg.body_crop) -> intensities to [0, 1]."""
  return preprocess_pair(vol, None, cfg)[0]
