"""Where pre-training cubes are drawn: the cube settings of `config.data`, and random crops of
one preprocessed volume (scales, the chest-CT lung filter, lung-centred sampling).

A scan's crops depend only on (seed, scan id) (`scan_rng`), never on the order scans are
processed in, so a prepared dataset is the same whatever the worker count or interruptions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage

from genesis_jax import errors
from genesis_jax.data import manifest as manifest_lib

# The original's chest-CT filter (docs/method.md) keeps a crop when under 15% of its voxels are
# >= -150 HU (i.e. mostly lung and air). It tries up to 50 crops per wanted cube before giving up
# on a scan.
LUNG_HU_THRESHOLD = -150.0
LUNG_MAX_FRACTION = 0.15
ATTEMPTS_PER_CUBE = 50

# `data.sampler`: "anywhere" draws crop origins uniformly over the volume; "lung_centred" draws
# crop centres uniformly from the voxels in LUNG_WINDOW_HU, half a crop or more from every border,
# so cubes are centred in the lung as the target tasks' candidate cubes are. It stands in for the
# original's border exclusion (docs/method.md#pre-training-recipe: origins 100 voxels from the
# in-plane borders of 512 x 512 slices and 30 slices from the ends), whose fixed margins only fit
# LUNA16-sized scans. HU below the window is air (outside the body, airways).
SAMPLERS = ("anywhere", "lung_centred")
LUNG_WINDOW_HU = (-900.0, -500.0)


class VolumeTooSmallError(errors.DataError):
  """A (preprocessed) volume smaller than the crop it should yield."""


def config_field(cfg: Any, name: str, default: Any) -> Any:
  """`cfg[name]` or `cfg.name` (a ConfigDict, a dict or any object), `default` when unset/None."""
  try:
    value = cfg[name]
  except (KeyError, AttributeError, TypeError):
    value = getattr(cfg, name, default)
  return default if value is None else value


@dataclasses.dataclass(frozen=True)
class CubeSettings:
  """The subset of `config.data` that decides what a shard contains."""
  crop: tuple[int, ...]  # (x, y, z) for cubes, (x, y) for 2D axial slices.
  scales: tuple[float, ...]  # In-plane (x, y) zoom-out factors: crop round(s * size) and resize.
  cubes_per_scan: int
  modality: str
  hu_window: tuple[float, float]
  mri_norm: str
  mri_percentiles: tuple[float, float]
  spacing: tuple[float, ...]
  body_crop: bool
  lung_filter: bool
  sampler: str = "anywhere"

  @classmethod
  def from_config(cls, data_cfg: Any) -> CubeSettings:
    crop = tuple(int(c) for c in config_field(data_cfg, "crop", ()))
    if len(crop) not in (2, 3) or min(crop) <= 0:
      raise errors.ConfigError(
          f"config.data.crop must have 2 or 3 positive entries, got {crop!r}.")
    scales = tuple(float(s) for s in config_field(data_cfg, "scales", (1.0,)))
    if not scales or min(scales) <= 0:
      raise errors.ConfigError(f"config.data.scales must be positive numbers, got {scales!r}.")
    s = cls(
        crop=crop,
        scales=scales,
        cubes_per_scan=int(config_field(data_cfg, "cubes_per_scan", 32)),
        modality=str(config_field(data_cfg, "modality", "ct")),
        hu_window=tuple(float(v) for v in config_field(data_cfg, "hu_window", (-1000.0, 1000.0))),
        mri_norm=str(config_field(data_cfg, "mri_norm", "percentile")),
        mri_percentiles=tuple(float(v) for v in config_field(data_cfg, "mri_percentiles",
                                                             (0.5, 99.5))),
        spacing=tuple(float(v) for v in config_field(data_cfg, "spacing", ())),
        body_crop=bool(config_field(data_cfg, "body_crop", False)),
        lung_filter=bool(config_field(data_cfg, "lung_filter", False)),
        sampler=str(config_field(data_cfg, "sampler", "anywhere")),
    )
    if s.cubes_per_scan <= 0:
      raise errors.ConfigError(
          f"config.data.cubes_per_scan must be positive, got {s.cubes_per_scan}.")
    if s.sampler not in SAMPLERS:
      raise errors.ConfigError(
          f"config.data.sampler must be one of {SAMPLERS}, got {s.sampler!r}.")
    if s.lung_filter:
      s.lung_threshold()  # Validates modality and window early.
    if s.sampler == "lung_centred":
      s.lung_window()
    return s

  def hu_to_unit(self, hu: float, what: str) -> float:
    """`hu` on the [0, 1] scale of the preprocessed volume (CT only, `hu` inside the window).

    The CT window maps HU linearly (after clipping) to [0, 1], so comparing the normalised data
    against mapped thresholds is the same test as comparing raw HU, and it stays valid after
    resampling and body cropping (the crop positions are those of the preprocessed volume).
    """
    lo, hi = self.hu_window
    if self.modality != "ct":
      raise errors.ConfigError(f"config.data.{what} needs modality 'ct', got {self.modality!r}.")
    if not lo <= hu <= hi:
      raise errors.ConfigError(
          f"config.data.{what} needs {hu:g} HU inside hu_window, got {self.hu_window}.")
    return (hu - lo) / (hi - lo)

  def lung_threshold(self) -> float:
    """-150 HU (the lung filter's threshold) on the [0, 1] scale of the preprocessed volume."""
    return self.hu_to_unit(LUNG_HU_THRESHOLD, "lung_filter")

  def lung_window(self) -> tuple[float, float]:
    """LUNG_WINDOW_HU on the [0, 1] scale of the preprocessed volume."""
    return tuple(self.hu_to_unit(h, "sampler='lung_centred'") for h in LUNG_WINDOW_HU)

  def fingerprint(self) -> str:
    """Short hash of the settings and the shard format: a shard made with others is stale."""
    fields = dataclasses.asdict(self)
    if fields["sampler"] == "anywhere":  # The default leaves shards prepared before it valid.
      del fields["sampler"]
    blob = json.dumps({"format": manifest_lib.FORMAT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scan_rng(seed: int, scan_id: str) -> np.random.Generator:
  """The only randomness of a scan's extraction: a function of (seed, scan id), never of order."""
  digest = int.from_bytes(hashlib.sha256(scan_id.encode()).digest()[:8], "little")
  return np.random.default_rng(np.random.SeedSequence([int(seed), digest]))


def window_size(crop: Sequence[int], scale: float) -> tuple[int, int, int]:
  """Voxel extent (x, y, z) read from the volume for one output crop at `scale` (in-plane only,
  as in the original, whose multi-resolution crops zoom rows and columns but keep the depth)."""
  x, y = (max(1, int(round(c * scale))) for c in crop[:2])
  z = crop[2] if len(crop) == 3 else 1
  return x, y, z


def lung_centres(data: np.ndarray, size: Sequence[int], window: tuple[float, float]
                 ) -> np.ndarray:
  """Flat indices of the voxels of `data` in `window` (lung) around which a `size` crop fits.

  A crop centred on voxel c spans [c - size // 2, c - size // 2 + size), so c lies at least
  size // 2 from the low border and size - size // 2 from the high one.
  """
  lung = (data >= window[0]) & (data <= window[1])
  inside = np.zeros_like(lung)
  inside[tuple(slice(s // 2, d - s + s // 2 + 1) for d, s in zip(data.shape, size))] = True
  return np.flatnonzero(lung & inside)


def extract_cubes(data: np.ndarray, settings: CubeSettings, rng: np.random.Generator,
                  source: str = "") -> np.ndarray:
  """Random crops of one preprocessed volume (x, y, z) in [0, 1] -> float32 (N, *crop).

  Cube k uses scale `scales[k % len(scales)]`; with the lung filter, rejected crops are redrawn, up
  to ATTEMPTS_PER_CUBE * cubes_per_scan tries, so N may be below cubes_per_scan (even 0). With
  sampler "lung_centred" a crop's centre is a random voxel of `lung_centres`; a volume without one
  yields no cubes.
  """
  crop = settings.crop
  sizes = [window_size(crop, s) for s in settings.scales]
  need = tuple(max(sz[a] for sz in sizes) for a in range(3))
  if any(d < n for d, n in zip(data.shape, need)):
    raise VolumeTooSmallError(
        f"{source or 'volume'}: shape {tuple(data.shape)} (x, y, z) after preprocessing is smaller "
        f"than the crop window {need} (crop {crop}, scales {settings.scales}).")
  threshold = settings.lung_threshold() if settings.lung_filter else None
  centres = ({size: lung_centres(data, size, settings.lung_window()) for size in set(sizes)}
             if settings.sampler == "lung_centred" else None)
  cubes = []
  for _ in range(ATTEMPTS_PER_CUBE * settings.cubes_per_scan):
    if len(cubes) == settings.cubes_per_scan:
      break
    size = sizes[len(cubes) % len(sizes)]
    if centres is None:
      origin = [int(rng.integers(0, d - s + 1)) for d, s in zip(data.shape, size)]
    elif not centres[size].size:
      break  # No lung voxel that a whole crop fits around: the scan yields no cubes.
    else:
      flat = int(centres[size][rng.integers(0, centres[size].size)])
      origin = [int(c) - s // 2 for c, s in zip(np.unravel_index(flat, data.shape), size)]
    window = data[tuple(slice(o, o + s) for o, s in zip(origin, size))]
    if threshold is not None and np.mean(window >= threshold) >= LUNG_MAX_FRACTION:
      continue
    window = window if len(crop) == 3 else window[..., 0]
    if window.shape != crop:
      factors = [c / w for c, w in zip(crop, window.shape)]
      window = np.clip(scipy.ndimage.zoom(window, factors, order=1), 0.0, 1.0)
      assert window.shape == crop, (window.shape, crop)
    cubes.append(np.asarray(window, np.float32))
  if not cubes:
    return np.zeros((0, *crop), np.float32)
  return np.stack(cubes)

