"""Procedural chest-CT phantoms: the built-in data set that needs no download.

Each subject is a miniature chest CT drawn from one integer seed (`np.random.default_rng(seed)`):
body ellipse with subcutaneous fat and muscle, ribs, spine and sternum, mediastinum and heart,
trachea and main bronchi, two lungs with smooth parenchymal texture, branching and tapering vessel
trees, and nodules (solid, ground-glass, part-solid; isolated, juxta-vascular, juxta-pleural) of
3-25 mm. Look-alikes a nodule detector confuses with nodules are placed on purpose: vessel
bifurcations, vessel crossings, vessel segments (end-on when they run along z), scars and pleural
bumps. Blur and Gaussian noise finish the image.

Geometry is built in millimetres so that nodule and vessel sizes are physical whatever the voxel
spacing (0.7-1.0 mm in-plane, 1.0-2.5 mm between slices, drawn per subject); the body is scaled to
fill the field of view, so at 128 x 128 voxels the chest is a small one (about 100 mm wide).

Arrays are (x, y, z) in RAS+ voxel order (index i towards patient Right, j Anterior, k Superior),
matching `Volume`. Intensities are Hounsfield units.

Two target tasks mirror the paper's NCS and NCC: `Phantom.nodule_mask` (segmentation) and
`Phantom.candidates` (label 1 = true nodule centre, 0 = look-alike), written to disk by
`write_phantom_dataset` as an MSD/nnU-Net folder plus LUNA16-style candidates.csv:

  python -m genesis_jax.data.phantoms --out data/phantoms --subjects 24 --seed 0

Subject i of the data set drawn with seed s is `make_phantom(subject_seed(s, i), shape)`, so a
pipeline can also generate the same subjects in memory, on the fly, without the files.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import heapq
import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np
from scipy import ndimage
import threadpoolctl

from genesis_jax.data.volume import Volume

# Bump when the generator's output changes, so cached data sets are regenerated.
GENERATOR_VERSION = 2  # 2: candidates.csv in LPS (LUNA16).
MANIFEST = "phantom_manifest.json"

# Codes of `Phantom.tissue`: which structure each voxel was drawn as (before blur and noise).
TISSUE = {"air": 0, "fat": 1, "soft_tissue": 2, "lung": 3, "bone": 4, "vessel": 5, "nodule": 6,
          "lookalike": 7, "airway": 8}

NODULE_KINDS = ("nodule_solid", "nodule_ground_glass", "nodule_part_solid")
LOOKALIKE_KINDS = ("vessel_bifurcation", "vessel_crossing", "vessel_end_on", "vessel", "scar",
                   "pleural_bump")


@dataclasses.dataclass
class Candidate:
  center_vox: tuple[float, float, float]  # Voxel index coordinates (x, y, z), may be fractional.
  label: int  # 1 = true nodule, 0 = look-alike.
  kind: str  # One of NODULE_KINDS or LOOKALIKE_KINDS.
  diameter_mm: float = 0.0  # Equivalent-sphere diameter for nodules; 0 for look-alikes.


@dataclasses.dataclass
class Phantom:
  volume: Volume  # HU, float32 (x, y, z); affine carries this subject's spacing.
  nodule_mask: np.ndarray  # uint8 (x, y, z), 1 inside nodules.
  candidates: list[Candidate]
  # uint8 (x, y, z), TISSUE codes of what each voxel was drawn as. The lung region is the codes
  # lung, vessel, nodule and lookalike together (for lung masks and cube filters).
  tissue: np.ndarray | None = None


# ----------------------------------------------------------------------------- geometry helpers


class _Grid:
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


def _smooth_field(rng: np.random.Generator, shape, cell) -> np.ndarray:
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


def _unit(v) -> np.ndarray:
  v = np.asarray(v, np.float64)
  return v / max(np.linalg.norm(v), 1e-9)


def _random_unit(rng) -> np.ndarray:
  return _unit(rng.standard_normal(3))


def _perpendicular(rng, d) -> np.ndarray:
  v = rng.standard_normal(3)
  return _unit(v - np.dot(v, d) * d)


def _cross(a, b) -> np.ndarray:
  """Cross product of two 3-vectors (np.cross costs ~50 us a call; this is a hot loop)."""
  (a0, a1, a2), (b0, b1, b2) = a.tolist(), b.tolist()
  return np.array([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


def _rotate(d, axis, angle) -> np.ndarray:
  """Rodrigues rotation of vector d about unit `axis` by `angle` radians."""
  c, s = np.cos(angle), np.sin(angle)
  return d * c + _cross(axis, d) * s + axis * (float(axis @ d) * (1 - c))


def _random_rotation(rng) -> np.ndarray:
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  return q * np.sign(np.diag(r))


@dataclasses.dataclass
class _Segment:
  p0: np.ndarray  # mm
  p1: np.ndarray  # mm
  r0: float  # radius at p0, mm
  r1: float  # radius at p1, mm


def _capsule(grid: _Grid, seg: _Segment, edge: float):
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


def _tubes(grid: _Grid, segs: list[_Segment], edge: float, piece_mm: float = 3.0) -> np.ndarray:
  """Soft occupancy volume of the union of tapered tubes (max over tubes).

  Thick tubes are drawn one by one in their own boxes; the many thin ones are cut into pieces of
  at most `piece_mm` (a capsule chain with interpolated radii is the same tube) and drawn in one
  vectorised pass over equal-sized boxes, which keeps a tree of ~1000 segments cheap.
  """
  occ = np.zeros(grid.shape, np.float32)
  thin_r = 1.2
  thick = [s for s in segs if max(s.r0, s.r1) > thin_r]
  for seg in thick:
    out = _capsule(grid, seg, edge)
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


def _blob(grid: _Grid, rng, centre, radii, rotation, edge: float, lobulation: float = 0.0):
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
      v = _random_unit(rng)
      c = np.maximum((u[0] * v[0] + u[1] * v[1] + u[2] * v[2]) / rho, 0)
      scale += np.float32(rng.uniform(-0.5, 1.0) * lobulation) * c ** 4
    rho = rho / scale
  mean_r = float(np.exp(np.log(radii).mean()))
  return sl, np.clip(0.5 + (1 - rho) * mean_r / edge, 0, 1).astype(np.float32)


def _paint(hu, sl, alpha, value):
  """Alpha-blend `value` (scalar or array of the box's shape) into hu[sl], in place."""
  box = hu[sl]
  box += alpha * (value - box)


# ----------------------------------------------------------------------------- anatomy


def _fill(hu, tissue, where, value, code):
  """hu[where] = value and tissue[where] = code; `where`/`value` broadcast against the volume."""
  np.copyto(hu, value, where=where)
  np.copyto(tissue, np.uint8(code), where=where)


def _anatomy(rng, grid: _Grid):
  """Body, bones, mediastinum and lungs: (hu float32, tissue uint8, lung mask, lungs, info)."""
  g = grid
  half = np.asarray(g.shape) * g.spacing / 2  # Half field of view per axis, mm.
  hu = np.full(g.shape, -1000.0, np.float32)
  tissue = np.zeros(g.shape, np.uint8)

  # Body cross-section: an ellipse, constant along z. Thicknesses are in units of rb.
  ax_b, ay_b = rng.uniform(0.82, 0.94) * half[0], rng.uniform(0.62, 0.78) * half[1]
  cy_b = rng.uniform(-0.06, 0.02) * half[1]
  rb = np.sqrt((g.x / ax_b) ** 2 + ((g.y - cy_b) / ay_b) ** 2)  # (X, Y, 1)
  mean_ab = (ax_b + ay_b) / 2
  t_fat = rng.uniform(2.5, 8.0) / mean_ab
  t_muscle = rng.uniform(4.0, 8.0) / mean_ab
  squeeze = min(1.0, 0.3 / (t_fat + t_muscle))  # Small fields of view keep a roomy rib cage.
  t_fat, t_muscle = t_fat * squeeze, t_muscle * squeeze
  r_cavity = 1 - t_fat - t_muscle
  _fill(hu, tissue, rb < 1, np.float32(rng.uniform(-115, -85)), TISSUE["fat"])
  soft = _smooth_field(rng, g.shape, (10, 10, 6))  # Organ/muscle heterogeneity and fat pockets.
  hu_soft = np.float32(rng.uniform(35, 50)) + 8 * soft
  _fill(hu, tissue, rb < 1 - t_fat, hu_soft, TISSUE["soft_tissue"])
  # Mediastinal and abdominal fat: the fatty end of the same field, inside the rib cage only.
  _fill(hu, tissue, (rb < r_cavity - 0.05) & (soft > 1.0), np.float32(-90) + 10 * soft,
        TISSUE["fat"])

  # Lungs fill the upper part of the field: their height follows the chest's width (a chest is
  # about as tall as wide) within 65-90% of the field, so below them lies some upper abdomen.
  height = float(np.clip(rng.uniform(0.9, 1.25) * 2 * ax_b, 1.3 * half[2], 1.8 * half[2]))
  z_apex = half[2] - rng.uniform(0.02, 0.10) * 2 * half[2]
  z_base = z_apex - height  # Lowest point of the diaphragm (posterior recess), mm.
  z_taper = z_apex - rng.uniform(0.30, 0.45) * height
  wobble = _smooth_field(rng, g.shape, (14, 14, 10)) * np.float32(rng.uniform(0.05, 0.10))
  heart_c = np.array([rng.uniform(-0.25, -0.08) * ax_b, cy_b + rng.uniform(0.05, 0.25) * ay_b,
                      z_base + rng.uniform(0.25, 0.40) * height])
  heart_r = np.array([rng.uniform(0.26, 0.33) * ax_b, rng.uniform(0.36, 0.45) * ay_b,
                      rng.uniform(0.30, 0.40) * height])
  heart = (((g.x - heart_c[0]) / heart_r[0]) ** 2 + ((g.y - heart_c[1]) / heart_r[1]) ** 2
           + ((g.z - heart_c[2]) / heart_r[2]) ** 2) < 1
  med_half = rng.uniform(0.06, 0.10) * ax_b
  spine_c = np.array([0.0, cy_b - rng.uniform(0.50, 0.60) * ay_b])
  spine_r = rng.uniform(0.12, 0.16) * ax_b
  rs = np.sqrt((g.x - spine_c[0]) ** 2 + (g.y - spine_c[1]) ** 2) / spine_r  # (X, Y, 1)
  canal_y = spine_c[1] - 1.55 * spine_r  # Spinal canal, behind the vertebral body.
  rc = np.sqrt((g.x - spine_c[0]) ** 2 + (g.y - canal_y) ** 2) / spine_r
  apex = np.clip(1 - ((g.z - z_taper) / (z_apex - z_taper)) ** 2, 1e-4, None)
  apex = np.where(g.z > z_taper, apex, 1).astype(np.float32)  # Squared radius scale, (1, 1, Z).
  lung = np.zeros(g.shape, bool)
  lungs = []
  for side in (1, -1):  # +x = patient right (larger lung), -x = left (heart side).
    size = 1.0 if side > 0 else rng.uniform(0.88, 0.97)
    cx = side * rng.uniform(0.44, 0.50) * ax_b
    cy = cy_b + rng.uniform(-0.08, 0.02) * ay_b
    lax = size * rng.uniform(0.42, 0.48) * ax_b
    lay = size * rng.uniform(0.72, 0.82) * ay_b
    r2d = ((g.x - cx) / lax) ** 2 + ((g.y - cy) / lay) ** 2  # (X, Y, 1)
    dome = rng.uniform(0.15, 0.30) * height
    z_dia = z_base + dome * (1 - np.clip(r2d, 0, 1))  # Dome: highest at the lung's centre.
    # Clear of the mediastinum, the rib cage, the vertebral body and the neural arch.
    in_plane = ((side * g.x > med_half) & (r2d < 1.3) & (rb < r_cavity) & (rs > 1.25)
                & (rc > 1.1))
    lung |= (r2d / apex + wobble < 1) & (g.z > z_dia) & (g.z < z_apex) & in_plane
    lungs.append(dict(side=side, c=np.array([cx, cy]), r=np.array([lax, lay]),
                      z=(z_base + dome, z_apex)))
  lung &= ~heart
  _fill(hu, tissue, heart & (rb < r_cavity), hu_soft, TISSUE["soft_tissue"])

  # Lung parenchyma: base density, denser posteriorly (gravity-dependent), smooth texture.
  gradient = rng.uniform(30, 80) * (1 - (g.y - g.y.min()) / (g.y.max() - g.y.min()))
  parenchyma = (_smooth_field(rng, g.shape, (2.5, 2.5, 2.0)) * np.float32(rng.uniform(12, 25))
                + _smooth_field(rng, g.shape, (8, 8, 5)) * np.float32(rng.uniform(8, 20)))
  parenchyma += np.float32(rng.uniform(-870, -790)) + gradient
  _fill(hu, tissue, lung, parenchyma, TISSUE["lung"])

  # Spine: vertebral bodies (cortical rim, cancellous core) with discs every ~20 mm; behind
  # each body the neural arch around the spinal canal, and the spinous process.
  disc_period = rng.uniform(18, 26)
  disc = np.abs(((g.z - rng.uniform(0, disc_period)) / disc_period) % 1 - 0.5) > 0.42  # (1,1,Z)
  cortex, cancellous = np.float32(rng.uniform(700, 950)), np.float32(rng.uniform(320, 420))
  bone = TISSUE["bone"]
  _fill(hu, tissue, (rs < 1) & ~disc, np.where(rs > 0.8, cortex, cancellous), bone)
  _fill(hu, tissue, (rs < 1) & disc, np.float32(80), TISSUE["soft_tissue"])
  _fill(hu, tissue, (rc > 0.5) & (rc < 0.85), cortex, bone)
  _fill(hu, tissue, rc <= 0.5, np.float32(10), TISSUE["soft_tissue"])  # CSF in the canal.
  spinous = ((np.abs(g.x - spine_c[0]) < 0.25 * spine_r) & (g.y < canal_y - 0.8 * spine_r)
             & (g.y > canal_y - 2.0 * spine_r) & (rb < 1 - t_fat))
  _fill(hu, tissue, spinous, np.float32(rng.uniform(450, 700)), bone)
  # Ribs: oval cross-sections in the muscle shell, sloping down anteriorly, one every ~15 mm.
  rib_period = rng.uniform(13, 19)
  rib_h = rng.uniform(4.0, 6.5)  # Cranio-caudal height of a rib, mm.
  rib_slope = rng.uniform(0.5, 0.9)  # mm of z per mm of y (anterior ends lower).
  rib_t = t_muscle * rng.uniform(0.6, 0.85)
  rib_mid = r_cavity + rib_t / 2
  dr = (rb - rib_mid) / (rib_t / 2)  # (X, Y, 1)
  angle = np.arctan2(g.y - cy_b, g.x)  # +pi/2 = anterior midline (sternum).
  shell = (np.abs(dr) < 1) & (np.abs(angle - np.pi / 2) > 0.35)  # (X, Y, 1)
  dz = ((g.z + rib_slope * (g.y - cy_b) - rng.uniform(0, rib_period)) / rib_period) % 1 - 0.5
  rib_e = (dz * (2 * rib_period / rib_h)) ** 2 + dr ** 2
  rib = (rib_e < 1) & shell & (g.z < z_apex + 5) & (g.z > z_base - 15)
  _fill(hu, tissue, rib, np.where(rib_e > 0.55, np.float32(rng.uniform(650, 900)),
                                  np.float32(rng.uniform(330, 450))), bone)
  sternum = ((np.abs(g.x) < 0.10 * ax_b) & (np.abs(dr) < 1) & (g.y > cy_b)
             & (g.z > z_base + 0.3 * height) & (g.z < z_apex))
  _fill(hu, tissue, sternum, np.float32(rng.uniform(350, 550)), bone)
  # Chest width relative to an ~95 mm one (128 voxels at ~0.85 mm): smaller fields of view
  # get proportionally thinner vessel trunks, so vessels do not crowd out the lung.
  scale = min(1.0, 2 * ax_b / 95.0)
  return hu, tissue, lung, lungs, dict(z_apex=z_apex, spine_c=spine_c, spine_r=spine_r,
                                       scale=scale)


def _airways(rng, grid: _Grid, hu, tissue, lungs, info, edge):
  """Trachea down the mediastinum, splitting at the carina into a main bronchus per lung."""
  z_carina = info["z_apex"] - rng.uniform(0.40, 0.55) * (info["z_apex"] - lungs[0]["z"][0])
  y_tr = info["spine_c"][1] + info["spine_r"] * rng.uniform(1.6, 2.2)
  r_tr = rng.uniform(4.0, 6.0) * info["scale"]
  carina = np.array([0.0, y_tr, z_carina])
  segs = [_Segment(np.array([0.0, y_tr, grid.z.max() + 5]), carina, r_tr, r_tr)]
  hila = []
  for lg in lungs:
    hilum = np.array([lg["c"][0] - lg["side"] * lg["r"][0] * 0.55, lg["c"][1],
                      z_carina - rng.uniform(4, 10)])
    segs.append(_Segment(carina, hilum, r_tr * 0.75, r_tr * 0.55))
    hila.append(hilum)
  wall = rng.uniform(1.0, 1.8) * info["scale"]
  for seg in segs:  # Wall first (soft tissue), then the air lumen inside it.
    for r_add, value, code in ((wall, 40.0, TISSUE["soft_tissue"]),
                               (0.0, -1000.0, TISSUE["airway"])):
      out = _capsule(grid, _Segment(seg.p0, seg.p1, seg.r0 + r_add, seg.r1 + r_add), edge)
      if out is not None:
        sl, a = out
        _paint(hu, sl, a, np.float32(value))
        tissue[sl][a > 0.5] = code
  return hila


def _grow_vessels(rng, grid: _Grid, lung, root, direction, radius, budget):
  """A tapering vessel tree grown from `root` (mm) inside the lung mask.

  Monopodial, like pulmonary arteries: each segment continues into a slightly thinner main branch
  and often gives off a thinner side branch. Segments are grown thickest first, so when the
  `budget` of segments runs out it is the finest vessels that are missing.
  """

  def inside(p):
    idx = grid.index(p)
    return idx is not None and lung[idx]

  segs, branch_points = [], []
  heap = [(-radius, 0, np.asarray(root, np.float64), _unit(direction))]
  order = 1  # Tie-breaker, so the heap never compares arrays.
  while heap and len(segs) < budget:
    neg_r, _, p, d = heapq.heappop(heap)
    r = -neg_r
    for attempt in range(6):  # Tries at a direction whose end stays in the lung, wider each time.
      nd = _unit(d + (0.15 + 0.3 * attempt) * rng.standard_normal(3))
      length = float(np.clip(r * rng.uniform(3, 6), 1.5, 10))
      q = p + nd * length
      if inside(q) and inside((p + q) / 2):
        break
    else:
      continue
    r_end = r * rng.uniform(0.93, 0.99)
    segs.append(_Segment(p, q, r, r_end))
    if r_end < 0.35:
      continue
    axis = _perpendicular(rng, nd)
    heapq.heappush(heap, (-r_end * rng.uniform(0.90, 0.98), order,
                          q, _rotate(nd, axis, rng.uniform(0.05, 0.25))))
    if rng.uniform() < 0.85:
      branch_points.append((q, r_end, nd))
      heapq.heappush(heap, (-r_end * rng.uniform(0.5, 0.8), order + 1,
                            q, _rotate(nd, axis, -rng.uniform(0.5, 1.2))))
    order += 2
  return segs, branch_points


# ----------------------------------------------------------------------------- lesions


def _march_to_pleura(rng, grid: _Grid, lung, start, max_mm=80.0):
  """The lung boundary point reached from `start` along a random direction, and the direction."""
  d = _random_unit(rng)
  step = 0.5 * float(grid.spacing.min())
  p = np.asarray(start, np.float64)
  for _ in range(int(max_mm / step)):
    q = p + d * step
    idx = grid.index(q)
    if idx is None or not lung[idx]:
      return p, d
    p = q
  return None


def _sphere_in_lung(grid: _Grid, lung, c, r, fraction=1.0) -> bool:
  """Whether the centre and (at least `fraction` of) 26 points on the sphere lie in the lung."""
  offs = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                   if (i, j, k) != (0, 0, 0)], np.float64)
  offs = offs / np.linalg.norm(offs, axis=1, keepdims=True) * r
  c_idx = grid.index(c)
  if c_idx is None or not lung[c_idx]:
    return False
  hits = [(idx := grid.index(c + o)) is not None and lung[idx] for o in offs]
  return np.mean(hits) >= fraction


