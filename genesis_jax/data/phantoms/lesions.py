"""Phantom lesions: nodules (solid, ground-glass, part-solid; isolated, juxta-vascular,
juxta-pleural) and the look-alikes a nodule detector confuses with them (vessel bifurcations,
crossings and segments, scars, pleural bumps)."""
from __future__ import annotations

import numpy as np

from genesis_jax.data.phantoms.anatomy import TISSUE
from genesis_jax.data.phantoms.geometry import (Grid, Segment, blob, capsule, cross, paint,
                                                perpendicular, random_rotation, random_unit, unit)

NODULE_KINDS = ("nodule_solid", "nodule_ground_glass", "nodule_part_solid")
LOOKALIKE_KINDS = ("vessel_bifurcation", "vessel_crossing", "vessel_end_on", "vessel", "scar",
                   "pleural_bump")


def _march_to_pleura(rng, grid: Grid, lung, start, max_mm=80.0):
  """The lung boundary point reached from `start` along a random direction, and the direction."""
  d = random_unit(rng)
  step = 0.5 * float(grid.spacing.min())
  p = np.asarray(start, np.float64)
  for _ in range(int(max_mm / step)):
    q = p + d * step
    idx = grid.index(q)
    if idx is None or not lung[idx]:
      return p, d
    p = q
  return None


def _sphere_in_lung(grid: Grid, lung, c, r, fraction=1.0) -> bool:
  """Whether the centre and (at least `fraction` of) 26 points on the sphere lie in the lung."""
  offs = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                   if (i, j, k) != (0, 0, 0)], np.float64)
  offs = offs / np.linalg.norm(offs, axis=1, keepdims=True) * r
  c_idx = grid.index(c)
  if c_idx is None or not lung[c_idx]:
    return False
  hits = [(idx := grid.index(c + o)) is not None and lung[idx] for o in offs]
  return np.mean(hits) >= fraction


class Occupancy:
  """Spheres already claimed by lesions, so lesions and look-alikes do not overlap."""

  def __init__(self):
    self.items: list[tuple[np.ndarray, float]] = []

  def free(self, c, r, margin) -> bool:
    return all(np.linalg.norm(c - c2) > r + r2 + margin for c2, r2 in self.items)

  def add(self, c, r):
    self.items.append((np.asarray(c, np.float64), float(r)))


