"""Geometry of the phantom generator: the voxel/millimetre grid, smooth random fields, vectors,
and soft (partial-volume) shapes: tapered tubes, lobulated ellipsoids, alpha-blended painting."""
from __future__ import annotations

import dataclasses

import numpy as np


class Grid:
  """Voxel <-> phantom millimetre coordinates (origin at the volume centre, axes x, y, z)."""

  def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray):
    self.shape = tuple(int(n) for n in shape)
    self.spacing = np.asarray(spacing, np.float64)
    self.centre = (np.asarray(self.shape, np.float64) - 1) / 2
    self._spacing, self._centre = self.spacing.tolist(), self.centre.tolist()
    # Open grids, broadcastable to the volume: x (X,1,1), y (1,Y,1), z (1,1,Z), in mm.
    self.x, self.y, self.z = (self._axis(ax, 0, n) for ax, n in enumerate(self.shape))

  def _axis(self, ax: int, start: int, stop: int) -> np.ndarray:
    """mm coordinates of voxels start..stop-1 along axis `ax`, shaped to broadcast in 3D."""
    mm = (np.arange(start, stop) - self.centre[ax]) * self.spacing[ax]
    return mm.astype(np.float32).reshape([-1 if k == ax else 1 for k in range(3)])

  def to_vox(self, p_mm) -> np.ndarray:
    return np.asarray(p_mm) / self.spacing + self.centre

  def to_mm(self, v) -> np.ndarray:
    return (np.asarray(v, np.float64) - self.centre) * self.spacing

  def index(self, p_mm) -> tuple[int, int, int] | None:
    """Nearest voxel of a point in mm, or None outside the volume (plain floats: hot loop)."""
    idx = []
    for p, s, c, n in zip(p_mm, self._spacing, self._centre, self.shape):
      i = int(round(float(p) / s + c))
      if i < 0 or i >= n:
        return None
      idx.append(i)
    return tuple(idx)

  def box(self, lo_mm, hi_mm):
    """Slices of the voxels whose centres may fall in [lo, hi] mm, and their mm open grids."""
    lo = np.maximum(np.floor(self.to_vox(lo_mm)).astype(int), 0)
    hi = np.minimum(np.ceil(self.to_vox(hi_mm)).astype(int) + 1, self.shape)
    if np.any(hi <= lo):
      return None
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    return sl, [self._axis(ax, a, b) for ax, (a, b) in enumerate(zip(lo, hi))]


def smooth_field(rng: np.random.Generator, shape, cell) -> np.ndarray:
  """Unit-variance Gaussian random field with correlation length ~`cell` voxels per axis.

  White noise on a coarse lattice, interpolated with separable Gaussian weights (three small
  matrix products): far cheaper than filtering full-size noise or `ndimage.zoom`.
  """
  coarse = tuple(int(np.ceil(n / c)) + 3 for n, c in zip(shape, cell))
  out = rng.standard_normal(coarse, dtype=np.float32)
  w = []
  for n, c, m in zip(shape, cell, coarse):
    knots = (np.arange(m) - 1.5) * c
    wa = np.exp(-0.5 * ((np.arange(n)[:, None] - knots[None, :]) / c) ** 2).astype(np.float32)
    w.append(wa / np.sqrt((wa ** 2).sum(1, keepdims=True)))
  out = out @ w[2].T  # (a, b, Z)
  out = np.matmul(w[1], out)  # (a, Y, Z)
  return (w[0] @ out.reshape(coarse[0], -1)).reshape(shape)


def unit(v) -> np.ndarray:
  v = np.asarray(v, np.float64)
  return v / max(np.linalg.norm(v), 1e-9)


def random_unit(rng) -> np.ndarray:
  return unit(rng.standard_normal(3))


def perpendicular(rng, d) -> np.ndarray:
  v = rng.standard_normal(3)
  return unit(v - np.dot(v, d) * d)