class _Occupancy:
  """Spheres already claimed by lesions, so lesions and look-alikes do not overlap."""

  def __init__(self):
    self.items: list[tuple[np.ndarray, float]] = []

  def free(self, c, r, margin) -> bool:
    return all(np.linalg.norm(c - c2) > r + r2 + margin for c2, r2 in self.items)

  def add(self, c, r):
    self.items.append((np.asarray(c, np.float64), float(r)))


def _place_nodules(rng, grid, hu, tissue, lung, lung_idx, segs, edge, claimed):
  """Draw nodules into hu; returns (mask, [(centre_mm, diameter_mm, kind)])."""
  mask = np.zeros(grid.shape, np.uint8)
  nodules = []
  n = int(rng.integers(1, 5))
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
        c = on + _perpendicular(rng, _unit(s.p1 - s.p0)) * r * rng.uniform(0.6, 1.0)
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
    rot = _random_rotation(rng)
    out = _blob(grid, rng, centre, radii, rot, edge, lobulation=rng.uniform(0.0, 0.35))
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
    _paint(hu, sl, alpha, value)
    if kind == "nodule_part_solid":
      core = _blob(grid, rng, centre, radii * rng.uniform(0.35, 0.6), rot, edge)
      if core is not None:
        csl, calpha = core
        _paint(hu, csl, calpha * lung[csl], np.float32(rng.uniform(0, 80)))
    if kind == "nodule_solid" and rng.uniform() < 0.4:  # Spiculation: thin strands outwards.
      for _ in range(int(rng.integers(3, 8))):
        d = _random_unit(rng)
        spike = _Segment(centre + d * r * 0.7, centre + d * r * rng.uniform(1.4, 2.0),
                         rng.uniform(0.5, 0.9), 0.25)
        sp = _capsule(grid, spike, edge)
        if sp is not None:
          ssl, sa = sp
          _paint(hu, ssl, sa * lung[ssl], np.float32(20))
    mask[sl][inside] = 1
    tissue[sl][inside] = TISSUE["nodule"]
    claimed.add(centre, r)
    # Report the drawn size (lobulation and the pleura change it): equivalent-sphere diameter.
    volume_mm3 = float(inside.sum()) * float(np.prod(grid.spacing))
    nodules.append((centre, (6 * volume_mm3 / np.pi) ** (1 / 3), kind))
  return mask, nodules


