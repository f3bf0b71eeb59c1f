"""Chest-radiograph findings drawn into a copy of a phantom's CT before it is projected (DRRs only).

The 3D phantoms' lesions are nodules of 3-25 mm: faint in projection (a 12 mm solid nodule adds
about 0.2 to a line integral spanning 0-3) and anywhere in the lung. The findings a chest
radiograph shows best are larger opacities, and ChestX-ray8 labels them. `add_findings` draws
each of RADIOGRAPH_FINDINGS into a subject's CT with probability `prevalence` (independently),
each replacing lung voxels only (tissue codes lung, vessel, look-alike: never a nodule, an airway,
bone or anything outside the lungs) and each from the lung voxels the previous ones left:

- Mass: a lobulated solid opacity (30-70 HU) of at least MASS_MM equivalent diameter, centred at
  least 10 mm inside a lung and mostly inside it (clipped to it).
- Cardiomegaly: an enlarged heart, a soft-tissue ellipsoid (40 HU) left of the midline in the
  lower chest, whose transverse width is 0.55-0.7 of the lungs' outer width (a cardiothoracic
  ratio above 0.5, the radiographic definition), filling the lung around the heart.
- Effusion: fluid (0-20 HU) at the base of one lung up to a level 25-50% of the lung's height
  above its lowest point, climbing towards the chest wall (the meniscus), as on an erect film.
- Consolidation: an airspace opacity (-100 to 20 HU, filled 50-100% by a smooth texture) in the
  part of one lung's upper or lower lobe (split by an oblique fissure) within 30-50 mm of a
  point of that lobe, as in lobar pneumonia.

Findings are read from what was drawn (the voxels each lesion replaced), never from pixels; the 3D
phantom itself (`make_phantom`, the NCC/NCS tasks' volumes) is not changed: the findings go into a
copy, drawn with a random generator of their own. A finding that does not fit (a lung too small
for a mass) is not drawn and not labelled.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from genesis_jax.data.phantoms.anatomy import TISSUE
from genesis_jax.data.phantoms.geometry import Grid, blob, paint, random_rotation, smooth_field
from genesis_jax.data.phantoms.subject import Phantom

RADIOGRAPH_FINDINGS = ("Mass", "Cardiomegaly", "Effusion", "Consolidation")
PREVALENCE = 0.5
MASS_MM = 30.0  # ChestX-ray8's mass: a lesion larger than 3 cm.
PAINTABLE = (TISSUE["lung"], TISSUE["vessel"], TISSUE["lookalike"])


@dataclasses.dataclass
class Lesion:
  """One drawn finding: its name, the patient side (+1 right, -1 left) and the voxels it
  replaced (bool (x, y, z), alpha > 0.5), with its size where it has one."""
  name: str
  side: int
  mask: np.ndarray
  size_mm: float = 0.0


def _lung_sides(grid: Grid, paintable: np.ndarray) -> dict[int, np.ndarray]:
  """{+1: right-lung voxels, -1: left} of the paintable mask (patient right = +x)."""
  right = (grid.x > 0)
  return {1: paintable & right, -1: paintable & ~right}


def _draw(hu, tissue, sl, alpha, value, allowed, code=TISSUE["soft_tissue"]) -> np.ndarray:
  """Paint `value` with `alpha` restricted to `allowed[sl]`; returns the full bool mask painted."""
  alpha = alpha * allowed[sl]
  paint(hu, sl, alpha, value)
  inside = alpha > 0.5
  tissue[sl][inside] = code
  full = np.zeros(hu.shape, bool)
  full[sl] = inside
  return full


def _cardiomegaly(rng, grid, hu, tissue, paintable) -> Lesion | None:
  lung = paintable
  xs = np.flatnonzero(lung.any(axis=(1, 2)))
  zs = np.flatnonzero(lung.any(axis=(0, 1)))
  ys = np.flatnonzero(lung.any(axis=(0, 2)))
  if xs.size < 8 or zs.size < 8:
    return None
  x_lo, x_hi = (xs[[0, -1]] - grid.centre[0]) * grid.spacing[0]
  z_lo, z_hi = (zs[[0, -1]] - grid.centre[2]) * grid.spacing[2]
  y_lo, y_hi = (ys[[0, -1]] - grid.centre[1]) * grid.spacing[1]
  width = float(x_hi - x_lo)
  ratio = rng.uniform(0.55, 0.7)
  radii = np.array([ratio * width / 2, rng.uniform(0.35, 0.45) * (y_hi - y_lo),
                    rng.uniform(0.28, 0.36) * (z_hi - z_lo)])
  centre = np.array([(x_lo + x_hi) / 2 - rng.uniform(0.05, 0.12) * width,
                     (y_lo + y_hi) / 2 + rng.uniform(0.05, 0.15) * (y_hi - y_lo),
                     z_lo + rng.uniform(0.22, 0.30) * (z_hi - z_lo)])
  out = blob(grid, rng, centre, radii, np.eye(3), float(grid.spacing[:2].mean()))
  if out is None:
    return None
  sl, alpha = out
  value = np.float32(40) + 8 * rng.standard_normal(alpha.shape).astype(np.float32)
  mask = _draw(hu, tissue, sl, alpha, value, paintable)
  return Lesion("Cardiomegaly", 0, mask, 2 * radii[0]) if mask.any() else None


def _effusion(rng, grid, hu, tissue, paintable) -> Lesion | None:
  side = int(rng.choice([1, -1]))
  lung = _lung_sides(grid, paintable)[side]
  zs = np.flatnonzero(lung.any(axis=(0, 1)))
  xs = np.flatnonzero(lung.any(axis=(1, 2)))
  if zs.size < 8:
    return None
  z0 = (zs[0] - grid.centre[2]) * grid.spacing[2]
  height = (zs[-1] - zs[0]) * grid.spacing[2]
  x_med = (xs[[0, -1]] - grid.centre[0]) * grid.spacing[0]
  lateral = np.clip((side * grid.x - np.abs(x_med).min()) / max(np.ptp(x_med), 1e-3), 0, 1)
  level = z0 + rng.uniform(0.25, 0.5) * height * (1 + rng.uniform(0.2, 0.5) * lateral ** 2)
  edge = float(grid.spacing[2])
  alpha = np.clip(0.5 + (level - grid.z) / edge, 0, 1).astype(np.float32)
  alpha = np.broadcast_to(alpha, grid.shape)
  sl = (slice(None),) * 3
  value = np.float32(rng.uniform(0, 20)) + 6 * rng.standard_normal(grid.shape, np.float32)
  mask = _draw(hu, tissue, sl, alpha, value, lung)
  return Lesion("Effusion", side, mask) if mask.any() else None


def _mass(rng, grid, hu, tissue, paintable) -> Lesion | None:
  sides = _lung_sides(grid, paintable)
  voxel_mm3 = float(np.prod(grid.spacing))
  # Centres at least 10 mm inside the lung, where a mass has room.
  deep = ndimage.distance_transform_edt(paintable, sampling=grid.spacing) >= 10.0
  for _ in range(30):
    side = int(rng.choice([1, -1]))
    idx = np.flatnonzero(sides[side] & deep)
    if idx.size == 0:
      continue
    centre = grid.to_mm(np.unravel_index(idx[rng.integers(idx.size)], grid.shape))
    diam = rng.uniform(34, 46)
    radii = diam / 2 * rng.uniform(0.85, 1.15, 3)
    radii[2] *= rng.uniform(1.0, 1.3)  # Lungs are tall: room along z.
    out = blob(grid, rng, centre, radii, random_rotation(rng), float(grid.spacing[:2].mean()),
               lobulation=rng.uniform(0.05, 0.3))
    if out is None:
      continue
    sl, alpha = out
    kept = float((alpha * sides[side][sl] > 0.5).sum()) * voxel_mm3
    whole = float((alpha > 0.5).sum()) * voxel_mm3
    if (6 * kept / np.pi) ** (1 / 3) < MASS_MM or kept < 0.6 * whole:
      continue
    value = np.float32(rng.uniform(30, 70)) + 12 * rng.standard_normal(alpha.shape, np.float32)
    mask = _draw(hu, tissue, sl, alpha, value, sides[side])
    return Lesion("Mass", side, mask, (6 * mask.sum() * voxel_mm3 / np.pi) ** (1 / 3))
  return None


def _consolidation(rng, grid, hu, tissue, paintable) -> Lesion | None:
  side = int(rng.choice([1, -1]))
  lung = _lung_sides(grid, paintable)[side]
  zs = np.flatnonzero(lung.any(axis=(0, 1)))
  ys = np.flatnonzero(lung.any(axis=(0, 2)))
  if zs.size < 8 or ys.size < 4:
    return None
  z_lo, z_hi = (zs[[0, -1]] - grid.centre[2]) * grid.spacing[2]
  y_lo, y_hi = (ys[[0, -1]] - grid.centre[1]) * grid.spacing[1]
  # The oblique fissure: from high at the back to low at the front; lobe: upper or lower.
  t = (grid.y - y_lo) / max(y_hi - y_lo, 1e-3)  # 0 posterior .. 1 anterior.
  fissure = z_lo + (z_hi - z_lo) * (rng.uniform(0.55, 0.7) - rng.uniform(0.3, 0.45) * t)
  upper = bool(rng.uniform() < 0.5)
  lobe = lung & ((grid.z > fissure) if upper else (grid.z <= fissure))
  idx = np.flatnonzero(lobe)
  if idx.size == 0:
    return None
  # The part of the lobe within 30-50 mm of a point in it, filled partly (air bronchograms,
  # spared alveoli) by a smooth texture.
  centre = grid.to_mm(np.unravel_index(idx[rng.integers(idx.size)], grid.shape))
  radius = rng.uniform(30, 50)
  patch = blob(grid, rng, centre, np.full(3, radius), np.eye(3), 3 * float(grid.spacing.max()))
  if patch is None:
    return None
  sl, alpha = patch
  cells = tuple(max(1.0, 6.0 / s) for s in grid.spacing)
  texture = smooth_field(rng, alpha.shape, cells)
  alpha = alpha * np.clip(0.8 + 0.2 * texture, 0.5, 1.0).astype(np.float32)
  value = np.float32(rng.uniform(-100, 20)) + 20 * texture
  mask = _draw(hu, tissue, sl, alpha, value, lobe)
  return Lesion("Consolidation", side, mask, 2 * radius) if mask.any() else None


DRAW = {"Cardiomegaly": _cardiomegaly, "Effusion": _effusion, "Mass": _mass,
        "Consolidation": _consolidation}


def add_findings(phantom: Phantom, rng: np.random.Generator,
                 prevalence: float = PREVALENCE) -> tuple[Phantom, list[Lesion]]:
  """A copy of `phantom` with RADIOGRAPH_FINDINGS drawn into its CT (each with probability
  `prevalence`, in that order) and the lesions drawn; `phantom` itself is left as it is.

  The copy keeps the nodule mask and candidates; its tissue map marks each lesion's voxels as
  soft tissue. prevalence 0 returns `phantom` unchanged (no copy) and no lesions."""
  if prevalence <= 0 or phantom.tissue is None:
    return phantom, []
  vol = phantom.volume
  grid = Grid(vol.data.shape, np.asarray(vol.spacing, np.float64))
  hu = np.array(vol.data, np.float32, copy=True)
  tissue = np.array(phantom.tissue, copy=True)
  lesions = []
  for name in RADIOGRAPH_FINDINGS:
    if rng.uniform() >= prevalence:
      continue
    paintable = np.isin(tissue, PAINTABLE)
    lesion = DRAW[name](rng, grid, hu, tissue, paintable)
    if lesion is not None:
      lesions.append(lesion)
  np.clip(hu, -1024, 3071, out=hu)
  out = dataclasses.replace(phantom, volume=dataclasses.replace(vol, data=hu), tissue=tissue)
  return out, lesions