def place_nodules(rng, grid, hu, tissue, lung, lung_idx, segs, edge, claimed, count=None):
  """Draw nodules into hu; returns (mask, [(centre_mm, diameter_mm, kind)]).

  `count` overrides the drawn number of nodules (1-4); the draw happens either way.
  """
  mask = np.zeros(grid.shape, np.uint8)
  nodules = []
  n = int(rng.integers(1, 5))
  n = n if count is None else int(count)
  # Widest lung's extent along x: nodules are capped to fit comfortably inside one lung.
  lung_width = float(np.sum(lung.any(axis=(1, 2)))) * grid.spacing[0] / 2
  vessel_segs = [s for s in segs if s.r0 >= 0.8]
  for _ in range(n + 6):  # Spare rounds, so a nodule that cannot be placed is replaced.
    if len(nodules) == n:
      break
    # Diameter log-uniform on 3-25 mm (small nodules dominate, as in screening), capped to fit.
    diam = float(np.exp(rng.uniform(np.log(3.0), np.log(25.0))))
    diam = min(diam, 0.6 * lung_width)
    kind = NODULE_KINDS[rng.choice(3, p=[0.6, 0.22, 0.18])]
    where = rng.choice(["isolated", "juxta_vascular", "juxta_pleural"], p=[0.5, 0.25, 0.25])
    centre = None
    for attempt in range(60):
      if attempt and attempt % 15 == 0:  # Hard to fit: try smaller (the first one must fit).
        diam = max(3.0, diam * 0.7)
      r = diam / 2
      if where == "juxta_vascular" and vessel_segs:
        s = vessel_segs[rng.integers(len(vessel_segs))]
        t = rng.uniform(0.2, 0.8)
        on = s.p0 + t * (s.p1 - s.p0)
        c = on + perpendicular(rng, unit(s.p1 - s.p0)) * r * rng.uniform(0.6, 1.0)
        ok = _sphere_in_lung(grid, lung, c, r, 0.9)
      elif where == "juxta_pleural":
        start = grid.to_mm(np.unravel_index(lung_idx[rng.integers(len(lung_idx))], grid.shape))
        hit = _march_to_pleura(rng, grid, lung, start)
        if hit is None:
          continue
        c = hit[0] - hit[1] * r * rng.uniform(0.45, 0.8)
        ok = _sphere_in_lung(grid, lung, c, r * 0.5, 0.9)
      else:
        c = grid.to_mm(np.unravel_index(lung_idx[rng.integers(len(lung_idx))], grid.shape))
        ok = _sphere_in_lung(grid, lung, c, r + 1.5)
      if ok and claimed.free(c, r, 4.0):
        centre = c
        break
    if centre is None:
      continue
    radii = r * rng.uniform(0.8, 1.2, 3)
    radii *= r / np.exp(np.log(radii).mean())  # Keep the equivalent radius at r.
    rot = random_rotation(rng)
    out = blob(grid, rng, centre, radii, rot, edge, lobulation=rng.uniform(0.0, 0.35))
    if out is None:
      continue
    sl, alpha = out
    alpha *= lung[sl]  # The pleura bounds a juxta-pleural nodule; the chest wall is not nodule.
    inside = alpha > 0.5
    if not inside.any():
      continue
    noise = rng.standard_normal(alpha.shape).astype(np.float32)
    if kind == "nodule_solid":
      value = np.float32(rng.uniform(0, 100)) + 15 * noise
    else:
      value = np.float32(rng.uniform(-600, -300)) + 35 * noise
    paint(hu, sl, alpha, value)
    if kind == "nodule_part_solid":
      core = blob(grid, rng, centre, radii * rng.uniform(0.35, 0.6), rot, edge)
      if core is not None:
        csl, calpha = core
        paint(hu, csl, calpha * lung[csl], np.float32(rng.uniform(0, 80)))
    if kind == "nodule_solid" and rng.uniform() < 0.4:  # Spiculation: thin strands outwards.
      for _ in range(int(rng.integers(3, 8))):
        d = random_unit(rng)
        spike = Segment(centre + d * r * 0.7, centre + d * r * rng.uniform(1.4, 2.0),
                         rng.uniform(0.5, 0.9), 0.25)
        sp = capsule(grid, spike, edge)
        if sp is not None:
          ssl, sa = sp
          paint(hu, ssl, sa * lung[ssl], np.float32(20))
    mask[sl][inside] = 1
    tissue[sl][inside] = TISSUE["nodule"]
    claimed.add(centre, r)
    # Report the drawn size (lobulation and the pleura change it): equivalent-sphere diameter.
    volume_mm3 = float(inside.sum()) * float(np.prod(grid.spacing))
    nodules.append((centre, (6 * volume_mm3 / np.pi) ** (1 / 3), kind))
  return mask, nodules