def _lookalikes(rng, grid, hu, tissue, lung, lung_idx, segs, branch_points, edge, claimed):
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
      d1 = _unit(s.p1 - s.p0)
      p = s.p0 + rng.uniform(0.3, 0.7) * (s.p1 - s.p0)
      r1 = 0.5 * (s.r0 + s.r1)
      d2 = _perpendicular(rng, d1)
      d2 = _unit(d2 + d1 * rng.uniform(-0.5, 0.5))
      r2 = r1 * rng.uniform(0.6, 1.0)
      off = _unit(_cross(d1, d2)) * (r1 + r2) * rng.uniform(0.2, 0.9)
      half_len = rng.uniform(6, 14)
      q0, q1 = p + off - d2 * half_len, p + off + d2 * half_len
      idx0, idx1 = grid.index(q0), grid.index(q1)
      if idx0 is None or idx1 is None or not (lung[idx0] and lung[idx1]):
        continue
      if take(p + off / 2, "vessel_crossing", r1 + r2):
        extra.append(_Segment(q0, q1, r2 * 1.05, r2 * 0.95))
        break
  # Bifurcations of visible vessels.
  forks = [b for b in branch_points if b[1] >= 0.8]
  for i in rng.permutation(len(forks))[:int(rng.integers(3, 6))]:
    take(forks[i][0], "vessel_bifurcation", forks[i][1] * 2)
  # Vessel segments; those running along z look like round blobs on axial slices.
  for i in rng.permutation(len(visible))[:int(rng.integers(3, 6))]:
    s = visible[i]
    d = _unit(s.p1 - s.p0)
    take(s.p0 + rng.uniform(0.3, 0.7) * (s.p1 - s.p0),
         "vessel_end_on" if abs(d[2]) > 0.7 else "vessel", s.r0 * 2)
  # Scars: flat, elongated, irregular soft-tissue densities.
  for _ in range(int(rng.integers(1, 3))):
    for _ in range(20):
      c = grid.to_mm(np.unravel_index(lung_idx[rng.integers(len(lung_idx))], grid.shape))
      radii = np.array([rng.uniform(5, 12), rng.uniform(1.5, 3.5), rng.uniform(0.6, 1.4)])
      if _sphere_in_lung(grid, lung, c, 3.0) and take(c, "scar", radii[0]):
        b = _blob(grid, rng, c, radii, _random_rotation(rng), edge, lobulation=0.5)
        if b is not None:
          sl, a = b
          a *= lung[sl] * np.float32(rng.uniform(0.6, 1.0))
          _paint(hu, sl, a, np.float32(rng.uniform(-250, 30)))
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
      e1 = _perpendicular(rng, normal)
      rot = np.stack([normal, e1, _cross(normal, e1)], axis=1)  # Columns: the blob's axes.
      if take(b_pt - normal * thick / 2, "pleural_bump", radii.max()):
        bl = _blob(grid, rng, b_pt, radii, rot, edge, lobulation=0.2)
        if bl is not None:
          sl, a = bl
          a *= lung[sl]
          _paint(hu, sl, a, np.float32(rng.uniform(10, 70)))
          tissue[sl][a > 0.5] = TISSUE["lookalike"]
        break
  return out, extra


