"""One phantom subject: anatomy, vessels, lesions and look-alikes, then scanner blur and noise.

Subject i of the data set drawn with seed s is `make_phantom(subject_seed(s, i), shape)`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage
import threadpoolctl

from genesis_jax import errors
from genesis_jax.data.phantoms.anatomy import TISSUE, draw_airways, draw_anatomy, grow_vessels
from genesis_jax.data.phantoms.geometry import Grid, tubes
from genesis_jax.data.phantoms.lesions import Occupancy, place_lookalikes, place_nodules
from genesis_jax.data.volume import Candidate, Volume


@dataclasses.dataclass
class Phantom:
  volume: Volume  # HU, float32 (x, y, z); affine carries this subject's spacing.
  nodule_mask: np.ndarray  # uint8 (x, y, z), 1 inside nodules.
  # True nodules (label 1) and look-alikes (0), with their kind, size and voxel position.
  candidates: list[Candidate]
  # uint8 (x, y, z), TISSUE codes of what each voxel was drawn as. The lung region is the codes
  # lung, vessel, nodule and lookalike together (for lung masks and cube filters).
  tissue: np.ndarray | None = None


def make_phantom(seed: int, shape=(128, 128, 96), n_nodules: int | None = None) -> Phantom:
  """One phantom subject, fully determined by `seed`; `shape` is (x, y, z) voxels.

  `n_nodules` replaces the drawn nodule count (0 = a nodule-free subject; None = as drawn)."""
  # One BLAS thread: the smooth fields are small matrix products, and a multi-threaded BLAS on
  # busy cores (data-loader workers, a training step) is many times slower than one thread.
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    return _make_phantom(seed, shape, n_nodules)


def _make_phantom(seed: int, shape, n_nodules: int | None = None) -> Phantom:
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3 or min(shape) < 32:
    raise errors.ConfigError(f"Phantom shape must be 3 sizes >= 32 (x, y, z), got {shape}; set "
                             "config.data.phantom_shape.")
  rng = np.random.default_rng(seed)
  spacing = np.array([rng.uniform(0.7, 1.0), 0.0, rng.uniform(1.0, 2.5)])
  spacing[1] = spacing[0]
  grid = Grid(shape, spacing)
  edge = float(spacing[:2].mean())  # Partial-volume ramp of drawn edges, mm.

  hu, tissue, lung, lungs, info = draw_anatomy(rng, grid)
  hila = draw_airways(rng, grid, hu, tissue, lungs, info, edge)
  lung_idx = np.flatnonzero(lung)
  if lung_idx.size == 0:
    raise errors.ConfigError(f"Phantom seed {seed}, shape {shape}: no lung voxels were drawn; use "
                             "a larger config.data.phantom_shape.")

  # About one vessel segment per 80 mm^3 of lung, shared by 9 trees a lung.
  lung_mm3 = lung_idx.size * float(np.prod(spacing))
  budget = int(np.clip(lung_mm3 / 80 / 18, 3, 100))
  segs, branch_points = [], []
  for lg, hilum in zip(lungs, hila):
    # Trunks leave the hilum region towards random points of the same lung.
    side_idx = lung_idx[(lung_idx // (shape[1] * shape[2]) - grid.centre[0]) * lg["side"] > 0]
    height = lg["z"][1] - lg["z"][0]
    for _ in range(9):
      root = hilum + np.array([lg["side"] * rng.uniform(2, 6), rng.uniform(-4, 4),
                               rng.uniform(-0.25, 0.2) * height])
      target = grid.to_mm(np.unravel_index(side_idx[rng.integers(len(side_idx))], shape))
      idx = grid.index(root)
      if idx is None or not lung[idx]:
        root = hilum + 0.3 * (target - hilum)
      trunk_r = rng.uniform(1.5, 2.5) * info["scale"]
      s, b = grow_vessels(rng, grid, lung, root, target - root, trunk_r, budget=budget)
      segs += s
      branch_points += b

  claimed = Occupancy()
  mask, nodules = place_nodules(rng, grid, hu, tissue, lung, lung_idx, segs, edge, claimed,
                                n_nodules)
  fakes, extra = place_lookalikes(rng, grid, hu, tissue, lung, lung_idx, segs, branch_points, edge,
                             claimed)
  # Vessels last, from their own occupancy: nodules stay whole (a juxta-vascular nodule swallows
  # the vessel it touches) and scars and pleural bumps are only half covered.
  vessel = tubes(grid, segs + extra, edge)
  vessel *= lung
  vessel[mask.astype(bool)] = 0
  vessel[tissue == TISSUE["lookalike"]] *= 0.5
  hu += vessel * (np.float32(rng.uniform(30, 50)) - hu)
  tissue[(vessel > 0.5) & (tissue == TISSUE["lung"])] = TISSUE["vessel"]

  # Scanner: slight blur (in voxels; thinner in z where slices are thick) then Gaussian noise
  # whose standard deviation after the same blur is `sigma_hu`.
  blur_xy, blur_z = rng.uniform(0.5, 0.8), rng.uniform(0.3, 0.5)
  blur = (blur_xy, blur_xy, blur_z)
  sigma_hu = rng.uniform(10, 30)
  noise = rng.standard_normal(shape, dtype=np.float32)
  gain = np.prod([np.sqrt(np.sum(_gauss_kernel(s) ** 2)) for s in blur])
  hu += noise * np.float32(sigma_hu / gain)
  hu = ndimage.gaussian_filter(hu, blur, truncate=3.0)
  np.clip(hu, -1024, 3071, out=hu)

  affine = np.diag([*spacing, 1.0])
  affine[:3, 3] = -grid.centre * spacing + rng.uniform(-20, 20, 3)
  source = f"phantom:{seed}"

  def candidate(centre_mm, label, kind, diameter_mm=0.0) -> Candidate:
    vox = tuple(float(v) for v in grid.to_vox(centre_mm))
    world = tuple(float(w) for w in (affine @ np.array([*vox, 1.0]))[:3])
    return Candidate(source, world, label, kind, diameter_mm, center_vox=vox)

  candidates = [candidate(c, 1, kind, float(d)) for c, d, kind in nodules]
  candidates += [candidate(c, 0, kind) for c, kind in fakes]
  candidates = [candidates[i] for i in rng.permutation(len(candidates))]
  return Phantom(Volume(hu, affine, source), mask, candidates, tissue)


def _gauss_kernel(sigma: float) -> np.ndarray:
  """The 1D kernel scipy's gaussian_filter uses with truncate=3 (sigma 0 = identity)."""
  if sigma <= 0:
    return np.ones(1)
  r = int(3.0 * sigma + 0.5)
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  return k / k.sum()


def subject_seed(seed: int, index: int) -> int:
  """Seed of subject `index` in the data set drawn with `seed` (independent streams per subject)."""
  return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def subject_name(index: int) -> str:
  return f"phantom_{index:03d}"
