"""Cube helpers shared by the target tasks: crop sizes, stacking, centred extraction.

Cubes are channels-last: images (N, x, y, z, 1); a 2-entry crop (x, y) gives 2D slices
(N, x, y, 1) taken at the same centres.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from genesis_jax import errors


def as_3d_crop(crop: Sequence[int]) -> tuple[tuple[int, int, int], bool]:
  """(x, y, z) crop and whether it stands for 2D slices: (x, y) -> ((x, y, 1), True)."""
  crop = tuple(int(c) for c in crop)
  if len(crop) == 2:
    return (crop[0], crop[1], 1), True
  if len(crop) != 3 or min(crop) < 1:
    raise errors.ConfigError(
        f"config.data.crop must be (x, y, z) or (x, y) positive sizes, got {crop}.")
  return crop, False


def stack_cubes(cubes: list[np.ndarray], dtype, is_2d: bool) -> np.ndarray:
  """(x, y, z) cubes -> (N, *crop, 1) of `dtype`; 2D crops drop the unit z axis."""
  if not cubes:
    return np.zeros((0,), dtype)
  out = np.stack(cubes).astype(dtype, copy=False)
  if is_2d:
    out = out[..., 0]
  return out[..., None]


def extract_cube(data: np.ndarray, center: Sequence[int], size: Sequence[int],
                 pad_value: float = 0.0) -> np.ndarray:
  """`size` voxels around integer `center` (centre at index size // 2), padded off the edges."""
  center, size = np.asarray(center, int), np.asarray(size, int)
  start = center - size // 2
  lo = np.maximum(start, 0)
  hi = np.minimum(start + size, data.shape)
  out = np.full(tuple(size), pad_value, dtype=data.dtype)
  if (hi > lo).all():
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    out[dst] = data[tuple(slice(a, b) for a, b in zip(lo, hi))]
  return out