# ----------------------------------------------------------------------------- subjects


def make_phantom(seed: int, shape=(128, 128, 96)) -> Phantom:
  """One phantom subject, fully determined by `seed`; `shape` is (x, y, z) voxels."""
  # One BLAS thread: the smooth fields are small matrix products, and a multi-threaded BLAS on
  # busy cores (data-loader workers, a training step) is many times slower than one thread.
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    return _make_phantom(seed, shape)


def _make_phantom(seed: int, shape) -> Phantom:
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3 or min(shape) < 32:
    raise ValueError(f"Phantom shape must be 3 sizes >= 32 (x, y, z), got {shape}.")
  rng = np.random.default_rng(seed)
  spacing = np.array([rng.uniform(0.7, 1.0), 0.0, rng.uniform(1.0, 2.5)])
  spacing[1] = spacing[0]
  grid = _Grid(shape, spacing)
  edge = float(spacing[:2].mean())  # Partial-volume ramp of drawn edges, mm.

  hu, tissue, lung, lungs, info = _anatomy(rng, grid)
  hila = _airways(rng, grid, hu, tissue, lungs, info, edge)
  lung_idx = np.flatnonzero(lung)
  if lung_idx.size == 0:
    raise ValueError(f"Phantom seed {seed}, shape {shape}: no lung voxels were drawn.")

  # About one vessel segment per 80 mm^3 of lung (about 1,500 at 128 x 128 x 96), 9 trees a lung.
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
      s, b = _grow_vessels(rng, grid, lung, root, target - root, trunk_r, budget=budget)
      segs += s
      branch_points += b

  claimed = _Occupancy()
  mask, nodules = _place_nodules(rng, grid, hu, tissue, lung, lung_idx, segs, edge, claimed)
  fakes, extra = _lookalikes(rng, grid, hu, tissue, lung, lung_idx, segs, branch_points, edge,
                             claimed)
  # Vessels last, from their own occupancy: nodules stay whole (a juxta-vascular nodule swallows
  # the vessel it touches) and scars and pleural bumps are only half covered.
  vessel = _tubes(grid, segs + extra, edge)
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
  candidates = [Candidate(tuple(float(v) for v in grid.to_vox(c)), 1, kind, float(d))
                for c, d, kind in nodules]
  candidates += [Candidate(tuple(float(v) for v in grid.to_vox(c)), 0, kind) for c, kind in fakes]
  candidates = [candidates[i] for i in rng.permutation(len(candidates))]
  return Phantom(Volume(hu, affine, f"phantom:{seed}"), mask, candidates, tissue)


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


