"""The one in-memory volume type every reader and generator returns.

Axis order is (x, y, z) in voxel index space, reoriented to the canonical RAS+ orientation
(nibabel's `as_closest_canonical`): `affine` maps (i, j, k, 1) -> (R, A, S, 1) in millimetres,
with index i growing towards +R, j towards +A and k towards +S. Intensities are raw units (Hounsfield units for CT) as float32.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Volume:
  data: np.ndarray  # float32, (x, y, z), raw intensity units (HU for CT).
  affine: np.ndarray  # (4, 4) float64, voxel index -> world millimetres (RAS+).
  source: str = ""  # Where it came from (a path or "phantom:<seed>"), for error messages.

  @property
  def spacing(self) -> tuple[float, ...]:
    """Voxel size in millimetres along (x, y, z)."""
    return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.data.shape)
