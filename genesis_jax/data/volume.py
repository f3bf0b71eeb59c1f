"""The in-memory types every reader and generator returns: `Volume` (a scan) and `Candidate`
(a location in a scan to classify: a nodule, a look-alike or an unknown).

Axis order is (x, y, z) in voxel index space, reoriented to the canonical RAS+ orientation
(nibabel's `as_closest_canonical`): `affine` maps (i, j, k, 1) -> (R, A, S, 1) in millimetres,
with index i growing towards +R, j towards +A and k towards +S. Intensities are raw units
(Hounsfield units for CT) as float32.
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


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A candidate location: a true nodule (label 1), a look-alike (0) or unknown (-1, to predict).

  Read from a LUNA16-style candidates CSV (`data.tasks.read_candidates_csv`) or drawn by the
  phantom generator, which also knows its voxel position, kind and size.
  """
  # The scan it lies in: a LUNA16 seriesuid, i.e. the scan file's name without suffix (see
  # readers.scan_id); "phantom:<seed>" for a phantom generated in memory.
  scan_id: str
  world_xyz_mm: tuple[float, float, float]  # RAS world mm, the frame of Volume.affine.
  label: int
  kind: str = ""  # When known: one of phantoms.NODULE_KINDS or phantoms.LOOKALIKE_KINDS.
  diameter_mm: float = 0.0  # Equivalent-sphere diameter of a nodule when known, else 0.
  # Voxel index (x, y, z) in its scan when known (phantoms), may be fractional.
  center_vox: tuple[float, float, float] | None = None