# ----------------------------------------------------------------------------- data set on disk


def _manifest(n_subjects: int, seed: int, shape) -> dict:
  return {"generator": "genesis_jax.data.phantoms", "version": GENERATOR_VERSION,
          "n_subjects": int(n_subjects), "seed": int(seed), "shape": [int(n) for n in shape]}


def _is_complete(root: pathlib.Path, manifest: dict) -> bool:
  try:
    found = json.loads((root / MANIFEST).read_text())
  except (OSError, ValueError):
    return False
  if found != manifest:
    return False
  names = [subject_name(i) for i in range(manifest["n_subjects"])]
  return ((root / "dataset.json").is_file() and (root / "candidates.csv").is_file()
          and all((root / "imagesTr" / f"{n}_0000.nii.gz").is_file() for n in names)
          and all((root / "labelsTr" / f"{n}.nii.gz").is_file() for n in names))


def _nifti(data: np.ndarray, affine: np.ndarray):
  import nibabel as nib  # Imported here: generating phantoms in memory does not need it.
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)  # 1 = scanner coordinates.
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm")
  return img


_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def _write_all(tmp: pathlib.Path, n_subjects: int, seed: int, shape) -> None:
  (tmp / "imagesTr").mkdir()
  (tmp / "labelsTr").mkdir()
  training = []
  with open(tmp / "candidates.csv", "w", newline="") as fc, \
      open(tmp / "annotations.csv", "w", newline="") as fa:
    cands, annos = csv.writer(fc), csv.writer(fa)
    cands.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
    annos.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
    for i in range(n_subjects):
      name = subject_name(i)
      ph = make_phantom(subject_seed(seed, i), shape)
      affine = ph.volume.affine
      image = np.rint(ph.volume.data).astype(np.int16)
      _nifti(image, affine).to_filename(str(tmp / "imagesTr" / f"{name}_0000.nii.gz"))
      _nifti(ph.nodule_mask.astype(np.uint8), affine).to_filename(
          str(tmp / "labelsTr" / f"{name}.nii.gz"))
      for c in ph.candidates:
        # LUNA16 / ITK convention: world coordinates in LPS (RAS with x and y negated).
        world = (affine @ np.array([*c.center_vox, 1.0]))[:3] * _RAS_TO_LPS
        row = [name, *(f"{w:.3f}" for w in world)]
        cands.writerow(row + [c.label])
        if c.label == 1:
          annos.writerow(row + [f"{c.diameter_mm:.2f}"])
      training.append({"image": f"./imagesTr/{name}_0000.nii.gz",
                       "label": f"./labelsTr/{name}.nii.gz"})
  dataset = {
      "name": "GenesisPhantomChestCT",
      "description": "Procedural chest-CT phantoms (genesis_jax.data.phantoms); HU, RAS+.",
      "channel_names": {"0": "CT"},
      "labels": {"background": 0, "nodule": 1},
      "numTraining": n_subjects,
      "file_ending": ".nii.gz",
      "training": training,
  }
  (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2))
  # The manifest goes last: its presence (after the rename) marks a complete data set.
  (tmp / MANIFEST).write_text(json.dumps(_manifest(n_subjects, seed, shape), indent=2))