def place_lookalikes(rng, grid, hu, tissue, lung, lung_idx, segs, branch_points, edge, claimed):
  """Look-alike structures and candidate points on existing vessels: [(centre_mm, kind)]."""
  out = []
  margin = 6.0

  def take(c, kind, r=2.0):
    # In the lung (vessels are drawn only there), not in a bronchus or its wall.
    idx = grid.index(c)
    if (idx is not None and lung[idx] and tissue[idx] in (TISSUE["lung"], TISSUE["lookalike"])
        and claimed.free(c, r, margin)):
      claimed.add(c, r)
      out.append((np.asarray(c, np.float64), kind))
      return True
    return False

  # Vessel crossings: a second vessel passing just by an existing one (extra segment).
  extra = []
  visible = [s for s in segs if s.r0 >= 0.9]
  for _ in range(int(rng.integers(2, 4))):
    for _ in range(10):
      if not visible:
        break
      s = visible[rng.integers(len(visible))]
      d1 = unit(s.p1 - s.p0)
      p = s.p0 + rng.uniform(0.3, 0.7) * (s.p1 - s.p0)
      r1 = 0.5 * (s.r0 + s.r1)
      d2 = perpendicular(rng, d1)
      d2 = unit(d2 + d1 * rng.uniform(-0.5, 0.5))
      r2 = r1 * rng.uniform(0.6, 1.0)
      off = unit(cross(d1, d2)) * (r1 + r2) * rng.uniform(0.2, 0.9)
      half_len = rng.uniform(6, 14)
      q0, q1 = p + off - d2 * half_len, p + off + d2 * half_len
      idx0, idx1 = grid.index(q0), grid.index(q1)
      if idx0 is None or idx1 is None or not (lung[idx0] and lung[idx1]):
        continue
      if take(p + off / 2, "vessel_crossing", r1 + r2):
        extra.append(Segment(q0, q1, r2 * 1.05, r2 * 0.95))
        break
  # Bifurcations of visible vessels.
  forks = [b for b in branch_points if b[1] >= 0.8]
  for i in rng.permutation(len(forks))[:int(rng.integers(3, 6))]:
    take(forks[i][0], "vessel_bifurcation", forks[i][1] * 2)
  # Vessel segments; those running along z look like round blobs on axial slices.
  for i in rng.permutation(len(visible))[:int(rng.integers(3, 6))]:
    s = visible[i]
    d = unit(s.p1 - s.p0)
    take(s.p0 + rng.uniform(0.3, 0.7) * (s.p1 - s.p0),
         "vessel_end_on" if abs(d[2]) > 0.7 else "vessel", s.r0 * 2)
  # Scars: flat, elongated, irregular soft-tissue densities.
  for _ in range(int(rng.integers(1, 3))):
    for _ in range(20):
      c = grid.to_mm(np.unravel_index(lung_idx[rng.integers(len(lung_idx))], grid.shape))
      radii = np.array([rng.uniform(5, 12), rng.uniform(1.5, 3.5), rng.uniform(0.6, 1.4)])
      if _sphere_in_lung(grid, lung, c, 3.0) and take(c, "scar", radii[0]):
        b = blob(grid, rng, c, radii, random_rotation(rng), edge, lobulation=0.5)
        if b is not None:
          sl, a = b
          a *= lung[sl] * np.float32(rng.uniform(0.6, 1.0))
          paint(hu, sl, a, np.float32(rng.uniform(-250, 30)))
          tissue[sl][a > 0.5] = TISSUE["lookalike"]
        break
  # Pleural bumps: lens-shaped thickenings straddling the lung boundary.
  for _ in range(int(rng.integers(1, 4))):
    for _ in range(20):
      start = grid.to_mm(np.unravel_index(lung_idx[rng.integers(len(lung_idx))], grid.shape))
      hit = _march_to_pleura(rng, grid, lung, start)
      if hit is None:
        continue
      b_pt, normal = hit
      thick = rng.uniform(1.5, 3.5)
      radii = np.array([thick, rng.uniform(3, 8), rng.uniform(3, 8)])
      e1 = perpendicular(rng, normal)
      rot = np.stack([normal, e1, cross(normal, e1)], axis=1)  # Columns: the blob's axes.
      if take(b_pt - normal * thick / 2, "pleural_bump", radii.max()):
        bl = blob(grid, rng, b_pt, radii, rot, edge, lobulation=0.2)
        if bl is not None:
          sl, a = bl
          a *= lung[sl]
          paint(hu, sl, a, np.float32(rng.uniform(10, 70)))
          tissue[sl][a > 0.5] = TISSUE["lookalike"]
        break
  return out, extra