def cross(a, b) -> np.ndarray:
  """Cross product of two 3-vectors (np.cross has a large per-call cost; this is a hot loop)."""
  (a0, a1, a2), (b0, b1, b2) = a.tolist(), b.tolist()
  return np.array([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


def rotate(d, axis, angle) -> np.ndarray:
  """Rodrigues rotation of vector d about unit `axis` by `angle` radians."""
  c, s = np.cos(angle), np.sin(angle)
  return d * c + cross(axis, d) * s + axis * (float(axis @ d) * (1 - c))


def random_rotation(rng) -> np.ndarray:
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  return q * np.sign(np.diag(r))


@dataclasses.dataclass
class Segment:
  p0: np.ndarray  # mm
  p1: np.ndarray  # mm
  r0: float  # radius at p0, mm
  r1: float  # radius at p1, mm


def capsule(grid: Grid, seg: Segment, edge: float):
  """Soft occupancy in [0, 1] of a tapered tube; `edge` (mm) is the partial-volume ramp width."""
  rmax = max(seg.r0, seg.r1) + edge
  b = grid.box(np.minimum(seg.p0, seg.p1) - rmax, np.maximum(seg.p0, seg.p1) + rmax)
  if b is None:
    return None
  sl, (x, y, z) = b
  d = (seg.p1 - seg.p0).astype(np.float32)
  qx, qy, qz = x - np.float32(seg.p0[0]), y - np.float32(seg.p0[1]), z - np.float32(seg.p0[2])
  t = np.clip((qx * d[0] + qy * d[1] + qz * d[2]) / max(float(d @ d), 1e-9), 0, 1)
  dist = np.sqrt((qx - t * d[0]) ** 2 + (qy - t * d[1]) ** 2 + (qz - t * d[2]) ** 2)
  r = seg.r0 + t * (seg.r1 - seg.r0)
  return sl, np.clip(0.5 + (r - dist) / edge, 0, 1).astype(np.float32)


def tubes(grid: Grid, segs: list[Segment], edge: float, piece_mm: float = 3.0) -> np.ndarray:
  """Soft occupancy volume of the union of tapered tubes (max over tubes).

  Thick tubes are drawn one by one in their own boxes; the many thin ones are cut into pieces of
  at most `piece_mm` (a capsule chain with interpolated radii is the same tube) and drawn in one
  vectorised pass over equal-sized boxes, which keeps a tree of ~1000 segments cheap.
  """
  occ = np.zeros(grid.shape, np.float32)
  thin_r = 1.2
  thick = [s for s in segs if max(s.r0, s.r1) > thin_r]
  for seg in thick:
    out = capsule(grid, seg, edge)
    if out is not None:
      sl, a = out
      np.maximum(occ[sl], a, out=occ[sl])
  thin = [s for s in segs if max(s.r0, s.r1) <= thin_r]
  if not thin:
    return occ
  p0 = np.array([s.p0 for s in thin])
  p1 = np.array([s.p1 for s in thin])
  r = np.array([[s.r0, s.r1] for s in thin])
  n_cut = np.maximum(np.ceil(np.linalg.norm(p1 - p0, axis=1) / piece_mm), 1).astype(int)
  seg_id = np.repeat(np.arange(len(thin)), n_cut)
  k = np.arange(seg_id.size) - np.repeat(np.cumsum(n_cut) - n_cut, n_cut)
  t0, t1 = (k / n_cut[seg_id])[:, None], ((k + 1) / n_cut[seg_id])[:, None]
  a0 = p0[seg_id] + t0 * (p1 - p0)[seg_id]
  a1 = p0[seg_id] + t1 * (p1 - p0)[seg_id]
  ra = r[seg_id, 0:1] + t0 * (r[seg_id, 1:2] - r[seg_id, 0:1])
  rb = r[seg_id, 0:1] + t1 * (r[seg_id, 1:2] - r[seg_id, 0:1])
  half = piece_mm / 2 + thin_r + edge
  hv = np.ceil(half / grid.spacing).astype(int)
  offs = [np.arange(-h, h + 1) for h in hv]
  centre_vox = np.rint(grid.to_vox((a0 + a1) / 2)).astype(int)  # (n, 3)
  flat = occ.reshape(-1)
  for start in range(0, len(a0), 512):
    sl = slice(start, start + 512)
    # Voxel indices (n, bx, by, bz) per axis, and their mm coordinates relative to the piece start.
    vi = [centre_vox[sl, ax, None, None, None] + offs[ax].reshape(
        [-1 if j == ax else 1 for j in range(3)]) for ax in range(3)]
    q = [((vi[ax] - grid.centre[ax]) * grid.spacing[ax] - a0[sl, ax, None, None, None])
         .astype(np.float32) for ax in range(3)]
    d = (a1[sl] - a0[sl]).astype(np.float32)
    dd = np.maximum((d ** 2).sum(1), 1e-9)
    t = (q[0] * d[:, 0, None, None, None] + q[1] * d[:, 1, None, None, None]
         + q[2] * d[:, 2, None, None, None]) / dd[:, None, None, None]
    np.clip(t, 0, 1, out=t)
    dist = np.sqrt(sum((q[ax] - t * d[:, ax, None, None, None]) ** 2 for ax in range(3)))
    rr = (ra[sl, 0, None, None, None] + t * (rb[sl, 0] - ra[sl, 0])[:, None, None, None])
    alpha = np.clip(0.5 + (rr - dist) / edge, 0, 1).astype(np.float32)
    valid = alpha > 0
    for ax in range(3):
      valid &= (vi[ax] >= 0) & (vi[ax] < grid.shape[ax])
    idx = np.ravel_multi_index(
        tuple(np.broadcast_to(vi[ax], alpha.shape)[valid] for ax in range(3)), grid.shape)
    np.maximum.at(flat, idx, alpha[valid])
  return occ


def blob(grid: Grid, rng, centre, radii, rotation, edge: float, lobulation: float = 0.0):
  """Soft occupancy of a lobulated ellipsoid (radii in mm along the rotation's columns)."""
  radii = np.asarray(radii, np.float64)
  ext = radii.max() * (1 + 2 * lobulation) + edge  # Bumps can add up where they overlap.
  b = grid.box(centre - ext, centre + ext)
  if b is None:
    return None
  sl, (x, y, z) = b
  q = [x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])]
  # Local frame coordinates scaled by the radii: the ellipsoid is |u| < 1.
  u = [sum(q[k] * np.float32(rotation[k, a]) for k in range(3)) / np.float32(radii[a])
       for a in range(3)]
  rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + np.float32(1e-6)
  if lobulation > 0:
    # A few outward/inward bumps: radius scales by 1 + sum_k b_k max(0, cos angle to v_k)^4.
    scale = np.ones_like(rho)
    for _ in range(4):
      v = random_unit(rng)
      c = np.maximum((u[0] * v[0] + u[1] * v[1] + u[2] * v[2]) / rho, 0)
      scale += np.float32(rng.uniform(-0.5, 1.0) * lobulation) * c ** 4
    rho = rho / scale
  mean_r = float(np.exp(np.log(radii).mean()))
  return sl, np.clip(0.5 + (1 - rho) * mean_r / edge, 0, 1).astype(np.float32)


def paint(hu, sl, alpha, value):
  """Alpha-blend `value` (scalar or array of the box's shape) into hu[sl], in place."""
  box = hu[sl]
  box += alpha * (value - box)