def write_phantom_dataset(root, n_subjects: int, seed: int = 0,
                          shape=(128, 128, 96)) -> pathlib.Path:
  """Writes (or reuses) an MSD/nnU-Net style phantom data set at `root`; returns its path.

  Layout: imagesTr/phantom_XXX_0000.nii.gz (int16 HU), labelsTr/phantom_XXX.nii.gz (uint8 nodule
  mask), dataset.json, candidates.csv and annotations.csv (LUNA16 columns; coordinates are world
  millimetres in LUNA16's LPS frame, i.e. affine @ (i, j, k, 1) with x and y negated), and
  phantom_manifest.json. The set is built in a sibling temporary folder and renamed into place,
  so `root` is either absent or complete; a complete set with the same (n_subjects, seed, shape)
  is reused as is, one from other parameters is replaced, and any other non-empty folder at
  `root` is an error (never deleted).
  """
  root = pathlib.Path(root)
  shape = tuple(int(n) for n in shape)
  if n_subjects < 1:
    raise ValueError(f"write_phantom_dataset({root}): n_subjects must be >= 1, got {n_subjects}.")
  manifest = _manifest(n_subjects, seed, shape)
  if _is_complete(root, manifest):
    return root
  if root.exists() and not (root / MANIFEST).is_file() and any(root.iterdir()):
    raise ValueError(f"{root} exists, is not empty and holds no {MANIFEST}: refusing to "
                     "overwrite it with a phantom data set; choose another folder.")
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
  os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is meant to be shared.
  old = None
  try:
    _write_all(tmp, n_subjects, seed, shape)
    if root.exists():  # An empty folder, or a phantom set from other parameters.
      old = root.with_name(f".{root.name}.old-{os.getpid()}-{time.monotonic_ns()}")
      os.rename(root, old)
    try:
      os.rename(tmp, root)
    except OSError:
      # Someone else renamed a data set into place in the meantime: use it if it is the one.
      if _is_complete(root, manifest):
        return root
      raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  return root


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m genesis_jax.data.phantoms",
      description="Write the built-in procedural chest-CT phantom data set (NIfTI, MSD layout).")
  parser.add_argument("--out", required=True, help="Data set folder to create (or reuse).")
  parser.add_argument("--subjects", type=int, default=24, help="Number of subjects.")
  parser.add_argument("--seed", type=int, default=0, help="Data set seed.")
  parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96),
                      metavar=("X", "Y", "Z"), help="Voxels per subject along x, y, z.")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  root = write_phantom_dataset(args.out, args.subjects, args.seed, tuple(args.shape))
  with open(root / "candidates.csv") as f:
    labels = [int(r["class"]) for r in csv.DictReader(f)]
  print(f"{root}: {args.subjects} subjects of {tuple(args.shape)}, {len(labels)} candidates "
        f"({sum(labels)} nodules), {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
  main()
